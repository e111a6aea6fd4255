"""Materializing ZeRO-3 partitioned weights for generation, and putting them back.

A plain ``GatheredParameters`` around ``generate`` is as slow as no gathering at all:
ZeRO-3's per-module hooks still fetch and release every submodule on every forward. So
for the duration of a generation the hooks on the generation module are *detached* (taken
out of the modules' hook dicts) and put back afterwards at the same place, with the same
handles, so ZeRO-3's prefetch trace never notices.

Three ways to materialize, all with the hooks detached:

* ``PinnedGather`` (``pin_parameters=True``): the whole module gathered once (small params in
  one coalesced collective), held for the whole context, ZeRO-3's parameter getter set aside.
  Optionally keeps frozen weights gathered between contexts (``FrozenWeightCache``), so only
  the trainable ones move each time.
* ``LayerwiseGather`` (``pin_parameters=False``): the non-layer weights stay gathered, the
  decoder layers are gathered ``tp_gather_partition_size`` at a time during each forward
  and released after, bounding memory at the cost of collectives on every forward.
* nothing, under ZeRO-1/2, where every rank already holds every weight.

LoRA is fused into whatever is materialized, right after it is gathered, and unfused
right before it is released (see ``lora.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from deepspeed.runtime.zero import GatheredParameters
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from torch import nn

from .deepspeed_compat import ZeROOrderedDict, partition_stamp, wait_for_prefetch, zero3_hook_ids, zero3_linear_wrap
from .lora import LoraFusion, lora_modules
from .metrics import Stopwatch

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _timed(fn, *args) -> float:
    """Seconds ``fn(*args)`` takes, with the GPU's queued work (all-gathers, fuse matmuls) included."""
    watch = Stopwatch(_active_cuda_device())
    fn(*args)
    return watch.lap()


def _active_cuda_device() -> torch.device | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def missing_params(params, engine: nn.Module) -> list[torch.Tensor]:
    """The ZeRO-3 params among ``params`` that are partitioned now, after any prefetch lands.

    Inside ``training_step`` ZeRO-3 may already have fetched or prefetched some of them
    (its trace runs ahead of the forward). Those stay ZeRO-3's to release; only what is
    partitioned is ours to gather and to partition again.
    """
    params = [p for p in params if is_zero3_param(p)]
    inflight = [p for p in params if p.ds_status == ZeroParamStatus.INFLIGHT]
    if inflight:
        wait_for_prefetch(engine, inflight)  # then AVAILABLE, and ZeRO-3 releases them on its schedule
    return [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]


def released_copies(params: list[torch.Tensor]) -> set[int]:
    """Ids of the gathered ``params`` whose data is a copy that releasing them throws away (LoRA may fuse into it
    in place). Not so where ZeRO-3 partitions over one rank: its "gather" then points the data at the partition
    itself, the weights training goes on with."""
    return {id(p) for p in params if p.data.untyped_storage().data_ptr() != p.ds_tensor.untyped_storage().data_ptr()}


@contextmanager
def native_linear():
    """``torch.nn.functional.linear`` as torch ships it, for the block.

    Every ZeRO-3 engine replaces it, process-wide and for good, with DeepSpeed's
    ``zero3_linear_wrap`` (``zero.Init``'s ``memory_efficient_linear``): an autograd Function
    that keeps the partitioned weight for backward instead of the gathered one. Generation
    runs without gradients on gathered weights, where the wrapper only costs time (a Python
    signature bind per call, and matmul + add instead of one fused kernel: 5-6% of a
    SmolLM2 generation on CPU). Any other replacement (a user's, DeepSpeed's quantized one)
    is left alone.
    """
    patched = F.linear
    if patched is zero3_linear_wrap:
        F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        F.linear = patched


class DetachedZeroHooks:
    """Takes ZeRO-3's hooks off ``modules`` (a model's ``modules()``); ``restore()`` puts them back in place."""

    def __init__(self, modules: list[nn.Module], engine: nn.Module) -> None:
        # Hook ids are unique in the process (RemovableHandle.next_id): a key is ZeRO-3's iff it is one
        # of its handles' ids. One pass over our modules' hook dicts, not one weakref per handle.
        zero_ids = zero3_hook_ids(engine)
        # Per hook dict: its items as they were, and which of them are ZeRO-3's.
        self._detached: list[tuple[dict, list, set]] = []
        for m in modules:
            for name in _HOOK_DICTS:
                hooks = getattr(m, name)
                zero = {key for key in hooks if key in zero_ids} if hooks else None
                if not zero:
                    continue
                items = list(hooks.items())
                if len(zero) == len(items):
                    hooks.clear()  # the common case: only ZeRO-3's hooks there
                else:
                    for key in zero:
                        del hooks[key]
                self._detached.append((hooks, items, zero))

    def restore(self) -> None:
        for hooks, items, zero in self._detached:
            if not hooks and len(zero) == len(items):
                hooks.update(items)  # nothing added meanwhile: as they were
                continue
            # Put ZeRO-3's hooks back where they were, keep the others that are still there, and
            # hooks added meanwhile go last.
            current = dict(hooks)
            hooks.clear()
            for key, value in items:
                if key in zero:
                    hooks[key] = value
                elif key in current:
                    hooks[key] = current.pop(key)
            hooks.update(current)
        self._detached.clear()


class PlainParameterDicts:
    """ZeRO-3's parameter dicts swapped for plain ones, for a block where every weight is gathered.

    ZeRO-3 replaces each module's ``_parameters`` with a ``ZeROOrderedDict`` whose Python
    ``__getitem__`` would gather a partitioned weight on access. Every ``self.weight`` in a
    forward pays for it (1-2% of a SmolLM2 generation on CPU), for nothing once all is
    gathered. ``restore()`` puts ZeRO-3's dicts back, carrying over any parameter set or
    deleted meanwhile.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self._swapped: list[tuple[nn.Module, ZeROOrderedDict, dict]] = []
        for m in modules:
            zero = m.__dict__.get("_parameters")
            if isinstance(zero, ZeROOrderedDict) and zero:  # the getter is only on items: skip empty dicts
                plain = {key: dict.__getitem__(zero, key) for key in zero}  # no getter: nothing gathers
                m._parameters = plain
                self._swapped.append((m, zero, plain))

    def restore(self) -> None:
        for m, zero, plain in reversed(self._swapped):
            if m.__dict__.get("_parameters") is not plain:
                continue  # replaced meanwhile by someone else: theirs stands
            if plain.keys() != zero.keys() or any(dict.__getitem__(zero, k) is not v for k, v in plain.items()):
                for key in [k for k in zero if k not in plain]:
                    del zero[key]
                for key, value in plain.items():
                    zero[key] = value
            m._parameters = zero
        self._swapped.clear()


@dataclass
class FrozenWeightCache:
    """Full copies of frozen ZeRO-3 weights, kept between generation contexts (and scratch to fuse LoRA into).

    An entry is valid while the parameter stays frozen and its partition is untouched: any
    write to the partition (``load_state_dict``, a checkpoint load, ``GatheredParameters``
    with a modifier rank, the optimizer if the user unfreezes it) bumps the partition
    tensor's version counter or replaces it, and the entry is dropped.
    """

    entries: dict[int, tuple[torch.Tensor, int, int]] = field(default_factory=dict)  # id(param) -> (full, ptr, ver)
    # Scratch for the fused LoRA weights (``W + delta``), rewritten by every context: no allocation
    # per context, and the cached originals are never touched.
    fused_buffers: dict[int, torch.Tensor] = field(default_factory=dict)

    def lookup(self, param: torch.Tensor, frozen: bool) -> torch.Tensor | None:
        entry = self.entries.get(id(param))
        if entry is None:
            return None
        if not frozen or entry[1:] != partition_stamp(param):
            del self.entries[id(param)]
            return None
        return entry[0]

    def store(self, param: torch.Tensor) -> None:
        self.entries[id(param)] = (param.data.detach().clone(), *partition_stamp(param))

    def clear(self) -> None:
        self.entries.clear()
        self.fused_buffers.clear()

    @property
    def nbytes(self) -> int:
        tensors = [full for full, _, _ in self.entries.values()] + list(self.fused_buffers.values())
        return sum(t.numel() * t.element_size() for t in tensors)


class CoalescedGather:
    """Gathers many small ZeRO-3 params in one collective, and partitions them again on exit.

    ``GatheredParameters`` launches one all-gather per parameter: 120 of them for the LoRA of
    SmolLM2 (about 1 ms each over gloo), where the bytes are nothing. This is ZeRO-3's own
    prefetch path (``all_gather_coalesced``: one flat buffer per dtype, then one copy per
    param into its own tensor), worth it only for small params.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params

    def __enter__(self) -> CoalescedGather:
        if self.params:
            self.params[0].all_gather_coalesced(self.params).wait()
        return self

    def __exit__(self, *exc) -> None:
        if self.params:
            self.params[0].partition(param_list=self.params, has_been_updated=False)


# Params up to this many elements are gathered coalesced (LoRA A/B, norms, biases): the copy out of
# the flat buffer costs less than a collective's latency. Weight matrices go one collective each.
COALESCE_MAX_NUMEL = 1 << 18


class Materializer:
    """What makes the generation module's weights whole for one context (``with materializer:``), and puts
    everything back on exit, whatever happened inside. The generation context reads the rest:

    * ``collectives_per_forward``: every forward gathers from all ranks, so ranks step (and prefill) together;
    * ``pools_ranks``: a tensor-parallel group generates one pooled batch (``pooled``, inference_tp.py);
    * ``holding``: after a clean exit the weights stay gathered for the training step (``PinnedGather``'s
      ``hold``) until ``release()``;
    * what it cost: ``gathered_bytes`` and ``sliced_bytes`` on entry, ``fuse_s`` folding LoRA in and
      ``layer_gather_s`` gathering during generation (layer-wise), ``fused_copy_bytes`` of fused LoRA weights
      held beside their originals.
    """

    collectives_per_forward = False
    pools_ranks = False
    holding = False

    def __init__(self, fusion: LoraFusion | None = None) -> None:
        self.fusion = fusion
        self.gathered_bytes = 0
        self.sliced_bytes = 0
        self.fuse_s = 0.0
        self.layer_gather_s = 0.0

    @property
    def fused_copy_bytes(self) -> int:
        return self.fusion.copy_bytes if self.fusion is not None else 0

    def __enter__(self) -> Materializer:
        return self

    def __exit__(self, *exc) -> None:
        pass


class PinnedGather(Materializer):
    """Gathers the whole module once (``pin_parameters=True``).

    ``hold=True`` (``gather_once_per_step``): a clean exit only unfuses LoRA and gives ZeRO-3 its parameter
    dicts back; the weights stay gathered with ZeRO-3's hooks off them, for the step's training passes, until
    ``release()``. LoRA is then fused into copies, never into the gathered weights training will read.
    """

    def __init__(
        self,
        module: nn.Module,
        engine: nn.Module,
        cache: FrozenWeightCache | None,
        trainable: set[int],
        hold: bool = False,
    ) -> None:
        super().__init__(LoraFusion(buffers=cache.fused_buffers if cache is not None else None))
        self.module, self.engine, self.cache, self.trainable, self.hold = module, engine, cache, trainable, hold
        self._hooks: DetachedZeroHooks | None = None
        self._plain_dicts: PlainParameterDicts | None = None
        self._gathered: list = []  # the gathers to undo, in order
        self._swapped: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, placeholder, cached)

    def __enter__(self) -> PinnedGather:
        try:
            self._enter()
        except BaseException:
            self.__exit__()  # undo what was done: the caller's exit stack never saw this context
            raise
        return self

    def _enter(self) -> None:
        modules = list(self.module.modules())  # walked once: a deep model's tree walk costs milliseconds
        self._hooks = DetachedZeroHooks(modules, self.engine)
        to_gather = []
        for param in missing_params(self.module.parameters(), self.engine):
            frozen = id(param) not in self.trainable
            full = self.cache.lookup(param, frozen) if self.cache is not None else None
            if full is None:
                to_gather.append(param)
                continue
            self._swapped.append((param, param.data, full))
            param.data = full
            # Marked gathered, as a gather would: inside training_step ZeRO-3's parameter getter
            # all-gathers any param it sees partitioned, and would replace the copy on first use.
            param.ds_status = ZeroParamStatus.AVAILABLE
        self.gathered_bytes = sum(p.ds_numel * p.element_size() for p in to_gather)
        small = [p for p in to_gather if p.ds_numel <= COALESCE_MAX_NUMEL]
        large = [p for p in to_gather if p.ds_numel > COALESCE_MAX_NUMEL]
        for gather in (CoalescedGather(small), GatheredParameters(large)):
            gather.__enter__()
            self._gathered.append(gather)
        if self.cache is not None:
            for param in to_gather:
                if id(param) not in self.trainable:
                    self.cache.store(param)
        if not self.hold:
            self.fusion.disposable = released_copies(to_gather)  # thrown away after the context: fused in place
        self.fuse_s = _timed(self.fusion.fuse, lora_modules(modules))
        self._plain_dicts = PlainParameterDicts(modules)

    def __exit__(self, *exc) -> None:
        if self.hold and exc[0] is None:
            self._restore_dicts_and_unfuse()
            self.holding = True
            return
        self.release()

    def _restore_dicts_and_unfuse(self) -> None:
        if self._plain_dicts is not None:
            self._plain_dicts.restore()
            self._plain_dicts = None
        self.fusion.unfuse()

    def release(self) -> None:
        """Everything back to ZeRO-3: weights partitioned, its hooks in place."""
        self.holding = False
        try:
            self._restore_dicts_and_unfuse()
            for param, placeholder, full in self._swapped:
                # Still the copy we put there (unfuse restored the very tensor): partitioned again, as
                # a release would. Anything else is ZeRO-3's own doing, left to it.
                if param.ds_status == ZeroParamStatus.AVAILABLE and param.data.data_ptr() == full.data_ptr():
                    param.data = placeholder
                    param.ds_status = ZeroParamStatus.NOT_AVAILABLE
            self._swapped.clear()
            while self._gathered:
                self._gathered.pop().__exit__(None, None, None)
        finally:
            self._gathered.clear()
            if self._hooks is not None:
                self._hooks.restore()
                self._hooks = None


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (through any PEFT wrapping)."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in module.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


class LayerwiseGather(Materializer):
    """Gathers ``group_size`` decoder layers at a time, per forward (``pin_parameters=False``)."""

    collectives_per_forward = True

    def __init__(self, module: nn.Module, engine: nn.Module, group_size: int) -> None:
        super().__init__()
        self.module, self.engine = module, engine
        layers = decoder_layers(module)
        if not layers:
            raise RuntimeError(
                f"pin_parameters=False needs the decoder layers of {type(module).__name__}, and none were found"
                " (no `_no_split_modules`, no nn.ModuleList). Use pin_parameters=True."
            )
        self.groups = [layers[i : i + group_size] for i in range(0, len(layers), group_size)]
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        self.other = [p for p in module.parameters() if is_zero3_param(p) and id(p) not in in_layers]
        self.other = missing_params(self.other, engine)
        self.other_fusion = LoraFusion()
        self._open: tuple[GatheredParameters, LoraFusion] | None = None
        self._handles: list = []
        self._hooks: DetachedZeroHooks | None = None
        self._other: GatheredParameters | None = None
        self.max_layers_materialized = 0
        self.gathered_bytes = sum(p.ds_numel * p.element_size() for p in self.other)

    def __enter__(self) -> LayerwiseGather:
        self._hooks = DetachedZeroHooks(list(self.module.modules()), self.engine)
        self._other = GatheredParameters(self.other)
        self._other.__enter__()
        in_groups = {id(m) for group in self.groups for layer in group for m in layer.modules()}
        outside = [m for m in lora_modules(self.module) if id(m) not in in_groups]
        self.other_fusion.disposable = released_copies(self.other)
        self.fuse_s += _timed(self.other_fusion.fuse, outside)
        for group in self.groups:
            self._handles.append(group[0].register_forward_pre_hook(lambda *_, g=group: self._open_group(g)))
            self._handles.append(group[-1].register_forward_hook(lambda *_: self._close_group()))
        return self

    def _open_group(self, group: list[nn.Module]) -> None:
        self._close_group()
        params = missing_params([p for layer in group for p in layer.parameters()], self.engine)
        gathered = GatheredParameters(params)
        self.layer_gather_s += _timed(gathered.__enter__)
        fusion = LoraFusion(disposable=released_copies(params))
        self.fuse_s += _timed(fusion.fuse, [m for layer in group for m in lora_modules(layer)])
        self._open = (gathered, fusion)
        self.max_layers_materialized = max(self.max_layers_materialized, len(group))

    def _close_group(self) -> None:
        if self._open is not None:
            gathered, fusion = self._open
            self._open = None
            fusion.unfuse()
            gathered.__exit__(None, None, None)

    def __exit__(self, *exc) -> None:
        try:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._close_group()
            self.other_fusion.unfuse()
            if self._other is not None:
                self._other.__exit__(None, None, None)
        finally:
            self._other = None
            if self._hooks is not None:
                self._hooks.restore()
                self._hooks = None


class NoGather(Materializer):
    """ZeRO-1/2: every weight is already whole; only LoRA is fused."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(LoraFusion())
        self.module = module

    def __enter__(self) -> NoGather:
        self.fuse_s = _timed(self.fusion.fuse, lora_modules(self.module))
        return self

    def __exit__(self, *exc) -> None:
        self.fusion.unfuse()
