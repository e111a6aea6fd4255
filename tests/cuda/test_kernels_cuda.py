"""On one GPU: DeepSpeed's kernel path against the portable path (``bash tests/cuda/run.sh``).

Each test prints one ``KERNELS {json}`` line: the numbers for the note on issue 7.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import (
    RolloutModule,
    add_peft_lora,
    ds_config,
    fit,
    merged_reference,
    prompts,
    tiny_gpt_neo,
    tiny_gptj,
    tiny_llama,
    tiny_opt,
)

from lightning_hybrid import HybridEngineStrategy
from lightning_hybrid.kernels import (
    LOGIT_TOLERANCE,
    KernelPath,
    KernelRefused,
    compare_paths,
    kernel_refusal,
)
from lightning_hybrid.lora import LoraFusion, lora_modules

pytestmark = pytest.mark.cuda

# PEFT LoRA on the attention projections each architecture names its own way.
ARCHITECTURES = {
    "opt": (tiny_opt, ("q_proj", "v_proj")),
    "llama": (tiny_llama, ("q_proj", "v_proj", "down_proj")),
    "gptj": (tiny_gptj, ("q_proj", "v_proj")),
    "gpt_neo": (tiny_gpt_neo, ("q_proj", "v_proj")),
}
REFUSED = ("opt", "llama")  # by kernels.KNOWN_BREAKS on transformers >= 5
DEVICE = "cuda"


def report(**numbers) -> None:
    print("KERNELS " + json.dumps(numbers), flush=True)


def synchronize() -> None:
    if DEVICE == "cuda":  # a CPU dry run of these tests sets DEVICE = "cpu"
        torch.cuda.synchronize()


def tokens_per_s(generate, ids, mask, new_tokens: int = 32) -> float:
    generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # warm-up
    synchronize()
    start = time.perf_counter()
    out = generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    synchronize()
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - start)


def kernels_vs_portable(make, targets, dtype: torch.dtype, ids, mask) -> dict:
    """KernelPath on an unsharded PEFT LoRA actor (fused, as in the generation context) vs its own generate."""
    actor = add_peft_lora(make(), targets=targets).to(DEVICE, dtype).eval()
    fusion = LoraFusion()
    fusion.fuse(lora_modules(actor))
    try:
        path = KernelPath(actor, max_out_tokens=128, release_inference_cache=False, transform_per_forward=False)

        def through_kernels(**kwargs):
            with path.active():
                return actor.generate(**kwargs)

        with torch.no_grad():
            parity = compare_paths(
                through_kernels, actor.generate, ids, mask, new_tokens=8, tolerance=LOGIT_TOLERANCE[dtype]
            )
            return {
                "passed": parity.passed,
                "parity": parity.describe(),
                "kernel_tok_s": round(tokens_per_s(through_kernels, ids, mask), 1),
                "portable_tok_s": round(tokens_per_s(actor.generate, ids, mask), 1),
            }
    except Exception as error:  # a refused architecture may fail outright: that is evidence too
        return {"passed": False, "error": f"{type(error).__name__}: {error}"[:300]}
    finally:
        fusion.unfuse()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_raw_kernels_against_the_portable_path(arch):
    """Kernels with fused PEFT LoRA match the portable path (fp32) unless refused; refused ones still differ.

    fp16 numbers are reported too (random tiny weights make near-ties, so they are not asserted).
    """
    make, targets = ARCHITECTURES[arch]
    ids, mask = (t.to(DEVICE) for t in prompts(batch=4, length=16))
    refused = kernel_refusal(add_peft_lora(make(), targets=targets)) is not None
    fp32 = kernels_vs_portable(make, targets, torch.float32, ids, mask)
    fp16 = kernels_vs_portable(make, targets, torch.float16, ids, mask)
    report(arch=arch, refused=refused, float32=fp32, float16=fp16)
    if refused:
        assert not fp32["passed"], f"DeepSpeed's kernels now match the portable path for {arch}: lift its refusal"
    else:
        assert fp32["passed"], f"{arch}: {fp32}"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_strategy_generates_through_the_kernels_under_zero3_with_lora(arch):
    """inference_backend='deepspeed', ZeRO-3, one GPU, PEFT LoRA: refused up front, or checked and equal to the policy.

    Unrefused architectures: every generation is checked by the guard (interval 1) and its
    greedy tokens equal the merged, unsharded policy's.
    """
    make, targets = ARCHITECTURES[arch]
    ids, mask = (t.cuda() for t in prompts())
    actor = add_peft_lora(make(), targets=targets)
    want = merged_reference(actor).cuda().generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    seen = []

    def on_step(module, batch):
        with module.trainer.strategy.generation() as policy:
            seen.append(policy.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
        seen.append(module.trainer.strategy.generation_stats)

    strategy = HybridEngineStrategy(config=ds_config(3), inference_backend="deepspeed", kernel_check_interval=1)
    module = RolloutModule(actor, on_step, lr=0.0)
    if arch in REFUSED:
        with pytest.raises(KernelRefused, match="known to break"):
            fit(module, strategy, steps=1, accelerator="gpu")
        report(arch=arch, strategy="refused up front")
        return
    fit(module, strategy, steps=2, accelerator="gpu")
    (first, first_stats), (second, second_stats) = zip(seen[0::2], seen[1::2])
    report(arch=arch, strategy="kernels", tokens_per_s=round(second_stats.tokens_per_s, 1))
    assert strategy.backend == "deepspeed"
    assert torch.equal(first, want) and torch.equal(second, want)
    assert first_stats.backend == second_stats.backend == "deepspeed"
    assert first_stats.kernel_checks == second_stats.kernel_checks == 1
