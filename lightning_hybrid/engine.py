"""The hybrid engine: DeepSpeed's ``DeepSpeedHybridEngine`` with a portable inference path.

DeepSpeed's engine builds CUDA kernel containers for the whole model at construction,
which fails on CPU, misses PEFT LoRA, and silently falls back for architectures it has no
policy for. This subclass keeps everything else of it (rank-synced RNG, ``Z3_enabled``,
``gather_all_layers``, ``eval()``/``train()``) and decides the inference path itself:

* ``"torch"``: the portable path. The generation module runs as the Hugging Face model it
  is, with weights materialized by ``gather.py``, LoRA fused by ``lora.py`` and its KV cache
  chosen by ``workspace.py``. Works on any device and any causal LM.
* ``"deepspeed"``: DeepSpeed's kernel containers for the generation module's decoder layers
  (CUDA only), under a parity guard against the portable path (see ``kernels.py``).
"""

from __future__ import annotations

import hashlib

import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine
from torch import nn

from .config import HybridEngineSettings
from .deepspeed_compat import GatherCounter
from .gather import FrozenWeightCache, LayerwiseGather, Materializer, NoGather, PinnedGather
from .inference_tp import TensorParallelGather
from .kernels import KERNEL_BACKEND, KernelPath, KernelRouting, ParityGuard, select_backend
from .training_tp import data_parallel_rank, replace_batch_check
from .workspace import InferenceWorkspace
from .zero3_leaves import keep_leaf_gradients, mark_leaves

__all__ = ["HybridEngine", "resolve_generation_module", "select_backend"]


def resolve_generation_module(root: nn.Module, path: str | None) -> tuple[str, nn.Module]:
    """The model that generates: ``path`` inside ``root`` ("" is ``root``), else its only submodule with
    ``generate``, else ``root`` itself when it generates."""
    if path is None:
        found: list[str] = []
        for name, module in root.named_modules():
            if name and callable(getattr(module, "generate", None)):
                if not any(name.startswith(f"{outer}.") for outer in found):
                    found.append(name)
        if not found and callable(getattr(root, "generate", None)):
            return "", root  # e.g. a Hugging Face model given to fabric.setup as it is
        if len(found) != 1:
            what = "no submodule" if not found else f"{len(found)} submodules ({', '.join(found)})"
            raise ValueError(
                f"`generation_module=None` needs exactly one submodule of {type(root).__name__} with a `generate`"
                f" method, found {what}. Pass `HybridEngineStrategy(generation_module='<attribute path>')`"
                + (f", e.g. generation_module={found[0]!r}." if found else ".")
            )
        path = found[0]
    module: nn.Module = root
    for part in path.split(".") if path else ():
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            options = [n for n, _ in module.named_children()]
            raise ValueError(
                f"`generation_module={path!r}`: {type(module).__name__} has no submodule {part!r}."
                f" Its submodules are {options}. Set generation_module to the dotted path of the actor."
            )
        module = child
    if not callable(getattr(module, "generate", None)):
        raise ValueError(
            f"`generation_module={path!r}` is a {type(module).__name__}, which has no `generate` method."
            " Point generation_module at a Hugging Face causal LM (or a PEFT model wrapping one)."
        )
    return path, module


class HybridEngine(DeepSpeedHybridEngine):
    """``DeepSpeedHybridEngine`` whose inference path is chosen by the strategy."""

    def __init__(
        self,
        args,
        model: nn.Module,
        *,
        settings: HybridEngineSettings,
        backend: str,
        generation_path: str | None,
        **kwargs,
    ) -> None:
        # DeepSpeedHybridEngine.__init__ minus what only kernel containers need: its
        # WorkspaceOp() would JIT-compile DeepSpeed's CUDA inference ops for nothing.
        mark_leaves(model, settings.zero3_leaf_modules)  # read by ZeRO-3 as it hooks the modules
        DeepSpeedEngine.__init__(self, args, model, **kwargs)
        if self.zero_optimization_stage() == 3:
            keep_leaf_gradients(model)
        replace_batch_check(self)  # tensor-parallel training: one that reads Lightning's nested batches
        synced = get_accelerator().get_rng_state().to(get_accelerator().current_device_name())
        dist.broadcast(synced, 0)
        get_accelerator().set_rng_state(synced.cpu())
        self.settings = settings  # the strategy's own object: the one source of every setting
        self.backend = backend  # "torch" (portable) or "deepspeed" (kernel containers), as select_backend picked
        self.Z3_enabled = self.zero_optimization_stage() == 3
        self.gather_all_layers = settings.pin_parameters  # DeepSpeedHybridEngine's name for it
        self._inference_containers, self._orig_modules, self._orig_fwds = [], [], []
        self.create_inference_module(generation_path)
        self.is_lora_fused = False
        self._decode_graphs = None
        self.in_inference = False
        self.kv_workspace = InferenceWorkspace(settings.max_out_tokens, settings.release_inference_cache)
        self.frozen_cache = FrozenWeightCache() if settings.cache_frozen_weights else None
        self.held: PinnedGather | None = None  # gather_once_per_step: the actor gathered until the backward
        self.actor_gathers = GatherCounter(list(self.generation_module.parameters())) if self.Z3_enabled else None
        self.generation_rng = self._seed_generation_rng()
        self.said: set[str] = set()  # one-time notices already given (e.g. why prompts could not be shared)

    # -- construction ------------------------------------------------------------------
    def create_inference_module(self, generation_path: str | None = None) -> None:
        """DeepSpeed's hook for building inference containers; the portable path builds none."""
        self.layer_params, self.layer_lora_params, self.lora_params, self.all_lora_params = [], [], [], []
        self._other_layers, self._orig_modules_others, self._orig_fwds_others = [], [], []
        self.mp_group, self.mp_replace = None, None
        self.inference_policies = {}
        self.all_layers_params = list(self.module.parameters())
        _, generation_module = resolve_generation_module(self.module, generation_path)
        # Not a registered submodule: it already is one, inside the LightningModule.
        self.__dict__["generation_module"] = generation_module
        self.kernels: KernelRouting | None = None
        if self.backend == KERNEL_BACKEND:
            # Containers for the generation module only; reference/reward models stay as they are.
            path = KernelPath(
                generation_module,
                max_out_tokens=self.settings.max_out_tokens,
                release_inference_cache=self.settings.release_inference_cache,
                transform_per_forward=self.Z3_enabled and not self.settings.pin_parameters,
            )
            on_mismatch = "raise" if self.settings.inference_backend == KERNEL_BACKEND else "fallback"
            self.kernels = KernelRouting(path, ParityGuard(self.settings.kernel_check_interval), on_mismatch)

    def _seed_generation_rng(self) -> dict[str, torch.Tensor]:
        """A sampling RNG stream of its own, so generation never shifts the training RNG stream.

        Seeded from the RNG state DeepSpeed just synced across ranks, plus the data-parallel rank,
        so replicas draw different samples, the ranks of a tensor-parallel group the same ones
        (they compute one batch together), and a rerun draws the same ones.
        """
        synced = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()
        base = int.from_bytes(hashlib.sha256(synced.numpy().tobytes()).digest()[:7], "little")
        seed = base + data_parallel_rank(self)  # a tensor-parallel group shares one stream
        states = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.Generator(self.device).manual_seed(seed).get_state()
        return states

    # -- mode switching -----------------------------------------------------------------
    def eval(self) -> None:
        # DeepSpeed's eval() swaps in kernel containers and print()s latencies. With no
        # containers it is a plain eval(): Lightning's validation runs the training model.
        DeepSpeedEngine.eval(self)

    def train(self, mode: bool = True) -> None:
        DeepSpeedEngine.train(self, mode)

    # -- training, with the actor held gathered (gather_once_per_step) ----------------------
    def backward(self, loss, *args, **kwargs):
        try:
            return super().backward(loss, *args, **kwargs)  # gradients reduced into partitions as ZeRO-3 does
        finally:
            self.release_held()

    def step(self, lr_kwargs=None) -> None:
        self.release_held()  # the optimizer writes the partitions: gathered copies must not outlive them
        # DeepSpeed's version also times training for its print()ed report; our metrics do that.
        DeepSpeedEngine.step(self, lr_kwargs=lr_kwargs)

    def save_checkpoint(self, *args, **kwargs):
        self.release_held()
        return super().save_checkpoint(*args, **kwargs)

    def load_checkpoint(self, *args, **kwargs):
        self.release_held()
        return super().load_checkpoint(*args, **kwargs)

    def release_held(self) -> None:
        """Gives a held actor back to ZeRO-3 (partitioned, hooks in place); nothing when none is held."""
        held, self.held = self.held, None
        if held is not None:
            held.release()

    def materializer(self, trainable: set[int], hold: bool = False) -> Materializer:
        """The object that makes the generation module's weights whole for one context.

        ``trainable``: ids of the parameters that required grad before the context began. ``hold``: keep
        the weights gathered after the context, for this training step (``gather_once_per_step``).
        """
        module = self.generation_module
        if not self.Z3_enabled:
            return NoGather(module)
        if self.settings.reslices_for_inference:
            return TensorParallelGather(
                module, self, self.settings.inference_tp_size, self.settings.tp_gather_partition_size
            )
        if self.settings.pin_parameters:
            return PinnedGather(module, self, self.frozen_cache, trainable, hold=hold and self.held is None)
        return LayerwiseGather(module, self, self.settings.tp_gather_partition_size)
