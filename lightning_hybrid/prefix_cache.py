"""A prompt shared by several rows, computed once: the KV cache of distinct prompts, expanded.

In GRPO every prompt is answered G times, and a plain batch computes each prompt G times
(in the generation prefill, in the policy's forward and backward, in the reference's
forward). Causal attention makes a prompt's keys and values independent of what follows
it, so they can be computed once per distinct prompt and handed to every row that repeats
it, through transformers' own ``DynamicCache`` (``batch_select_indices``). Both the
generation context (``generation.py``) and the scoring function (``scoring.py``) use this.

Positions follow ``generate``'s own numbering (left padding does not count), so the cached
prompt is exactly what a plain forward would have computed, up to floating-point summation
order (different batch and sequence shapes): greedy tokens agree, logits within ~1e-6 (fp32).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig

from .hf import base_model
from .workspace import CACHE_KWARGS, cache_kwarg


@dataclass(frozen=True)
class PromptGroups:
    """Which rows of a batch repeat which prompt.

    ``first[d]`` is a row holding distinct prompt ``d``; ``of_row[r]`` the distinct prompt of row ``r``.
    """

    first: torch.Tensor  # (distinct,) row indices
    of_row: torch.Tensor  # (rows,) indices into ``first``

    @property
    def distinct(self) -> int:
        return self.first.numel()

    @property
    def rows(self) -> int:
        return self.of_row.numel()

    @property
    def repeats(self) -> bool:
        return self.distinct < self.rows

    @classmethod
    def of(cls, ids: torch.Tensor, mask: torch.Tensor) -> PromptGroups:
        """Rows are the same prompt when their ids and attention mask are equal, wherever they sit."""
        key = torch.cat([ids, mask.to(ids.dtype)], 1)
        _, of_row = torch.unique(key, dim=0, return_inverse=True)
        rows = torch.arange(ids.shape[0], device=ids.device)
        first = torch.full((int(of_row.max()) + 1,), ids.shape[0], dtype=rows.dtype, device=ids.device)
        first.scatter_reduce_(0, of_row, rows, reduce="amin")
        return cls(first, of_row)

    @classmethod
    def contiguous(cls, prompts: int, group_size: int, device: torch.device) -> PromptGroups:
        """Prompt ``p`` answered by rows ``p * group_size ... (p + 1) * group_size - 1`` (``repeat_interleave``)."""
        first = torch.arange(prompts, device=device)
        return cls(first, first.repeat_interleave(group_size))


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions as ``generate`` numbers them: left padding does not count (padded slots read 1, as there)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def why_not_shareable(model: nn.Module) -> str | None:
    """Why ``model``'s prompts cannot be cached and shared, or None when they can."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return f"{type(base).__name__} is not a decoder-only transformers model"
    supports = getattr(type(base), "_supports_default_dynamic_cache", None)
    if supports is None or not supports():
        return f"{type(base).__name__} does not use transformers' DynamicCache"
    return None


def sharing_refusal(
    model: nn.Module, config: GenerationConfig, kwargs: dict[str, Any], *, static_workspace: bool
) -> str | None:
    """Why the rows of one ``generate`` call cannot share a prefill of their prompts, or None when they can.

    ``config`` is the generation config transformers resolves for the call (``generation.prepare_call``), so
    a setting that reaches ``generate`` by any route (keyword, a ``GenerationConfig``, the model's defaults)
    counts. Sharing hands ``generate`` a cache already holding the prompt: anything that would not use that
    cache exactly as its own (no cache at all, another cache type, a search over several beams, a call that
    reports the prompt's own step) refuses.
    """
    if any(kwargs.get(k) is not None for k in CACHE_KWARGS):
        if static_workspace:
            return "kv_cache='static' preallocates the cache per row (use kv_cache='dynamic' to share prompts)"
        return "the call passes its own cache"
    if config.use_cache is False:
        return "use_cache=False makes generate recompute the whole sequence at every step, with no cache to share"
    if config.cache_implementation is not None:
        return f"the call asks for cache_implementation={config.cache_implementation!r}"
    if (config.num_beams or 1) > 1:
        return "beam search"
    if kwargs.get("assistant_model") is not None or config.prompt_lookup_num_tokens:
        return "assisted generation"
    if kwargs.get("custom_generate") is not None:
        return "custom_generate runs its own decoding loop"
    if config.output_attentions or config.output_hidden_states:
        return "output_attentions/output_hidden_states report the whole prompt's first step"
    extra = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask")]
    if extra:
        return f"tensor arguments {extra} besides input_ids and attention_mask"
    ids = kwargs["input_ids"]
    if ids.shape[1] < 2:
        return "a one-token prompt leaves nothing to cache"
    if kwargs.get("attention_mask") is None and config.pad_token_id is not None:
        if bool((ids == config.pad_token_id).any()):
            return "no attention_mask was passed and the prompts hold pad tokens"
    return why_not_shareable(model)


def takes_keyword(model: nn.Module, name: str) -> bool:
    base = base_model(model)
    return name in inspect.signature(base.forward).parameters


def prefill(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, groups: PromptGroups, *, last_logits: bool = False
) -> tuple[DynamicCache, torch.Tensor | None]:
    """Run each distinct prompt once into a fresh ``DynamicCache`` and expand it to every row.

    Returns the cache (one entry per row of ``ids``, ``ids.shape[1]`` positions) and, with
    ``last_logits``, the logits at each distinct prompt's last position (distinct, vocab).
    Gradients flow through both when enabled.
    """
    base = base_model(model)
    cache = DynamicCache(config=base.config)
    distinct_ids, distinct_mask = ids[groups.first], mask[groups.first]
    kwargs = {
        "input_ids": distinct_ids,
        "attention_mask": distinct_mask,
        cache_kwarg(model): cache,
        "use_cache": True,
    }
    if takes_keyword(model, "position_ids"):
        kwargs["position_ids"] = position_ids(distinct_mask)
    if takes_keyword(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # the lm_head over the whole prompt is wasted work
    output = model(**kwargs)
    if cache.get_seq_length() != ids.shape[1]:
        # transformers turns the cache off under gradient checkpointing in training, silently.
        raise RuntimeError(
            f"{type(base).__name__} did not fill its KV cache for the shared prompt (gradient checkpointing turns the"
            " cache off in training). Turn gradient checkpointing off, or score without a shared prompt"
            " (share_prompt=False)."
        )
    cache.batch_select_indices(groups.of_row)  # one entry per row (a differentiable gather)
    return cache, (output.logits[:, -1] if last_logits else None)
