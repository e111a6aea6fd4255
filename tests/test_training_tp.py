"""Tensor-parallel training: what is refused before any process group, and the pieces that run on one process.

The multi-process behaviour (slices, loss and generation parity, the sampler, a user's mpu,
2 DP x 2 TP, checkpoints, multi-node) is in tests/test_multiprocess.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import RolloutModule, add_dschat_lora, add_peft_lora, ds_config, tiny_llama
from lightning.pytorch import Trainer

from lightning_hybrid import HybridEngineStrategy
from lightning_hybrid.training_tp import (
    _fingerprint,
    check_autotp_model,
    data_parallel_rank_and_size,
    resolve_training_tp,
)


class ToyMpu:
    """The Megatron-style API DeepSpeed reads, for a fixed layout (no process groups needed here)."""

    def __init__(self, dp_rank: int = 0, dp_size: int = 1):
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_group(self):
        return None

    def get_model_parallel_world_size(self):
        return 2

    def get_data_parallel_rank(self):
        return self.dp_rank

    def get_data_parallel_group(self):
        return None

    def get_data_parallel_world_size(self):
        return self.dp_size


def test_training_tp_size_writes_the_autotp_block_and_agrees_with_the_config():
    strategy = HybridEngineStrategy(config=ds_config(2), training_tp_size=2)
    assert strategy.config["tensor_parallel"] == {"autotp_size": 2}
    assert strategy.settings.training_tp_size == 2
    # The config's block alone is honoured too, and the caller's dict is left as it was.
    config = {**ds_config(3), "tensor_parallel": {"autotp_size": 2}}
    assert HybridEngineStrategy(config=config).settings.training_tp_size == 2
    assert HybridEngineStrategy(config=config, training_tp_size=2).settings.training_tp_size == 2
    assert HybridEngineStrategy(config=ds_config(3)).settings.training_tp_size == 1
    assert "tensor_parallel" not in HybridEngineStrategy(config=ds_config(3)).config


def test_training_tp_size_disagreeing_with_the_config_is_refused():
    config = {**ds_config(3), "tensor_parallel": {"autotp_size": 4}}
    with pytest.raises(ValueError, match=r"training_tp_size=2\) but .* `tensor_parallel.autotp_size` is 4"):
        HybridEngineStrategy(config=config, training_tp_size=2)
    with pytest.raises(ValueError, match=r"`training_tp_size` must be an int >= 1, got 0"):
        HybridEngineStrategy(training_tp_size=0)


def test_an_mpu_together_with_autotp_is_refused():
    with pytest.raises(ValueError, match=r"`mpu` and AutoTP .* = 2\) exclude each other"):
        HybridEngineStrategy(config=ds_config(2), training_tp_size=2, mpu=ToyMpu())
    config = {**ds_config(2), "tensor_parallel": {"autotp_size": 2}}
    with pytest.raises(ValueError, match="exclude each other"):
        HybridEngineStrategy(config=config, mpu=ToyMpu())


def test_an_mpu_without_deepspeeds_api_is_refused_with_what_it_lacks():
    with pytest.raises(TypeError, match=r"lacks \['get_model_parallel_rank'.*'get_data_parallel_world_size'\]"):
        HybridEngineStrategy(mpu=object())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(training_tp_size=2, inference_tp_size=4), r"inference_tp_size=4` conflicts with training_tp_size=2"),
        (dict(mpu=ToyMpu(), inference_tp_size=2), r"inference_tp_size=2` with an `mpu`"),
    ],
)
def test_an_inference_tp_size_other_than_1_or_the_training_size_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridEngineStrategy(config=ds_config(3), **kwargs)


def test_inference_tp_equal_to_training_tp_generates_in_the_training_layout():
    # No re-slicing at generation (and so no ZeRO-3 requirement): the hybrid block says 1.
    strategy = HybridEngineStrategy(config=ds_config(1), training_tp_size=2, inference_tp_size=2)
    assert not strategy.settings.reslices_for_inference
    assert strategy.config["hybrid_engine"]["inference_tp_size"] == 1


def test_a_training_tp_size_not_dividing_the_world_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match=r"training_tp_size=2` must divide the world size 3 \(1 node\(s\) x 3"):
        Trainer(accelerator="cpu", devices=3, strategy=HybridEngineStrategy(training_tp_size=2), logger=False)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(num_attention_heads=6, hidden_size=96, num_key_value_heads=3), r"num_key_value_heads=3"),
        (dict(intermediate_size=127), r"intermediate_size=127"),
    ],
)
def test_dimensions_or_heads_not_divisible_are_refused_on_connect(overrides, match):
    strategy = HybridEngineStrategy(config=ds_config(2), training_tp_size=2)
    module = RolloutModule(tiny_llama(**overrides))
    had_group = torch.distributed.is_initialized()  # an earlier in-process fit leaves its group (Lightning: atexit)
    with pytest.raises(ValueError, match=rf"training_tp_size=2 does not divide actor's {match}"):
        strategy.connect(module)  # what Trainer.fit calls first, before any process group
    assert torch.distributed.is_initialized() == had_group  # connect() created none


@pytest.mark.parametrize("lora", [add_peft_lora, add_dschat_lora], ids=["peft", "dschat"])
def test_lora_with_autotp_training_is_refused_with_the_way_out(lora):
    strategy = HybridEngineStrategy(config=ds_config(3), training_tp_size=2)
    with pytest.raises(ValueError, match=r"does not support LoRA: .*Train LoRA with training_tp_size=1"):
        strategy.connect(RolloutModule(lora(tiny_llama())))


def test_a_frozen_reference_is_checked_like_the_actor():
    module = RolloutModule(tiny_llama(), extra=tiny_llama(intermediate_size=127))
    with pytest.raises(ValueError, match=r"reference's intermediate_size=127"):
        check_autotp_model(module, 2)
    check_autotp_model(RolloutModule(tiny_llama(), extra=tiny_llama(seed=3)), 2)


def test_the_sampler_shards_by_data_parallel_rank():
    # AutoTP's (DP, TP) mesh: TP groups of consecutive ranks.
    assert [data_parallel_rank_and_size(r, 4, 2, None) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert data_parallel_rank_and_size(3, 4, 1, None) == (3, 4)
    assert data_parallel_rank_and_size(5, 8, 1, ToyMpu(dp_rank=1, dp_size=2)) == (1, 2)
    strategy = HybridEngineStrategy(config=ds_config(2), training_tp_size=1)
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}


def test_resolve_training_tp_leaves_a_config_without_tp_alone():
    config = ds_config(2)
    assert resolve_training_tp(config, None, None) == 1
    assert "tensor_parallel" not in config


def test_batch_fingerprints_read_nested_batches():
    ids = torch.arange(6).view(2, 3)
    batch = ([ids, torch.ones_like(ids)], 0)
    assert _fingerprint(batch) == _fingerprint(([ids.clone(), torch.ones_like(ids)], 0))
    assert _fingerprint(batch) != _fingerprint(([ids + 1, torch.ones_like(ids)], 0))
    assert _fingerprint(batch) != _fingerprint(([ids, torch.ones_like(ids)], 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.bool, torch.int64])
def test_request_fingerprints_take_any_dtype(dtype):
    """A tensor-parallel group compares its ranks' generate() arguments by their bytes: bf16 embeddings included
    (numpy, which the comparison went through, has no bfloat16)."""
    from lightning_hybrid.training_tp import tensor_bytes

    tensor = torch.arange(6).reshape(2, 3).to(dtype)
    assert len(tensor_bytes(tensor)) == tensor.numel() * tensor.element_size()
    assert tensor_bytes(tensor) == tensor_bytes(tensor.clone()) != tensor_bytes(torch.zeros_like(tensor))
