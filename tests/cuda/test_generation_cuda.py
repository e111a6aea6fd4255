"""On one GPU: the generation context's parity and nothing-lost checks (``bash tests/cuda/run.sh``).

The CUDA counterparts of test_generation.py's parity and nothing-lost tests (which run on the CPU),
with the same helpers: ZeRO-2 and ZeRO-3, fp32 and bf16, PEFT LoRA, one process. Each test prints
one ``GENCUDA {json}`` line. A CPU dry run of this file sets DEVICE = "cpu" and drops the mark.
"""

from __future__ import annotations

import json

import pytest
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from helpers import (
    RolloutModule,
    ds_config,
    fit,
    hook_state,
    log_probs,
    make_actor,
    mode_state,
    prompts,
    sharding_state,
    snapshot,
    unsharded_reference,
)

from lightning_hybrid import HybridEngineStrategy
from lightning_hybrid.gather import native_linear

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"
DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}
# Log-probs of the same weights: fp32 up to summation order; bf16 allows its rounding (2e-3 on a CPU dry
# run). The adapter itself moves them by 0.24 (max over the prompts), so an unfused LoRA cannot pass.
LOGPROB_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
GREEDY = dict(max_new_tokens=8, do_sample=False)
STEPS = 3


def rng_states() -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if DEVICE == "cuda":
        states.append(torch.cuda.get_rng_state())
    return states


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("stage", [2, 3])
def test_context_matches_merged_reference_and_loses_nothing_on_cuda(stage: int, precision: str) -> None:
    """Greedy tokens in the context equal the unsharded merged-LoRA policy's; weights, LoRA, sharding, hooks,
    modes and RNG are as before after every context (ZeRO-2/3, fp32/bf16, PEFT LoRA, one GPU)."""
    dtype = DTYPES[precision]
    ids, mask = (t.to(DEVICE) for t in prompts())
    report: dict = {"stage": stage, "precision": precision, "max_logprob_diff": 0.0}
    checked = []

    def on_step(module: RolloutModule, batch) -> None:
        strategy = module.trainer.strategy
        assert next(module.actor.parameters()).dtype == dtype
        reference = unsharded_reference(module, "peft", dtype, DEVICE)  # merged on the GPU, as in the context
        with torch.no_grad(), native_linear():  # as in a process without DeepSpeed
            want = reference.generate(ids, attention_mask=mask, **GREEDY)
            want_lp = log_probs(reference, ids, mask)
        before = (snapshot(module), sharding_state(module.actor), hook_state(module.actor), mode_state(module.actor))
        rng = rng_states()
        with strategy.generation() as actor:
            got = actor.generate(ids, attention_mask=mask, **GREEDY)
            got_lp = log_probs(actor, ids, mask)
            actor.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True)  # draws from its own stream
        after = (snapshot(module), sharding_state(module.actor), hook_state(module.actor), mode_state(module.actor))
        assert torch.equal(got, want), f"step {module.global_step}: greedy tokens differ from the merged policy's"
        diff = (got_lp - want_lp).abs().max().item()
        report["max_logprob_diff"] = max(report["max_logprob_diff"], diff)
        assert diff <= LOGPROB_TOLERANCE[dtype], diff
        assert all(torch.equal(a, b) for a, b in zip(rng_states(), rng)), "the training RNG stream moved"
        assert after[1:] == before[1:], "sharding, hooks or train/eval modes changed"
        assert after[0].keys() == before[0].keys()
        lost = [name for name in before[0] if not torch.equal(after[0][name], before[0][name])]
        assert not lost, f"weights changed by the context: {lost[:5]}"
        assert any("lora_" in name for name in before[0])  # the adapter is among what was compared
        stats = strategy.generation_stats
        assert stats.peak_memory_bytes > 0 and stats.tokens_per_s > 0
        report["tokens_per_s"] = round(stats.tokens_per_s, 1)
        checked.append(module.global_step)

    strategy = HybridEngineStrategy(config=ds_config(stage), tp_gather_partition_size=1, max_out_tokens=64)
    module = RolloutModule(make_actor("peft"), on_step, lr=0.05)  # the weights move between checks
    trainer = fit(module, strategy, steps=STEPS, accelerator=ACCELERATOR, precision=precision)
    assert trainer.strategy.root_device.type == DEVICE
    assert checked == list(range(STEPS))
    if stage == 3:  # really sharded, so the context really gathered
        assert all(s == ZeroParamStatus.NOT_AVAILABLE and n == 0 for _, s, n in sharding_state(module.actor))
    print("GENCUDA " + json.dumps(report), flush=True)
