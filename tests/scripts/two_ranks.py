"""Standalone multi-process scenarios, run by tests/test_multiprocess.py in subprocesses.

Every rank runs this script: tests/test_multiprocess.py starts them all at once with LOCAL_RANK set
(``helpers.launch_ranks``); run by hand, Lightning's launcher re-runs it once per rank. So it must be a
script, not a pytest test. Each rank asserts; rank 0 prints ``SCENARIO OK`` once every rank has passed a scenario.
Several scenarios can share one launch (one interpreter start and process group per rank,
the slow part of a small scenario): they run in the order given.

    python tests/scripts/two_ranks.py <scenario> [<scenario> ...] [--stage 3] [--pin 1]
"""

from __future__ import annotations

import argparse
import copy
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
    prompt_loader,
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


def scenario_fit_pinned(args) -> None:
    """``scenario_fit`` with the whole actor gathered, under ZeRO-3 and then ZeRO-2, in one launch."""
    for stage in (3, 2):
        scenario_fit(argparse.Namespace(stage=stage, pin=1))
        if torch_dist.get_rank() == 0:
            print(f"FIT STAGE {stage} OK", flush=True)


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


def scenario_step(args) -> None:
    """The RL step's precision and gathers on 2 ranks, each with its own prompts.

    bf16-mixed (ZeRO-3 + LoRA, ZeRO-2 full fine-tuning): every rank's greedy tokens, rows sharing their prompt's
    prefill included, equal the whole merged policy's in bf16; weights, sharding and hooks bitwise as before each
    context. gather_once_per_step (ZeRO-3 + LoRA, SGD): 3 steps end with today's weights within fp32 tolerance on
    every rank, with the actor all-gathered once a step (the logged metric) instead of ~3 times.
    """
    from helpers import GatherOnceModule, hook_state, make_actor, sharding_state, snapshot, unsharded_reference

    def state(module):
        return sharding_state(module.actor), hook_state(module.actor)

    for stage, lora in ((3, "peft"), (2, None)):

        def on_step(module, batch, stage=stage, lora=lora):
            rank = module.global_rank
            ids, mask = prompts(batch=2, length=5 + rank, seed=rank + 10 * module.global_step)
            ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)  # GRPO rows
            reference = unsharded_reference(module, lora, torch.bfloat16)
            want = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            before, before_state = snapshot(module), state(module)
            with module.trainer.strategy.generation() as actor:
                got = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            label = f"bf16 stage={stage} lora={lora} rank {rank} step {module.global_step}"
            assert module.trainer.strategy.generation_stats.prompt_tokens_reused > 0, label
            assert torch.equal(got, want), f"{label}: context != merged bf16 reference"
            assert state(module) == before_state, f"{label}: sharding or hooks differ"
            after = snapshot(module)
            assert all(torch.equal(after[n], before[n]) for n in before), f"{label}: weights changed"

        module = RolloutModule(make_actor(lora), on_step, lr=0.05)
        fit(module, HybridEngineStrategy(config=ds_config(stage)), steps=2, devices=2, precision="bf16-mixed")

    weights, gathers = {}, {}
    for once in (False, True):
        module = GatherOnceModule(add_peft_lora(tiny_llama()))
        config = ds_config(3, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
        fit(module, HybridEngineStrategy(config=config, gather_once_per_step=once), steps=3, devices=2)
        weights[once], gathers[once] = snapshot(module), module.gathers
    for name, today in weights[False].items():
        torch.testing.assert_close(weights[True][name], today, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert all(2.5 < g <= 3.0 for g in gathers[False]), gathers[False]
    assert gathers[True] == [1.0, 1.0, 1.0], gathers[True]
    flat = torch.cat([p.flatten() for p in weights[True].values()])
    assert all_equal_across_ranks(flat), "gather_once_per_step: ranks disagree on the weights"


def rollout_loss(model, ids, mask) -> torch.Tensor:
    """RolloutModule's training loss, for a reference trained by plain torch."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1))


def stored_shape(p: torch.Tensor) -> tuple:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def tp_training_fit(module, strategy, build, tp: int, steps: int = 3, **trainer_kwargs):
    """Trains ``module`` with a tensor-parallel actor beside an unsharded copy trained by plain torch.

    At every step, on every rank: the ranks of the TP group got the same batch; greedy generation in the
    context (two prompt lengths, left padding) equals the copy's, before and after optimizer steps; after
    the fit, the step losses equal the copy's within fp32 tolerance.
    """
    reference = build()
    reference.train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=module.lr)
    reference_losses, checks = [], []
    frozen = None if module.reference is None else copy.deepcopy(module.reference).eval()
    group = module.tp_group

    def on_step(module, batch):
        ids, mask = batch
        gathered = [torch.empty_like(ids) for _ in range(tp)]
        torch_dist.all_gather(gathered, ids, group=group())
        assert all(torch.equal(gathered[0], g) for g in gathered), "ranks of a tensor-parallel group got other batches"
        reference.eval()
        if module.global_step == 0:  # prompts that differ within the TP group: refused on every rank, no hang
            mine, mine_mask = prompts(batch=2, length=4, seed=torch_dist.get_rank())
            with module.trainer.strategy.generation() as actor:
                try:
                    actor.generate(mine, attention_mask=mine_mask, max_new_tokens=2, do_sample=False)
                    raise AssertionError("different prompts within a tensor-parallel group were not refused")
                except ValueError as error:
                    assert "ranks of a tensor-parallel group called generate() with different prompts" in str(error)
        with torch.no_grad():
            for length, seed in ((5, module.global_step), (9, 100 + module.global_step)):
                prompt, prompt_mask = prompts(batch=3, length=length, seed=seed)
                want = reference.generate(prompt, attention_mask=prompt_mask, max_new_tokens=6, do_sample=False)
                want_logits = reference(input_ids=prompt, attention_mask=prompt_mask).logits
                with module.trainer.strategy.generation() as actor:
                    got = actor.generate(prompt, attention_mask=prompt_mask, max_new_tokens=6, do_sample=False)
                    logits = actor(input_ids=prompt, attention_mask=prompt_mask).logits
                assert torch.equal(got, want), f"step {module.global_step}: {got.tolist()} != {want.tolist()}"
                # Relative to the logits' scale: after an optimizer step the two copies' weights differ by
                # AdamW's amplified rounding (1e-4 absolute at logits of ~2.7 on an AMD EPYC's MKL).
                gap = (logits - want_logits)[prompt_mask.bool()].abs().max().item()
                scale = want_logits[prompt_mask.bool()].abs().max().item()
                assert gap < 1e-4 * max(1.0, scale), (
                    f"step {module.global_step}: logits differ by {gap} (scale {scale})"
                )
            if frozen is not None:  # a frozen model beside the actor: sliced too, computes the same
                theirs = module.reference(input_ids=ids, attention_mask=mask).logits
                gap = (theirs - frozen(ids, attention_mask=mask).logits)[mask.bool()].abs().max().item()
                assert gap < 1e-4, f"frozen reference differs by {gap}"
        reference.train()
        loss = rollout_loss(reference, ids, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reference_losses.append(loss.item())
        checks.append(module.global_step)

    module.on_step = on_step
    trainer = fit(module, strategy, steps=steps, devices=2, **trainer_kwargs)
    assert checks == list(range(steps)), checks
    assert len(module.losses) == len(reference_losses) == steps
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(module.losses, reference_losses)), (
        f"losses {module.losses} != unsharded {reference_losses}"
    )
    return trainer


def assert_halved(actor, whole, tp: int) -> int:
    """Every linear AutoTP sliced holds 1/tp of the unsharded one's weight, by shape. Returns how many."""
    from deepspeed.module_inject.layers import TensorParallel_Layer

    sliced = 0
    wholes = dict(whole.named_modules())
    for name, layer in actor.named_modules():
        if isinstance(layer, TensorParallel_Layer) and layer.is_tp_parallel:
            mine, full = stored_shape(layer.weight), tuple(wholes[name].weight.shape)
            assert math.prod(mine) * tp == math.prod(full), f"{name}: {mine} is not 1/{tp} of {full}"
            sliced += 1
    layers = len(decoder_layers(whole))
    assert sliced >= 7 * layers, f"only {sliced} linears sliced"  # q, k, v, o, gate, up, down per layer
    return sliced


def scenario_autotp(args) -> None:
    """AutoTP training (training_tp_size=2) on 2 ranks: halves, loss parity, generation parity.

    ``--stage 0``: ZeRO-1, 2 and 3 one after the other in this one launch (with inference_tp_size 1, 2, 1).
    """
    from deepspeed.utils import groups

    runs = [(1, 1), (2, 2), (3, 1)] if args.stage == 0 else [(args.stage, args.tp)]
    for stage, inference_tp in runs:
        frozen = tiny_llama(seed=3).requires_grad_(False)  # e.g. the KL reference
        module = RolloutModule(tiny_llama(), lr=0.05, extra=frozen)
        module.tp_group = groups.get_tensor_model_parallel_group
        strategy = HybridEngineStrategy(
            config=ds_config(stage), training_tp_size=2, inference_tp_size=inference_tp, generation_module="actor"
        )
        trainer = tp_training_fit(module, strategy, tiny_llama, tp=2)
        sliced = assert_halved(module.actor, tiny_llama(), 2)
        assert_halved(module.reference, tiny_llama(seed=3), 2)
        assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}
        assert trainer.strategy.model.dp_world_size == 1  # ZeRO works over the data-parallel group
        if torch_dist.get_rank() == 0:
            print(f"stage {stage}: {sliced} linears sliced, losses {module.losses}", flush=True)


class GroupsMpu:
    """A Megatron-style mpu over the test's own torch process groups: TP groups of ``tp`` consecutive ranks.

    Its groups are built in ``build()``, which every rank calls once the process group exists (in the
    LightningModule's ``setup``), as Megatron's ``initialize_model_parallel`` is called after init.
    """

    def __init__(self, tp: int):
        self.tp = tp
        self.tp_group = self.dp_group = None

    def build(self) -> None:
        world, rank = torch_dist.get_world_size(), torch_dist.get_rank()
        for start in range(0, world, self.tp):  # every rank creates every group, in the same order
            group = torch_dist.new_group(list(range(start, start + self.tp)))
            if start <= rank < start + self.tp:
                self.tp_group = group
        for offset in range(self.tp):
            group = torch_dist.new_group(list(range(offset, world, self.tp)))
            if rank % self.tp == offset:
                self.dp_group = group

    def get_model_parallel_rank(self):
        return torch_dist.get_rank(self.tp_group)

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_world_size(self):
        return self.tp

    def get_data_parallel_rank(self):
        return torch_dist.get_rank(self.dp_group)

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self):
        return torch_dist.get_world_size(self.dp_group)


def slice_with_autotp(model: torch.nn.Module, group, tp: int) -> None:
    """Slices ``model``'s decoder layers in place with DeepSpeed's AutoTP training layers, over ``group``."""
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.module_inject.layers import set_autotp_mode

    set_autotp_mode(training=True)
    for cls, all_reduce in AutoTP.tp_parser(model):
        for layer in [m for m in model.modules() if isinstance(m, cls)]:
            autotp = AutoTP(
                layer,
                set(all_reduce),
                "",
                None,
                (torch.nn.Linear,),
                None,
                model_config=model.config,
                training_mode=True,
            )
            # In training mode set_tensor_parallel_config() reads DeepSpeed's own groups: give it ours.
            autotp.mp_size, autotp.mp_group = tp, group
            autotp.update_linear_policies()
            autotp._replace_module(layer)


class SlicedRollout(RolloutModule):
    """A RolloutModule whose actor it slices itself over its mpu's groups (Megatron-style user code)."""

    def setup(self, stage: str) -> None:
        self.mpu.build()
        slice_with_autotp(self.actor, self.mpu.tp_group, self.mpu.tp)

    def configure_model(self) -> None:  # under the strategy's zero.Init (ZeRO-3): built sharded over the mpu's DP
        if self.reference is None:
            # No pad token: transformers zeroes its embedding row at init, which a partitioned weight lacks.
            self.reference = tiny_llama(seed=3, pad_token_id=None).requires_grad_(False)


def scenario_mpu(args) -> None:
    """A user's mpu (its own groups, its own slicing) passed as mpu=: halves, loss and generation parity.

    ``--stage 0``: ZeRO-1 then ZeRO-3 in this one launch.
    """
    for stage in [1, 3] if args.stage == 0 else [args.stage]:
        mpu = GroupsMpu(tp=2)
        module = SlicedRollout(tiny_llama(), lr=0.05)
        module.mpu = mpu
        module.tp_group = lambda mpu=mpu: mpu.tp_group
        strategy = HybridEngineStrategy(config=ds_config(stage), mpu=mpu, generation_module="actor")
        trainer = tp_training_fit(module, strategy, tiny_llama, tp=2)
        sliced = assert_halved(module.actor, tiny_llama(), 2)
        if stage == 3:  # zero.Init partitioned the reference over the mpu's data-parallel group (1 rank): whole
            weights = list(module.reference.parameters())
            assert all(p.ds_process_group is mpu.dp_group for p in weights)
            assert all(p.ds_tensor.numel() == p.ds_numel for p in weights), "partitioned over the world"
        assert trainer.strategy.model.mpu is mpu
        assert trainer.strategy.model.dp_world_size == 1  # ZeRO works over the mpu's data-parallel group
        assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}
        if torch_dist.get_rank() == 0:
            print(f"mpu, stage {stage}: {sliced} linears sliced, losses {module.losses}", flush=True)


def scenario_dp_tp(args) -> None:
    """4 ranks as 2 data-parallel x 2 tensor-parallel (AutoTP): which ranks see which batch."""
    seen = []

    def on_step(module, batch):
        ids, _ = batch
        everyone = [torch.empty_like(ids) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(everyone, ids)
        seen.append(everyone)
        prompt, mask = prompts(batch=2, length=4 + module.global_step, seed=module.global_step)
        with module.trainer.strategy.generation() as actor:  # the group's ranks generate the same tokens
            tokens = actor.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=True)
        seen.append(tokens)

    strategy = HybridEngineStrategy(config=ds_config(args.stage), training_tp_size=2)
    module = RolloutModule(tiny_llama(), on_step, lr=0.05)
    trainer = fit(module, strategy, steps=2, devices=4)
    rank = torch_dist.get_rank()
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": rank // 2}
    assert trainer.strategy.model.dp_world_size == 2
    for everyone in seen[0::2]:
        assert torch.equal(everyone[0], everyone[1]) and torch.equal(everyone[2], everyone[3]), "a TP group split"
        assert not torch.equal(everyone[0], everyone[2]), "the two data-parallel groups got the same batch"
    # Sampling: one stream per data-parallel replica, shared by the ranks of a TP group.
    for tokens in seen[1::2]:
        everyone = [torch.empty_like(tokens) for _ in range(4)]
        torch_dist.all_gather(everyone, tokens)
        assert torch.equal(everyone[0], everyone[1]) and torch.equal(everyone[2], everyone[3])
    assert all(math.isfinite(loss) for loss in module.losses)
    # The data-parallel replicas hold the same model after their reduced steps.
    with GatheredParameters(missing_params(module.actor.parameters(), trainer.strategy.model)):
        flat = torch.cat([p.detach().flatten().float() for p in module.actor.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(4)]
    torch_dist.all_gather(everyone, flat)
    assert torch.equal(everyone[0], everyone[2]) and torch.equal(everyone[1], everyone[3]), "replicas drifted"
    assert not torch.equal(everyone[0], everyone[1])  # TP partners hold different slices


def scenario_tp_checkpoint(args) -> None:
    """AutoTP training under ZeRO-3: resume from a checkpoint gives the uninterrupted run's losses and generations;
    export_actor writes one unsliced model that plain transformers loads and that generates the same tokens."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers import AutoModelForCausalLM

    directory = Path(args.dir)
    ids, mask = prompts(batch=3, length=6, seed=5)

    class Exporting(RolloutModule):
        def validation_step(self, batch, batch_idx):  # standalone validate(): its own engine, same layout
            with self.trainer.strategy.generation() as actor:
                self.validated = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)

        def on_train_end(self):
            if self.export:
                strategy = self.trainer.strategy
                self.final = strategy.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
                strategy.export_actor(directory / "export")

    def run(ckpt_path=None, callbacks=(), export=False) -> Exporting:
        samples = {}

        def on_step(module, batch):
            with module.trainer.strategy.generation() as actor:
                greedy = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
                sampled = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True)
            samples[module.global_step] = (greedy, sampled)

        module = Exporting(tiny_llama(), on_step, lr=0.05)
        module.samples, module.export = samples, export
        strategy = HybridEngineStrategy(config=ds_config(3), training_tp_size=2)
        # 2 batches an epoch: the checkpoint after step 2 falls on an epoch boundary.
        loader = prompt_loader(n=4)
        trainer = fit(
            module,
            strategy,
            steps=4,
            devices=2,
            loader=loader,
            ckpt_path=ckpt_path,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
        )
        if export:
            from lightning_hybrid.training_tp import training_tp_group

            training_engine = trainer.strategy.model
            trainer.validate(module, dataloaders=prompt_loader(n=4, batch=2), verbose=False)
            assert trainer.strategy.model is not training_engine  # Lightning's inference engine, rebuilt
            assert training_tp_group(trainer.strategy.model) is not None, "validate() lost the TP groups"
        return module

    every_two = ModelCheckpoint(dirpath=directory, filename="step{step}", every_n_train_steps=2, save_top_k=-1)
    straight = run(callbacks=[every_two], export=True)
    resumed = run(ckpt_path=directory / "stepstep=2.ckpt")
    assert len(straight.losses) == 4 and resumed.losses == straight.losses[2:], (straight.losses, resumed.losses)
    assert sorted(resumed.samples) == [2, 3]
    for step in (2, 3):
        for got, want in zip(resumed.samples[step], straight.samples[step]):
            assert torch.equal(got, want), f"step {step}: {got.tolist()} != {want.tolist()}"
    torch_dist.barrier()
    exported = AutoModelForCausalLM.from_pretrained(directory / "export").eval()
    whole = tiny_llama()
    shapes = {k: tuple(v.shape) for k, v in exported.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in whole.state_dict().items()}, "the export is not unsliced"
    files = sorted(f.name for f in (directory / "export").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"], files
    with torch.no_grad():
        tokens = exported.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, straight.final), f"{tokens.tolist()} != {straight.final.tolist()}"
    assert torch.equal(straight.validated, straight.final), "standalone validate() generates otherwise"


def scenario_plain_after_tp(args) -> None:
    """After training-TP fits in this process (AutoTP, a user's mpu), a fit without training TP: its engine is
    data-parallel over both ranks, not the earlier engines' model-parallel groups DeepSpeed keeps in its globals,
    and inference_tp_size=2 slices over its own group, not AutoTP's stale training group."""
    generated = []

    def on_step(module, batch):
        ids, mask = prompts(batch=2, length=6, seed=4)
        with module.trainer.strategy.generation() as actor:
            generated.append(actor.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False))

    module = RolloutModule(tiny_llama(), on_step)
    strategy = HybridEngineStrategy(config=ds_config(3), inference_tp_size=2)
    engine = fit(module, strategy, steps=2, devices=2).strategy.model
    assert (engine.mp_world_size, engine.dp_world_size) == (1, 2), (engine.mp_world_size, engine.dp_world_size)
    assert len(module.losses) == 2 and len(generated) == 2
    assert all(all_equal_across_ranks(tokens) for tokens in generated)


def scenario_score(args) -> None:
    """response_logprobs under ZeRO-3 (Qwen2, full fine-tuning; Llama + LoRA with the shared run's decoder layers as
    ZeRO-3 leaves) and ZeRO-2 (GPT-NeoX + LoRA) on 2 ranks, each with its own batch: shared-prompt log-probs within
    1e-4 of the plain forward's, the step's update within 1e-4."""
    cases = [
        (3, lambda: tiny_qwen2(num_key_value_heads=2), None),
        (3, lambda: add_peft_lora(tiny_llama()), "auto"),
        (2, lambda: add_peft_lora(tiny_neox(), targets=("query_key_value", "dense_4h_to_h")), None),
    ]
    for stage, build, leaves in cases:
        before = {n: p.detach().clone() for n, p in build().named_parameters() if p.requires_grad}
        updates, logprobs = {}, {}
        for share in (True, False):
            # Lightning's launcher re-runs this script per rank with LOCAL_RANK set; rank 0 is the first process.
            module = ScoringModule(build(), share, group_batch(seed=int(os.environ.get("LOCAL_RANK", "0"))))
            strategy = HybridEngineStrategy(config=ds_config(stage), zero3_leaf_modules=leaves if share else None)
            trainer = fit(module, strategy, steps=1, devices=2)
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
    parser.add_argument(
        "scenarios",
        nargs="+",
        choices=[
            "fit",
            "fit_pinned",
            "eos",
            "rank_fault",
            "tp",
            "front_ends",
            "score",
            "step",
            "autotp",
            "mpu",
            "dp_tp",
            "tp_checkpoint",
            "plain_after_tp",
        ],
    )
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--pin", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dir", default=None)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    for scenario in arguments.scenarios:
        globals()[f"scenario_{scenario}"](arguments)
        torch_dist.barrier()  # raises on rank 0 if another rank failed: then no OK for this scenario
        if torch_dist.get_rank() == 0:
            print(f"{scenario.upper()} OK", flush=True)
    # Leaving with the process group alive can abort at interpreter exit (gloo worker threads).
    torch_dist.destroy_process_group()
