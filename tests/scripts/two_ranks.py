"""Standalone multi-process scenarios, run by tests/test_multiprocess.py in a subprocess.

Lightning's default launcher re-runs this script once per rank, so it must be a script,
not a pytest test. Each rank asserts; rank 0 prints ``SCENARIO OK`` at the end.

    python tests/scripts/two_ranks.py <scenario> [--stage 3] [--pin 1]
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
from deepspeed.runtime.zero import GatheredParameters  # noqa: E402
from helpers import RolloutModule, add_peft_lora, ds_config, fit, merged_reference, prompts, tiny_llama  # noqa: E402

from lightning_hybrid import HybridEngineStrategy  # noqa: E402
from lightning_hybrid.gather import missing_params  # noqa: E402


def all_equal_across_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(gathered[0], t) for t in gathered)


def whole_reference(module) -> torch.nn.Module:
    with GatheredParameters(missing_params(module.actor.parameters(), module.trainer.strategy.model)):
        state = {k: v.detach().clone() for k, v in module.actor.state_dict().items()}
    fresh = add_peft_lora(tiny_llama())
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
        with module.trainer.strategy.generation() as actor:
            actor.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            if module.global_rank == 1 and module.global_step == 1:
                raise RuntimeError("injected fault on rank 1")

    strategy = HybridEngineStrategy(config=ds_config(3), pin_parameters=bool(args.pin), timeout=timedelta(seconds=20))
    fit(RolloutModule(tiny_llama(), on_step), strategy, steps=4, devices=2)
    raise AssertionError("unreachable: the run should have failed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["fit", "eos", "rank_fault"])
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--pin", type=int, default=1)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    globals()[f"scenario_{arguments.scenario}"](arguments)
    if torch_dist.get_rank() == 0:
        print(f"{arguments.scenario.upper()} OK", flush=True)
