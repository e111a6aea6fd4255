"""The generation context, in-process (1 rank): parity, nothing lost, errors, workspace, metrics.

Parity, nothing lost and faults run under both front-ends (the Trainer and Fabric, through `helpers.train`).
"""

from __future__ import annotations

import copy
import csv
import dataclasses

import pytest
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from helpers import (
    FRONT_ENDS,
    RolloutModule,
    add_peft_lora,
    ds_config,
    fit,
    hook_state,
    log_probs,
    make_actor,
    mode_state,
    prompts,
    reference_generate,
    sharding_state,
    snapshot,
    strategy_for,
    tiny_llama,
    train,
    unsharded_reference,
)

from lightning_hybrid import HybridEngineStrategy
from lightning_hybrid.gather import native_linear
from lightning_hybrid.scoring import response_logprobs

GREEDY = dict(max_new_tokens=8, do_sample=False)


def grpo_prompts(distinct: int = 2, group: int = 3):
    """GRPO's layout: each of a few left-padded prompts repeated for its group of rows."""
    ids, mask = prompts(batch=distinct, length=7, seed=3)
    return ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)


@pytest.mark.parametrize(
    "front_end,stage,pin,lora,kv_cache,cache_frozen",
    [
        ("trainer", 3, True, "peft", "dynamic", False),
        ("trainer", 3, True, "peft", "static", False),
        ("trainer", 3, False, "peft", "dynamic", False),
        ("trainer", 3, True, "dschat", "dynamic", False),
        ("trainer", 3, False, "dschat", "static", False),
        ("trainer", 2, True, "peft", "dynamic", False),
        ("trainer", 2, True, "dschat", "dynamic", False),
        ("trainer", 3, True, None, "dynamic", False),
        ("fabric", 3, True, "peft", "dynamic", False),
        ("fabric", 3, False, "peft", "static", False),
        ("fabric", 3, True, "peft", "dynamic", True),
        ("fabric", 2, True, "peft", "dynamic", False),
    ],
)
def test_parity_with_unsharded_merged_reference(front_end, stage, pin, lora, kv_cache, cache_frozen):
    """Greedy tokens and log-probs inside the context equal the whole, merged policy's (bit for bit), before and
    after steps, under the Trainer and under Fabric."""
    ids, mask = prompts()
    checked = []

    def on_step(run, batch):
        if run.step not in (0, 3):
            return
        reference = unsharded_reference(run, lora)
        with torch.no_grad(), native_linear():  # as in a process without DeepSpeed
            want = reference.generate(ids, attention_mask=mask, **GREEDY)
            want_lp = log_probs(reference, ids, mask)
        with run.strategy.generation() as actor:
            got = actor.generate(ids, attention_mask=mask, **GREEDY)
            got_lp = log_probs(actor, ids, mask)  # the yielded module's __call__, even under Fabric's wrapper
        assert torch.equal(got, want)
        assert torch.equal(got_lp, want_lp)  # bit for bit: same weights, same kernels
        checked.append(run.step)

    strategy = strategy_for(
        front_end,
        config=ds_config(stage),
        pin_parameters=pin,
        tp_gather_partition_size=1,
        max_out_tokens=64,
        kv_cache=kv_cache,
        cache_frozen_weights=cache_frozen,
    )
    run = train(front_end, make_actor(lora), strategy, on_step, steps=4, lr=0.05)
    assert checked == [0, 3]
    if stage == 3:  # really sharded, so the context really gathered
        assert all(s == ZeroParamStatus.NOT_AVAILABLE and n == 0 for _, s, n in sharding_state(run.actor))


@pytest.mark.parametrize(
    "front_end,stage,pin,cache_frozen",
    [
        ("trainer", 3, True, False),
        ("trainer", 3, False, False),
        ("trainer", 2, True, False),
        ("trainer", 3, True, True),
        ("fabric", 3, True, False),
        ("fabric", 3, False, False),
        ("fabric", 2, True, False),
        ("fabric", 3, True, True),
    ],
)
def test_nothing_lost_over_cycles(front_end, stage, pin, cache_frozen):
    """5 generate/train cycles with a zero learning rate leave every weight bitwise as it was; hooks and modes
    are back after every context (rows repeating their prompts, so the shared prefill runs too)."""
    ids, mask = grpo_prompts()
    seen = {}

    def on_step(run, batch):
        if "before" not in seen:
            seen["before"] = snapshot(run)
            seen["hooks"] = hook_state(run.actor)
            seen["modes"] = mode_state(run.actor)
        with run.strategy.generation() as actor:
            actor.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True)
        assert run.strategy.generation_stats.prompt_tokens_reused > 0
        assert hook_state(run.actor) == seen["hooks"]
        assert mode_state(run.actor) == seen["modes"]

    strategy = strategy_for(
        front_end,
        config=ds_config(stage),
        pin_parameters=pin,
        tp_gather_partition_size=1,
        cache_frozen_weights=cache_frozen,
    )
    run = train(front_end, add_peft_lora(tiny_llama()), strategy, on_step, steps=5, lr=0.0)
    after = snapshot(run)
    assert after.keys() == seen["before"].keys()
    for name, value in after.items():
        assert torch.equal(value, seen["before"][name]), name


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("fault", [ValueError, KeyboardInterrupt])
def test_fault_inside_context_restores_everything(fault, front_end):
    """An exception or interrupt in the block: weights, sharding, hooks, modes, RNG as before; training goes on."""
    ids, mask = grpo_prompts()
    seen = {}

    def on_step(run, batch):
        if run.step != 1:
            return
        state = lambda: (snapshot(run), sharding_state(run.actor), hook_state(run.actor), mode_state(run.actor))  # noqa: E731
        before = state()
        rng = torch.get_rng_state()
        with pytest.raises(fault):
            with run.strategy.generation() as actor:
                actor.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True)
                raise fault("boom")
        assert torch.equal(torch.get_rng_state(), rng)
        after = state()
        assert after[1:] == before[1:]
        assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
        seen["ok"] = True

    run = train(front_end, add_peft_lora(tiny_llama()), strategy_for(front_end, config=ds_config(3)), on_step, steps=3)
    assert seen["ok"] and len(run.losses) == 3 and all(torch.isfinite(torch.tensor(run.losses)))


def test_generation_keeps_training_rng_stream_and_samples_vary():
    ids, mask = prompts()
    samples = []

    def on_step(module, batch):
        rng = torch.get_rng_state()
        with module.trainer.strategy.generation() as actor:
            samples.append(actor.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0))
        assert torch.equal(torch.get_rng_state(), rng)

    fit(RolloutModule(tiny_llama(), on_step, lr=0.0), HybridEngineStrategy(config=ds_config(3)), steps=2)
    assert not torch.equal(samples[0], samples[1])  # the generation stream advances across contexts


def test_misuse_is_refused():
    strategy = HybridEngineStrategy(config=ds_config(3), max_out_tokens=16)
    with pytest.raises(RuntimeError, match="does not exist yet"):
        with strategy.generation():
            pass
    ids, mask = prompts()
    seen = []

    def on_step(module, batch):
        with module.trainer.strategy.generation():
            with pytest.raises(RuntimeError, match="cannot be nested"):
                with module.trainer.strategy.generation():
                    pass
        with pytest.raises(ValueError, match="max_out_tokens=16"):
            module.trainer.strategy.generate(ids, attention_mask=mask, max_new_tokens=12)
        with pytest.raises(ValueError, match="max_new_tokens"):
            module.trainer.strategy.generate(ids, attention_mask=mask, max_new_tokens=0)
        with pytest.raises(ValueError, match="empty batch"):
            module.trainer.strategy.generate(ids[:0], max_new_tokens=2)
        seen.append(module.trainer.strategy.generation_stats.calls)

    trainer = fit(RolloutModule(tiny_llama(), on_step), strategy, steps=1)
    assert seen == [0]  # the refused requests never entered a context (the nesting test's one did, empty)
    with pytest.raises(RuntimeError, match="outside a running trainer"):
        with trainer.strategy.generation():
            pass


@pytest.mark.parametrize("release", [False, True])
def test_static_workspace_reused_or_released(release):
    ids, mask = prompts()
    seen = []

    def on_step(module, batch):
        workspace = module.trainer.strategy.hybrid_engine.kv_workspace
        with module.trainer.strategy.generation() as actor:
            for _ in range(2):
                actor.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
                cache = workspace.cache
                seen.append((id(cache), cache.layers[0].keys.data_ptr() if cache is not None else None))
        assert workspace.max_out_tokens == 32

    strategy = HybridEngineStrategy(
        config=ds_config(3), max_out_tokens=32, release_inference_cache=release, kv_cache="static"
    )
    trainer = fit(RolloutModule(tiny_llama(), on_step), strategy, steps=2)
    workspace = trainer.strategy.hybrid_engine.kv_workspace
    if release:
        assert all(entry == (id(None), None) for entry in seen) and workspace.allocations == 4
    else:
        assert len(set(seen)) == 1 and workspace.allocations == 1
        assert workspace.cache.layers[0].keys.shape[2] == 32  # sized by max_out_tokens


def test_dynamic_cache_holds_nothing_between_calls():
    """The default KV cache is transformers' own: no workspace is built, kept or reported."""
    ids, mask = prompts()
    held = []

    def on_step(module, batch):
        strategy = module.trainer.strategy
        with strategy.generation() as actor:
            actor.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            held.append(strategy.hybrid_engine.kv_workspace.cache)
        held.append(strategy.generation_stats.workspace_bytes)

    trainer = fit(RolloutModule(tiny_llama(), on_step), HybridEngineStrategy(config=ds_config(3)), steps=1)
    assert held == [None, 0] and trainer.strategy.hybrid_engine.kv_workspace.allocations == 0


def test_metrics_reach_the_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    ids, mask = prompts()

    def on_step(module, batch):
        with module.trainer.strategy.generation() as actor:
            actor.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)

    strategy = HybridEngineStrategy(config=ds_config(3))
    fit(
        RolloutModule(add_peft_lora(tiny_llama()), on_step),
        strategy,
        steps=3,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
    )
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("hybrid_engine/tokens_per_s")]
    assert len(logged) == 3
    for row in logged:
        assert float(row["hybrid_engine/new_tokens"]) == 16
        assert float(row["hybrid_engine/tokens_per_s"]) > 0
        assert 0 < float(row["hybrid_engine/generation_share"]) < 1
        assert float(row["hybrid_engine/peak_memory_bytes"]) > 0
    # The first step gathers the whole actor (later ones may find ZeRO-3's own prefetch holding some).
    assert float(logged[0]["hybrid_engine/gathered_bytes"]) > 0
    stats = strategy.generation_stats
    assert stats.calls == 1 and stats.prompt_tokens == ids.numel() and stats.new_tokens == 16


def generate_with_sharing(strategy, share: bool, *args, **kwargs):
    """One context generating with prompt sharing on or off (same weights, same generation RNG state)."""
    engine = strategy.hybrid_engine
    engine.settings = dataclasses.replace(engine.settings, share_prompt_prefill=share)
    with strategy.generation() as actor:
        out = actor.generate(*args, **kwargs)
    return out, strategy.generation_stats


@pytest.mark.parametrize(
    "stage,pin,cache_frozen",
    [(3, True, False), (3, True, True), (3, False, False), (2, True, False)],
    ids=["zero3-pinned", "zero3-cached", "zero3-layerwise", "zero2"],
)
def test_repeated_prompts_are_prefilled_once(stage, pin, cache_frozen):
    """Rows repeating a prompt (anywhere in the batch, or via num_return_sequences when sampling) share one
    prefill: greedy tokens equal plain generate's and the unsharded merged reference's, sampled tokens equal plain
    generate's with per-step logits within 1e-5; the prompt positions not recomputed are counted."""
    ids, mask = grpo_prompts()  # 2 prompts x 3 rows, 7 columns: 4 rows x 6 cached columns are not recomputed
    shuffled = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(0))
    checked = []

    def on_step(module, batch):
        strategy = module.trainer.strategy
        want = reference_generate(module, "peft", ids, mask, **GREEDY)
        for rows in (torch.arange(ids.shape[0]), shuffled):
            got, stats = generate_with_sharing(strategy, True, ids[rows], attention_mask=mask[rows], **GREEDY)
            assert torch.equal(got, want[rows])
            assert stats.prompt_tokens_reused == 4 * 6 and stats.prompt_sharing_skipped == 0
            plain, stats = generate_with_sharing(strategy, False, ids[rows], attention_mask=mask[rows], **GREEDY)
            assert torch.equal(plain, want[rows]) and stats.prompt_tokens_reused == 0
        sampling = dict(max_new_tokens=6, do_sample=True, top_k=0, output_logits=True, return_dict_in_generate=True)
        rng = copy.deepcopy(strategy.hybrid_engine.generation_rng)
        outputs = {}
        for share in (True, False):
            strategy.hybrid_engine.generation_rng = copy.deepcopy(rng)
            outputs[share], _ = generate_with_sharing(strategy, share, ids, attention_mask=mask, **sampling)
        shared, plain = outputs[True], outputs[False]
        assert torch.equal(shared.sequences, plain.sequences)
        assert (torch.stack(shared.logits) - torch.stack(plain.logits)).abs().max() < 1e-5
        # num_return_sequences repeats rows inside generate (sampling): the same draws, the prompt computed once.
        distinct, distinct_mask = ids[::3], mask[::3]
        strategy.hybrid_engine.generation_rng = copy.deepcopy(rng)
        copies, stats = generate_with_sharing(
            strategy, True, distinct, attention_mask=distinct_mask, num_return_sequences=3, **sampling
        )
        assert torch.equal(copies.sequences, plain.sequences) and stats.prompt_tokens_reused == 4 * 6
        checked.append(module.global_step)

    strategy = HybridEngineStrategy(
        config=ds_config(stage), pin_parameters=pin, tp_gather_partition_size=1, cache_frozen_weights=cache_frozen
    )
    fit(RolloutModule(add_peft_lora(tiny_llama()), on_step, lr=0.05), strategy, steps=2)
    assert checked == [0, 1]


def test_prompt_sharing_steps_aside_for_calls_it_cannot_serve():
    """A static workspace, beam search, or a caller's own cache: the call generates as it came (the same tokens),
    the skip is counted and said once; calls without repeated rows are not counted; the setting turns it off."""
    from transformers import DynamicCache

    ids, mask = grpo_prompts()
    seen = {}

    def on_step(module, batch):
        strategy = module.trainer.strategy
        with strategy.generation() as actor:
            seen["static"] = actor.generate(ids, attention_mask=mask, **GREEDY)
        seen["static_stats"] = strategy.generation_stats
        engine = strategy.hybrid_engine
        engine.settings = dataclasses.replace(engine.settings, kv_cache="dynamic")
        with strategy.generation() as actor:
            seen["dynamic"] = actor.generate(ids, attention_mask=mask, **GREEDY)
            actor.generate(ids, attention_mask=mask, num_beams=2, **GREEDY)
            actor.generate(ids, attention_mask=mask, past_key_values=DynamicCache(), **GREEDY)
            actor.generate(ids[::3], attention_mask=mask[::3], **GREEDY)  # nothing repeats: nothing to count
        seen["dynamic_stats"] = strategy.generation_stats

    strategy = HybridEngineStrategy(config=ds_config(3), kv_cache="static", max_out_tokens=32)
    with pytest.warns(UserWarning, match="kv_cache='static'") as said:
        fit(RolloutModule(tiny_llama(), on_step), strategy, steps=1)
    assert torch.equal(seen["static"], seen["dynamic"])
    assert seen["static_stats"].prompt_sharing_skipped == 1 and seen["static_stats"].prompt_tokens_reused == 0
    dynamic = seen["dynamic_stats"]
    assert dynamic.prompt_sharing_skipped == 2 and dynamic.prompt_tokens_reused == 4 * 6
    reasons = [str(w.message) for w in said if "repeat a prompt" in str(w.message)]
    assert len(reasons) == 3 and any("beam search" in r for r in reasons) and any("own cache" in r for r in reasons)

    with pytest.raises(TypeError, match="share_prompt_prefill"):
        HybridEngineStrategy(share_prompt_prefill="yes")


def test_prompt_sharing_follows_the_generation_config_transformers_resolves():
    """What transformers would refuse is refused the same way; whatever turns its cache off turns sharing off.

    ``use_cache=False`` (a keyword, a ``GenerationConfig``, or the model's default) generates without a cache:
    handing it a prefilled one gave wrong tokens. Greedy ``num_return_sequences > 1`` raises transformers' own
    ``ValueError`` (it returned identical copies: zero advantage for every GRPO group)."""
    from transformers import GenerationConfig

    ids, mask = grpo_prompts()
    no_cache = dict(GREEDY, use_cache=False)
    checked = []

    def on_step(module, batch):
        strategy = module.trainer.strategy
        want = reference_generate(module, "peft", ids, mask, **GREEDY)
        with pytest.raises(ValueError, match="num_return_sequences") as plain_error:
            reference_generate(module, "peft", ids[::3], mask[::3], num_return_sequences=3, **GREEDY)
        for share in (True, False):
            got, stats = generate_with_sharing(strategy, share, ids, attention_mask=mask, **no_cache)
            assert torch.equal(got, want) and stats.prompt_tokens_reused == 0
            config = GenerationConfig(**no_cache)
            got, stats = generate_with_sharing(strategy, share, ids, attention_mask=mask, generation_config=config)
            assert torch.equal(got, want) and stats.prompt_tokens_reused == 0
            with pytest.raises(ValueError, match="num_return_sequences") as error:
                generate_with_sharing(
                    strategy, share, ids[::3], attention_mask=mask[::3], num_return_sequences=3, **GREEDY
                )
            assert str(error.value) == str(plain_error.value)
        actor = strategy.hybrid_engine.generation_module.get_base_model()
        actor.generation_config.use_cache = False  # the model's own default
        try:
            got, stats = generate_with_sharing(strategy, True, ids, attention_mask=mask, **GREEDY)
        finally:
            actor.generation_config.use_cache = True
        assert torch.equal(got, want) and stats.prompt_tokens_reused == 0 and stats.prompt_sharing_skipped == 1
        checked.append(module.global_step)

    strategy = HybridEngineStrategy(config=ds_config(3))
    with pytest.warns(UserWarning, match="use_cache=False"):
        fit(RolloutModule(add_peft_lora(tiny_llama()), on_step, lr=0.05), strategy, steps=2)
    assert checked == [0, 1]


def test_a_static_workspace_turns_off_transformers_auto_compile_unless_the_user_configured_it():
    """transformers compiles the decode step (CUDA graphs) whenever a StaticCache is on a GPU; weights gathered and
    fused anew in every context would re-record the graphs each time. The context passes ``disable_compile=True``
    with its static workspace, unless the call brings a ``compile_config``."""
    from transformers import CompileConfig, LlamaForCausalLM

    calls = []

    class RecordingLlama(LlamaForCausalLM):  # the real model; only its generate's arguments are recorded
        def generate(self, *args, **kwargs):
            calls.append(kwargs)
            return super().generate(*args, **kwargs)

    source = tiny_llama()
    actor = RecordingLlama(source.config).eval()
    actor.load_state_dict(source.state_dict())
    ids, mask = prompts()

    def on_step(module, batch):
        with module.trainer.strategy.generation() as generating:
            generating.generate(ids, attention_mask=mask, **GREEDY)
            generating.generate(ids, attention_mask=mask, compile_config=CompileConfig(), **GREEDY)

    fit(RolloutModule(actor, on_step), HybridEngineStrategy(config=ds_config(3), kv_cache="static"), steps=1)
    assert calls[0]["disable_compile"] is True
    assert "disable_compile" not in calls[1]


def test_output_logprobs_equal_the_scoring_forward():
    """``output_logprobs=True`` (shared prompt prefill, ZeRO-3 gathered, LoRA fused, the inverse-CDF sampler): each
    sampled token's log-prob equals the scoring forward's of the unsharded merged policy within 1e-5 (fp32), so
    GRPO can use them as the old policy's; the call refuses what it cannot record, before any work."""
    ids, mask = grpo_prompts()
    seen = {}

    def on_step(module, batch):
        strategy = module.trainer.strategy
        sampling = dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=0, pad_token_id=0)
        with strategy.generation() as actor:
            out = actor.generate(
                ids, attention_mask=mask, output_logprobs=True, return_dict_in_generate=True, **sampling
            )
            with pytest.raises(ValueError, match="return_dict_in_generate=True"):
                actor.generate(ids, attention_mask=mask, output_logprobs=True, **sampling)
            with pytest.raises(ValueError, match="num_beams"):
                actor.generate(
                    ids, attention_mask=mask, output_logprobs=True, return_dict_in_generate=True, num_beams=2
                )
        assert strategy.generation_stats.prompt_tokens_reused > 0
        responses = out.sequences[:, ids.shape[1] :]
        reference = unsharded_reference(module, "peft")
        with torch.no_grad(), native_linear():
            scored = response_logprobs(reference, ids, mask, responses, temperature=0.7, share_prompt=False)
        seen[module.global_step] = (out.logprobs - scored).abs().max().item()

    fit(
        RolloutModule(add_peft_lora(tiny_llama()), on_step, lr=0.05), HybridEngineStrategy(config=ds_config(3)), steps=2
    )
    assert seen.keys() == {0, 1} and max(seen.values()) < 1e-5, seen


@pytest.mark.parametrize(
    "stage,pin,lora,precision",
    [
        (3, True, "peft", "bf16-mixed"),
        (3, False, "peft", "bf16-mixed"),
        (3, True, None, "bf16-mixed"),
        (2, True, "peft", "bf16-true"),
    ],
    ids=["zero3-lora-mixed", "zero3-layerwise-lora-mixed", "zero3-full-mixed", "zero2-lora-true"],
)
def test_bf16_parity_and_nothing_lost(stage, pin, lora, precision):
    """In bf16 (DeepSpeed's bf16-mixed: bf16 weights, fp32 master copies; and bf16-true): greedy tokens in the
    context, GRPO rows sharing their prompt's prefill included, equal the unsharded merged policy's in bf16 (its
    buffers as the policy holds them), before and after steps; scoring log-probs within bf16 rounding (2e-2; the
    adapter alone moves them by ~0.2); rollout log-probs likewise; weights, sharding, hooks, modes and the training
    RNG bitwise as before every context."""
    ids, mask = grpo_prompts()
    checked = []

    def on_step(module, batch):
        strategy = module.trainer.strategy
        assert next(module.actor.parameters()).dtype == torch.bfloat16
        reference = unsharded_reference(module, lora, torch.bfloat16)
        with torch.no_grad(), native_linear():
            want = reference.generate(ids, attention_mask=mask, **GREEDY)
            want_lp = log_probs(reference, ids, mask)
        before = (snapshot(module), sharding_state(module.actor), hook_state(module.actor), mode_state(module.actor))
        rng = torch.get_rng_state()
        with strategy.generation() as actor:
            got = actor.generate(ids, attention_mask=mask, output_logprobs=True, return_dict_in_generate=True, **GREEDY)
            got_lp = log_probs(actor, ids, mask)
        assert strategy.generation_stats.prompt_tokens_reused > 0  # the shared prefill ran
        assert torch.equal(got.sequences, want), f"step {module.global_step}: greedy tokens differ in bf16"
        assert (got_lp - want_lp).abs().max() <= 2e-2
        with torch.no_grad(), native_linear():  # the scoring forward, each row in full
            scored = response_logprobs(reference, ids, mask, want[:, ids.shape[1] :], share_prompt=False)
        assert (got.logprobs - scored).abs().max() <= 2e-2
        after = (snapshot(module), sharding_state(module.actor), hook_state(module.actor), mode_state(module.actor))
        assert torch.equal(torch.get_rng_state(), rng)
        assert after[1:] == before[1:]
        assert all(torch.equal(after[0][name], before[0][name]) for name in before[0])
        checked.append(module.global_step)

    strategy = HybridEngineStrategy(config=ds_config(stage), pin_parameters=pin, tp_gather_partition_size=1)
    fit(RolloutModule(make_actor(lora), on_step, lr=0.05), strategy, steps=3, precision=precision)
    assert checked == [0, 1, 2]
