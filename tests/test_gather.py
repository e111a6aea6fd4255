"""ZeRO-3 materialization: layer-wise memory bound, detached hooks, and the frozen-weight cache."""

from __future__ import annotations

import contextlib

import pytest
import torch
from deepspeed.runtime.zero import GatheredParameters
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from helpers import (
    RELEASE_AFTER_USE,
    GatherOnceModule,
    RolloutModule,
    add_peft_lora,
    ds_config,
    fit,
    hook_state,
    prompts,
    sharding_state,
    snapshot,
    strategy_for,
    tiny_llama,
    train,
    unsharded_reference,
)

from lightning_hybrid import HybridEngineStrategy
from lightning_hybrid.gather import decoder_layers, native_linear
from lightning_hybrid.lora import lora_modules


@pytest.mark.parametrize("partition", [1, 2])
def test_layerwise_gather_keeps_at_most_partition_layers_whole(partition):
    ids, mask = prompts()
    peaks = []

    def on_step(module, batch):
        layers = decoder_layers(module.actor)
        assert len(layers) == 4

        def count(*_):
            whole = sum(all(p.ds_status == ZeroParamStatus.AVAILABLE for p in layer.parameters()) for layer in layers)
            peaks.append(whole)

        handles = [layer.register_forward_hook(count) for layer in layers]
        try:
            with module.trainer.strategy.generation() as actor:
                actor.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        finally:
            for handle in handles:
                handle.remove()

    strategy = HybridEngineStrategy(config=ds_config(3), pin_parameters=False, tp_gather_partition_size=partition)
    fit(RolloutModule(add_peft_lora(tiny_llama(layers=4)), on_step, lr=0.0), strategy, steps=1)
    assert peaks and max(peaks) == partition  # never more than one partition of layers materialized


def test_zero3_hooks_are_detached_during_generation_and_restored():
    ids, mask = prompts()
    seen = {}

    def on_step(module, batch):
        before = hook_state(module)
        with module.trainer.strategy.generation() as actor:
            seen["inside"] = sum(len(m._forward_pre_hooks) for m in actor.modules())
            actor.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        seen["outside"] = sum(len(m._forward_pre_hooks) for m in module.actor.modules())
        assert hook_state(module) == before

    fit(RolloutModule(tiny_llama(), on_step), HybridEngineStrategy(config=ds_config(3)), steps=2)
    assert seen["inside"] == 0 and seen["outside"] > 0


def test_parameter_getter_set_aside_while_gathered_and_changes_carried_over():
    """Pinned: plain parameter dicts inside (no ZeRO-3 getter per weight access); ZeRO-3's own dicts after,
    holding what was registered inside the block."""
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict

    ids, mask = prompts()
    seen = {}

    def on_step(module, batch):
        norm = module.actor.model.norm
        before = norm._parameters
        with module.trainer.strategy.generation() as actor:
            seen["inside"] = {type(m._parameters) for m in actor.modules() if m._parameters}
            actor.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            norm.register_parameter("probe", torch.nn.Parameter(torch.ones(1)))
        seen["after"] = (norm._parameters is before, isinstance(before, ZeROOrderedDict), "probe" in before)
        del norm.probe

    fit(RolloutModule(tiny_llama(), on_step), HybridEngineStrategy(config=ds_config(3)), steps=1)
    assert seen["inside"] == {dict} and seen["after"] == (True, True, True)


@pytest.mark.parametrize("fault", [None, RuntimeError])
def test_generation_uses_torch_linear_and_gives_deepspeeds_back(fault):
    """ZeRO-3 replaces F.linear for good with DeepSpeed's autograd wrapper (slow, and pointless without
    gradients); inside the context torch's own runs (on CPU through decode_linear, which calls it), and the
    wrapper is back after, even after a fault."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from lightning_hybrid import decode_linear

    ids, mask = prompts()
    seen = []

    def on_step(module, batch):
        seen.append(torch.nn.functional.linear)
        with pytest.raises(RuntimeError) if fault else contextlib.nullcontext():
            with module.trainer.strategy.generation() as actor:
                seen.append(torch.nn.functional.linear)
                actor.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
                if fault:
                    raise fault("inside")
        seen.append(torch.nn.functional.linear)

    fit(RolloutModule(tiny_llama(), on_step), HybridEngineStrategy(config=ds_config(3)), steps=1)
    assert seen == [zero3_linear_wrap, decode_linear.linear, zero3_linear_wrap]


def test_native_linear_leaves_other_replacements_alone(monkeypatch):
    def users_linear(*args):
        return torch._C._nn.linear(*args)

    monkeypatch.setattr(torch.nn.functional, "linear", users_linear)
    with native_linear():
        assert torch.nn.functional.linear is users_linear


def test_cached_frozen_weights_parity_and_only_trainable_bytes_move():
    """With cache_frozen_weights, later contexts gather only the LoRA weights, and still match the policy."""
    ids, mask = prompts()
    stats = []

    def on_step(module, batch):
        reference = unsharded_reference(module, "peft")
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        with module.trainer.strategy.generation() as actor:
            got = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want), module.global_step
        stats.append(module.trainer.strategy.generation_stats)

    module = RolloutModule(add_peft_lora(tiny_llama()), on_step, lr=0.05)
    fit(module, HybridEngineStrategy(config=ds_config(3), cache_frozen_weights=True), steps=3)
    lora_bytes = sum(p.ds_numel * p.element_size() for p in module.actor.parameters() if p.requires_grad)
    frozen_bytes = sum(p.ds_numel * p.element_size() for p in module.actor.parameters() if not p.requires_grad)
    assert stats[0].gathered_bytes == lora_bytes + frozen_bytes
    # Later contexts move at most the LoRA bytes (less where ZeRO-3's own prefetch already holds some).
    assert all(s.gathered_bytes <= lora_bytes < frozen_bytes for s in stats[1:])
    # The copies, plus one scratch tensor per LoRA-targeted weight that the fused value is written into.
    targeted = [m.get_base_layer().weight for m in lora_modules(module.actor)]
    scratch_bytes = sum(w.ds_numel * w.element_size() for w in targeted)
    assert all(s.frozen_cache_bytes == frozen_bytes + scratch_bytes for s in stats)


@pytest.mark.parametrize("cached", [True, False])
def test_cached_mode_sees_a_changed_frozen_weight_and_loses_nothing(cached):
    ids, mask = prompts()
    seen = {}

    def between_steps(module):
        if module.global_step == 0:
            seen["before"] = snapshot(module)
        if module.global_step == 1:  # change a frozen base weight between two contexts
            weight = module.actor.base_model.model.model.layers[0].mlp.up_proj.weight
            assert not weight.requires_grad
            with GatheredParameters([weight], modifier_rank=0):
                weight.data.mul_(-1.0)
            seen["changed"] = snapshot(module)

    def on_step(module, batch):
        reference = unsharded_reference(module, "peft")
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        with module.trainer.strategy.generation() as actor:
            got = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, want), f"stale weights at step {module.global_step}"

    module = RolloutModule(add_peft_lora(tiny_llama()), on_step, lr=0.0)
    module.before_step = between_steps
    fit(module, HybridEngineStrategy(config=ds_config(3), cache_frozen_weights=cached), steps=3)
    after = snapshot(module)
    assert any(not torch.equal(seen["changed"][k], seen["before"][k]) for k in after)  # the change was real
    assert all(torch.equal(after[k], seen["changed"][k]) for k in after)  # and nothing else moved


def test_cached_weights_are_used_as_is_and_partitioned_again_after(monkeypatch):
    """A cached weight is never gathered again inside the context, and leaves it partitioned.

    Inside ``training_step`` ZeRO-3's parameter getter all-gathers any weight it sees as
    partitioned: a cached copy swapped in while the weight still looked partitioned was
    re-gathered, one collective per weight, on first use, and stayed gathered after the context.
    """
    from deepspeed.runtime.zero.partition_parameters import Init

    ids, mask = prompts()
    gathers_in_generate = []
    real_all_gather = Init._all_gather

    def counting_all_gather(self, param_list, *args, **kwargs):
        counter[0] += len(param_list)
        return real_all_gather(self, param_list, *args, **kwargs)

    counter = [0]
    monkeypatch.setattr(Init, "_all_gather", counting_all_gather)

    def on_step(module, batch):
        # What ZeRO-3 had partitioned before (its own prefetches in flight stay its own to release).
        partitioned = {n for n, status, _ in sharding_state(module.actor) if status == ZeroParamStatus.NOT_AVAILABLE}
        with module.trainer.strategy.generation() as actor:
            counter[0] = 0
            actor.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            gathers_in_generate.append(counter[0])
        after = {n: (status, numel) for n, status, numel in sharding_state(module.actor)}
        left = [n for n in partitioned if after[n] != (ZeroParamStatus.NOT_AVAILABLE, 0)]
        assert not left, f"left gathered at step {module.global_step}: {left}"

    module = RolloutModule(add_peft_lora(tiny_llama()), on_step, lr=0.05)
    # No prefetch: ZeRO-3 would otherwise fetch the whole tiny model at the step's start, and no copy be used.
    config = ds_config(3, stage3_prefetch_bucket_size=0)
    fit(module, HybridEngineStrategy(config=config, cache_frozen_weights=True), steps=3)
    assert gathers_in_generate == [0, 0, 0]


def test_hooks_of_others_keep_their_order_and_changes_made_inside_the_context():
    """ZeRO-3's hooks go back where they were; a hook removed inside stays removed, one added inside comes last."""
    ids, mask = prompts()
    seen = {}

    def on_step(module, batch):
        layer = decoder_layers(module.actor)[0]
        before = layer.register_forward_pre_hook(lambda *_: None)
        removed_inside = layer.register_forward_pre_hook(lambda *_: None)
        order = list(layer._forward_pre_hooks)
        with module.trainer.strategy.generation() as actor:
            assert list(layer._forward_pre_hooks) == [before.id, removed_inside.id]  # ZeRO-3's are off
            removed_inside.remove()
            added_inside = layer.register_forward_pre_hook(lambda *_: None)
            actor.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
        seen["after"] = list(layer._forward_pre_hooks)
        seen["want"] = [key for key in order if key != removed_inside.id] + [added_inside.id]
        for handle in (before, added_inside):
            handle.remove()

    fit(RolloutModule(tiny_llama(), on_step), HybridEngineStrategy(config=ds_config(3)), steps=1)
    assert seen["after"] == seen["want"] and len(seen["want"]) > 2


def test_a_failure_while_gathering_undoes_the_swaps_and_the_detached_hooks(monkeypatch):
    from lightning_hybrid import gather

    ids, mask = prompts()
    seen = {}

    def failing_enter(self):
        raise RuntimeError("injected gather failure")

    def on_step(module, batch):
        if module.global_step != 1:  # the cache is full by now: this entry swaps cached copies in first
            with module.trainer.strategy.generation() as actor:
                actor.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
            return
        before = (snapshot(module), sharding_state(module.actor), hook_state(module))
        with monkeypatch.context() as patch:
            patch.setattr(gather.CoalescedGather, "__enter__", failing_enter)
            with pytest.raises(RuntimeError, match="injected gather failure"):
                with module.trainer.strategy.generation():
                    pass
        after = (snapshot(module), sharding_state(module.actor), hook_state(module))
        assert after[1:] == before[1:]
        assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
        seen["ok"] = True

    config = ds_config(3, stage3_prefetch_bucket_size=0)
    module = RolloutModule(add_peft_lora(tiny_llama()), on_step, lr=0.0)
    fit(module, HybridEngineStrategy(config=config, cache_frozen_weights=True), steps=3)
    assert seen["ok"]


@pytest.mark.parametrize("front_end,lora", [("trainer", True), ("fabric", False)], ids=["trainer-lora", "fabric-full"])
def test_gather_once_per_step_trains_the_same_weights(front_end, lora):
    """gather_once_per_step: after 3 generate-and-train steps (plain SGD: the weights then differ by lr x the
    gradients' difference, where Adam would turn summation-order noise in near-zero gradients into whole steps) the
    weights equal today's path's within fp32 summation order; before every step the actor is partitioned with the
    same ZeRO-3 hooks in place."""
    weights, between = {}, {}
    for once in (False, True):
        states = []

        def on_step(run, batch):
            ids, mask = batch
            with run.strategy.generation() as actor:
                actor.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=True)

        def before_step(run, states=states):
            states.append((sharding_state(run.actor), hook_state(run.actor)))

        strategy = strategy_for(front_end, config=ds_config(3, **RELEASE_AFTER_USE), gather_once_per_step=once)
        actor = add_peft_lora(tiny_llama()) if lora else tiny_llama()
        run = train(
            front_end, actor, strategy, on_step, steps=3, lr=0.05, before_step=before_step, optimizer=torch.optim.SGD
        )
        weights[once], between[once] = snapshot(run), states
    initial = {
        n: p.detach().clone() for n, p in (add_peft_lora(tiny_llama()) if lora else tiny_llama()).named_parameters()
    }
    assert any(not torch.equal(value, initial[name]) for name, value in weights[True].items())  # it trained
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-5, atol=1e-6)
    assert len(between[True]) == 3 and all(state == between[True][0] for state in between[True])
    assert all(s == ZeroParamStatus.NOT_AVAILABLE and n == 0 for _, s, n in between[True][-1][0])


def test_actor_gathers_metric_counts_one_gather_per_step_instead_of_three():
    """``hybrid_engine/actor_gathers``: generation, forward and backward (all but the embedding) each all-gather the
    actor, ~3 actor sizes a step; with gather_once_per_step, 1."""
    gathers = {}
    for once in (False, True):
        module = GatherOnceModule(add_peft_lora(tiny_llama()))
        strategy = HybridEngineStrategy(config=ds_config(3, **RELEASE_AFTER_USE), gather_once_per_step=once)
        fit(module, strategy, steps=2)
        gathers[once] = module.gathers
    assert all(2.5 < g <= 3.0 for g in gathers[False]), gathers[False]
    assert gathers[True] == [1.0, 1.0]


def test_gather_once_per_step_gives_the_actor_back_when_the_step_fails():
    """An exception after the generation, before the backward: the held actor goes back to ZeRO-3 (partitioned,
    hooks in place) with its weights as they were."""
    module = GatherOnceModule(add_peft_lora(tiny_llama()), fail_at_step=1)
    with pytest.raises(ValueError, match="boom"):
        fit(module, HybridEngineStrategy(config=ds_config(3), gather_once_per_step=True), steps=3)
    before_failing_step = module.between_steps[1]
    assert sharding_state(module.actor) == before_failing_step[0]
    assert hook_state(module.actor) == before_failing_step[1]
