"""Every setting is checked in the constructor (or at Trainer construction), before any work."""

from __future__ import annotations

import json

import pytest
from helpers import ds_config
from lightning.pytorch import Trainer

from lightning_hybrid import HybridEngineStrategy


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"max_out_tokens": 0}, ValueError, "max_out_tokens.*>= 1"),
        ({"max_out_tokens": -3}, ValueError, "max_out_tokens"),
        ({"max_out_tokens": "512"}, TypeError, "max_out_tokens.*int"),
        ({"max_out_tokens": True}, TypeError, "max_out_tokens"),
        ({"inference_tp_size": 0}, ValueError, "inference_tp_size"),
        ({"tp_gather_partition_size": 0}, ValueError, "tp_gather_partition_size"),
        ({"tp_gather_partition_size": 2.5}, TypeError, "tp_gather_partition_size"),
        ({"pin_parameters": "yes"}, TypeError, "pin_parameters.*bool"),
        ({"release_inference_cache": 1}, TypeError, "release_inference_cache"),
        ({"inference_backend": "cuda"}, ValueError, "inference_backend"),
        ({"kv_cache": "paged"}, ValueError, "kv_cache.*dynamic.*static"),
        ({"generation_module": 3}, TypeError, "generation_module"),
        ({"generation_module": ""}, TypeError, "generation_module"),
        ({"stage": 4}, ValueError, "stage"),
        ({"stage": 2, "inference_tp_size": 2}, ValueError, "needs ZeRO stage 3"),
        ({"stage": 2, "cache_frozen_weights": True}, ValueError, "cache_frozen_weights.*stage=3"),
        ({"pin_parameters": False, "cache_frozen_weights": True}, ValueError, "pin_parameters=True"),
        ({"sampler": "gumbel"}, ValueError, "sampler.*inverse_cdf.*torch"),
        ({"gather_once_per_step": 1}, TypeError, "gather_once_per_step.*bool"),
        ({"stage": 2, "gather_once_per_step": True}, ValueError, "gather_once_per_step.*stage=3"),
        ({"pin_parameters": False, "gather_once_per_step": True}, ValueError, "gather_once_per_step.*pin_parameters"),
    ],
)
def test_bad_arguments_are_refused_with_the_setting_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        HybridEngineStrategy(**kwargs)


def test_hybrid_block_written_with_deepspeed_defaults():
    strategy = HybridEngineStrategy()
    assert strategy.config["hybrid_engine"] == {
        "enabled": True,
        "max_out_tokens": 512,
        "inference_tp_size": 1,
        "release_inference_cache": False,
        "pin_parameters": True,
        "tp_gather_partition_size": 8,
    }
    assert strategy.config["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("as_path", [False, True])
def test_user_config_gets_the_block_and_is_not_mutated(tmp_path, as_path):
    config = ds_config(2)
    source = config
    if as_path:
        source = tmp_path / "ds.json"
        source.write_text(json.dumps(config))
    strategy = HybridEngineStrategy(config=source, max_out_tokens=128, pin_parameters=False)
    assert strategy.config["hybrid_engine"]["max_out_tokens"] == 128
    assert strategy.config["hybrid_engine"]["pin_parameters"] is False
    assert "hybrid_engine" not in config  # the caller's dict is untouched


def test_user_block_values_win_over_defaults_and_must_agree_otherwise():
    config = ds_config(3)
    config["hybrid_engine"] = {"enabled": True, "max_out_tokens": 256, "release_inference_cache": True}
    strategy = HybridEngineStrategy(config=config)
    assert strategy.settings.max_out_tokens == 256 and strategy.settings.release_inference_cache
    assert HybridEngineStrategy(config=config, max_out_tokens=256).settings.max_out_tokens == 256
    with pytest.raises(ValueError, match=r"max_out_tokens.*128.*256"):
        HybridEngineStrategy(config=config, max_out_tokens=128)


@pytest.mark.parametrize(
    "block,match",
    [
        ({"max_out_token": 64}, r"Unknown key\(s\) \['max_out_token'\]"),
        ({"enabled": False}, "enabled"),
        ({"enable_cuda_graph": True}, "enable_cuda_graph"),
        ({"max_out_tokens": 0}, "max_out_tokens"),
    ],
)
def test_bad_user_block_is_refused(block, match):
    config = ds_config(3)
    config["hybrid_engine"] = block
    with pytest.raises(ValueError, match=match):
        HybridEngineStrategy(config=config)


def test_world_size_checks_happen_at_trainer_construction():
    with pytest.raises(ValueError, match=r"inference_tp_size=2.*divide the world size 1"):
        Trainer(accelerator="cpu", devices=1, strategy=HybridEngineStrategy(inference_tp_size=2), logger=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        Trainer(accelerator="cpu", devices=1, strategy=HybridEngineStrategy(inference_backend="deepspeed"))
