"""Sampling inside the generation context: an exact, cheaper draw, and the log-prob of every chosen token.

* ``inverse_cdf_sampling()``: for the block, ``torch.multinomial(probs, 1)`` (what transformers calls for
  each sampled token) draws by inverting the cumulative distribution: one uniform number per row, a float64
  cumulative sum, a binary search. The same distribution as torch's own draw, which takes one exponential
  number per vocabulary entry (the exponential race): 51.8 ms against 4.3 ms for 16 rows of SmolLM2's 49k
  vocabulary on this project's 2-core CPU (``benchmarks/sampler.py``). The draws differ from transformers'
  for the same seed.
* ``recording_logprobs(model)``: every ``generate`` of ``model`` in the block runs a ``SampledLogprobs``
  after every other logits processor (temperature and all warpers), which keeps the log-prob of each chosen
  token under the distribution it was drawn from, one step at a time: no full-vocabulary scores are kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import LogitsProcessor

_TORCH_MULTINOMIAL = torch.multinomial  # torch's own, taken at import: the fallback and what the block restores


def inverse_cdf_multinomial(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` (rows, vocabulary; unnormalised weights >= 0), as ``(rows, 1)`` indices.

    Token ``i`` is drawn with probability ``(cdf[i] - cdf[i-1]) / cdf[-1]``, the cumulative sum taken in float64:
    ``probs[i] / probs.sum()`` to ~1e-12 relative, for any vocabulary size. Rows torch would refuse (NaN, inf,
    negative or all-zero weights) go to ``torch.multinomial``, for its error.
    """
    cdf = probs.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()) or bool((probs < 0).any()):
        return _TORCH_MULTINOMIAL(probs, 1, generator=generator)
    uniform = torch.rand(total.shape, dtype=torch.float64, device=probs.device, generator=generator)
    # The first position whose cumulative weight exceeds u: never a zero-weight token, since its cdf equals
    # the one before it. u < total, except when rounding lifts (1 - 2**-53) * total onto it.
    index = torch.searchsorted(cdf, uniform * total, right=True)
    vocab = probs.shape[-1]
    past_end = index == vocab
    if bool(past_end.any()):
        last_with_weight = vocab - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)
        index = torch.where(past_end, last_with_weight, index)
    return index


def _multinomial(input, num_samples, replacement=False, *, generator=None, out=None):  # noqa: A002 (torch's names)
    if num_samples != 1 or out is not None or input.dim() != 2 or not input.is_floating_point():
        return _TORCH_MULTINOMIAL(input, num_samples, replacement, generator=generator, out=out)
    return inverse_cdf_multinomial(input, generator)


@contextmanager
def inverse_cdf_sampling() -> Iterator[None]:
    """``torch.multinomial(probs, 1)`` draws by ``inverse_cdf_multinomial`` for the block; any other call
    (several samples, 1-D input, ``out=``) is torch's own. A replacement someone else made is left alone."""
    if torch.multinomial is not _TORCH_MULTINOMIAL:
        yield
        return
    torch.multinomial = _multinomial
    try:
        yield
    finally:
        torch.multinomial = _TORCH_MULTINOMIAL


class SampledLogprobs(LogitsProcessor):
    """Records ``log p(token)`` of every token ``generate`` chooses, under the scores it chose from.

    Run last (``recording_logprobs``), it sees the scores after temperature and every warper: the sampling
    distribution (for greedy search, the model's own). At each step it keeps the scores of that step and their
    log-normaliser, and reads the previous step's chosen token off the ``input_ids`` it is called with;
    ``logprobs(sequences)`` reads the last one.
    """

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length
        self.reset()

    def reset(self) -> None:
        self._steps: list[torch.Tensor] = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (scores, logsumexp) of the latest step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            self._steps.append(self._chosen(input_ids[:, -1]))
        scores32 = scores.float()
        self._last = (scores32, torch.logsumexp(scores32, dim=-1))
        return scores

    def _chosen(self, tokens: torch.Tensor) -> torch.Tensor:
        scores, normaliser = self._last
        return scores.gather(-1, tokens[:, None].to(scores.device)).squeeze(-1) - normaliser

    def logprobs(self, sequences: torch.Tensor, eos_ids: Sequence[int] = ()) -> torch.Tensor:
        """``(rows, new tokens)`` float32: each new token's log-prob; 0 after a row's first EOS (padding)."""
        new = sequences[:, self.prompt_length :]
        steps = list(self._steps)
        if self._last is not None and len(steps) < new.shape[1]:
            steps.append(self._chosen(new[:, len(steps)]))
        if not steps:
            return torch.zeros(new.shape, dtype=torch.float32, device=sequences.device)
        out = torch.stack(steps[: new.shape[1]], dim=1).to(sequences.device)
        if eos_ids:
            is_eos = torch.isin(new, torch.tensor(list(eos_ids), device=new.device))
            after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
            out = out.masked_fill(after_eos, 0.0)
        return out


@contextmanager
def recording_logprobs(model: nn.Module, prompt_length: int) -> Iterator[SampledLogprobs]:
    """For the block, ``model.generate`` (a transformers model) runs a ``SampledLogprobs`` after all of its logits
    processors; ``prompt_length``: the prompt columns of the sequences it returns (0 for ``inputs_embeds``).

    A processor passed to ``generate(logits_processor=...)`` would run *before* the warpers (transformers
    appends temperature, top-k and top-p after the caller's processors), so the recorder is appended to the
    list transformers builds, through its ``_get_logits_processor`` (present since transformers 4.26).
    """
    build = getattr(model, "_get_logits_processor", None)
    if build is None:
        raise TypeError(
            f"output_logprobs=True needs a transformers model (GenerationMixin); {type(model).__name__} has no"
            " `_get_logits_processor`."
        )
    recorder = SampledLogprobs(prompt_length)
    had_own = "_get_logits_processor" in model.__dict__

    def with_recorder(*args, **kwargs):  # once per generate call: the latest call's tokens are recorded
        processors = build(*args, **kwargs)
        recorder.reset()
        processors.append(recorder)
        return processors

    model._get_logits_processor = with_recorder
    try:
        yield recorder
    finally:
        if had_own:
            model._get_logits_processor = build
        else:
            del model._get_logits_processor
