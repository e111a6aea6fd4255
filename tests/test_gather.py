"""ZeRO-3 materialization: layer-wise memory bound, detached hooks, and the frozen-weight cache."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.zero import GatheredParameters
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from helpers import RolloutModule, add_peft_lora, ds_config, fit, prompts, tiny_llama
from test_generation import hook_state, snapshot, unsharded_reference

from lightning_hybrid import HybridEngineStrategy
from lightning_hybrid.gather import decoder_layers


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
    assert all(s.frozen_cache_bytes == frozen_bytes for s in stats)


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
