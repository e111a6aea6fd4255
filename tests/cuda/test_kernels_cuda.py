"""On one GPU: DeepSpeed's kernel path against the portable path (``bash tests/cuda/run.sh``).

Each test prints one ``KERNELS {json}`` line: the numbers for the note on issue 7. On transformers 5
every architecture here is refused (its layers take a transformers Cache): the tests then check that
forcing the kernels anyway still fails, so a refusal is lifted only on evidence.
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
    PROBE_ROWS,
    KernelPath,
    KernelRefused,
    cache_argument,
    compare_paths,
    kernel_refusal,
    policy_layers,
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
DEVICE = "cuda"


def refusal(arch: str) -> str | None:
    make, targets = ARCHITECTURES[arch]
    return kernel_refusal(add_peft_lora(make(), targets=targets))


def assert_refused_for_its_cache(arch: str) -> None:
    """Where the layer takes a transformers Cache, the refusal says so and names the argument."""
    make, targets = ARCHITECTURES[arch]
    actor = add_peft_lora(make(), targets=targets)
    argument = cache_argument(type(policy_layers(actor)[0][0]))
    if argument is not None:
        reason = kernel_refusal(actor)
        assert reason is not None and f"Cache object (argument `{argument}`)" in reason, reason


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
            parity = compare_paths(through_kernels, actor.generate, ids, mask, new_tokens=8, dtype=dtype)
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
    assert_refused_for_its_cache(arch)
    refused = refusal(arch) is not None
    fp32 = kernels_vs_portable(make, targets, torch.float32, ids, mask)
    fp16 = kernels_vs_portable(make, targets, torch.float16, ids, mask)
    report(arch=arch, refused=refused, float32=fp32, float16=fp16)
    for numbers in (fp32, fp16):  # a report never says the logits agree where the tokens differ
        if not numbers["passed"] and "parity" in numbers:
            assert "(a near-tie" in numbers["parity"] or not numbers["parity"].startswith("max |log-prob diff| 0 ")
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
    reason = refusal(arch)
    if reason is not None:
        with pytest.raises(KernelRefused) as error:
            fit(module, strategy, steps=1, accelerator="gpu")
        assert str(error.value).startswith(f"inference_backend='deepspeed' refused: {reason}")
        report(arch=arch, strategy="refused up front")
        return
    fit(module, strategy, steps=2, accelerator="gpu")
    (first, first_stats), (second, second_stats) = zip(seen[0::2], seen[1::2])
    report(arch=arch, strategy="kernels", tokens_per_s=round(second_stats.tokens_per_s, 1))
    assert strategy.backend == "deepspeed"
    assert torch.equal(first, want) and torch.equal(second, want)
    assert first_stats.backend == second_stats.backend == "deepspeed"
    assert first_stats.kernel_checks == second_stats.kernel_checks == 1


@pytest.mark.xfail(
    strict=True,
    reason="H200, 2026-12-04 (DeepSpeed 0.19.8, transformers 5.17): the 8-row call still differs from the same rows"
    " run 2 at a time (max 0.17) with the per-call re-arm, and the same GPT-J kernel layers are 0.88 log-prob off the"
    " portable path in fp32: the layers themselves are broken on this stack, so the workspace fix is unproven there."
    " Every policy is refused on transformers 5. Passing here means the kernels work again: lift this mark.",
)
def test_kernel_workspace_is_sized_for_each_calls_batch():
    """A 2-row call first (the parity probe), then 8 rows: the 8 rows equal the same rows run 2 at a time.

    DeepSpeed's kernel layer sizes its KV workspace at layer 0's first forward and never again;
    unless ``KernelPath`` re-arms it per call, the 8-row call runs in a workspace sized for 2 rows.
    GPT-J's kernel layers are driven directly on hidden states (a prompt, then decode steps), so
    they use their own KV cache and no transformers Cache is involved.
    """
    model = tiny_gptj().to(DEVICE, torch.float32)
    path = KernelPath(model, max_out_tokens=64, release_inference_cache=False, transform_per_forward=False)
    layers = [layer for layer, _ in path.layers]
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(8, 6, model.config.n_embd, generator=generator).to(DEVICE)
    decode = torch.randn(8, 4, model.config.n_embd, generator=generator).to(DEVICE)

    def run(rows: slice) -> torch.Tensor:
        outputs = []
        with path.active(), torch.no_grad():
            for hidden in [prompt[rows], *(step.contiguous() for step in decode[rows].split(1, dim=1))]:
                for layer in layers:
                    hidden = layer(hidden.contiguous())
                    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                outputs.append(hidden)
        return torch.cat(outputs, dim=1)

    run(slice(0, PROBE_ROWS))
    whole = run(slice(0, 8))
    pairs = torch.cat([run(slice(row, row + 2)) for row in range(0, 8, 2)])
    report(workspace="8 rows after 2", max_abs_diff=float((whole - pairs).abs().max()))
    assert whole.isfinite().all()
    torch.testing.assert_close(whole, pairs, atol=1e-4, rtol=1e-4)
