"""LoRA fusion for generation: fold adapters into the base weights, then restore them exactly.

Two conventions are understood:

* PEFT's ``LoraLayer`` (any target module type, several adapters, the active ones fused);
* DeepSpeed-Chat's ``LinearLayer_LoRA`` (``lora_right_weight``, ``lora_left_weight``,
  ``lora_scaling``, ``fuse_lora``).

A weight that will be thrown away after the context (ZeRO-3's gathered copy of a partitioned
weight: releasing it drops the data, the partition is untouched) is fused in place, as DeepSpeed
does: no extra memory, and nothing to undo. Any other weight (ZeRO-1/2's training weights,
weights ZeRO-3 itself fetched, cached frozen copies) is never edited: the parameter's ``.data``
is pointed at another tensor holding ``W + delta`` (new, or a scratch buffer the caller keeps)
and, on unfuse, pointed back at the original tensor object, so it comes back bit for bit however
many cycles run (``W + d - d`` does not, in bf16). That costs one copy of each LoRA-targeted
weight while the context is open (``GenerationStats.fused_copy_bytes``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

try:
    from peft.tuners.lora import LoraLayer
except ImportError:  # peft is optional at run time
    LoraLayer = ()


def is_peft_lora(module: nn.Module) -> bool:
    return bool(LoraLayer) and isinstance(module, LoraLayer)


def is_dschat_lora(module: nn.Module) -> bool:
    # `"lora_right_weight" in _parameters` first: hasattr on a module without it raises inside
    # nn.Module.__getattr__, which costs milliseconds over a model's thousand modules.
    return "lora_right_weight" in module._parameters and all(
        hasattr(module, a) for a in ("lora_left_weight", "lora_scaling", "weight")
    )


def peft_fusable(layer: nn.Module) -> bool:
    """Whether a PEFT LoRA layer's active adapters are plain LoRA (no DoRA, no lora_bias): foldable into W."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    return all(a not in getattr(layer, "lora_variant", {}) and not layer.lora_bias.get(a, False) for a in adapters)


def lora_modules(module: nn.Module | list[nn.Module]) -> list[nn.Module]:
    """Every LoRA layer (either convention) inside ``module`` (or among a list of modules), in module order."""
    modules = module.modules() if isinstance(module, nn.Module) else module
    return [m for m in modules if is_peft_lora(m) or is_dschat_lora(m)]


@dataclass
class _Fused:
    module: nn.Module
    weight: nn.Parameter
    original: torch.Tensor | None  # None: fused in place into a copy that is thrown away after the context
    merged_adapters: list[str] | None = None  # PEFT only
    fuse_flag: bool | None = None  # DS-Chat only


@dataclass
class LoraFusion:
    """Fuses the LoRA layers it is given and undoes exactly that on ``unfuse()``.

    ``buffers`` (optional, kept by the caller between fusions): a scratch tensor per fused
    weight that receives ``W + delta`` each time, instead of a new allocation. It is never the
    original: the base weight still comes back as the very tensor it was.
    ``disposable``: ids of weights whose current data is thrown away after the context (ZeRO-3's
    gathered copies): those are fused in place.
    """

    fused: list[_Fused] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    buffers: dict[int, torch.Tensor] | None = None  # id(weight param) -> scratch for its fused value
    disposable: set[int] = field(default_factory=set)
    copy_bytes: int = 0  # fused values held beside their originals (not in place, not in ``buffers``)

    def _fused_out(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Where ``weight``'s fused value goes: its own data (disposable), a scratch tensor, or None (a new one)."""
        if id(weight) in self.disposable:
            return weight.data
        if self.buffers is None:
            self.copy_bytes += weight.numel() * weight.element_size()
            return None
        original = weight.data
        buffer = self.buffers.get(id(weight))
        if buffer is None or buffer.shape != original.shape or buffer.dtype != original.dtype:
            buffer = self.buffers[id(weight)] = torch.empty_like(original, memory_format=torch.contiguous_format)
        return buffer

    @torch.no_grad()
    def fuse(self, layers: list[nn.Module]) -> None:
        for layer in layers:
            if is_peft_lora(layer):
                self._fuse_peft(layer)
            else:
                self._fuse_dschat(layer)

    def unfuse(self) -> None:
        # Reverse order, so a weight fused twice (never expected) still ends at its original.
        while self.fused:
            item = self.fused.pop()
            if item.original is not None:
                item.weight.data = item.original
            if item.merged_adapters is not None:
                item.module.merged_adapters = item.merged_adapters
            if item.fuse_flag is not None:
                item.module.fuse_lora = item.fuse_flag

    def _fuse_peft(self, layer: nn.Module) -> None:
        if layer.disable_adapters or layer.merged:
            return  # adapters off, or the user merged them already: the base layer is the policy
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if not adapters:
            return
        weight = getattr(layer.get_base_layer(), "weight", None)
        if not peft_fusable(layer) or not isinstance(weight, torch.Tensor):
            # DoRA and other variants are exact on PEFT's own (unfused) path: leave them there.
            self.skipped.append(type(layer).__name__)
            return
        original = weight.data
        deltas = [layer.get_delta_weight(adapter) for adapter in adapters]
        if any(delta.shape != original.shape for delta in deltas):
            self.skipped.append(type(layer).__name__)
            return
        out = self._fused_out(weight)
        fused = original
        for delta in deltas:
            # PEFT's merge is `weight += delta`: add in the promoted dtype, round once into the
            # weight's dtype. Same here, so fused weights equal `merge_and_unload()`'s bit for bit.
            fused = (fused + delta).to(original.dtype) if out is None else torch.add(fused, delta, out=out)
        weight.data = fused
        kept = None if fused is original else original
        self.fused.append(_Fused(layer, weight, kept, merged_adapters=list(layer.merged_adapters)))
        layer.merged_adapters = list(adapters)  # PEFT's forward now skips the adapter branch

    def _fuse_dschat(self, layer: nn.Module) -> None:
        if getattr(layer, "fuse_lora", False):
            return  # already fused by the user
        weight = layer.weight
        original = weight.data
        # DeepSpeed-Chat's own formula: W + scaling * left^T @ right^T  (= W + scaling * B @ A).
        delta = layer.lora_scaling * torch.matmul(layer.lora_left_weight.t(), layer.lora_right_weight.t())
        out = self._fused_out(weight)
        weight.data = (original + delta).to(original.dtype) if out is None else torch.add(original, delta, out=out)
        kept = None if out is original else original
        self.fused.append(_Fused(layer, weight, kept, fuse_flag=getattr(layer, "fuse_lora", False)))
        layer.fuse_lora = True

    def warn_skipped(self) -> None:
        if self.skipped:
            names = sorted(set(self.skipped))
            warnings.warn(
                f"LoRA layers {names} use a variant (DoRA, lora_bias, ...) that is not fused for generation; they run"
                " on PEFT's own adapter path, which is exact but slower.",
                stacklevel=3,
            )
            self.skipped.clear()
