"""Log-probabilities of responses to prompts that a group of rows shares, each prompt computed once.

``response_logprobs`` is what an RL step needs after sampling: for every response token, its
log-probability under a model given the prompt and the response tokens before it, at the
sampling temperature, with gradients (the policy) or without (the reference). With
``share_prompt=True`` each distinct prompt runs once into a KV cache, with grad, and the
group's responses run on the expanded cache (``prefix_cache.py``); the log-prob of a
response's first token comes from its prompt's last position. With ``share_prompt=False`` it
is the plain forward over every full row. Works for any Hugging Face causal LM (PEFT wrapped or
not), in plain PyTorch and under DeepSpeed ZeRO-1/2/3.
"""

from __future__ import annotations

import torch
from torch import nn

from .prefix_cache import PromptGroups, position_ids, prefill, takes_keyword
from .workspace import cache_kwarg


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
        share_prompt: compute each distinct prompt once (True) or every row in full (False).

    Exactness: the shared path computes the same function as the plain one; only floating-point
    summation order differs (other batch and sequence shapes). Measured on tiny Llama, Qwen2, GPT-NeoX and
    GPT-2 in fp32 (``tests/test_scoring.py``): log-probs within 1e-5 of the plain forward and gradients
    within 1e-5 relative, asserted at 1e-4. In bf16 expect bf16's own rounding (~1e-2).
    Gradient checkpointing in training turns transformers' cache off: the shared path then raises.
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
    row_prompt_ids = prompt_ids[groups.first][groups.of_row]
    row_prompt_mask = prompt_mask[groups.first][groups.of_row]
    attention = torch.cat([row_prompt_mask, response_mask.to(row_prompt_mask.dtype)], 1)
    positions = position_ids(attention)
    n = responses.shape[1]
    kwargs = {"position_ids": positions} if takes_keyword(model, "position_ids") else {}

    if share_prompt:
        cache, first_logits = prefill(model, prompt_ids, prompt_mask, groups, last_logits=True)
        if "position_ids" in kwargs:
            kwargs["position_ids"] = positions[:, -n:]
        kwargs[cache_kwarg(model)] = cache
        logits = model(input_ids=responses, attention_mask=attention, use_cache=True, **kwargs).logits
        logits = torch.cat([first_logits[groups.of_row, None], logits[:, :-1]], 1)
    else:
        if takes_keyword(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = n + 1  # only where they predict a response token
        sequences = torch.cat([row_prompt_ids, responses], 1)
        logits = model(input_ids=sequences, attention_mask=attention, use_cache=False, **kwargs).logits[:, -n - 1 : -1]
    logits = logits.float() / temperature
    return logits.gather(-1, responses.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
