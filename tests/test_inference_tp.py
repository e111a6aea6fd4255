"""Inference tensor parallelism: what is refused up front, and the pieces that run on one process.

The two-rank behaviour (parity with the unsharded model, memory, training after) is in
tests/test_multiprocess.py::test_tensor_parallel_generation_matches_the_unsharded_model.
"""

from __future__ import annotations

import pytest
import torch
from helpers import add_dschat_lora, add_peft_lora, ds_config, tiny_llama, tiny_neox, tiny_qwen2
from lightning.pytorch import Trainer
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_hybrid import HybridEngineStrategy
from lightning_hybrid.inference_tp import _cut_finished, check_tp_support, skeleton
from lightning_hybrid.lora import is_dschat_lora, is_peft_lora


def test_an_architecture_not_verified_is_refused_with_the_list():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"verified for model types \['llama'.*model_type='gpt2'.*inference_tp_size=1"):
        check_tp_support(gpt2, 2)


def test_each_rank_needs_a_key_value_head():
    with pytest.raises(ValueError, match=r"inference_tp_size=4 is more than the 2 key/value heads .* <= 2"):
        check_tp_support(tiny_llama(), 4)
    with pytest.raises(ValueError, match=r"4 attention heads for 32 key/value heads"):
        check_tp_support(tiny_qwen2(), 2)  # Qwen2Config's default 32 key/value heads
    check_tp_support(add_peft_lora(tiny_llama()), 2)  # through PEFT wrapping
    check_tp_support(tiny_neox(), 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"cache_frozen_weights": True}, "cannot be combined with cache_frozen_weights"),
        ({"inference_backend": "deepspeed"}, "inference_backend='deepspeed'"),
    ],
)
def test_tp_refuses_settings_it_cannot_honour(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridEngineStrategy(config=ds_config(3), inference_tp_size=2, **kwargs)


def test_tp_not_dividing_the_world_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match=r"inference_tp_size=2.*divide the world size 1"):
        Trainer(accelerator="cpu", devices=1, strategy=HybridEngineStrategy(inference_tp_size=2), logger=False)


@pytest.mark.parametrize("lora", [add_peft_lora, add_dschat_lora])
def test_skeleton_computes_what_the_model_computes_and_shares_nothing_mutable(lora):
    model = lora(tiny_llama())
    for module in model.modules():  # fused: the skeleton drops the adapter branch
        if hasattr(module, "merged_adapters"):
            module.merge()
        if hasattr(module, "fuse_lora"):
            module.weight.data += module.lora_scaling * (module.lora_left_weight.t() @ module.lora_right_weight.t())
            module.fuse_lora = True
    copy = skeleton(model)
    ids = torch.randint(3, 90, (2, 7))
    with torch.no_grad():
        assert torch.equal(copy(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not any(is_peft_lora(m) or is_dschat_lora(m) for m in copy.modules())  # what AutoTP can slice
    assert all(p is not q for p in copy.parameters() for q in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in copy.modules())


def test_rows_are_cut_to_what_the_rank_alone_would_have_generated():
    eos = 2
    # Prompt of 2, then: row 0 ends at its 2nd new token, row 1 at its 1st; pooled ran 2 more.
    pooled = torch.tensor([[5, 6, 7, 2, 2, 2], [5, 6, 2, 2, 2, 2]])
    assert _cut_finished(pooled, 2, [eos]).tolist() == [[5, 6, 7, 2], [5, 6, 2, 2]]
    running = torch.tensor([[5, 6, 7, 8, 9, 9], [5, 6, 2, 2, 2, 2]])  # a row never ended: full width
    assert torch.equal(_cut_finished(running, 2, [eos]), running)
    assert torch.equal(_cut_finished(running, 2, []), running)
