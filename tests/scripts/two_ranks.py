"""Standalone multi-process scenarios, run by tests/test_multiprocess.py in a subprocess.

Lightning's default launcher re-runs this script once per rank, so it must be a script,
not a pytest test. Each rank asserts; rank 0 prints ``SCENARIO OK`` at the end.

    python tests/scripts/two_ranks.py <scenario> [--stage 3] [--pin 1]
"""

from __future__ import annotations

import argparse
import math
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
    add_peft_lora,
    ds_config,
    fit,
    merged_reference,
    prompts,
    tiny_llama,
    tiny_neox,
    tiny_qwen2,
    train,
)

from lightning_hybrid import HybridEngineStrategy  # noqa: E402
from lightning_hybrid.fabric import HybridEngineStrategy as FabricHybridEngineStrategy  # noqa: E402
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
        # Each rank its own prompts, of its own lengths: rank-dependent work inside the context.
        ids, mask = prompts(batch=2 + rank, length=5 + 2 * rank, seed=rank)
        reference = whole_reference(module)
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        with module.trainer.strategy.generation() as actor:
            got = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want), f"rank {rank} step {module.global_step}: context != unsharded reference"
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
        # Each rank its own prompts: other batch sizes, other lengths, left padding.
        ids, mask = prompts(batch=2 + rank, length=5 + 3 * rank, seed=10 * step + rank)
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


def scenario_front_ends(args) -> None:
    """The Trainer and Fabric, 2 ranks, ZeRO-3 (pinned, layer-wise, frozen-weight cache) and ZeRO-2, PEFT LoRA:
    each step, every rank's greedy tokens equal the whole merged policy's, and the weights are bitwise as they
    were before the context; a fault raised inside it (step 1) leaves weights, sharding, hooks, modes and the
    training RNG as they were; training goes on."""

    def weights(run) -> dict[str, torch.Tensor]:
        with GatheredParameters(missing_params(run.actor.parameters(), run.engine)):
            return {n: p.detach().clone() for n, p in run.actor.named_parameters()}

    def state(run):
        sharding = [(n, p.ds_status, p.data.numel()) for n, p in run.actor.named_parameters() if hasattr(p, "ds_id")]
        hooks = [(n, list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in run.actor.named_modules()]
        modes = [(n, m.training) for n, m in run.actor.named_modules()]
        return sharding, hooks, modes, [p.requires_grad for p in run.actor.parameters()]

    def on_step(run, batch):
        ids, mask = prompts(batch=2 + run.rank, length=5 + 2 * run.rank, seed=run.rank + 10 * run.step)
        before, before_state = weights(run), state(run)
        with GatheredParameters(missing_params(run.actor.parameters(), run.engine)):
            whole = {k: v.detach().clone() for k, v in run.actor.state_dict().items()}
        fresh = add_peft_lora(tiny_llama())
        fresh.load_state_dict(whole)
        want = merged_reference(fresh).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        rng = torch.get_rng_state()
        try:
            with run.strategy.generation() as actor:
                got = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
                if run.step == 1:
                    raise ValueError("injected fault")
        except ValueError as error:
            assert run.step == 1 and "injected fault" in str(error), error
        assert torch.equal(got, want), f"{label} rank {run.rank} step {run.step}: context != merged reference"
        assert torch.equal(torch.get_rng_state(), rng), f"{label}: training RNG moved"
        assert state(run) == before_state, f"{label} rank {run.rank} step {run.step}: sharding/hooks/modes differ"
        after = weights(run)
        assert all(torch.equal(after[n], before[n]) for n in before), f"{label} step {run.step}: weights changed"

    for front_end, strategy_class in (("trainer", HybridEngineStrategy), ("fabric", FabricHybridEngineStrategy)):
        for stage, pin, cache_frozen in ((3, True, False), (3, False, False), (3, True, True), (2, True, False)):
            label = f"{front_end} stage={stage} pin={pin} cache_frozen={cache_frozen}"
            strategy = strategy_class(
                config=ds_config(stage),
                pin_parameters=pin,
                tp_gather_partition_size=1,
                cache_frozen_weights=cache_frozen,
            )
            run = train(front_end, add_peft_lora(tiny_llama()), strategy, on_step, steps=3, lr=0.05, devices=2)
            assert len(run.losses) == 3 and all(math.isfinite(loss) for loss in run.losses), label
            flat = torch.cat([p.flatten() for p in weights(run).values()])
            assert all_equal_across_ranks(flat), f"{label}: ranks disagree on the weights"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["fit", "eos", "rank_fault", "tp", "front_ends"])
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
