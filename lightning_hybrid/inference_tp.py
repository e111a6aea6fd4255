"""Inference tensor parallelism: with ``inference_tp_size = T`` each rank holds 1/T of the actor.

DeepSpeed's hybrid engine promises this but, without an external mpu, never slices the
weights and never gathers the attention mask (DeepSpeed issues 3998, 5656, 4345). Here:

* **Groups**: ranks form ``world / T`` groups of ``T`` consecutive ranks.
* **Slicing**: decoder layers are gathered from ZeRO-3 ``tp_gather_partition_size`` at a
  time, LoRA is fused into them, and each is copied into a *skeleton*: the same module
  classes with plain tensors and no ZeRO-3 hooks, whose linears DeepSpeed's AutoTP
  replaces by its tensor-parallel layers holding only this rank's slice. The real layer is
  then released (re-partitioned) and the skeleton stands in for it in the ``ModuleList``
  until the context ends. An untied output head is sliced the same way. Embeddings and
  norms stay whole, gathered for the context.
* **Pooling**: the T ranks of a group generate as one batch. Their prompts are left-padded
  to a common length and concatenated; each rank gets back exactly its own rows, cut to
  what it would have generated alone. A plain forward (``actor(ids)``) is pooled the same
  way (right-padded, so positions do not move). Sampling uses the group leader's RNG stream,
  so the ranks of a group draw the same tokens.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from deepspeed.module_inject.auto_tp import AutoTP
from deepspeed.runtime.zero import GatheredParameters
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .gather import DetachedZeroHooks, Materializer, decoder_layers, is_zero3_param, missing_params
from .hf import base_model
from .lora import LoraFusion, is_dschat_lora, is_peft_lora, lora_modules

# Architectures whose tensor-parallel generation equals the unsharded model's, token for
# token, in tests/test_inference_tp.py (AutoTP finds the layer plan; the attention
# infers its head count from the sliced projections).
VERIFIED_MODEL_TYPES = ("llama", "qwen2", "gpt_neox")

_MODULE_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def check_tp_support(module: nn.Module, tp_size: int) -> None:
    """Refuses, before any work, a model that tensor-parallel generation has not been verified on."""
    config = getattr(base_model(module), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in VERIFIED_MODEL_TYPES:
        raise ValueError(
            f"inference_tp_size={tp_size} is verified for model types {list(VERIFIED_MODEL_TYPES)}, and this actor is"
            f" {type(base_model(module)).__name__} (model_type={model_type!r}). Use inference_tp_size=1 for it."
        )
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    # AutoTP splits attention by whole key/value heads (unevenly if it must): each rank needs one.
    if heads is None or heads % kv_heads:
        raise ValueError(
            f"inference_tp_size={tp_size} splits attention by key/value head groups, and"
            f" {type(base_model(module)).__name__} has {heads} attention heads for {kv_heads} key/value heads."
            " Use inference_tp_size=1 for it."
        )
    if kv_heads < tp_size:
        raise ValueError(
            f"inference_tp_size={tp_size} is more than the {kv_heads} key/value heads of"
            f" {type(base_model(module)).__name__}: each rank needs at least one. Use inference_tp_size <= {kv_heads}."
        )


_GROUPS: dict[tuple[int, int, int], Any] = {}


def inference_tp_group(tp_size: int):
    """This rank's group of ``tp_size`` consecutive ranks (all groups are created on every rank, once
    per default process group)."""
    world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
    key = (id(torch_dist.distributed_c10d._get_default_group()), world, tp_size)
    if key not in _GROUPS:
        mine = None
        for start in range(0, world, tp_size):
            group = torch_dist.new_group(list(range(start, start + tp_size)))
            if start <= rank < start + tp_size:
                mine = group
        _GROUPS[key] = mine
    return _GROUPS[key]


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for inference: same classes, plain parameters sharing its data, no hooks.

    LoRA layers (fused already) become the linear layers they wrap, which is what AutoTP
    knows how to slice.
    """
    if is_peft_lora(module):
        return skeleton(module.get_base_layer())
    if is_dschat_lora(module):
        return _plain_linear(module.weight.data, None if module.bias is None else module.bias.data)
    clone = copy.copy(module)
    clone._parameters = {
        name: None if p is None else nn.Parameter(p.data, requires_grad=False) for name, p in module._parameters.items()
    }
    clone._buffers = dict(module._buffers)
    clone._modules = {name: None if c is None else skeleton(c) for name, c in module._modules.items()}
    for name in _MODULE_HOOKS:
        setattr(clone, name, OrderedDict())
    return clone


def _compact(module: nn.Module) -> None:
    """Copies any parameter that still views a larger buffer (ZeRO-3's gathered flat buffer)."""
    for p in module.parameters():
        if p.data.untyped_storage().nbytes() > p.numel() * p.element_size():
            p.data = p.data.clone()


def _slots(root: nn.Module, layers: list[nn.Module]) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of each of ``layers`` inside ``root``."""
    where = {id(child): (parent, name) for parent in root.modules() for name, child in parent.named_children()}
    return [where[id(layer)] for layer in layers]


class TensorParallelGather(Materializer):
    """Materializes this rank's 1/T of the generation module and pools the group's requests."""

    collectives_per_forward = False  # the group steps together; no ZeRO-3 gathers while generating
    pools_ranks = True

    def __init__(self, module: nn.Module, engine: nn.Module, tp_size: int, group_size: int) -> None:
        super().__init__()
        self.module, self.engine, self.tp_size, self.group_size = module, engine, tp_size, group_size
        self.base = base_model(module)
        self.group = inference_tp_group(tp_size)
        self.leader = torch_dist.get_rank() // tp_size * tp_size
        self.layers = decoder_layers(module)
        if not self.layers:
            raise RuntimeError(f"inference_tp_size > 1 found no decoder layers in {type(self.base).__name__}.")
        # Which linears are row-parallel (followed by an all-reduce), per layer class: AutoTP's plan.
        self.plan = dict(AutoTP.tp_parser(skeleton(self.base)))
        head = self.base.get_output_embeddings()
        tied = head is not None and head.weight is getattr(self.base.get_input_embeddings(), "weight", None)
        self.head = None if head is None or tied or not isinstance(head, nn.Linear) else head
        sliced = {id(p) for layer in self.layers for p in layer.parameters()}
        if self.head is not None:
            sliced |= {id(p) for p in self.head.parameters()}
        self.resident = [p for p in module.parameters() if is_zero3_param(p) and id(p) not in sliced]
        self._hooks: DetachedZeroHooks | None = None
        self._resident: GatheredParameters | None = None
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, name, original)
        self._resident_fusion = LoraFusion()
        self._pooling = False
        self._group_knows = False

    # -- entering and leaving ---------------------------------------------------------------
    def __enter__(self) -> TensorParallelGather:
        try:
            self._materialize()
        except BaseException as error:  # undo what was done, and tell the group
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def _materialize(self) -> None:
        self._hooks = DetachedZeroHooks(list(self.module.modules()), self.engine)
        resident = missing_params(self.resident, self.engine)
        self.gathered_bytes = sum(p.ds_numel * p.element_size() for p in resident)
        self._resident = GatheredParameters(resident)
        self._resident.__enter__()
        in_sliced = {id(m) for layer in self.layers for m in layer.modules()}
        if self.head is not None:
            in_sliced |= {id(m) for m in self.head.modules()}
        self._resident_fusion.fuse([m for m in lora_modules(self.module) if id(m) not in in_sliced])
        slots = _slots(self.module, self.layers)
        for i in range(0, len(self.layers), self.group_size):
            chunk = list(zip(self.layers[i : i + self.group_size], slots[i : i + self.group_size]))
            self._slice([layer for layer, _ in chunk], [slot for _, slot in chunk], self._slice_layer)
        if self.head is not None:
            self._slice([self.head], _slots(self.module, [self.head]), self._slice_head)
        self._wrap_forward()

    def _slice(self, originals: list[nn.Module], slots: list[tuple[nn.Module, str]], build: Callable) -> None:
        """Gathers ``originals`` from ZeRO-3, fuses their LoRA, swaps in sliced skeletons, releases them."""
        params = missing_params([p for m in originals for p in m.parameters()], self.engine)
        self.gathered_bytes += sum(p.ds_numel * p.element_size() for p in params)
        fusion = LoraFusion()
        with GatheredParameters(params):
            try:
                fusion.fuse([m for original in originals for m in lora_modules(original)])
                for original, (parent, name) in zip(originals, slots):
                    sliced = build(original, name)
                    _compact(sliced)
                    self.sliced_bytes += sum(p.numel() * p.element_size() for p in sliced.parameters())
                    setattr(parent, name, sliced)
                    self._swapped.append((parent, name, original))
            finally:
                fusion.unfuse()

    def _autotp(self, module: nn.Module, all_reduce: set[str]) -> AutoTP:
        autotp = AutoTP(module, all_reduce, "", None, None, None, model_config=self.base.config)
        autotp.set_tensor_parallel_config(self.tp_size, self.group)
        autotp.update_linear_policies()
        return autotp

    def _slice_layer(self, layer: nn.Module, name: str) -> nn.Module:
        sliced = skeleton(layer)
        all_reduce = next((names for cls, names in self.plan.items() if isinstance(layer, cls)), None)
        if all_reduce is None:
            raise RuntimeError(f"AutoTP has no tensor-parallel plan for {type(layer).__name__}.")
        return self._autotp(sliced, set(all_reduce))._replace_module(sliced)

    def _slice_head(self, head: nn.Module, name: str) -> nn.Module:
        holder = nn.Module()
        holder.add_module(name, skeleton(head))
        return getattr(self._autotp(holder, {name})._replace_last_linear_module(holder), name)

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            self._restore()
        finally:
            if not self._group_knows:
                # The group leaves together and learns of any rank's failure (see _exchange).
                try:
                    self._exchange(None, None if exc is None else f"{type(exc).__name__}: {exc}")
                except ValueError:
                    if exc is None:
                        raise  # another rank failed: fail here too, with its error

    def _restore(self) -> None:
        try:
            self._unwrap_forward()
            while self._swapped:
                parent, name, original = self._swapped.pop()
                sliced = getattr(parent, name)
                setattr(parent, name, original)
                # Free the slices now: DeepSpeed's TP layers and their weights reference each other
                # (``weight.gather_params`` is a bound method), so they would wait for the cyclic GC
                # and a few contexts' slices would pile up. The skeleton's tensors are its own.
                for param in sliced.parameters():
                    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            self._resident_fusion.unfuse()
            if self._resident is not None:
                self._resident.__exit__(None, None, None)
        finally:
            self._resident = None
            if self._hooks is not None:
                self._hooks.restore()
                self._hooks = None

    # -- pooling the group's requests ---------------------------------------------------------
    def _exchange(self, payload: Any, error: str | None) -> list[Any]:
        """Every rank's (payload, error) in group order; raises on every rank if any rank failed.

        A rank that fails inside the context between two exchanges sends its error in the
        exchange of ``__exit__``, which the others are waiting in or will reach: no rank is
        left waiting for a partner that is gone.
        """
        gathered: list[Any] = [None] * self.tp_size
        torch_dist.all_gather_object(gathered, (payload, error), group=self.group)
        for rank, (_, failure) in enumerate(gathered):
            if failure is not None:
                self._group_knows = True  # every rank of the group raises here, together
                raise ValueError(f"Tensor-parallel generation: rank {self.leader + rank} of its group: {failure}")
        return [p for p, _ in gathered]

    @contextmanager
    def pooled(self, kwargs: dict[str, Any], pad_id: int, eos_ids: list[int]) -> Iterator[PooledBatch]:
        """The group's prompts as one batch, for the block: the caller generates ``batch.kwargs`` (the same batch
        on every rank of the group, from the same RNG state) and takes its own rows with ``batch.mine(output)``."""
        ids, mask, error = self._own_request(kwargs, pad_id, "generate")
        settings = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
        wants_dict = settings.get("return_dict_in_generate") or _config_flag(kwargs, "return_dict_in_generate")
        if error is None and wants_dict:
            error = "return_dict_in_generate=True is not supported with inference_tp_size > 1 (sequences only)"
        fingerprint = repr(sorted((k, repr(v)) for k, v in settings.items()))
        parts = self._exchange((ids, mask, fingerprint), error)
        if len({fp for _, _, fp in parts}) > 1:
            raise ValueError(
                "The ranks of a tensor-parallel group called generate() with different settings; they generate one"
                " batch together, so every setting but the prompts must match."
            )
        pooled_ids, pooled_mask, (offset, rows, pad_left) = self._pool(parts, pad_id, left=True)
        device = kwargs["input_ids"].device
        self._sync_rng()
        self._pooling = True  # the forwards inside are generate()'s own: already one batch for the group
        try:
            yield PooledBatch(
                {"input_ids": pooled_ids.to(device), "attention_mask": pooled_mask.to(device), **settings},
                slice(offset, offset + rows),
                pad_left,
                ids.shape[1],
                eos_ids,
            )
        finally:
            self._pooling = False

    def _own_request(self, kwargs: dict[str, Any], pad_id: int, call: str) -> tuple:
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        allowed = ("input_ids", "attention_mask")
        extra = [k for k, v in kwargs.items() if k not in allowed and isinstance(v, torch.Tensor)]
        if extra:
            return None, None, f"{call}() with tensor arguments {extra} cannot be pooled across the group"
        if mask is None:  # what transformers would infer for this rank alone
            mask = (ids != pad_id).long() if pad_id is not None and (ids == pad_id).any() else torch.ones_like(ids)
        return ids.cpu(), mask.cpu(), None

    def _pool(self, parts: list, pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        length = max(ids.shape[1] for ids, _, _ in parts)
        me = torch_dist.get_rank(self.group)
        offset = sum(ids.shape[0] for ids, _, _ in parts[:me])
        own = parts[me][0]
        pooled_ids, pooled_mask = [], []
        for ids, mask, _ in parts:
            pad = (length - ids.shape[1], 0) if left else (0, length - ids.shape[1])
            pooled_ids.append(F.pad(ids, pad, value=pad_id))
            pooled_mask.append(F.pad(mask, pad, value=0))
        pad_left = length - own.shape[1] if left else 0
        return torch.cat(pooled_ids), torch.cat(pooled_mask), (offset, own.shape[0], pad_left)

    def _sync_rng(self) -> None:
        state = [torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None]
        torch_dist.broadcast_object_list(state, src=self.leader, group=self.group)
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    def _wrap_forward(self) -> None:
        module, original = self.module, self.module.forward
        self._had_forward = "forward" in module.__dict__

        @functools.wraps(original)
        def pooled_forward(*args, **kwargs):
            if self._pooling:  # generate()'s own forwards: already one batch for the group
                return original(*args, **kwargs)
            return self._pooled_forward(original, args, kwargs)

        module.forward = pooled_forward
        self._original_forward = original

    def _unwrap_forward(self) -> None:
        if getattr(self, "_original_forward", None) is None:
            return
        if self._had_forward:
            self.module.forward = self._original_forward
        else:
            del self.module.forward
        self._original_forward = None

    def _pooled_forward(self, forward: Callable, args: tuple, kwargs: dict[str, Any]):
        """``actor(ids, attention_mask=...)`` for the whole group: this rank's logits back."""
        if args:
            kwargs = {**kwargs, "input_ids": args[0]}
        error = None
        if len(args) > 1:
            error = "forward() takes input_ids positionally and everything else by keyword"
        elif not isinstance(kwargs.get("input_ids"), torch.Tensor):
            error = "forward() needs input_ids"
        elif kwargs.get("labels") is not None:
            error = "forward() with labels would mix the group's rows into one loss; compute it from the logits"
        ids = mask = None
        if error is None:
            ids, mask, error = self._own_request(kwargs, None, "forward")
        settings = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "labels")}
        parts = self._exchange((ids, mask, ""), error)
        pooled_ids, pooled_mask, (offset, rows, _) = self._pool(parts, 0, left=False)
        device = kwargs["input_ids"].device
        self._pooling = True
        try:
            out = forward(input_ids=pooled_ids.to(device), attention_mask=pooled_mask.to(device), **settings)
        finally:
            self._pooling = False
        logits = out.logits[offset : offset + rows, : ids.shape[1]]
        return CausalLMOutputWithPast(logits=logits)


@dataclass
class PooledBatch:
    """A tensor-parallel group's requests as one batch (``kwargs``), and which of its rows are this rank's."""

    kwargs: dict[str, Any]
    rows: slice
    pad_left: int  # columns of left padding this rank's prompts got to match the group's longest
    prompt_length: int
    eos_ids: list[int]

    def mine(self, sequences: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the pooled output, as generating them alone would have returned them."""
        return _cut_finished(sequences[self.rows, self.pad_left :], self.prompt_length, self.eos_ids)


def _config_flag(kwargs: dict[str, Any], name: str) -> bool:
    config = kwargs.get("generation_config")
    return bool(getattr(config, name, False))


def _cut_finished(sequences: torch.Tensor, prompt_len: int, eos_ids: list[int]) -> torch.Tensor:
    """Drops the trailing columns only the group's other rows needed: what this rank alone would return."""
    if not eos_ids or sequences.shape[1] == prompt_len:
        return sequences
    new = sequences[:, prompt_len:]
    is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
    ended = is_eos.any(dim=1)
    if not bool(ended.all()):
        return sequences  # some row ran to the limit: the full width is what it would have had
    needed = int((is_eos.float().argmax(dim=1) + 1).max())
    return sequences[:, : prompt_len + needed]
