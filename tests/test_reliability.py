"""Faults and checkpoints (1 rank): out-of-memory splitting, saves, resume, export, two runs in one process.

The 2-rank cases (a rank failing, rank-dependent EOS) are in test_multiprocess.py; bad
settings in test_config.py; exceptions and interrupts inside the context in test_generation.py.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from helpers import (
    RolloutModule,
    add_peft_lora,
    ds_config,
    fit,
    hook_state,
    merged_reference,
    mode_state,
    prompt_loader,
    prompts,
    sharding_state,
    snapshot,
    tiny_llama,
)
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_hybrid import HybridEngineStrategy


def oom_above(actor, rows: int, seen: dict | None = None):
    """Make the actor's forward run out of memory for batches of more than ``rows`` rows.

    With ``seen``: each failing forward holds a tensor when it raises (as a real one holds its KV cache and
    logits); ``seen["alive_at_retry"]`` says whether it was still alive when the first smaller batch ran."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] > rows:
            held = torch.empty(1024)
            if seen is not None:
                seen["held"] = weakref.ref(held)
            raise torch.OutOfMemoryError(f"injected: {ids.shape[0]} rows")
        if seen is not None and "held" in seen:
            seen.setdefault("alive_at_retry", seen["held"]() is not None)

    return actor.register_forward_pre_hook(hook, with_kwargs=True)


def test_out_of_memory_retries_in_halves():
    """The same tokens, in halves; and the halves run after the failed attempt's tensors are gone (on a GPU,
    retrying while the traceback still holds the attempt's KV cache and logits runs out of memory again)."""
    ids, mask = prompts(batch=4)
    want = tiny_llama().generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = {}

    def on_step(module, batch):
        handle = oom_above(module.actor, rows=1, seen=got)
        try:
            with pytest.warns(UserWarning, match="Out of memory generating 4 sequences"):
                got["out"] = module.trainer.strategy.generate(
                    ids, attention_mask=mask, max_new_tokens=6, do_sample=False
                )
        finally:
            handle.remove()
        got["stats"] = module.trainer.strategy.generation_stats

    fit(RolloutModule(tiny_llama(), on_step, lr=0.0), HybridEngineStrategy(config=ds_config(3)), steps=1)
    assert torch.equal(got["out"], want)
    assert got["stats"].oom_splits == 3  # 4 -> 2 + 2 -> (1 + 1) + (1 + 1)
    assert got["alive_at_retry"] is False


def test_out_of_memory_below_the_floor_is_a_clear_error_and_loses_nothing():
    ids, mask = prompts(batch=4)
    seen = {}

    def on_step(module, batch):
        before = (snapshot(module), sharding_state(module.actor), hook_state(module), mode_state(module))
        handle = oom_above(module.actor, rows=1)
        try:
            with pytest.raises(RuntimeError, match="oom_split_min_batch=2") as error:
                module.trainer.strategy.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        finally:
            handle.remove()
        assert isinstance(error.value.__cause__, torch.OutOfMemoryError)
        after = (snapshot(module), sharding_state(module.actor), hook_state(module), mode_state(module))
        assert after[1:] == before[1:] and all(torch.equal(after[0][k], before[0][k]) for k in before[0])
        seen["ok"] = True

    strategy = HybridEngineStrategy(config=ds_config(3), oom_split_min_batch=2)
    fit(RolloutModule(tiny_llama(), on_step, lr=0.0), strategy, steps=1)
    assert seen["ok"]


def test_checkpoint_inside_generation_is_refused(tmp_path):
    def on_step(module, batch):
        with module.trainer.strategy.generation():
            with pytest.raises(RuntimeError, match="inside `strategy.generation\\(\\)`"):
                module.trainer.save_checkpoint(tmp_path / "inside.ckpt")

    fit(RolloutModule(add_peft_lora(tiny_llama()), on_step), HybridEngineStrategy(config=ds_config(2)), steps=1)


class Record(Callback):
    """Sampled generations per step."""

    def __init__(self):
        self.samples: dict[int, torch.Tensor] = {}


def run(steps: int, record: Record, ckpt_path=None, callbacks=()):
    ids, mask = prompts()

    def on_step(module, batch):
        with module.trainer.strategy.generation() as actor:
            record.samples[module.global_step] = actor.generate(
                ids, attention_mask=mask, max_new_tokens=6, do_sample=True
            )

    module = RolloutModule(add_peft_lora(tiny_llama()), on_step, lr=0.05)
    trainer = fit(
        module,
        HybridEngineStrategy(config=ds_config(3)),
        steps=steps,
        callbacks=[record, *callbacks],
        loader=prompt_loader(n=4),
        ckpt_path=ckpt_path,
        enable_checkpointing=bool(callbacks),
    )
    return module, trainer


def test_resume_gives_the_same_generations_and_losses(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="step{step}", every_n_train_steps=2, save_top_k=-1)
    straight = Record()
    uninterrupted, _ = run(4, straight, callbacks=[checkpoints])
    resumed_record = Record()
    resumed, _ = run(4, resumed_record, ckpt_path=tmp_path / "stepstep=2.ckpt")
    assert len(uninterrupted.losses) == 4 and len(resumed.losses) == 2
    assert resumed.losses == uninterrupted.losses[2:]
    for step in (2, 3):
        assert torch.equal(resumed_record.samples[step], straight.samples[step]), step


def test_checkpoint_holds_unfused_weights_and_export_loads_in_transformers_and_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids, mask = prompts()
    seen = {}

    class Exporting(RolloutModule):
        def on_train_end(self):
            strategy = self.trainer.strategy
            seen["context"] = strategy.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            seen["weights"] = snapshot(self)
            strategy.export_actor(tmp_path / "merged")
            strategy.export_actor(tmp_path / "split", merge_lora=False)
            self.trainer.save_checkpoint(tmp_path / "final.ckpt")

    module = Exporting(add_peft_lora(tiny_llama()), lr=0.05)
    fit(module, HybridEngineStrategy(config=ds_config(3)), steps=3)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(merged.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), seen["context"])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "split")
    adapter = PeftModel.from_pretrained(base, tmp_path / "split" / "adapter").eval()
    assert torch.equal(adapter.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), seen["context"])

    # The DeepSpeed checkpoint's consolidated weights are the unfused ones (base and LoRA apart).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(tmp_path / "final.ckpt", exclude_frozen_parameters=False)
    for name, value in seen["weights"].items():
        assert torch.equal(state[f"actor.{name}"].to(value.dtype), value), name


def test_two_runs_in_one_process():
    """Two Trainers, one after the other, each with its own engine, both correct."""
    ids, mask = prompts()
    want = merged_reference(add_peft_lora(tiny_llama())).generate(
        ids, attention_mask=mask, max_new_tokens=5, do_sample=False
    )
    outputs = []

    def on_step(module, batch):
        if module.global_step == 0:
            outputs.append(
                module.trainer.strategy.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
            )

    engines = []
    for _ in range(2):
        trainer = fit(RolloutModule(add_peft_lora(tiny_llama()), on_step), HybridEngineStrategy(config=ds_config(3)))
        engines.append(trainer.strategy.model)
    assert engines[0] is not engines[1]
    assert len(outputs) == 2 and all(torch.equal(out, want) for out in outputs)
