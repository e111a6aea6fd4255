"""What the Trainer's and Fabric's ``HybridEngineStrategy`` share: everything but the Lightning glue.

``HybridEngineCore`` is mixed in front of a Lightning ``DeepSpeedStrategy`` (the Trainer's in
``strategy.py``, Fabric's in ``fabric.py``), as Lightning's two ``ModelParallelStrategy`` classes
share their helpers. It holds the arguments and their validation, the ``hybrid_engine`` config
block, the choice of generation module and backend, building the hybrid engine through
``deepspeed.initialize``, the generation API (``generation()``, ``generate()``,
``generation_stats``, the rank-failure exchange), the sampling RNG in checkpoints, and
``export_actor``. It uses only what both Lightning bases have: ``config``, ``world_size``,
``local_rank``, ``root_device``, ``is_global_zero``, ``barrier`` and ``model`` (the engine).

Each front-end adds its lifecycle hooks and three hooks of this class:
``_check_generation_allowed`` (may a context open now), ``_record_generation`` (where a
context's metrics go) and ``_not_built_message`` (what to do before the engine exists).
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.zero import GatheredParameters
from lightning.fabric.accelerators import CUDAAccelerator
from lightning.fabric.utilities.rank_zero import rank_zero_info
from lightning.pytorch.accelerators import CUDAAccelerator as TrainerCUDAAccelerator
from torch import nn

from .config import HybridEngineSettings, InferenceBackend, KVCache, Sampler, zero_stage
from .deepspeed_compat import disable_shm_comm, forget_model_parallel_groups
from .engine import HybridEngine, resolve_generation_module
from .export import write_hf_directory
from .gather import missing_params
from .generation import GenerationContext, prepare_call
from .hf import say_once
from .inference_tp import check_tp_support
from .kernels import select_backend
from .metrics import GenerationStats
from .training_tp import (
    check_inference_tp,
    check_world_size,
    gather_tensor_parallel_state,
    initialize_kwargs,
    resolve_training_tp,
)
from .zero3_leaves import leaf_classes

CHECKPOINT_KEY = "hybrid_engine"  # the engine's own entry in a checkpoint: the sampling RNG stream


# -- CPU: what Lightning's DeepSpeed strategies refuse, made to work ---------------------------
def cpu_root_device(local_rank: int) -> torch.device:
    """Lightning hands ``root_device.index`` to DeepSpeed as the device rank; a bare "cpu" has None."""
    return torch.device("cpu", local_rank)


def use_plain_gloo() -> None:
    """DeepSpeed's shared-memory collective would JIT-compile for half a minute (and crashes under AutoTP)."""
    disable_shm_comm()


def check_deepspeed_accelerator(device: torch.device) -> None:
    """Refuses a run whose Lightning device and DeepSpeed's accelerator disagree.

    DeepSpeed picks its accelerator once, when it is first imported (CUDA whenever a GPU is visible, unless
    ``DS_ACCELERATOR`` says otherwise). ``accelerator="cpu"`` on a GPU machine would then put the model on
    ``cuda:N`` and the batches on the CPU.
    """
    from deepspeed.accelerator import get_accelerator

    theirs, ours = get_accelerator().device_name(), device.type
    if theirs != ours:
        raise RuntimeError(
            f"Lightning runs this job on {ours!r} but DeepSpeed's accelerator is {theirs!r} (DeepSpeed picks it"
            f" once, when it is first imported). Set DS_ACCELERATOR={ours} in the environment before the job"
            f" starts (before anything imports deepspeed), or choose Trainer/Fabric(accelerator=...) to match"
            f" {theirs!r}."
        )


class HybridEngineCore:
    """DeepSpeed's Hybrid Engine for an RLHF actor, on CUDA and on CPU (see the front-ends' docs).

    Args:
        stage: ZeRO stage (1, 2 or 3) when no ``config`` is given. Default 3.
        max_out_tokens: the longest sequence (prompt plus new tokens) a generation may reach; sizes
            the KV workspace with ``kv_cache="static"`` and DeepSpeed's kernels.
        inference_tp_size: tensor-parallel degree while generating (1 = none).
        release_inference_cache: free the KV cache after every generation (``kv_cache="static"``
            and the kernels' workspace; the dynamic cache is never held between calls).
        pin_parameters: ZeRO-3: gather the whole actor once per generation context (fast);
            False gathers ``tp_gather_partition_size`` decoder layers at a time (bounded memory).
        tp_gather_partition_size: decoder layers gathered at once when ``pin_parameters=False``.
        generation_module: dotted attribute path of the generating model inside the model the
            strategy sets up (the LightningModule, or the module given to ``fabric.setup``); None
            picks its only submodule with a ``generate`` method.
        inference_backend: "torch" (the portable path), "deepspeed" (DeepSpeed's fused CUDA kernel
            containers for the generation module; refused with the reason on CPU and for
            architectures they are known to break) or "auto" (the kernels only where a GPU run
            verified them, else the portable path; says which, once).
        kernel_check_interval: parity guard for the kernels: the first kernel generation and every
            N-th after it are compared with the portable path on a small probe (greedy tokens and
            logits); 1 checks every generation, 0 never. A mismatch raises with the numbers
            ("deepspeed") or switches the run to the portable path with one warning ("auto").
        cache_frozen_weights: ZeRO-3 with ``pin_parameters=True``: keep full copies of the
            actor's frozen weights between generation contexts, so each entry gathers only
            the trainable ones (LoRA). Costs the frozen weights' full size on every rank.
        gather_once_per_step: ZeRO-3 with ``pin_parameters=True``: a generation context inside a training step
            leaves the actor gathered (LoRA unfused, ZeRO-3's hooks off it) through that step's forwards and
            its backward, and gives it back to ZeRO-3 right after the backward (``engine.backward``; before
            the optimizer step, a checkpoint save or load at the latest). One all-gather of the actor per step
            instead of one per pass (generation, policy forward, backward, reference forward); gradients are
            reduced into their partitions by ZeRO-3 as always. Costs: the whole actor stays gathered during
            the backward, and LoRA is fused into copies (``fused_copy_bytes``) so the gathered weights stay
            exact for training. ``hybrid_engine/actor_gathers`` logs the actor sizes all-gathered per step.
        kv_cache: the portable path's KV cache. "dynamic" (transformers' default): grows with the
            sequence, so each step attends over the tokens so far; nothing is held between calls.
            "static": a ``StaticCache`` of ``max_out_tokens`` positions per sequence, allocated once
            and reused across calls and contexts: fixed memory, no allocation per step, but every
            step attends over all ``max_out_tokens`` positions, so short requests pay for the
            full length (2-5% slower than "dynamic" at max_out_tokens = prompt + new on CPU).
        share_prompt_prefill: rows of a ``generate`` call that repeat a prompt (GRPO's groups,
            ``num_return_sequences``) prefill it once and share its KV cache (the portable path with the
            dynamic cache; other calls generate as they come, counted in ``prompt_sharing_skipped``).
        sampler: how a sampled token is drawn inside the context. "inverse_cdf": one uniform number per row
            against the float64 cumulative distribution (``sampling.py``): the same distribution as
            ``torch.multinomial``, 12x cheaper per draw over a 49k vocabulary on CPU, other draws for the same seed.
            "torch": ``torch.multinomial`` (transformers' own draws).
        zero3_leaf_modules: ZeRO-3 only: fetch each transformer block's weights as one unit instead of
            hooking every submodule (DeepSpeed's leaf modules; ``zero3_leaves.py``). ``"auto"``: each Hugging
            Face model's blocks (its ``_no_split_modules``); a list of class names; None: DeepSpeed's default.
            Same results, far fewer hooks per training pass (faster, most of all with LoRA), a whole block's
            weights live at a time.
        oom_split_min_batch: when a generation runs out of memory, it is retried in halves of
            the batch, down to this many rows; below that, a clear error.
        training_tp_size: tensor-parallel degree while *training* (DeepSpeed's AutoTP, the config's
            ``tensor_parallel.autotp_size``): each rank holds 1/T of every sliced linear, ZeRO works over
            the data-parallel group, the sampler shards by data-parallel rank. None: the config's value
            (default 1). See ``training_tp.py``. Trainer only for now.
        mpu: a Megatron-style model-parallel unit for an actor you sliced yourself; passed to every
            ``deepspeed.initialize`` and to ``zero.Init``. Excludes ``training_tp_size > 1``. Trainer only for now.
        **kwargs: every other ``DeepSpeedStrategy`` argument (``config``, ``offload_*``, ...).
    """

    strategy_name = "hybrid_engine"
    _not_built_message = "The hybrid engine does not exist yet."

    def __init__(  # the settings' defaults are HybridEngineSettings' (config.py), their only place
        self,
        *,
        stage: int = 3,
        max_out_tokens: int = HybridEngineSettings.max_out_tokens,
        inference_tp_size: int = HybridEngineSettings.inference_tp_size,
        release_inference_cache: bool = HybridEngineSettings.release_inference_cache,
        pin_parameters: bool = HybridEngineSettings.pin_parameters,
        tp_gather_partition_size: int = HybridEngineSettings.tp_gather_partition_size,
        generation_module: str | None = HybridEngineSettings.generation_module,
        inference_backend: InferenceBackend = HybridEngineSettings.inference_backend,
        cache_frozen_weights: bool = HybridEngineSettings.cache_frozen_weights,
        gather_once_per_step: bool = HybridEngineSettings.gather_once_per_step,
        kv_cache: KVCache = HybridEngineSettings.kv_cache,
        share_prompt_prefill: bool = HybridEngineSettings.share_prompt_prefill,
        sampler: Sampler = HybridEngineSettings.sampler,
        zero3_leaf_modules: str | Sequence[str] | None = HybridEngineSettings.zero3_leaf_modules,
        oom_split_min_batch: int = HybridEngineSettings.oom_split_min_batch,
        kernel_check_interval: int = HybridEngineSettings.kernel_check_interval,
        training_tp_size: int | None = None,
        mpu: Any | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(stage, bool) or stage not in (1, 2, 3):
            raise ValueError(f"`stage` must be 1, 2 or 3, got {stage!r}.")
        if isinstance(kwargs.get("config"), dict):
            kwargs["config"] = copy.deepcopy(kwargs["config"])  # never edit the caller's dict
        super().__init__(stage=stage, **kwargs)  # Lightning's DeepSpeedStrategy (Trainer's or Fabric's)

        self.mpu = mpu
        self.settings = HybridEngineSettings.resolve(
            self.config,
            max_out_tokens=max_out_tokens,
            inference_tp_size=inference_tp_size,
            release_inference_cache=release_inference_cache,
            pin_parameters=pin_parameters,
            tp_gather_partition_size=tp_gather_partition_size,
            generation_module=generation_module,
            inference_backend=inference_backend,
            kernel_check_interval=kernel_check_interval,
            cache_frozen_weights=cache_frozen_weights,
            gather_once_per_step=gather_once_per_step,
            kv_cache=kv_cache,
            share_prompt_prefill=share_prompt_prefill,
            sampler=sampler,
            zero3_leaf_modules=zero3_leaf_modules,
            oom_split_min_batch=oom_split_min_batch,
            zero_stage=zero_stage(self.config),
            training_tp_size=resolve_training_tp(self.config, training_tp_size, mpu),
        )
        check_inference_tp(inference_tp_size, mpu)
        self.generation_module_path = generation_module  # resolved at setup: "" when the model itself generates
        self.backend: str | None = None  # the one picked at setup
        self._said: set[str] = set()  # backend choices already reported, so each is said once
        self.generation_stats: GenerationStats | None = None
        self._in_generation = False

    @property
    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, (CUDAAccelerator, TrainerCUDAAccelerator))

    @property
    def root_device(self) -> torch.device:
        return super().root_device if self._on_cuda else cpu_root_device(self.local_rank)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """The same names in the Trainer's and in Fabric's registry."""
        strategy_registry.register("hybrid_engine", cls, description="Hybrid Engine with ZeRO-3", stage=3)
        for stage in (1, 2, 3):
            strategy_registry.register(
                f"hybrid_engine_stage_{stage}", cls, description=f"Hybrid Engine with ZeRO-{stage}", stage=stage
            )
        strategy_registry.register(
            "hybrid_engine_stage_2_offload",
            cls,
            description="Hybrid Engine with ZeRO-2 and optimizer offload to CPU",
            stage=2,
            offload_optimizer=True,
        )
        strategy_registry.register(
            "hybrid_engine_stage_3_offload",
            cls,
            description="Hybrid Engine with ZeRO-3 and optimizer and parameter offload to CPU",
            stage=3,
            offload_optimizer=True,
            offload_parameters=True,
        )

    # -- before any process: the accelerator and the world size -------------------------------
    def _check_before_launch(self) -> None:
        check_deepspeed_accelerator(self.root_device)
        tp = self.settings.inference_tp_size
        if self.world_size % tp:
            raise ValueError(
                f"`inference_tp_size={tp}` must divide the world size {self.world_size}"
                f" ({self.num_nodes} node(s) x {self.num_processes} process(es)). Pick a divisor of {self.world_size}."
            )
        check_world_size(self.settings.training_tp_size, self.world_size, self.num_nodes, self.num_processes)
        if self.settings.inference_backend == "deepspeed":
            select_backend("deepspeed", self.root_device)

    # -- engine construction ---------------------------------------------------------------
    def _prepare_generation(self, root: nn.Module) -> None:
        """Find the generation module in ``root`` and pick the backend, before the engine is built."""
        path, generation_module = resolve_generation_module(root, self.generation_module_path)
        self.generation_module_path = path
        if self.settings.zero3_leaf_modules is not None:
            # Names the model lacks: said now, not inside DeepSpeed.
            leaf_classes(root, self.settings.zero3_leaf_modules)
        if self.settings.reslices_for_inference:
            check_tp_support(generation_module, self.settings.inference_tp_size)
        self.backend, why = select_backend(self.settings.inference_backend, self.root_device, generation_module)
        say_once(self._said, f"HybridEngineStrategy: {why}; generation module {path!r}.", say=rank_zero_info)

    def _engine_factory(self):
        return functools.partial(
            HybridEngine, settings=self.settings, backend=self.backend, generation_path=self.generation_module_path
        )

    @contextmanager
    def _building_hybrid_engine(self) -> Iterator[None]:
        """Around Lightning's own ``deepspeed.initialize`` call: the engine it builds is ours.

        deepspeed.initialize() constructs ``deepspeed.DeepSpeedHybridEngine`` whenever the config
        enables it; that name points at our subclass for the duration of the call. Lightning's
        deepspeed.initialize() calls take no mpu: the user's, if any, is added. What an earlier
        engine in this process left of its model parallelism in DeepSpeed's globals is cleared first.
        """
        forget_model_parallel_groups()
        original, initialize = deepspeed.DeepSpeedHybridEngine, deepspeed.initialize
        deepspeed.DeepSpeedHybridEngine = self._engine_factory()
        deepspeed.initialize = functools.partial(initialize, **initialize_kwargs(self.mpu))
        try:
            yield
        finally:
            deepspeed.DeepSpeedHybridEngine, deepspeed.initialize = original, initialize

    @property
    def hybrid_engine(self) -> HybridEngine:
        """The engine, once built; a clear error before."""
        engine = self.model
        if not isinstance(engine, HybridEngine):
            raise RuntimeError(self._not_built_message)
        return engine

    # -- generation ----------------------------------------------------------------------
    def _check_generation_allowed(self) -> None:
        """The front-end's precondition for a generation context (the Trainer: a running fit)."""

    def _record_generation(self, stats: GenerationStats, seconds: float) -> None:
        """Where the front-end sends a finished context's metrics (always on ``generation_stats``)."""

    @contextmanager
    def generation(self) -> Iterator[nn.Module]:
        """Switch the actor to inference for a block: gathered, LoRA fused, eval, no grad.

        Yields the generation module itself (a Hugging Face causal LM), whose ``generate``
        takes every argument of transformers' ``generate`` and whose ``__call__`` scores. On
        exit, always: LoRA unfused, weights re-partitioned, ZeRO-3 hooks, train mode,
        ``requires_grad`` and the training RNG stream as they were. Every rank must enter it
        together under ZeRO-3.
        """
        engine = self.hybrid_engine
        self._check_generation_allowed()
        if self._in_generation:
            raise RuntimeError(
                "`strategy.generation()` is already active: generation contexts cannot be nested. Use the `actor`"
                " the outer block yielded."
            )
        context = GenerationContext(engine, self.world_size)
        self._in_generation = True
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            with context as actor:
                yield actor
        except BaseException as error:
            failure = error
            raise
        finally:
            self._in_generation = False
            self.generation_stats = context.stats
            try:
                if engine.Z3_enabled and self.world_size > 1:
                    self._raise_if_any_rank_failed(failure, context.stats)
            finally:
                self._record_generation(context.stats, time.perf_counter() - started)

    def _raise_if_any_rank_failed(self, failure: BaseException | None, stats: GenerationStats) -> None:
        """Under ZeRO-3 every rank leaves the context together: share whether one failed.

        Without this, a rank that raised leaves the others waiting in their next collective
        until the process-group timeout, and they die with a bare "connection closed". The
        same exchange carries each rank's peak memory, for the logger on rank 0.
        """
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(reports, (mine, stats.peak_memory_bytes))
        stats.peak_memory_bytes_per_rank = [peak for _, peak in reports]
        failed = [(rank, report) for rank, (report, _) in enumerate(reports) if report is not None]
        if failed and failure is None:
            rank, report = failed[0]
            raise RuntimeError(f"Generation failed on rank {rank} of {self.world_size}: {report}")

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """One call: ``with self.generation() as actor: return actor.generate(*args, **kwargs)``.

        The request is checked against ``max_out_tokens`` before anything is gathered.
        """
        module = self.hybrid_engine.generation_module
        prepare_call(module, self.settings.max_out_tokens, args, kwargs)
        with self.generation() as actor:
            return actor.generate(*args, **kwargs)

    # -- checkpoints and export ------------------------------------------------------------
    def _refuse_inside_generation(self, what: str) -> None:
        if self._in_generation:
            raise RuntimeError(
                f"{what} was requested inside `strategy.generation()`, where the actor's weights hold fused"
                " LoRA. Call it after the block."
            )

    def _engine_checkpoint_state(self) -> dict[str, Any]:
        """The engine's entry in a checkpoint: the sampling RNG stream, for an exact resume."""
        if isinstance(self.model, HybridEngine):
            return {CHECKPOINT_KEY: {"generation_rng": self.model.generation_rng}}
        return {}

    def _restore_engine_checkpoint_state(self, saved: dict[str, Any] | None) -> None:
        engine = self.model
        if isinstance(engine, HybridEngine):
            if engine.frozen_cache is not None:
                engine.frozen_cache.clear()  # loaded weights: no cached copy can be trusted
            if saved:
                engine.generation_rng = saved["generation_rng"]

    def export_actor(self, directory: str | Path, merge_lora: bool = True) -> None:
        """Write the actor as a Hugging Face directory (call on every rank; rank 0 writes).

        ``merge_lora=True``: one model with LoRA merged. ``False`` (PEFT): the base model in
        ``directory`` and the adapter in ``directory/adapter``.
        """
        if self._in_generation:
            raise RuntimeError("export_actor() cannot run inside `strategy.generation()`: call it after the block.")
        engine = self.hybrid_engine
        engine.release_held()  # exported from the partitions, as ZeRO-3 holds them
        module = engine.generation_module
        params = missing_params(module.parameters(), engine) if engine.Z3_enabled else []
        sliced = self.settings.training_tp_size > 1 or self.mpu is not None
        with GatheredParameters(params, enabled=bool(params)):
            state = None
            if self.is_global_zero or sliced:  # only rank 0 writes; AutoTP slices are made whole by every rank
                state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            if sliced:
                state = gather_tensor_parallel_state(module, state)
        if self.is_global_zero:
            write_hf_directory(module, state, Path(directory), merge_lora)
        self.barrier("export_actor")
