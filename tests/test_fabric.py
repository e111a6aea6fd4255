"""Fabric's ``HybridEngineStrategy`` (1 process, CPU): selection by name, the same arguments as the Trainer's,
a bare Hugging Face model, metrics to Fabric's loggers, and ``fabric.save`` / ``fabric.load``.

The generation context's parity and nothing-lost tests run for both front-ends in test_generation.py
(1 process) and tests/scripts/two_ranks.py ``front_ends`` (2 processes).
"""

from __future__ import annotations

import csv
import inspect

import pytest
import torch
from helpers import (
    Policy,
    Run,
    add_peft_lora,
    ds_config,
    merged_reference,
    prompt_loader,
    prompts,
    snapshot,
    tiny_llama,
)
from lightning.fabric import Fabric
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry

import lightning_hybrid
from lightning_hybrid import HybridEngine
from lightning_hybrid.fabric import HybridEngineStrategy

NAMES = [
    "hybrid_engine",
    "hybrid_engine_stage_1",
    "hybrid_engine_stage_2",
    "hybrid_engine_stage_3",
    "hybrid_engine_stage_2_offload",
    "hybrid_engine_stage_3_offload",
]


@pytest.mark.parametrize("name", NAMES)
def test_registered_names_select_the_fabric_strategy(name):
    fabric = Fabric(accelerator="cpu", devices=1, strategy=name)
    assert type(fabric.strategy) is HybridEngineStrategy
    assert STRATEGY_REGISTRY[name]["init_params"] == StrategyRegistry[name]["init_params"]
    assert fabric.strategy.config["zero_optimization"]["stage"] == STRATEGY_REGISTRY[name]["init_params"]["stage"]
    assert fabric.strategy.config["hybrid_engine"]["enabled"]


def test_same_arguments_defaults_and_validation_as_the_trainer_strategy():
    assert inspect.signature(HybridEngineStrategy) == inspect.signature(lightning_hybrid.HybridEngineStrategy)
    for strategy_class in (HybridEngineStrategy, lightning_hybrid.HybridEngineStrategy):
        with pytest.raises(ValueError, match="cache_frozen_weights=True.*needs stage=3"):
            strategy_class(stage=2, cache_frozen_weights=True)
        with pytest.raises(ValueError, match="`kv_cache` must be one of"):
            strategy_class(kv_cache="paged")


def test_world_size_and_backend_checks_happen_at_fabric_construction():
    with pytest.raises(ValueError, match="`inference_tp_size=2` must divide the world size 1"):
        Fabric(accelerator="cpu", devices=1, strategy=HybridEngineStrategy(inference_tp_size=2))
    with pytest.raises(ValueError, match="CUDA"):
        Fabric(accelerator="cpu", devices=1, strategy=HybridEngineStrategy(inference_backend="deepspeed"))
    with pytest.raises(ValueError, match="not supported by the Fabric strategy yet"):
        Fabric(accelerator="cpu", devices=2, strategy=HybridEngineStrategy(training_tp_size=2))


def fabric_with(strategy, **kwargs) -> Fabric:
    fabric = Fabric(accelerator="cpu", devices=1, strategy=strategy, **kwargs)
    fabric.launch()
    return fabric


def test_a_bare_hugging_face_model_generates_and_fabric_module_eval_does_not_matter():
    """The module given to fabric.setup may be the causal LM itself; what the context yields generates and scores,
    whatever mode Fabric's wrapper was put in."""
    ids, mask = prompts()
    actor = add_peft_lora(tiny_llama())
    want = merged_reference(actor).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    fabric = fabric_with(HybridEngineStrategy(config=ds_config(3)))
    optimizer = torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad], lr=0.0)
    model, optimizer = fabric.setup(actor, optimizer)
    assert isinstance(fabric.strategy.model, HybridEngine)
    model.eval()  # reaches the modules, not the engine's mode switch: the context sets its own modes
    with fabric.strategy.generation() as generator:
        got = generator.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        logits = generator(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert logits.shape[:2] == ids.shape
    assert not any(m.training for m in actor.modules())  # the mode it was in before the context, as it was
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    fabric.backward(loss)
    optimizer.step()


def test_misuse_is_refused_before_setup():
    strategy = HybridEngineStrategy(config=ds_config(3))
    with pytest.raises(RuntimeError, match=r"fabric.setup\(model, optimizer\)"):
        with strategy.generation():
            pass


def test_metrics_go_to_fabric_loggers_and_generation_stats(tmp_path):
    from lightning.fabric.loggers import CSVLogger

    ids, mask = prompts()
    fabric = fabric_with(HybridEngineStrategy(config=ds_config(3)), loggers=CSVLogger(tmp_path, name="run"))
    policy = Policy(add_peft_lora(tiny_llama()))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    fabric.setup(policy, optimizer)
    for _ in range(2):
        with fabric.strategy.generation() as actor:
            actor.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    stats = fabric.strategy.generation_stats
    assert stats.calls == 1 and stats.new_tokens == 16 and stats.tokens_per_s > 0
    fabric.logger.finalize("success")
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert len(rows) == 2
    for row in rows:
        assert float(row["hybrid_engine/new_tokens"]) == 16 and float(row["hybrid_engine/gather_s"]) > 0


def rollout_run(steps: int, save_at: int | None = None, load_from=None, directory=None):
    """A Fabric RL-shaped loop: each step samples from the actor in the context, then trains on a loss."""
    fabric = fabric_with(HybridEngineStrategy(config=ds_config(3)))
    policy = Policy(add_peft_lora(tiny_llama()))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.05)
    model, optimizer = fabric.setup(policy, optimizer)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    if load_from is not None:
        fabric.load(load_from, state)
    batches = list(prompt_loader(n=2 * steps))
    samples, losses, saved_weights = {}, {}, None
    while state["step"] < steps:
        step = state["step"]
        ids, mask = batches[step]
        with fabric.strategy.generation() as actor:
            samples[step] = actor.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True)
        loss = model(ids, mask)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses[step] = loss.item()
        state["step"] = step + 1
        if state["step"] == save_at:
            with pytest.raises(RuntimeError, match="inside `strategy.generation\\(\\)`"):
                with fabric.strategy.generation():
                    fabric.save(directory, state)
            fabric.save(directory, state)
            saved_weights = snapshot(Run(fabric.strategy, policy.actor))
    return samples, losses, saved_weights


def test_fabric_save_holds_unfused_weights_and_load_resumes_exactly(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    samples, losses, saved = rollout_run(4, save_at=2, directory=tmp_path / "ckpt")
    state = get_fp32_state_dict_from_zero_checkpoint(tmp_path / "ckpt", tag="checkpoint")
    assert any("lora_A" in name for name in saved)  # base and LoRA apart, as trained: not fused
    for name, value in saved.items():
        assert torch.equal(state[f"actor.{name}"].to(value.dtype), value), name

    resumed_samples, resumed_losses, _ = rollout_run(4, load_from=tmp_path / "ckpt")
    assert list(resumed_losses) == [2, 3]  # it went on from the saved step
    for step in (2, 3):
        assert torch.equal(resumed_samples[step], samples[step]), step  # the sampling stream resumed too
        assert resumed_losses[step] == losses[step], step


FIRST_IMPORT_INSIDE_ZERO_INIT = """
import sys

import torch
from lightning.fabric import Fabric
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

import lightning_hybrid
from lightning_hybrid.fabric import HybridEngineStrategy

for name in ("qwen2", "mistral"):
    assert f"transformers.models.{name}.modeling_{name}" not in sys.modules, name
size = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": 1}


def check(cfg, sharded_context):
    with sharded_context():  # the model's module is first imported here
        sharded = AutoModelForCausalLM.from_config(cfg)
    plain = AutoModelForCausalLM.from_config(cfg)  # the same classes, outside zero.Init
    with sharded_context():
        again = AutoModelForCausalLM.from_config(cfg)
    for model, partitioned in ((sharded, True), (plain, False), (again, True)):
        assert all(hasattr(p, "ds_id") == partitioned for p in model.parameters())
        attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
        assert attention and all(hasattr(m, "_kernel_funcs") for m in attention), type(model).__name__
    plain(torch.tensor([[1, 2, 3]]))  # failed: AttributeError: ... no attribute '_kernel_funcs'
    print("KEPT", type(plain).__name__)


fabric = Fabric(accelerator="cpu", devices=1, strategy=HybridEngineStrategy(config=config))
fabric.launch()
check(Qwen2Config(**size), fabric.init_module)
trainer_strategy = lightning_hybrid.HybridEngineStrategy(config=config)  # the process group is Fabric's
check(MistralConfig(**size), trainer_strategy.model_sharded_context)
"""


def test_model_classes_first_imported_inside_zero_init_keep_their_decorators():
    """transformers' ``use_kernelized_func`` (the ``kernels`` package) wraps an attention class's ``__init__``; a class
    first imported inside ZeRO-3's ``zero.Init`` lost that wrapper when DeepSpeed restored its ``__init__`` on exit,
    and a model built afterwards outside it failed its forward. Both front-ends' sharded contexts keep it (the models
    still partitioned inside, not outside). A fresh process: the model classes must not be imported yet."""
    import subprocess
    import sys

    from helpers import subprocess_env

    env = subprocess_env()
    out = subprocess.run(
        [sys.executable, "-c", FIRST_IMPORT_INSIDE_ZERO_INIT], env=env, capture_output=True, text=True, timeout=180
    )
    kept = [line for line in out.stdout.splitlines() if line.startswith("KEPT")]
    assert kept == ["KEPT Qwen2ForCausalLM", "KEPT MistralForCausalLM"], out.stdout[-2000:] + out.stderr[-4000:]
