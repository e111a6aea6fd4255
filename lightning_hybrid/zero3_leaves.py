"""ZeRO-3 leaf modules: each transformer block fetched and released as one unit.

ZeRO-3 puts fetch/release hooks on every submodule, and with PEFT LoRA a decoder layer has
about sixty of them (every adapted linear brings its ``lora_A``/``lora_B``/dropout dicts). On
SmolLM2-135M that is ~3,600 hook calls per forward, a fixed cost of every training pass,
whatever its number of tokens. DeepSpeed's leaf modules (``deepspeed.utils.set_z3_leaf_modules``)
hook the block instead and fetch all its weights at once: the same arithmetic, far fewer hooks,
fewer and larger all-gathers, and a whole block's weights live at a time.

DeepSpeed reduces a leaf's gradients in a full backward hook on the leaf, and PyTorch fires
such a hook as soon as the gradient of the leaf's *outputs* exists when none of its inputs
requires grad. With frozen input embeddings (LoRA) the first block's inputs never do, so the
hook ran before that block's adapter gradients existed and the backward crashed
(``The size of tensor a (0) must match the size of tensor b (4)``, DeepSpeed 0.19.8). The first
floating-point input of every leaf that holds a trainable weight is therefore made to require
grad (what transformers' ``enable_input_require_grads`` does for gradient checkpointing, and
for the same reason): the hook then fires after the block's backward, as DeepSpeed expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from deepspeed.utils import set_z3_leaf_modules, z3_leaf_module
from torch import nn

AUTO = "auto"


def leaf_classes(root: nn.Module, spec: str | Sequence[str]) -> list[type]:
    """The module classes ``spec`` names in ``root``: ``"auto"`` is every Hugging Face model's transformer
    block (its ``_no_split_modules``), else a list of class names. A clear error when nothing matches."""
    present = {type(m).__name__: type(m) for m in root.modules()}
    if spec == AUTO:
        names = sorted({n for m in root.modules() for n in (getattr(m, "_no_split_modules", None) or [])})
        if not names:
            raise ValueError(
                f"`zero3_leaf_modules='auto'` found no Hugging Face model with `_no_split_modules` in"
                f" {type(root).__name__}. Name the block classes instead, e.g. zero3_leaf_modules=['MyBlock']."
            )
        found = [present[n] for n in names if n in present]
        if not found:
            raise ValueError(
                f"`zero3_leaf_modules='auto'`: the blocks its models name ({names}) are not modules of"
                f" {type(root).__name__}. Name the block classes instead, e.g. zero3_leaf_modules=['MyBlock']."
            )
        return found
    missing = [n for n in spec if n not in present]
    if missing:
        raise ValueError(
            f"`zero3_leaf_modules`: no module of class {missing} in {type(root).__name__}."
            f" Its classes include {sorted(present)[:12]}."
        )
    return [present[n] for n in spec]


def mark_leaves(root: nn.Module, spec: str | Sequence[str] | None) -> int:
    """Flag the modules ``spec`` names as ZeRO-3 leaves (before ``deepspeed.initialize``); how many."""
    if spec is None:
        return 0
    return len(set_z3_leaf_modules(root, leaf_classes(root, spec)))


def keep_leaf_gradients(root: nn.Module) -> int:
    """After ``deepspeed.initialize``: every leaf with a trainable weight gets an input that requires grad
    (see the module docstring). Covers leaves from any source (ours, the user's, DeepSpeed's
    ``stage3_module_granularity_threshold``). Returns how many leaves were hooked."""
    leaves = [m for m in root.modules() if z3_leaf_module(m) and any(p.requires_grad for p in m.parameters())]
    for leaf in leaves:
        if not getattr(leaf, "_lightning_hybrid_input_grad", False):
            leaf.register_forward_pre_hook(_input_requires_grad, with_kwargs=True)
            leaf._lightning_hybrid_input_grad = True
    return len(leaves)


def _input_requires_grad(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    if not torch.is_grad_enabled():
        return None
    values = list(args) + list(kwargs.values())
    tensors = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not tensors or any(t.requires_grad for t in tensors):
        return None
    first = tensors[0]
    replacement = first.detach().requires_grad_()  # a new leaf: the caller's tensor is left as it was
    for i, arg in enumerate(args):
        if arg is first:
            return (*args[:i], replacement, *args[i + 1 :]), kwargs
    key = next(k for k, v in kwargs.items() if v is first)
    return args, {**kwargs, key: replacement}
