"""Log-probabilities of responses to prompts that a group of rows shares, each prompt computed once.

``response_logprobs`` is what an RL step needs after sampling: for every response token, its
log-probability under a model given the prompt and the response tokens before it, at the
sampling temperature, with gradients (the policy) or without (the reference).

With ``share_prompt=True`` each distinct prompt is computed once for its whole group, in one of
two ways:

* packed (short groups): one row per distinct prompt, ``[prompt, response 1, ..., response G]``,
  with a block attention mask (each response sees the prompt and itself, causally) and each
  response's positions continuing its prompt's. One forward, so under ZeRO-3 one gather of each
  weight and one backward, as the plain path has; gradient checkpointing works.
* cached (long groups, or a model not verified with custom masks): the distinct prompts run once
  into a KV cache, with grad, and the responses on the expanded cache (``prefix_cache.py``):
  attention stays per row, but under ZeRO-3 the model is gathered twice per forward.

``share_prompt=False`` is the plain forward over every full row.
"""

from __future__ import annotations

import torch
from torch import nn

from .hf import base_model
from .prefix_cache import PromptGroups, position_ids, prefill, takes_keyword
from .workspace import cache_kwarg

# Model types whose attention honours a custom 4D mask, checked by tests/test_scoring.py.
PACKED_MODEL_TYPES = frozenset({"llama", "qwen2", "gpt_neox", "gpt2"})
# Longest packed row (prompt + group x response): its dense mask costs length^2 per prompt.
PACKED_MAX_LENGTH = 2048


def response_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    share_prompt: bool = True,
) -> torch.Tensor:
    """``log p(responses[r, t] | prompt of r, responses[r, :t])`` at ``temperature``: shape (rows, R), float32.

    Args:
        model: a causal LM; it is called as ``model(input_ids=..., attention_mask=..., ...)``.
        prompt_ids, prompt_mask: left-padded prompts (prompts of different lengths are fine), either one row
            per response row (rows repeating a prompt are found, as GRPO's ``repeat_interleave`` makes
            them), or one row per *distinct* prompt, each answered by ``rows / prompts`` consecutive rows.
        responses: (rows, R) the generated tokens, prompt columns excluded.
        response_mask: (rows, R) 1 for tokens that count (e.g. up to the first EOS); masked tokens are not
            attended to, and their log-probs are returned but meaningless. Default: all ones.
        temperature: the logits are divided by it, as ``generate`` did when sampling.
        share_prompt: compute each distinct prompt once per group (True) or every row in full (False).

    Exactness: every path computes the same function; only floating-point summation order differs
    (other batch and sequence shapes). Measured on tiny Llama, Qwen2, GPT-NeoX and GPT-2 in fp32
    (``tests/test_scoring.py``): log-probs within 1e-5 of each row computed alone and gradients within
    1e-5 relative of the plain forward's, asserted at 1e-4. In bf16 expect bf16's own rounding (~1e-2).
    The cached path cannot run under gradient checkpointing in training (transformers turns the cache
    off): it raises.
    """
    if responses.dim() != 2 or prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            "response_logprobs() needs 2-D prompt_ids and prompt_mask of one shape and 2-D responses, got"
            f" {tuple(prompt_ids.shape)}, {tuple(prompt_mask.shape)} and {tuple(responses.shape)}."
        )
    rows, prompts = responses.shape[0], prompt_ids.shape[0]
    if rows == 0 or responses.shape[1] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"response_logprobs() got an empty batch: {rows} responses of {responses.shape[1]} tokens.")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    if response_mask is None:
        response_mask = torch.ones_like(responses)
    elif response_mask.shape != responses.shape:
        raise ValueError(f"`response_mask` {tuple(response_mask.shape)} must match responses {tuple(responses.shape)}.")
    if prompts == rows:
        groups = PromptGroups.of(prompt_ids, prompt_mask)
    elif rows % prompts == 0:
        groups = PromptGroups.contiguous(prompts, rows // prompts, prompt_ids.device)
    else:
        raise ValueError(
            f"{rows} responses to {prompts} prompts: pass one prompt row per response, or one per distinct prompt"
            " with each answered by the same number of consecutive responses."
        )
    prompt_ids, prompt_mask = prompt_ids[groups.first], prompt_mask[groups.first]  # one row per distinct prompt
    response_mask = response_mask.to(prompt_mask.dtype)
    if not share_prompt:
        logits = _plain_logits(model, prompt_ids, prompt_mask, responses, response_mask, groups)
    elif _packable(model, prompt_ids.shape[1] + _largest_group(groups) * responses.shape[1]):
        logits = _packed_logits(model, prompt_ids, prompt_mask, responses, response_mask, groups)
    else:
        logits = _cached_logits(model, prompt_ids, prompt_mask, responses, response_mask, groups)
    logits = logits.float() / temperature
    return logits.gather(-1, responses.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _plain_logits(model, prompt_ids, prompt_mask, responses, response_mask, groups: PromptGroups) -> torch.Tensor:
    """Every row in full; logits only where they predict a response token."""
    n = responses.shape[1]
    attention = torch.cat([prompt_mask[groups.of_row], response_mask], 1)
    kwargs = {"position_ids": position_ids(attention)} if takes_keyword(model, "position_ids") else {}
    if takes_keyword(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = n + 1  # the lm_head over the prompt is wasted work
    sequences = torch.cat([prompt_ids[groups.of_row], responses], 1)
    return model(input_ids=sequences, attention_mask=attention, use_cache=False, **kwargs).logits[:, -n - 1 : -1]


def _cached_logits(model, prompt_ids, prompt_mask, responses, response_mask, groups: PromptGroups) -> torch.Tensor:
    """The distinct prompts once into a KV cache, the responses on it (expanded to every row)."""
    distinct = PromptGroups(torch.arange(groups.distinct, device=prompt_ids.device), groups.of_row)
    cache, first_logits = prefill(model, prompt_ids, prompt_mask, distinct, last_logits=True)
    attention = torch.cat([prompt_mask[groups.of_row], response_mask], 1)
    kwargs = {cache_kwarg(model): cache}
    if takes_keyword(model, "position_ids"):
        kwargs["position_ids"] = position_ids(attention)[:, prompt_ids.shape[1] :]
    logits = model(input_ids=responses, attention_mask=attention, use_cache=True, **kwargs).logits
    return torch.cat([first_logits[groups.of_row, None], logits[:, :-1]], 1)


def _packed_logits(model, prompt_ids, prompt_mask, responses, response_mask, groups: PromptGroups) -> torch.Tensor:
    """One row per distinct prompt: ``[prompt, its responses...]`` under a block mask, in one forward."""
    prompt_len, n = prompt_ids.shape[1], responses.shape[1]
    device, rows = responses.device, groups.rows
    # Each response row's slot within its prompt's packed row.
    order = torch.argsort(groups.of_row, stable=True)
    starts = torch.searchsorted(groups.of_row[order], torch.arange(groups.distinct, device=device))
    slot = torch.empty_like(groups.of_row)
    slot[order] = torch.arange(rows, device=device) - starts[groups.of_row[order]]
    width = prompt_len + (int(slot.max()) + 1) * n
    columns = prompt_len + slot[:, None] * n + torch.arange(n, device=device)  # (rows, n) packed columns

    ids = torch.zeros(groups.distinct, width, dtype=responses.dtype, device=device)
    ids[:, :prompt_len] = prompt_ids
    ids[groups.of_row[:, None], columns] = responses
    # Which packed column each column may attend to: the prompt (causally, its real tokens), and within
    # a response slot, its own earlier real tokens. Every column sees itself, so no row is empty.
    segment = torch.full((groups.distinct, width), -1, dtype=torch.long, device=device)  # -1: prompt, else slot
    real = torch.zeros(groups.distinct, width, dtype=torch.bool, device=device)
    real[:, :prompt_len] = prompt_mask.bool()
    segment[groups.of_row[:, None], columns] = slot[:, None].expand(-1, n)
    real[groups.of_row[:, None], columns] = response_mask.bool()
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    key_in_prompt = (segment == -1)[:, None, :]
    same_slot = segment[:, :, None] == segment[:, None, :]
    allowed = causal & real[:, None, :] & (key_in_prompt | same_slot)
    allowed |= torch.eye(width, dtype=torch.bool, device=device)
    dtype = model.get_input_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)

    # Positions as each full row [prompt, response] numbers them (left padding does not count).
    positions = torch.ones(groups.distinct, width, dtype=torch.long, device=device)
    positions[:, :prompt_len] = position_ids(prompt_mask)
    row_positions = position_ids(torch.cat([prompt_mask[groups.of_row], response_mask], 1))[:, prompt_len:]
    positions[groups.of_row[:, None], columns] = row_positions

    kwargs = {"position_ids": positions}
    if takes_keyword(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = width - prompt_len + 1  # from the prompt's last position on
    logits = model(input_ids=ids, attention_mask=mask[:, None], use_cache=False, **kwargs).logits
    dropped = width - logits.shape[1]  # leading columns logits_to_keep left out
    # Response token t is predicted at its previous column; token 0 at the prompt's last one.
    previous = torch.cat([torch.full((rows, 1), prompt_len - 1, device=device), columns[:, :-1]], 1)
    return logits[groups.of_row[:, None], previous - dropped]


def _largest_group(groups: PromptGroups) -> int:
    return int(torch.bincount(groups.of_row).max())


def _packable(model: nn.Module, packed_length: int) -> bool:
    """Whether the one-forward packed path applies: a verified model type with a plain attention kernel."""
    base = base_model(model)
    config = getattr(base, "config", None)
    return (
        packed_length <= PACKED_MAX_LENGTH
        and getattr(config, "model_type", None) in PACKED_MODEL_TYPES
        and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
        and "sliding_attention" not in (getattr(config, "layer_types", None) or [])
        and takes_keyword(model, "position_ids")
    )
