"""The inverse-CDF sampler (its draws follow the distribution) and the sampled-token log-prob recorder."""

from __future__ import annotations

import pytest
import torch
from helpers import chi_square, chi_square_critical, prompts, tiny_llama

from lightning_hybrid.sampling import inverse_cdf_multinomial, inverse_cdf_sampling, recording_logprobs
from lightning_hybrid.scoring import response_logprobs


@pytest.mark.parametrize("vocab,draws", [(12, 120_000), (49152, 8_000)])
def test_draws_follow_the_distribution(vocab, draws):
    """A chi-square goodness-of-fit test on a fixed seed: draws from a skewed distribution with zero-weight
    tokens (unnormalised, as a top-k/top-p warper leaves them); with SmolLM2's vocabulary, a realistic head and a
    long tail (pooled into one bin). Zero-weight tokens are never drawn."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(vocab, generator=gen) ** 4  # skewed
    weights[torch.randperm(vocab, generator=gen)[: vocab // 3]] = 0.0
    if vocab > 12:  # a realistic head: 10 tokens carry 95% of the mass, the rest share 5%
        head = torch.randperm(vocab, generator=gen)[:10]
        weights = weights / weights.sum() * 0.05
        weights[head] = torch.rand(10, generator=gen) * 0.19
    weights = weights * 3.7  # unnormalised
    counts = torch.zeros(vocab)
    for _ in range(draws // 2000):  # 2000 rows a call, the same row repeated
        picked = inverse_cdf_multinomial(weights.expand(2000, vocab), generator=gen)
        assert picked.shape == (2000, 1)
        counts += torch.bincount(picked.view(-1), minlength=vocab).float()
    assert counts[weights == 0].sum() == 0
    statistic, df = chi_square(counts, weights)
    assert statistic < chi_square_critical(df), (statistic, df)


def test_a_wrong_sampler_fails_the_test():
    """The test above can fail: draws from a slightly different distribution (one token's weight +10%) do."""
    gen = torch.Generator().manual_seed(1)
    weights = torch.rand(12, generator=gen) + 0.1
    biased = weights.clone()
    biased[3] *= 1.1
    draws = 120_000
    picked = inverse_cdf_multinomial(biased.expand(draws, 12), generator=gen).view(-1)
    statistic, df = chi_square(torch.bincount(picked, minlength=12), weights)
    assert df == 11 and statistic > chi_square_critical(df)


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([[0.5, float("nan"), 0.5]]),
        torch.tensor([[0.0, 0.0, 0.0]]),
        torch.tensor([[0.5, -0.1, 0.6]]),
        torch.tensor([[0.5, float("inf"), 0.5]]),
    ],
    ids=["nan", "all-zero", "negative", "inf"],
)
def test_invalid_distributions_get_torchs_error(bad):
    with pytest.raises(RuntimeError, match="probability tensor|invalid multinomial"):
        inverse_cdf_multinomial(bad)


def test_the_block_replaces_single_draws_only_and_puts_torch_back():
    original = torch.multinomial
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    with inverse_cdf_sampling():
        assert torch.multinomial is not original
        torch.manual_seed(0)
        assert torch.multinomial(probs, num_samples=1)[1].item() == 1
        torch.manual_seed(0)
        mine = torch.multinomial(probs, num_samples=1)
        torch.manual_seed(0)
        assert torch.equal(mine, inverse_cdf_multinomial(probs))  # the generator stream is torch's default one
        torch.manual_seed(0)
        two = torch.multinomial(probs[:1], num_samples=2)  # several samples: torch's own
        torch.manual_seed(0)
        assert torch.equal(two, original(probs[:1], 2))
    assert torch.multinomial is original


def test_a_replacement_made_by_someone_else_is_left_alone(monkeypatch):
    def theirs(*args, **kwargs):
        return "theirs"

    monkeypatch.setattr(torch, "multinomial", theirs)
    with inverse_cdf_sampling():
        assert torch.multinomial is theirs
    assert torch.multinomial is theirs


@pytest.mark.parametrize("warp", [dict(temperature=0.7, top_k=0), dict(temperature=1.3, top_k=5, top_p=0.9), {}])
def test_recorded_logprobs_are_those_of_the_distribution_drawn_from(warp):
    """With plain transformers generate: each new token's recorded log-prob equals log_softmax of transformers'
    own processed scores (after temperature and warpers) at that token, and, for plain sampling at a temperature,
    the scoring forward's within 1e-5 (fp32). After EOS: 0. The model is as it was after the block."""
    model = tiny_llama().eval()
    ids, mask = prompts(batch=4, length=6)
    sample = dict(do_sample=True, **warp) if warp else dict(do_sample=False)
    with torch.no_grad(), recording_logprobs(model, prompt_length=ids.shape[1]) as recorder:
        torch.manual_seed(0)
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=7,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **sample,
        )
    assert "_get_logits_processor" not in model.__dict__
    got = recorder.logprobs(out.sequences)
    new = out.sequences[:, ids.shape[1] :]
    want = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).gather(-1, new[..., None])[..., 0]
    assert got.shape == new.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if warp.get("top_k") == 0:
        with torch.no_grad():
            scored = response_logprobs(model, ids, mask, new, temperature=warp["temperature"], share_prompt=False)
        assert (got - scored).abs().max() < 1e-5
    eos = int(new[0, 2])
    masked = recorder.logprobs(out.sequences, eos_ids=[eos])
    after = (torch.cumsum((new == eos).long(), 1) - (new == eos).long()) > 0
    assert torch.all(masked[after] == 0) and torch.equal(masked[~after], got[~after])
