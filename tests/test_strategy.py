"""The strategy in a real (1-process, CPU) fit, validate, and by registered name."""

from __future__ import annotations

import math

import pytest
import torch
from deepspeed.runtime.hybrid_engine import DeepSpeedHybridEngine
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from helpers import (
    RolloutModule,
    add_peft_lora,
    ds_config,
    fit,
    merged_reference,
    prompt_loader,
    prompts,
    tiny_llama,
)
from lightning.pytorch import Trainer

from lightning_hybrid import HybridEngine, HybridEngineStrategy


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_fit_builds_a_hybrid_engine_and_trains(stage, bf16):
    module = RolloutModule(add_peft_lora(tiny_llama()))
    trainer = fit(
        module,
        HybridEngineStrategy(config=ds_config(stage)),
        steps=3,
        precision="bf16-true" if bf16 else "32-true",
    )
    engine = trainer.strategy.model
    assert isinstance(engine, DeepSpeedHybridEngine) and isinstance(engine, HybridEngine)
    assert engine.Z3_enabled == (stage == 3) and engine.gather_all_layers
    assert engine._config.hybrid_engine.enabled and engine._config.hybrid_engine.max_out_tokens == 512
    assert len(module.losses) == 3 and all(math.isfinite(loss) for loss in module.losses)
    dtype = next(module.actor.parameters()).dtype
    assert dtype == (torch.bfloat16 if bf16 else torch.float32)
    if stage == 3:
        params = list(module.actor.parameters())
        assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in params)


@pytest.mark.parametrize(
    "name,stage,offload",
    [
        ("hybrid_engine", 3, False),
        ("hybrid_engine_stage_1", 1, False),
        ("hybrid_engine_stage_2", 2, False),
        ("hybrid_engine_stage_3", 3, False),
        ("hybrid_engine_stage_2_offload", 2, True),
        ("hybrid_engine_stage_3_offload", 3, True),
    ],
)
def test_registered_names_select_the_strategy(name, stage, offload):
    trainer = Trainer(accelerator="cpu", devices=1, strategy=name, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, HybridEngineStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in strategy.config["zero_optimization"]) == offload
    assert strategy.config["hybrid_engine"]["enabled"] is True


def test_generation_module_must_be_found():
    two = RolloutModule(tiny_llama(), extra=tiny_llama())
    with pytest.raises(ValueError, match=r"2 submodules \(actor, reference\).*generation_module='actor'"):
        fit(two, HybridEngineStrategy(config=ds_config(2)), steps=1)
    with pytest.raises(ValueError, match="has no submodule 'policy'"):
        fit(RolloutModule(tiny_llama()), HybridEngineStrategy(config=ds_config(2), generation_module="policy"), steps=1)
    with pytest.raises(ValueError, match="no `generate` method"):
        fit(
            RolloutModule(tiny_llama()),
            HybridEngineStrategy(config=ds_config(2), generation_module="actor.model"),
            steps=1,
        )
    # Named explicitly, the actor is picked even with a reference model beside it.
    trainer = fit(
        RolloutModule(tiny_llama(), extra=tiny_llama()),
        HybridEngineStrategy(config=ds_config(2), generation_module="actor"),
        steps=1,
    )
    assert trainer.strategy.hybrid_engine.generation_module is trainer.lightning_module.actor


class ValidatingModule(RolloutModule):
    """Generates in training and in validation; records what validation saw."""

    def __init__(self, actor):
        super().__init__(actor, on_step=self.rollout)
        self.seen: list[tuple] = []

    def rollout(self, module, batch):
        with self.trainer.strategy.generation() as actor:
            actor.generate(batch[0], attention_mask=batch[1], max_new_tokens=3, do_sample=False)

    def validation_step(self, batch, batch_idx):
        engine = self.trainer.strategy.model
        stats = self.trainer.strategy.generation_stats
        loss = self.actor(input_ids=batch[0], attention_mask=batch[1]).logits.float().mean()
        self.seen.append((engine.in_inference, self.actor.training, stats, engine._config.hybrid_engine.enabled))
        self.log("val_loss", loss)


@pytest.mark.parametrize("stage", [2, 3])
def test_validation_in_fit_runs_the_training_model(stage):
    module = ValidatingModule(tiny_llama())
    fit(
        module,
        HybridEngineStrategy(config=ds_config(stage)),
        steps=2,
        val_check_interval=1,
        limit_val_batches=1,
        val_loader=prompt_loader(n=2),
    )
    assert module.seen, "validation ran"
    for in_inference, actor_training, stats, enabled in module.seen:
        assert not in_inference and not actor_training and enabled
        assert stats is not None and stats.calls == 1  # the last training context's stats, undisturbed


def test_validate_alone_keeps_the_hybrid_engine_and_can_generate():
    ids, mask = prompts()
    reference = tiny_llama().generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    outputs = []

    class Module(RolloutModule):
        def validation_step(self, batch, batch_idx):
            outputs.append(self.trainer.strategy.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))

    strategy = HybridEngineStrategy(config=ds_config(3))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=1,
        enable_model_summary=False,
    )
    trainer.validate(Module(tiny_llama()), prompt_loader())
    engine = trainer.strategy.model
    assert isinstance(engine, HybridEngine) and engine._config.hybrid_engine.enabled
    assert engine.Z3_enabled and torch.equal(outputs[0], reference)


@pytest.mark.cuda
@pytest.mark.parametrize("stage,pin", [(2, True), (3, True), (3, False)])
def test_fit_on_cuda(stage, pin):
    """On a GPU: the same fit, one process, PEFT LoRA; the context's greedy tokens equal the merged policy's."""
    ids, mask = (t.cuda() for t in prompts())
    actor = add_peft_lora(tiny_llama())
    reference = merged_reference(actor).cuda().generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    got = []

    def on_step(module, batch):
        with module.trainer.strategy.generation() as policy:
            got.append(policy.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))
        got.append(module.trainer.strategy.generation_stats)

    module = RolloutModule(actor, on_step, lr=0.0)
    strategy = HybridEngineStrategy(config=ds_config(stage), pin_parameters=pin, tp_gather_partition_size=1)
    trainer = fit(module, strategy, steps=2, accelerator="gpu")
    assert isinstance(trainer.strategy.model, HybridEngine)
    assert trainer.strategy.root_device.type == "cuda"
    assert torch.equal(got[0], reference) and torch.equal(got[2], reference)
    assert got[1].peak_memory_bytes > 0 and got[1].tokens_per_s > 0


MISMATCH = """
import lightning_hybrid
from lightning.fabric import Fabric
from lightning.pytorch import Trainer
trainer = lambda: Trainer(accelerator="cpu", devices=1, strategy=lightning_hybrid.HybridEngineStrategy(), logger=False)
fabric = lambda: Fabric(accelerator="cpu", devices=1, strategy=lightning_hybrid.fabric.HybridEngineStrategy())
for make in (trainer, fabric):
    try:
        make()
        print("ACCEPTED")
    except RuntimeError as error:
        print("REFUSED", error)
"""


def test_a_deepspeed_accelerator_other_than_lightnings_is_refused_with_the_fix():
    """On a GPU machine DeepSpeed picks CUDA on import; ``accelerator="cpu"`` would put the model on the GPU and the
    batches on the CPU. Shown here by giving DeepSpeed the CUDA accelerator the way a GPU machine would."""
    import subprocess
    import sys

    from helpers import subprocess_env

    env = subprocess_env(DS_ACCELERATOR="cuda")
    out = subprocess.run([sys.executable, "-c", MISMATCH], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("REFUSED", "ACCEPTED"))]
    assert len(lines) == 2, out.stdout + out.stderr
    for line in lines:
        assert line.startswith("REFUSED") and "DeepSpeed's accelerator is 'cuda'" in line
        assert "DS_ACCELERATOR=cpu" in line


def test_every_lightning_method_we_override_or_call_exists_in_the_installed_lightning():
    """The strategies override and call private Lightning methods; a Lightning release that renames one must fail
    here, by name, not deep inside a fit."""

    from lightning.fabric.strategies import DeepSpeedStrategy as FabricDeepSpeedStrategy
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_hybrid.fabric import HybridEngineStrategy as FabricHybridEngineStrategy

    called = {
        DeepSpeedStrategy: ("_init_deepspeed_distributed", "_init_config_if_needed", "set_world_ranks"),
        FabricDeepSpeedStrategy: ("_init_deepspeed_distributed", "_format_config", "_set_world_ranks"),
    }
    for ours, base in (
        (HybridEngineStrategy, DeepSpeedStrategy),
        (FabricHybridEngineStrategy, FabricDeepSpeedStrategy),
    ):
        overridden = [
            name for name, member in vars(ours).items() if getattr(getattr(member, "fget", member), "__override__", 0)
        ]
        assert len(overridden) >= 8, overridden
        for name in (*overridden, *called[base]):
            assert hasattr(base, name), f"{base.__module__}.{base.__name__} has no `{name}` any more"
