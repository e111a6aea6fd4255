"""On one GPU: the RL step's own pieces (``bash tests/cuda/run.sh``): rollout log-probs, one gather per step, the
inverse-CDF sampler.

The CUDA counterparts of tests/test_generation.py::test_output_logprobs_equal_the_scoring_forward,
tests/test_gather.py::test_gather_once_per_step_trains_the_same_weights and tests/test_sampling.py, with the same
helpers. Each test prints one ``GENCUDA {json}`` line (the measured gap, gathers or draw times). A CPU dry run of
this file sets DEVICE = "cpu" and drops the mark.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import (
    RELEASE_AFTER_USE,
    GatherOnceModule,
    RolloutModule,
    add_peft_lora,
    chi_square,
    chi_square_critical,
    ds_config,
    fit,
    prompts,
    snapshot,
    tiny_llama,
    unsharded_reference,
)

from lightning_hybrid import HybridEngineStrategy
from lightning_hybrid.gather import native_linear
from lightning_hybrid.sampling import inverse_cdf_multinomial
from lightning_hybrid.scoring import response_logprobs

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"
DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}
# fp32: the bound for using rollout log-probs as the old policy's. bf16: decode token by token rounds
# otherwise than the full-sequence forward (0.54 at most on SmolLM2 on a CPU), so its gap is measured and bounded
# only by what the CPU test allows on the tiny model.
ROLLOUT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("precision", list(DTYPES))
def test_rollout_logprobs_match_the_scoring_forward_on_cuda(precision: str) -> None:
    """``output_logprobs=True`` on the GPU (ZeRO-3, LoRA fused, shared prompt prefill, the inverse-CDF sampler):
    each sampled token's log-prob against the unsharded merged policy's scoring forward, within 1e-5 in fp32."""
    dtype = DTYPES[precision]
    ids, mask = prompts(batch=2, length=7, seed=3)
    ids, mask = ids.repeat_interleave(3, 0).to(DEVICE), mask.repeat_interleave(3, 0).to(DEVICE)
    sampling = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=0, pad_token_id=0)
    gaps: list[tuple[float, float]] = []

    def on_step(module, batch) -> None:
        strategy = module.trainer.strategy
        with strategy.generation() as actor:
            out = actor.generate(
                ids, attention_mask=mask, output_logprobs=True, return_dict_in_generate=True, **sampling
            )
        assert strategy.generation_stats.prompt_tokens_reused > 0  # the shared prefill ran
        reference = unsharded_reference(module, "peft", dtype, DEVICE)
        with torch.no_grad(), native_linear():
            scored = response_logprobs(
                reference, ids, mask, out.sequences[:, ids.shape[1] :], temperature=0.7, share_prompt=False
            )
        gap = (out.logprobs.float() - scored.float()).abs()
        gaps.append((gap.max().item(), gap.mean().item()))

    strategy = HybridEngineStrategy(config=ds_config(3))
    fit(
        RolloutModule(add_peft_lora(tiny_llama()), on_step, lr=0.05),
        strategy,
        steps=2,
        accelerator=ACCELERATOR,
        precision=precision,
    )
    print("GENCUDA " + json.dumps({"rollout_logprob_gap": precision, "max_mean": gaps}), flush=True)
    assert len(gaps) == 2 and max(g for g, _ in gaps) <= ROLLOUT_TOLERANCE[dtype], gaps


def test_gather_once_per_step_trains_the_same_weights_on_cuda() -> None:
    """``gather_once_per_step`` on the GPU (ZeRO-3, LoRA, SGD): weights after 3 steps equal today's path's within
    fp32 summation order, and the actor is all-gathered once a step instead of ~3 times."""
    weights, gathers = {}, {}
    for once in (False, True):
        module = GatherOnceModule(add_peft_lora(tiny_llama()))
        strategy = HybridEngineStrategy(config=ds_config(3, **RELEASE_AFTER_USE), gather_once_per_step=once)
        fit(module, strategy, steps=3, accelerator=ACCELERATOR)
        weights[once], gathers[once] = snapshot(module), module.gathers
    print("GENCUDA " + json.dumps({"actor_gathers": {"today": gathers[False], "once": gathers[True]}}), flush=True)
    initial = dict(add_peft_lora(tiny_llama()).named_parameters())
    assert any(not torch.equal(v.cpu(), initial[n].detach()) for n, v in weights[True].items())  # it trained
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-5, atol=1e-6)
    assert gathers[True] == [1.0, 1.0, 1.0] and all(g > 2.0 for g in gathers[False]), gathers


def test_inverse_cdf_sampler_on_cuda() -> None:
    """The inverse-CDF draw on GPU tensors: a chi-square test with SmolLM2's vocabulary (a realistic head, the
    tail pooled), zero-weight tokens never drawn; one draw of 16 rows timed against ``torch.multinomial``."""
    vocab, draws = 49152, 16_000
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    weights = torch.rand(vocab, device=DEVICE, generator=gen) ** 4
    weights[torch.randperm(vocab, device=DEVICE, generator=gen)[: vocab // 3]] = 0.0
    head = torch.randperm(vocab, device=DEVICE, generator=gen)[:10]
    weights = weights / weights.sum() * 0.05
    weights[head] = torch.rand(10, device=DEVICE, generator=gen) * 0.19
    counts = torch.zeros(vocab, device=DEVICE)
    for _ in range(draws // 4000):
        picked = inverse_cdf_multinomial(weights.expand(4000, vocab), generator=gen)
        counts += torch.bincount(picked.view(-1), minlength=vocab).float()
    assert counts[weights == 0].sum() == 0
    statistic, df = chi_square(counts, weights)
    assert statistic < chi_square_critical(df), (statistic, df)

    rows = torch.softmax(torch.randn(16, vocab, device=DEVICE, generator=gen), -1)
    timings = {}
    draws_by = {"torch": lambda: torch.multinomial(rows, 1), "inverse_cdf": lambda: inverse_cdf_multinomial(rows)}
    for name, draw in draws_by.items():
        draw()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(100):
            draw()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        timings[name] = (time.perf_counter() - start) / 100 * 1e3
    print("GENCUDA " + json.dumps({"draw_ms_16x49152": {k: round(v, 4) for k, v in timings.items()}}), flush=True)
