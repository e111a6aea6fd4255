"""The generation context: the actor switched to inference for one block, and back, always.

On entry, in this order (each step registers its own undo, so an exception or an interrupt
at any point unwinds exactly what was done, in reverse):

1. train/eval flags and ``requires_grad`` recorded; the actor goes to eval, gradients off,
   and ``F.linear`` is torch's own again (``gather.native_linear``), on CPU with decoding-sized
   products in whichever bit-identical layout the BLAS runs faster (``decode_linear.py``);
2. the training RNG stream is set aside and the generation stream swapped in;
3. the weights are materialized (ZeRO-3 gather) and LoRA fused (``gather.py``);
4. ``actor.generate`` is wrapped: requests are checked against ``max_out_tokens`` before any
   work, the call goes through DeepSpeed's kernels where they are on (``kernels.py``, under the
   parity guard) or else gets its KV cache (``workspace.py``; rows that repeat a prompt share one
   prefill of it, ``prefix_cache.py``), ranks are kept in step where the forward has collectives,
   out-of-memory batches are split, and time and tokens are counted.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import ExitStack
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from .decode_linear import decode_linear
from .engine import HybridEngine
from .gather import native_linear
from .kernels import KERNEL_BACKEND, PORTABLE_BACKEND
from .metrics import GenerationStats, PeakMemory, Stopwatch
from .model_parallel import check_same_request, tensor_parallel_group
from .prefix_cache import PromptGroups, prefill, why_not_shareable
from .workspace import CACHE_KWARGS, cache_kwarg


def _generation_config(module: nn.Module, kwargs: dict[str, Any]):
    return kwargs.get("generation_config") or getattr(module, "generation_config", None)


def _setting(module: nn.Module, kwargs: dict[str, Any], name: str, default: Any = None) -> Any:
    if name in kwargs and kwargs[name] is not None:
        return kwargs[name]
    return getattr(_generation_config(module, kwargs), name, default)


def _eos_ids(module: nn.Module, kwargs: dict[str, Any]) -> list[int]:
    eos = _setting(module, kwargs, "eos_token_id")
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _pad_id(module: nn.Module, kwargs: dict[str, Any]) -> int:
    """The token transformers pads finished rows with: pad_token_id, else the (first) EOS, else 0."""
    pad = _setting(module, kwargs, "pad_token_id")
    if pad is not None:
        return int(pad)
    eos = _eos_ids(module, kwargs)
    return eos[0] if eos else 0


def _prompt(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The (batch, length) prompt of a ``generate`` call: ids, or embeddings seen through their first channel."""
    prompt = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if prompt is None and isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
        prompt = kwargs["inputs_embeds"][..., 0]
    return prompt


def check_generate_request(module: nn.Module, max_out_tokens: int, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Validates a ``generate`` call before any work; returns (prompt ids, new-token budget)."""
    prompt = _prompt(args, kwargs)
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        raise ValueError(
            "generate() needs `input_ids` as a 2-D (batch, length) tensor, got"
            f" {type(prompt).__name__ if not isinstance(prompt, torch.Tensor) else tuple(prompt.shape)}."
        )
    if prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"generate() got an empty batch (input_ids of shape {tuple(prompt.shape)}): nothing to do.")
    prompt_len = prompt.shape[1]
    max_new = _setting(module, kwargs, "max_new_tokens")
    if max_new is None:
        max_new = _setting(module, kwargs, "max_length", 20) - prompt_len
    if max_new < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new}. Ask for at least one new token.")
    if prompt_len + max_new > max_out_tokens:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new} = {prompt_len + max_new} tokens exceeds"
            f" `max_out_tokens={max_out_tokens}`, the size of the inference workspace. Raise"
            f" HybridEngineStrategy(max_out_tokens=...) to at least {prompt_len + max_new}, or shorten the request."
        )
    return prompt, max_new


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
        self.stats = GenerationStats(backend=engine.options.backend)
        self.tp_group = tensor_parallel_group(engine)  # an actor trained tensor-parallel: its group
        self._stack = ExitStack()

    # -- entering ----------------------------------------------------------------------
    def __enter__(self) -> nn.Module:
        self.peak = PeakMemory(self.engine.device)
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
        watch = Stopwatch()
        self.materializer = self.engine.materializer(self.trainable)
        self._stack.enter_context(self.materializer)
        entered = watch.lap()
        self.stats.fuse_s = self.materializer.fuse_s
        self.stats.gather_s = entered - self.materializer.fuse_s
        self.stats.gathered_bytes = self.materializer.gathered_bytes
        self.stats.sliced_bytes = getattr(self.materializer, "sliced_bytes", 0)
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
        engine = self.engine
        prompt, _ = check_generate_request(self.module, engine.settings.max_out_tokens, args, kwargs)
        if self.tp_group is not None:
            check_same_request(self.tp_group, prompt, kwargs)
        if self.materializer.collectives_per_forward and self.world_size > 1:
            if kwargs.get("synced_gpus") is False:
                raise ValueError(
                    "synced_gpus=False would hang: with pin_parameters=False every forward gathers weights from all"
                    " ranks, so ranks that finish early must keep stepping. Leave synced_gpus unset."
                )
            kwargs["synced_gpus"] = True
        watch = Stopwatch()
        try:
            if getattr(self.materializer, "pools_ranks", False):
                output = self._generate_pooled(args, kwargs)
            else:
                output = self._generate_rows(args, kwargs)
        finally:
            self.stats.generate_s += watch.lap()
            self.peak.sample()
            engine.kv_workspace.after_generation()
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        rows = sequences.shape[0]
        self.stats.calls += 1
        self.stats.prompt_tokens += prompt.numel()
        self.stats.new_tokens += rows * (sequences.shape[1] - prompt.shape[1])
        return output

    def _generate_rows(self, args: tuple, kwargs: dict[str, Any]):
        """Generate; on out-of-memory, free the workspace and retry each half of the batch."""
        if args:
            kwargs, args = {**kwargs, "input_ids": args[0]}, args[1:]
        prompt = _prompt(args, kwargs)
        own_cache = any(kwargs.get(k) is not None for k in CACHE_KWARGS)
        attempt = dict(kwargs)
        try:
            return self._generate_once(args, attempt, prompt)
        except torch.OutOfMemoryError as error:
            rows, floor = prompt.shape[0], self.engine.options.oom_split_min_batch
            attempt.clear()
            self.engine.kv_workspace.release()
            why = None
            if rows // 2 < floor:
                why = f"the batch of {rows} cannot be halved without going under oom_split_min_batch={floor}"
            elif self.materializer.collectives_per_forward and self.world_size > 1:
                why = "with pin_parameters=False ranks gather weights together, so one rank cannot retry alone"
            elif own_cache or args:
                why = "the call passes its own cache or positional arguments, which cannot be split"
            if why:
                raise RuntimeError(
                    f"Out of memory generating {rows} sequences, and {why}. Lower the batch, max_new_tokens or"
                    " max_out_tokens, or set pin_parameters=False to gather fewer weights at once."
                ) from error
            self.stats.oom_splits += 1
            warnings.warn(f"Out of memory generating {rows} sequences: retrying in two halves.", stacklevel=4)
            halves = [self._generate_rows((), part) for part in _split_rows(kwargs, rows)]
            if not all(isinstance(h, torch.Tensor) for h in halves):
                raise RuntimeError(
                    "Out of memory with return_dict_in_generate=True: split outputs cannot be merged. Lower the batch."
                ) from error
            pad = _pad_id(self.module, kwargs)
            width = max(h.shape[1] for h in halves)
            return torch.cat([torch.nn.functional.pad(h, (0, width - h.shape[1]), value=pad) for h in halves])

    def _generate_pooled(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """Tensor parallel: the group's prompts generate as one batch (see ``tensor_parallel.py``)."""
        if len(args) > 1:
            raise ValueError("With inference_tp_size > 1, pass generate() the prompt, then keywords only.")
        if args:
            kwargs = {**kwargs, "input_ids": args[0]}
        pad, eos_ids = _pad_id(self.module, kwargs), _eos_ids(self.module, kwargs)

        def generate(**pooled: Any) -> torch.Tensor:
            self._attach_workspace(pooled["input_ids"], pooled)
            self._share_prompts(pooled, ranks_agree=False)  # the group generates this one pooled batch
            return self._original_generate(**pooled)

        return self.materializer.generate(generate, kwargs, pad, eos_ids)

    def _generate_once(self, args: tuple, kwargs: dict[str, Any], prompt: torch.Tensor):
        """One ``generate`` call: through DeepSpeed's kernels where they are on (and pass the guard), else portable."""
        generate = functools.partial(self._original_generate, *args)
        routing = self.engine.kernels
        if routing is not None and routing.enabled:
            # No StaticCache here: the kernels keep their KV cache in DeepSpeed's own workspace.
            dtype = next(self.module.parameters()).dtype
            output = routing.generate(generate, kwargs, self.stats, dtype)
            if output is not None:
                self.stats.backend = KERNEL_BACKEND
                return output
        self.stats.backend = PORTABLE_BACKEND
        self._attach_workspace(prompt, kwargs)
        if not args:
            # Layer-wise gathering has collectives in every forward: all ranks must prefill, or none.
            self._share_prompts(kwargs, ranks_agree=self.materializer.collectives_per_forward and self.world_size > 1)
        return generate(**kwargs)

    def _share_prompts(self, kwargs: dict[str, Any], ranks_agree: bool) -> None:
        """Rows repeating a prompt: prefill each distinct prompt once and hand ``generate`` the expanded cache.

        Edits ``kwargs`` in place (the cache; ``num_return_sequences`` rows made explicit). A call this
        cannot serve generates as it came, counted in ``stats.prompt_sharing_skipped`` and said once.
        """
        if not self.engine.options.share_prompt_prefill:
            return
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return  # embeddings: nothing to compare rows by
        mask = kwargs.get("attention_mask")
        beams = _setting(self.module, kwargs, "num_beams", 1) or 1
        copies = 1 if beams > 1 else _setting(self.module, kwargs, "num_return_sequences", 1) or 1
        reason = self._why_not_shared(kwargs, ids, mask)
        if mask is None:
            mask = torch.ones_like(ids)  # no pad token among the ids (else `reason` says so): what generate infers
        groups = PromptGroups.of(ids, mask)
        repeats = groups.repeats or copies > 1
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
            if reason not in self.engine.said:
                self.engine.said.add(reason)
                warnings.warn(
                    f"Rows of a generate() call repeat a prompt, but it is computed for every row: {reason}."
                    " (Counted in generation_stats.prompt_sharing_skipped; said once.)",
                    stacklevel=5,
                )
            return
        if copies > 1:  # what generate would expand to, made explicit so the cache has one entry per row
            ids, mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
            kwargs.update(input_ids=ids, num_return_sequences=1)
            groups = PromptGroups.of(ids, mask)
        kwargs["attention_mask"] = mask
        # Everything but the last token: generate needs at least one uncached position to start from.
        kwargs[cache_kwarg(self.module)], _ = prefill(self.module, ids[:, :-1], mask[:, :-1], groups)
        self.stats.prompt_tokens_reused += (groups.rows - groups.distinct) * (ids.shape[1] - 1)

    def _why_not_shared(self, kwargs: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor | None) -> str | None:
        if any(kwargs.get(k) is not None for k in CACHE_KWARGS):
            if self.engine.kv_workspace.static:
                return "kv_cache='static' preallocates the cache per row (use kv_cache='dynamic' to share prompts)"
            return "the call passes its own cache"
        if kwargs.get("cache_implementation") is not None:
            return "the call sets cache_implementation"
        if (_setting(self.module, kwargs, "num_beams", 1) or 1) > 1:
            return "beam search"
        if kwargs.get("assistant_model") is not None or _setting(self.module, kwargs, "prompt_lookup_num_tokens"):
            return "assisted generation"
        if _setting(self.module, kwargs, "output_attentions") or _setting(self.module, kwargs, "output_hidden_states"):
            return "output_attentions/output_hidden_states report the whole prompt's first step"
        extra = [
            k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask")
        ]
        if extra:
            return f"tensor arguments {extra} besides input_ids and attention_mask"
        if ids.shape[1] < 2:
            return "a one-token prompt leaves nothing to cache"
        if mask is None:
            pad = _setting(self.module, kwargs, "pad_token_id")
            if pad is not None and bool((ids == pad).any()):
                return "no attention_mask was passed and the prompts hold pad tokens"
        return why_not_shareable(self.module)

    def _attach_workspace(self, prompt: torch.Tensor, kwargs: dict[str, Any]) -> None:
        workspace = self.engine.kv_workspace
        if not workspace.static:
            return  # transformers' dynamic cache
        if any(kwargs.get(k) is not None for k in (*CACHE_KWARGS, "cache_implementation")):
            return  # the caller manages its own cache
        if kwargs.get("assistant_model") is not None or not workspace.supports(self.module):
            return
        num_beams = _setting(self.module, kwargs, "num_beams", 1) or 1
        num_return = _setting(self.module, kwargs, "num_return_sequences", 1) or 1
        rows = prompt.shape[0] * (num_beams if num_beams > 1 else num_return)
        dtype = next(self.module.parameters()).dtype
        kwargs[cache_kwarg(self.module)] = workspace.acquire(self.module, rows, dtype, prompt.device)
        self.stats.workspace_bytes = workspace.nbytes

    # -- leaving -----------------------------------------------------------------------
    def __exit__(self, *exc) -> None:
        watch = Stopwatch()
        self.stats.workspace_bytes = max(self.stats.workspace_bytes, self.engine.kv_workspace.nbytes)
        self._stack.__exit__(*exc)  # each undo sees the exception, if any (tensor parallelism tells its group)
        self.stats.release_s = watch.lap()
        # Layer-wise gathering and fusing happen during generation: book them where they belong.
        during = self.materializer.layer_gather_s + self.materializer.fuse_s - self.stats.fuse_s
        self.stats.gather_s += self.materializer.layer_gather_s
        self.stats.fuse_s = self.materializer.fuse_s
        self.stats.generate_s = max(self.stats.generate_s - during, 0.0)
        self.stats.peak_memory_bytes = self.peak.sample()
