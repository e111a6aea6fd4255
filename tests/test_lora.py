"""LoRA fusion on plain (unsharded) models: the fused weights, and the exact restore."""

from __future__ import annotations

import pytest
import torch
from helpers import DSChatLoRALinear, add_dschat_lora, add_peft_lora, merged_reference, prompts, tiny_llama

from lightning_hybrid.lora import LoraFusion, lora_modules


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_fused_weights_equal_merge_and_unload(dtype):
    actor = add_peft_lora(tiny_llama().to(dtype))
    reference = merged_reference(actor)
    fusion = LoraFusion()
    fusion.fuse(lora_modules(actor))
    assert len(fusion.fused) == 6  # q_proj, v_proj, down_proj in 2 layers
    for name, module in actor.named_modules():
        if hasattr(module, "base_layer") and module.merged:
            ref_name = name.replace("base_model.model.", "")
            assert torch.equal(module.get_base_layer().weight, reference.get_submodule(ref_name).weight), name
    ids, mask = prompts()
    with torch.no_grad():
        torch.testing.assert_close(
            actor(input_ids=ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
        )
    fusion.unfuse()
    assert not any(m.merged for m in lora_modules(actor))


def test_dschat_fused_weight_is_w_plus_scaling_b_a():
    actor = add_dschat_lora(tiny_llama())
    layer = next(m for m in actor.modules() if isinstance(m, DSChatLoRALinear))
    w = layer.weight.detach().clone()
    b, a = layer.lora_left_weight.t(), layer.lora_right_weight.t()  # B: out x r, A: r x in
    fusion = LoraFusion()
    fusion.fuse(lora_modules(actor))
    torch.testing.assert_close(layer.weight.detach(), w + layer.lora_scaling * b @ a, rtol=0, atol=1e-6)
    assert layer.fuse_lora is True
    fusion.unfuse()
    assert layer.fuse_lora is False and torch.equal(layer.weight, w)


@pytest.mark.parametrize("convention", ["peft", "dschat"])
def test_unfuse_restores_bit_for_bit_over_many_bf16_cycles(convention):
    """``W + d - d`` drifts in bf16; fusing by swapping tensors never does."""
    model = tiny_llama().to(torch.bfloat16)
    actor = add_peft_lora(model) if convention == "peft" else add_dschat_lora(model)
    actor.to(torch.bfloat16)
    before = weights(actor)
    for _ in range(20):
        fusion = LoraFusion()
        fusion.fuse(lora_modules(actor))
        assert any(not torch.equal(p, before[n]) for n, p in actor.named_parameters())  # really fused
        fusion.unfuse()
    for name, value in weights(actor).items():
        assert torch.equal(value, before[name]), name


def test_peft_multiple_adapters_fuse_only_the_active_one():
    from peft import LoraConfig

    actor = add_peft_lora(tiny_llama())
    actor.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    actor.set_adapter("other")
    reference = merged_reference(actor)  # merges the active adapter only
    fusion = LoraFusion()
    fusion.fuse(lora_modules(actor))
    ids, mask = prompts()
    with torch.no_grad():
        torch.testing.assert_close(
            actor(input_ids=ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
        )
    fusion.unfuse()


def test_disabled_adapters_and_dora_are_left_unfused():
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    fusion = LoraFusion()
    fusion.fuse(lora_modules(dora))
    assert fusion.fused == [] and fusion.skipped
    with pytest.warns(UserWarning, match="not fused"):
        fusion.warn_skipped()

    actor = add_peft_lora(tiny_llama())
    with actor.disable_adapter():
        fusion = LoraFusion()
        fusion.fuse(lora_modules(actor))
        assert fusion.fused == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("convention", ["peft", "dschat"])
def test_scratch_buffers_fuse_exactly_and_see_every_change(dtype, convention):
    """Fusing into kept scratch tensors: the same values as fresh tensors, cycle after cycle, originals intact."""
    model = tiny_llama().to(dtype)
    actor = (add_peft_lora(model) if convention == "peft" else add_dschat_lora(model)).to(dtype)
    buffers: dict[int, torch.Tensor] = {}

    def fused_weights(**kwargs):
        fusion = LoraFusion(**kwargs)
        fusion.fuse(lora_modules(actor))
        values = {id(item.weight): (item.weight.data, item.weight.detach().clone()) for item in fusion.fused}
        fusion.unfuse()
        return values

    for cycle in range(4):
        before = weights(actor)
        expected = fused_weights()  # fresh tensors, as without a cache
        got = fused_weights(buffers=buffers)
        assert got.keys() == expected.keys() and len(buffers) == len(got)
        for key, (tensor, value) in got.items():
            assert tensor.data_ptr() == buffers[key].data_ptr()  # written into the scratch, not a new tensor
            assert torch.equal(value, expected[key][1])
        for name, value in weights(actor).items():
            assert torch.equal(value, before[name]), f"cycle {cycle}: {name} not restored"
        with torch.no_grad():  # between cycles: the adapter trains, and a base weight changes
            lora = [p for n, p in actor.named_parameters() if "lora_B" in n or "lora_left" in n]
            lora[cycle % len(lora)].add_(0.5)
            targeted = lora_modules(actor)[cycle % 2]
            base = targeted.get_base_layer() if convention == "peft" else targeted
            base.weight.mul_(-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("convention", ["peft", "dschat"])
def test_disposable_weights_fuse_in_place_to_the_same_bits_and_the_others_come_back_exactly(convention, dtype):
    """ZeRO-3's gathered copies are thrown away after the context, so they are fused in place (no second copy of
    the LoRA-targeted weights); every other weight is fused into a copy and comes back as the very tensor it was.
    Either way the fused bits equal PEFT's ``merge_and_unload`` / DeepSpeed-Chat's formula."""
    actor = (add_peft_lora if convention == "peft" else add_dschat_lora)(tiny_llama().to(dtype))
    layers = lora_modules(actor)
    targeted = [layer.get_base_layer().weight if convention == "peft" else layer.weight for layer in layers]
    copies = LoraFusion()
    copies.fuse(layers)
    want = [w.detach().clone() for w in targeted]
    copies.unfuse()
    originals = [(w.data, w.detach().clone()) for w in targeted]
    half = {id(w) for w in targeted[::2]}  # every other weight as if ZeRO-3 had just gathered it
    fusion = LoraFusion(disposable=half)
    fusion.fuse(layers)
    for w, expected, (data, _) in zip(targeted, want, originals):
        assert torch.equal(w, expected)
        assert (w.data.data_ptr() == data.data_ptr()) == (id(w) in half)  # in place only where disposable
    kept = [w for w in targeted if id(w) not in half]
    assert fusion.copy_bytes == sum(w.numel() * w.element_size() for w in kept)
    fusion.unfuse()
    for w, (data, before) in zip(targeted, originals):
        if id(w) not in half:
            assert w.data_ptr() == data.data_ptr() and torch.equal(w, before)
