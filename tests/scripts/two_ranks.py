"""Standalone multi-process scenarios, run by tests/test_multiprocess.py in a subprocess.

Lightning's default launcher re-runs this script once per rank, so it must be a script,
not a pytest test. Each rank asserts; rank 0 prints ``SCENARIO OK`` at the end.

    python tests/scripts/two_ranks.py <scenario> [--stage 3] [--pin 1]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import weakref
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
from deepspeed.runtime.zero import GatheredParameters  # noqa: E402
from helpers import (  # noqa: E402
    RolloutModule,
    ScoringModule,
    add_peft_lora,
    ds_config,
    fit,
    group_batch,
    merged_reference,
    prompts,
    tiny_llama,
    tiny_neox,
    tiny_qwen2,
)

from lightning_hybrid import HybridEngineStrategy  # noqa: E402
from lightning_hybrid.gather import decoder_layers, missing_params  # noqa: E402


def all_equal_across_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(gathered[0], t) for t in gathered)


def whole_reference(module, build=lambda: add_peft_lora(tiny_llama())) -> torch.nn.Module:
    with GatheredParameters(missing_params(module.actor.parameters(), module.trainer.strategy.model)):
        state = {k: v.detach().clone() for k, v in module.actor.state_dict().items()}
    fresh = build()
    fresh.load_state_dict(state)
    return merged_reference(fresh)


def scenario_fit(args) -> None:
    """Training with generation each step: parity per rank, ranks in agreement, RNG synced."""
    checks = []

    def on_step(module, batch):
        rank = module.global_rank
        if module.global_step == 0:
            assert all_equal_across_ranks(torch.get_rng_state()), "RNG differs across ranks after construction"
        # Each rank its own prompts, of its own lengths: rank-dependent work inside the context. Rank 1's rows
        # repeat each prompt (shared prefill), rank 0's do not: with layer-wise gathering both must prefill.
        ids, mask = prompts(batch=2 + rank, length=5 + 2 * rank, seed=rank)
        ids, mask = ids.repeat_interleave(1 + rank, 0), mask.repeat_interleave(1 + rank, 0)
        reference = whole_reference(module)
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        with module.trainer.strategy.generation() as actor:
            got = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want), f"rank {rank} step {module.global_step}: context != unsharded reference"
        reused = module.trainer.strategy.generation_stats.prompt_tokens_reused
        assert reused == rank * 3 * (ids.shape[1] - 1), f"rank {rank}: {reused} prompt positions reused"
        checks.append(module.global_step)

    strategy = HybridEngineStrategy(
        config=ds_config(args.stage), pin_parameters=bool(args.pin), tp_gather_partition_size=1
    )
    module = RolloutModule(add_peft_lora(tiny_llama()), on_step, lr=0.05)
    trainer = fit(module, strategy, steps=3, devices=2)
    assert checks == [0, 1, 2]
    assert all(math.isfinite(loss) for loss in module.losses)
    # The ranks hold one model: every weight, gathered, is the same on both.
    with GatheredParameters(missing_params(module.actor.parameters(), trainer.strategy.model)):
        flat = torch.cat([p.detach().flatten().float() for p in module.actor.parameters()])
    assert all_equal_across_ranks(flat), "ranks disagree on the weights"
    losses = torch.tensor(module.losses)
    assert all_equal_across_ranks(torch.tensor([len(losses)]))


def scenario_eos(args) -> None:
    """Rank 0 stops at once (its EOS is the first token it generates), rank 1 runs to the limit."""
    lengths = []

    def on_step(module, batch):
        rank = module.global_rank
        ids, mask = prompts(batch=2, length=6, seed=7)
        with module.trainer.strategy.generation() as actor:
            first = actor.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)[:, -1]
            eos = int(first[0]) if rank == 0 else -1  # rank 1: an EOS that never comes
            out = actor.generate(
                ids[:1],
                attention_mask=mask[:1],
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=eos if eos >= 0 else None,
            )
        lengths.append(out.shape[1] - ids.shape[1])

    strategy = HybridEngineStrategy(
        config=ds_config(3), pin_parameters=bool(args.pin), tp_gather_partition_size=1, timeout=timedelta(seconds=60)
    )
    module = RolloutModule(tiny_llama(), on_step, lr=0.0)
    fit(module, strategy, steps=1, devices=2)
    rank = torch_dist.get_rank()
    if rank == 1:
        assert lengths == [12], lengths
    else:
        assert lengths[0] <= 12  # with synced ranks, rank 0's output is padded to the common length


def scenario_rank_fault(args) -> None:
    """Rank 1 raises inside generation: every rank must end with an error, never hang."""

    def on_step(module, batch):
        ids, mask = prompts(batch=2, length=6)
        fault = module.global_rank == 1 and module.global_step == 1
        with module.trainer.strategy.generation() as actor:
            if fault and args.tp > 1:  # while rank 0 waits for it to pool prompts
                raise RuntimeError("injected fault on rank 1")
            actor.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            if fault:
                raise RuntimeError("injected fault on rank 1")

    strategy = HybridEngineStrategy(
        config=ds_config(3), pin_parameters=bool(args.pin), inference_tp_size=args.tp, timeout=timedelta(seconds=20)
    )
    fit(RolloutModule(tiny_llama(), on_step), strategy, steps=4, devices=2)
    raise AssertionError("unreachable: the run should have failed")


def tp_fit(build, tp: int) -> list[float]:
    """A fit generating with ``inference_tp_size=tp``: every rank's rows equal the unsharded reference's."""

    def before_step(module):  # outside the engine's forward: the place to gather whole weights
        module.__dict__["reference_now"] = whole_reference(module, build)  # not a registered submodule

    def on_step(module, batch):
        rank, step = module.global_rank, module.global_step
        # Each rank its own prompts: other batch sizes, other lengths, left padding; rank 1's repeated (the pooled
        # batch shares their prefill).
        ids, mask = prompts(batch=2 + rank, length=5 + 3 * rank, seed=10 * step + rank)
        ids, mask = ids.repeat_interleave(1 + rank, 0), mask.repeat_interleave(1 + rank, 0)
        reference = module.reference_now
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        want_logits = reference(input_ids=ids, attention_mask=mask).logits
        with module.trainer.strategy.generation() as actor:
            # While generating, each rank holds 1/tp of every decoder layer's linear weights.
            if tp > 1:
                held = sum(p.numel() for p in decoder_layers(actor)[0].parameters())
                whole = sum(p.numel() for p in decoder_layers(reference)[0].parameters())
                assert held < 0.8 * whole, f"a rank holds {held} of a layer's {whole} weights"
                slices = [weakref.ref(p) for p in decoder_layers(actor)[0].parameters()]
            got = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            logits = actor(input_ids=ids, attention_mask=mask).logits
            sampled = actor.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=True)
        if tp > 1:  # freed on exit, not left to the cyclic GC
            assert all(r() is None or r().numel() == 0 for r in slices), "tensor-parallel slices outlive the context"
        # Back to training: the real layers, whole ZeRO-3 parameters again.
        assert all(hasattr(p, "ds_id") for p in module.actor.parameters())
        assert torch.equal(got, want), f"tp={tp} rank {rank} step {step}: {got.tolist()} != {want.tolist()}"
        real = mask.bool()
        gap = (logits[real] - want_logits[real]).abs().max().item()
        assert gap < 1e-5, f"tp={tp} rank {rank} step {step}: log-prob gap {gap}"
        assert sampled.shape[0] == 1
        stats = module.trainer.strategy.generation_stats
        assert (stats.sliced_bytes > 0) == (tp > 1), stats
        assert (stats.prompt_tokens_reused > 0) == (tp > 1 or rank == 1), stats  # tp > 1: the pooled batch repeats
        assert len(stats.peak_memory_bytes_per_rank) == 2 and min(stats.peak_memory_bytes_per_rank) > 0, stats
        module.peaks.append(stats.peak_memory_bytes)

    strategy = HybridEngineStrategy(config=ds_config(3), inference_tp_size=tp, tp_gather_partition_size=1)
    module = RolloutModule(build(), on_step, lr=0.05)
    module.before_step = before_step
    module.peaks = []
    fit(module, strategy, steps=3, devices=2)
    assert len(module.peaks) == 3
    return module.losses


def scenario_tp(args) -> None:
    """inference_tp_size=2 on 2 ranks: parity per rank, with LoRA and without, then training goes on the same."""
    lora_llama = lambda: add_peft_lora(tiny_llama())  # noqa: E731
    sliced = tp_fit(lora_llama, tp=2)
    whole = tp_fit(lora_llama, tp=1)
    assert sliced == whole, f"losses after tp=2 generation {sliced} != after tp=1 {whole}"
    tp_fit(tiny_neox, tp=2)
    tp_fit(lambda: tiny_qwen2(num_key_value_heads=2, tie_word_embeddings=True), tp=2)  # biased q/k/v, tied head
    # Three key/value heads on two ranks (as SmolLM2's 9/3): AutoTP splits them 2 + 1.
    tp_fit(lambda: tiny_llama(hidden_size=96, num_attention_heads=6, num_key_value_heads=3), tp=2)


def scenario_score(args) -> None:
    """response_logprobs under ZeRO-3 (Qwen2, full fine-tuning) and ZeRO-2 (GPT-NeoX + LoRA) on 2 ranks, each with
    its own batch: shared-prompt log-probs within 1e-4 of the plain forward's, the step's update within 1e-4."""
    cases = [
        (3, lambda: tiny_qwen2(num_key_value_heads=2)),
        (2, lambda: add_peft_lora(tiny_neox(), targets=("query_key_value", "dense_4h_to_h"))),
    ]
    for stage, build in cases:
        before = {n: p.detach().clone() for n, p in build().named_parameters() if p.requires_grad}
        updates, logprobs = {}, {}
        for share in (True, False):
            # Lightning's launcher re-runs this script per rank with LOCAL_RANK set; rank 0 is the first process.
            module = ScoringModule(build(), share, group_batch(seed=int(os.environ.get("LOCAL_RANK", "0"))))
            trainer = fit(module, HybridEngineStrategy(config=ds_config(stage)), steps=1, devices=2)
            with GatheredParameters(missing_params(module.actor.parameters(), trainer.strategy.model)):
                updates[share] = {
                    n: p.detach() - before[n] for n, p in module.actor.named_parameters() if p.requires_grad
                }
            logprobs[share] = module.logprobs[0]
        gap = (logprobs[True] - logprobs[False]).abs().max().item()
        assert gap < 1e-4, f"ZeRO-{stage}: shared-prompt log-probs {gap} from the plain forward's"
        for name, plain in updates[False].items():
            assert plain.norm() > 0, name
            relative = ((updates[True][name] - plain).norm() / plain.norm()).item()
            assert relative < 1e-4, f"ZeRO-{stage} {name}: update {relative} (relative) from the plain forward's"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["fit", "eos", "rank_fault", "tp", "score"])
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--pin", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    globals()[f"scenario_{arguments.scenario}"](arguments)
    if torch_dist.get_rank() == 0:
        print(f"{arguments.scenario.upper()} OK", flush=True)
    # Leaving with the process group alive can abort at interpreter exit (gloo worker threads).
    torch_dist.destroy_process_group()
