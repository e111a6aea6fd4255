"""The generation context: the actor switched to inference for one block, and back, always.

On entry, in this order (each step registers its own undo, so an exception or an interrupt
at any point unwinds exactly what was done, in reverse):

1. train/eval flags and ``requires_grad`` recorded; the actor goes to eval, gradients off,
   and ``F.linear`` is torch's own again (``gather.native_linear``), on CPU with decoding-sized
   products in whichever bit-identical layout the BLAS runs faster (``decode_linear.py``); sampled
   tokens drawn by the inverse-CDF sampler (``sampling.py``);
2. the training RNG stream is set aside and the generation stream swapped in;
3. the weights are materialized (ZeRO-3 gather) and LoRA fused (``gather.py``); with
   ``gather_once_per_step`` inside a training step they stay gathered after the block, for the step's
   training passes, and the engine gives them back after the backward;
4. ``actor.generate`` is wrapped: requests are checked against ``max_out_tokens`` before any
   work, the call goes through DeepSpeed's kernels where they are on (``kernels.py``, under the
   parity guard) or else gets its KV cache (``workspace.py``; rows that repeat a prompt share one
   prefill of it, ``prefix_cache.py``), ranks are kept in step where the forward has collectives,
   out-of-memory batches are split, each token's log-prob is recorded when asked (``output_logprobs``),
   and time and tokens are counted.
"""

from __future__ import annotations

import copy
import inspect
import traceback
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin

from .decode_linear import decode_linear
from .engine import HybridEngine
from .gather import native_linear
from .hf import base_model, free_accelerator_memory, say_once
from .kernels import KERNEL_BACKEND, PORTABLE_BACKEND
from .metrics import GenerationStats, PeakMemory, Stopwatch
from .prefix_cache import PromptGroups, prefill, sharing_refusal
from .sampling import inverse_cdf_sampling, recording_logprobs
from .training_tp import check_same_request, training_tp_group
from .workspace import CACHE_KWARGS, cache_kwarg

# ``generate``'s own parameters: everything else a call passes is a generation setting or a model input.
_GENERATE_PARAMETERS = frozenset(inspect.signature(GenerationMixin.generate).parameters) - {"self", "kwargs"}


@dataclass
class GenerateCall:
    """One ``generate`` call, normalised once: every argument by name, the settings transformers will use."""

    kwargs: dict[str, Any]  # what ``generate`` is called with: the prompt as ``input_ids`` (or ``inputs_embeds``)
    config: GenerationConfig  # the model's defaults, the call's ``generation_config`` and overrides, validated
    prompt: torch.Tensor  # (batch, length) as the caller passed it (embeddings seen through their first channel)
    output_logprobs: bool = False  # add ``logprobs`` (rows, new tokens) to the output: see ``sampling.py``

    @property
    def eos_ids(self) -> list[int]:
        eos = self.config.eos_token_id
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    @property
    def pad_id(self) -> int:
        """The token transformers pads finished rows with: pad_token_id, else the (first) EOS, else 0."""
        if self.config.pad_token_id is not None:
            return int(self.config.pad_token_id)
        return self.eos_ids[0] if self.eos_ids else 0


def resolve_generation_config(module: nn.Module, kwargs: dict[str, Any]) -> GenerationConfig:
    """The generation config transformers itself builds for this call, validated as ``generate`` validates it.

    The model's ``generation_config``, the call's ``generation_config`` and its keyword overrides merged by
    transformers' own code, so what it refuses (e.g. greedy ``num_return_sequences > 1``) is refused here the same
    way, before any work, and every decision below reads the settings the call will really run with.
    """
    base = base_model(module)
    overrides = {k: v for k, v in kwargs.items() if k not in _GENERATE_PARAMETERS and k != "trust_remote_code"}
    config, _ = base._prepare_generation_config(kwargs.get("generation_config"), **overrides)
    return config


def _generate_signature(model: nn.Module) -> inspect.Signature:
    """The class's ``generate`` signature (the instance's is the context's wrapper); transformers' own where the
    class passes ``*args`` through."""
    own = getattr(type(model), "generate", None)  # a PEFT tuner (LoraModel) forwards it from the instance only
    if own is not None:
        signature = inspect.signature(own)
        if not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
            return signature
    return inspect.signature(GenerationMixin.generate)


def with_settings(kwargs: dict[str, Any], **settings: Any) -> None:
    """Set generation settings on a call, where transformers reads them without a warning.

    A call that passes a ``generation_config`` gets an edited copy of it (keywords beside a config are
    deprecated in transformers); otherwise the settings go in as keywords.
    """
    if isinstance(kwargs.get("generation_config"), GenerationConfig):
        config = copy.deepcopy(kwargs["generation_config"])
        for name, value in settings.items():
            setattr(config, name, value)
        kwargs["generation_config"] = config
        for name in settings:
            kwargs.pop(name, None)
    else:
        kwargs.update(settings)


def prepare_call(module: nn.Module, max_out_tokens: int, args: tuple, kwargs: dict[str, Any]) -> GenerateCall:
    """Validates a ``generate`` call before any work and normalises it (see ``GenerateCall``).

    Positional arguments become keywords (by ``generate``'s signature). Rows that ``num_return_sequences``
    would repeat when sampling are repeated here, as transformers would (``repeat_interleave``), so every path
    below (prompt sharing, out-of-memory halves, tensor-parallel pooling) sees one row per sequence.
    """
    kwargs = dict(kwargs)
    output_logprobs = kwargs.pop("output_logprobs", False)  # ours, not transformers'
    if args:
        bound = _generate_signature(base_model(module)).bind_partial(None, *args).arguments
        for name, value in list(bound.items())[1:]:
            name = "input_ids" if name == "inputs" else name
            if name in kwargs:
                raise TypeError(f"generate() got `{name}` both by position and by keyword. Pass it once.")
            kwargs[name] = value
    if "inputs" in kwargs:
        if "input_ids" in kwargs:
            raise TypeError("generate() got both `inputs` and `input_ids`. Pass the prompt once.")
        kwargs["input_ids"] = kwargs.pop("inputs")
    prompt = kwargs.get("input_ids")
    if prompt is None and isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
        prompt = kwargs["inputs_embeds"][..., 0]
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        raise ValueError(
            "generate() needs `input_ids` as a 2-D (batch, length) tensor, got"
            f" {type(prompt).__name__ if not isinstance(prompt, torch.Tensor) else tuple(prompt.shape)}."
        )
    if prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"generate() got an empty batch (input_ids of shape {tuple(prompt.shape)}): nothing to do.")
    config = resolve_generation_config(module, kwargs)
    prompt_len = prompt.shape[1]
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_len
    if max_new < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new}. Ask for at least one new token.")
    if prompt_len + max_new > max_out_tokens:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new} = {prompt_len + max_new} tokens exceeds"
            f" `max_out_tokens={max_out_tokens}`, the size of the inference workspace. Raise"
            f" HybridEngineStrategy(max_out_tokens=...) to at least {prompt_len + max_new}, or shorten the request."
        )
    if output_logprobs is not False:
        if output_logprobs is not True:
            raise TypeError(f"`output_logprobs` must be a bool, got {output_logprobs!r}.")
        if not config.return_dict_in_generate:
            raise ValueError(
                "output_logprobs=True adds `logprobs` to generate()'s output object: pass"
                " return_dict_in_generate=True as well (then read `out.sequences` and `out.logprobs`)."
            )
        if (config.num_beams or 1) > 1:
            raise ValueError(
                "output_logprobs=True records the log-prob of each sampled or greedy token; beam search keeps"
                f" beams, not draws (num_beams={config.num_beams}). Use output_scores=True for beams, or num_beams=1."
            )
    copies = config.num_return_sequences or 1
    only_prompt = all(k in ("input_ids", "attention_mask") for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    if copies > 1 and (config.num_beams or 1) == 1 and "input_ids" in kwargs and only_prompt:
        kwargs["input_ids"] = kwargs["input_ids"].repeat_interleave(copies, 0)
        if isinstance(kwargs.get("attention_mask"), torch.Tensor):
            kwargs["attention_mask"] = kwargs["attention_mask"].repeat_interleave(copies, 0)
        with_settings(kwargs, num_return_sequences=1)
        config.num_return_sequences = 1
    return GenerateCall(kwargs, config, prompt, output_logprobs)


def _split_rows(kwargs: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    """Two kwargs dicts, each with the first or second half of every per-row tensor."""
    half = rows // 2
    parts: list[dict[str, Any]] = [{}, {}]
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            parts[0][key], parts[1][key] = value[:half], value[half:]
        else:
            parts[0][key] = parts[1][key] = value
    return parts


class GenerationContext:
    """One ``with strategy.generation() as actor:`` block. See the module docstring."""

    def __init__(self, engine: HybridEngine, world_size: int) -> None:
        self.engine = engine
        self.module = engine.generation_module
        self.world_size = world_size
        self.settings = engine.settings
        self.stats = GenerationStats(backend=engine.backend)
        self.training_tp_group = training_tp_group(engine)  # an actor trained tensor-parallel: its group
        self._stack = ExitStack()

    # -- entering ----------------------------------------------------------------------
    def __enter__(self) -> nn.Module:
        self.peak = PeakMemory(self.engine.device)
        # Inside a training step (grad on, training mode): the gathered actor may stay for its training passes.
        self.hold = self.settings.gather_once_per_step and torch.is_grad_enabled() and self.engine.module.training
        self.params = list(self.module.parameters())
        self.trainable = {id(p) for p in self.params if p.requires_grad}
        try:
            self._switch_modes()
            self._swap_rng()
            self._materialize()
            self._wrap_generate()
        except BaseException:
            self._stack.close()
            raise
        self.peak.sample()
        return self.module

    def _switch_modes(self) -> None:
        engine, module = self.engine, self.module
        modes = [(m, m.training) for m in engine.module.modules()]
        grads = [(p, p.requires_grad) for p in self.params]

        def restore() -> None:
            for p, flag in grads:
                p.requires_grad_(flag)
            for m, flag in modes:
                if m.training != flag:  # nn.Module.__setattr__ is slow, and most modules never changed
                    m.training = flag
            engine.in_inference = False

        self._stack.callback(restore)
        engine.in_inference = True
        module.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        self._stack.enter_context(torch.no_grad())
        self._stack.enter_context(native_linear())
        if engine.device.type == "cpu":
            self._stack.enter_context(decode_linear())  # decoding-sized products in the BLAS's faster layout
        if self.settings.sampler == "inverse_cdf":
            self._stack.enter_context(inverse_cdf_sampling())

    def _swap_rng(self) -> None:
        engine = self.engine
        cuda = "cuda" in engine.generation_rng
        training = {"cpu": torch.get_rng_state()}
        if cuda:
            training["cuda"] = torch.cuda.get_rng_state(engine.device)

        def restore() -> None:
            engine.generation_rng["cpu"] = torch.get_rng_state()
            torch.set_rng_state(training["cpu"])
            if cuda:
                engine.generation_rng["cuda"] = torch.cuda.get_rng_state(engine.device)
                torch.cuda.set_rng_state(training["cuda"], engine.device)

        self._stack.callback(restore)
        torch.set_rng_state(engine.generation_rng["cpu"])
        if cuda:
            torch.cuda.set_rng_state(engine.generation_rng["cuda"], engine.device)

    def _materialize(self) -> None:
        watch = Stopwatch(self.engine.device)
        self.materializer = self.engine.materializer(self.trainable, hold=self.hold)
        self._stack.enter_context(self.materializer)
        entered = watch.lap()
        self._booked = (0.0, 0.0)  # layer-gather and fuse seconds of the materializer already in the stats
        self.stats.gather_s += entered - self._book_materializer_time()  # the rest of entering is gathering
        self.stats.gathered_bytes = self.materializer.gathered_bytes
        self.stats.sliced_bytes = self.materializer.sliced_bytes
        self.stats.fused_copy_bytes = self.materializer.fused_copy_bytes
        if self.engine.frozen_cache is not None:
            self.stats.frozen_cache_bytes = self.engine.frozen_cache.nbytes

    def _wrap_generate(self) -> None:
        module, original = self.module, self.module.generate
        had_own = "generate" in module.__dict__

        def restore() -> None:
            if had_own:
                module.generate = original
            else:
                del module.generate

        self._stack.callback(restore)
        self._original_generate = original
        module.generate = self._generate

    # -- generating --------------------------------------------------------------------
    def _generate(self, *args: Any, **kwargs: Any):
        """``actor.generate`` inside the context: normalise, then generate (pooled across a tensor-parallel group,
        or in halves after running out of memory), counting time and tokens."""
        call = prepare_call(self.module, self.engine.settings.max_out_tokens, args, kwargs)
        if self.training_tp_group is not None:
            check_same_request(self.training_tp_group, call.prompt, call.kwargs)
        if self.materializer.collectives_per_forward and self.world_size > 1:
            if call.kwargs.get("synced_gpus") is False:
                raise ValueError(
                    "synced_gpus=False would hang: with pin_parameters=False every forward gathers weights from all"
                    " ranks, so ranks that finish early must keep stepping. Leave synced_gpus unset."
                )
            call.kwargs["synced_gpus"] = True
        watch = Stopwatch(self.engine.device)
        try:
            if self.materializer.pools_ranks:
                output = self._generate_pooled(call)
            else:
                output = self._generate_with_backoff(call, call.kwargs)
        finally:
            self.stats.generate_s += max(watch.lap() - self._book_materializer_time(), 0.0)
            self.peak.sample()
            self.engine.kv_workspace.after_generation()
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        self.stats.calls += 1
        self.stats.prompt_tokens += call.prompt.numel()
        self.stats.new_tokens += sequences.shape[0] * (sequences.shape[1] - call.prompt.shape[1])
        return output

    def _generate_with_backoff(self, call: GenerateCall, kwargs: dict[str, Any]):
        """Generate; on out-of-memory, free what the failed attempt held, then retry each half of the batch.

        The retry runs after the ``except`` block, with the failed attempt's frames cleared: inside it, the
        traceback would still hold that attempt's KV cache and logits, and the retry would run out again.
        """
        try:
            return self._generate_once(call, dict(kwargs))
        except torch.OutOfMemoryError as error:
            failure = error
            traceback.clear_frames(error.__traceback__)  # the attempt's locals (its cache, logits) go now
        self.engine.kv_workspace.release(free=False)
        free_accelerator_memory()
        rows, floor = kwargs["input_ids"].shape[0] if "input_ids" in kwargs else 0, self.settings.oom_split_min_batch
        why = None
        if rows // 2 < floor:
            why = f"the batch of {rows} cannot be halved without going under oom_split_min_batch={floor}"
        elif self.materializer.collectives_per_forward and self.world_size > 1:
            why = "with pin_parameters=False ranks gather weights together, so one rank cannot retry alone"
        elif any(kwargs.get(k) is not None for k in CACHE_KWARGS):
            why = "the call passes its own cache, which cannot be split"
        if why:
            raise RuntimeError(
                f"Out of memory generating {rows} sequences, and {why}. Lower the batch, max_new_tokens or"
                " max_out_tokens, or set pin_parameters=False to gather fewer weights at once."
            ) from failure
        self.stats.oom_splits += 1
        warnings.warn(f"Out of memory generating {rows} sequences: retrying in two halves.", stacklevel=4)
        halves = [self._generate_with_backoff(call, part) for part in _split_rows(kwargs, rows)]
        if not all(isinstance(h, torch.Tensor) for h in halves):
            raise RuntimeError(
                "Out of memory with return_dict_in_generate=True: split outputs cannot be merged. Lower the batch."
            ) from failure
        width = max(h.shape[1] for h in halves)
        return torch.cat([F.pad(h, (0, width - h.shape[1]), value=call.pad_id) for h in halves])

    def _generate_pooled(self, call: GenerateCall) -> torch.Tensor:
        """Tensor parallel: the group's prompts generate as one batch (see ``inference_tp.py``)."""
        if (call.config.num_return_sequences or 1) > 1:
            raise ValueError(
                "With inference_tp_size > 1, beam search with num_return_sequences > 1 cannot be pooled across the"
                " group. Set num_return_sequences=1, or inference_tp_size=1."
            )
        with self.materializer.pooled(call.kwargs, call.pad_id, call.eos_ids) as batch:
            output = self._generate_on_a_backend(call, batch.kwargs)
        return batch.mine(output)

    def _generate_once(self, call: GenerateCall, kwargs: dict[str, Any]):
        """One ``generate`` call, with each sampled token's log-prob recorded when the call asked."""
        if not call.output_logprobs:
            return self._generate_on_a_backend(call, kwargs)
        prompt_length = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else 0
        with recording_logprobs(base_model(self.module), prompt_length) as recorder:
            output = self._generate_on_a_backend(call, kwargs)
        output["logprobs"] = recorder.logprobs(output.sequences, call.eos_ids)
        return output

    def _generate_on_a_backend(self, call: GenerateCall, kwargs: dict[str, Any]):
        """Through DeepSpeed's kernels where they are on (and pass the guard), else the portable path."""
        routing = self.engine.kernels
        if routing is not None and routing.enabled:
            # No StaticCache here: the kernels keep their KV cache in DeepSpeed's own workspace.
            dtype = next(self.module.parameters()).dtype
            output = routing.generate(self._original_generate, kwargs, self.stats, dtype)
            if output is not None:
                self.stats.backend = KERNEL_BACKEND
                return output
        self.stats.backend = PORTABLE_BACKEND
        self._attach_workspace(kwargs, call.config)
        # Layer-wise gathering has collectives in every forward: all ranks must prefill, or none.
        self._share_prompts(
            kwargs, call.config, ranks_agree=self.materializer.collectives_per_forward and self.world_size > 1
        )
        return self._original_generate(**kwargs)

    def _share_prompts(self, kwargs: dict[str, Any], config: GenerationConfig, ranks_agree: bool) -> None:
        """Rows repeating a prompt: prefill each distinct prompt once and hand ``generate`` the expanded cache.

        Edits ``kwargs`` in place (the cache, the mask). A call this cannot serve generates as it came, counted
        in ``stats.prompt_sharing_skipped`` and said once.
        """
        if not self.settings.share_prompt_prefill:
            return
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return  # embeddings: nothing to compare rows by
        mask = kwargs.get("attention_mask")
        reason = sharing_refusal(self.module, config, kwargs, static_workspace=self.settings.kv_cache == "static")
        if mask is None:
            mask = torch.ones_like(ids)  # no pad token among the ids (else `reason` says so): what generate infers
        groups = PromptGroups.of(ids, mask)
        repeats = groups.repeats
        if ranks_agree:
            votes = torch.tensor([reason is None, not repeats], dtype=torch.int32, device=self.engine.device)
            torch_dist.all_reduce(votes, op=torch_dist.ReduceOp.MIN)
            if reason is None and not bool(votes[0]):
                reason = "another rank cannot share its prompts, and with pin_parameters=False ranks step together"
            repeats = not bool(votes[1])  # one rank sharing makes every rank prefill (its own rows, maybe all distinct)
        if not repeats:
            return
        if reason is not None:
            self.stats.prompt_sharing_skipped += 1
            say_once(
                self.engine.said,
                f"Rows of a generate() call repeat a prompt, but it is computed for every row: {reason}."
                " (Counted in generation_stats.prompt_sharing_skipped; said once.)",
                stacklevel=5,
            )
            return
        kwargs["attention_mask"] = mask
        # Everything but the last token: generate needs at least one uncached position to start from.
        kwargs[cache_kwarg(self.module)], _ = prefill(self.module, ids[:, :-1], mask[:, :-1], groups)
        self.stats.prompt_tokens_reused += (groups.rows - groups.distinct) * (ids.shape[1] - 1)

    def _attach_workspace(self, kwargs: dict[str, Any], config: GenerationConfig) -> None:
        workspace = self.engine.kv_workspace
        if self.settings.kv_cache != "static" or config.use_cache is False:
            return  # transformers' dynamic cache, or none at all
        if any(kwargs.get(k) is not None for k in CACHE_KWARGS) or config.cache_implementation is not None:
            return  # the caller manages its own cache
        if kwargs.get("assistant_model") is not None or not workspace.supports(self.module):
            return
        prompt = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        rows = prompt.shape[0] * max(config.num_beams or 1, config.num_return_sequences or 1)
        dtype = next(self.module.parameters()).dtype
        kwargs[cache_kwarg(self.module)] = workspace.acquire(self.module, rows, dtype, prompt.device)
        if config.compile_config is None and not config.disable_compile:
            # transformers compiles the decode step (CUDA graphs) whenever a StaticCache is on a GPU; each context
            # gathers and fuses into new tensors, so graphs would be re-recorded every context. A user's
            # compile_config says they want it anyway.
            with_settings(kwargs, disable_compile=True)
        self.stats.workspace_bytes = workspace.nbytes

    # -- leaving -----------------------------------------------------------------------
    def __exit__(self, *exc) -> None:
        watch = Stopwatch(self.engine.device)
        self.stats.workspace_bytes = max(self.stats.workspace_bytes, self.engine.kv_workspace.nbytes)
        self._stack.__exit__(*exc)  # each undo sees the exception, if any (tensor parallelism tells its group)
        if self.materializer.holding:
            self.engine.held = self.materializer  # given back to ZeRO-3 after the backward (engine.py)
        self.stats.release_s = watch.lap()
        self._book_materializer_time()  # what forwards outside generate() gathered and fused (layer-wise)
        self.stats.peak_memory_bytes = self.peak.sample()

    def _book_materializer_time(self) -> float:
        """Books the materializer's gathering and fusing since the last call as gather_s and fuse_s; returns
        those seconds (layer-wise gathering runs inside each forward, so a generate call's time holds them)."""
        gathered, fused = self.materializer.layer_gather_s, self.materializer.fuse_s
        new_gathered, new_fused = gathered - self._booked[0], fused - self._booked[1]
        self._booked = (gathered, fused)
        self.stats.gather_s += new_gathered
        self.stats.fuse_s += new_fused
        return new_gathered + new_fused
