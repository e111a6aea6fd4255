"""response_logprobs: log-probs and gradients with a shared prompt equal the plain forward's, in plain PyTorch and
under ZeRO-2/3 (2 processes: tests/scripts/two_ranks.py score)."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.zero import GatheredParameters
from helpers import (
    ScoringModule,
    add_peft_lora,
    ds_config,
    fit,
    group_batch,
    tiny_gpt2,
    tiny_llama,
    tiny_neox,
    tiny_qwen2,
)

from lightning_hybrid import HybridEngineStrategy, scoring
from lightning_hybrid.gather import missing_params
from lightning_hybrid.scoring import response_logprobs

ARCHITECTURES = {
    "llama": tiny_llama,
    "qwen2": lambda: tiny_qwen2(num_key_value_heads=2),  # biased q/k/v
    "gpt_neox": tiny_neox,  # fused QKV, partial rotary
    "gpt2": lambda: tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),  # tied head, Conv1D, learned positions
}
LORA_TARGETS = {"gpt_neox": ("query_key_value", "dense_4h_to_h"), "gpt2": ("c_attn", "c_proj")}


def build(arch: str, lora: bool):
    model = ARCHITECTURES[arch]()
    return add_peft_lora(model, targets=LORA_TARGETS.get(arch, ("q_proj", "v_proj", "down_proj"))) if lora else model


def per_row_truth(model, ids, mask, responses, temperature):
    """Each row alone, its padding cut off, no cache: what the log-probs *are*."""
    rows = []
    for r in range(responses.shape[0]):
        prompt = ids[r // (responses.shape[0] // ids.shape[0])]
        prompt = prompt[mask[r // (responses.shape[0] // ids.shape[0])].bool()]
        sequence = torch.cat([prompt, responses[r]])[None]
        logits = model(input_ids=sequence).logits[0, len(prompt) - 1 : -1].float() / temperature
        rows.append(torch.log_softmax(logits, -1).gather(-1, responses[r, :, None]).squeeze(-1))
    return torch.stack(rows)


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    assert all(b[k].norm() > 0 for k in b), "a gradient that is zero compares trivially"
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)).item() for k in a)


@pytest.fixture(params=["packed", "cached"])
def method(request, monkeypatch):
    """The shared prompt packed with its responses (one forward), or through a KV cache (two)."""
    if request.param == "cached":
        monkeypatch.setattr(scoring, "PACKED_MAX_LENGTH", 0)
    return request.param


def forwards(model) -> list:
    """A list that grows by one per forward of ``model``'s base transformer."""
    calls = []
    base = getattr(model, "get_base_model", lambda: model)()
    base.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_shared_prompt_matches_the_plain_forward(arch, lora, method):
    """Log-probs within 1e-4 of each row computed alone, gradients within 1e-4 (relative) of the plain forward's:
    left-padded prompts of different lengths, masked response tails, temperature 0.7, train mode. Packed, the
    shared prompt costs one forward; cached, two."""
    model = build(arch, lora).train()
    calls = forwards(model)
    ids, mask, responses, response_mask, advantages = group_batch()
    truth = per_row_truth(model, ids, mask, responses, 0.7).detach()
    results = {}
    for share in (True, False):
        calls.clear()
        logp = response_logprobs(model, ids, mask, responses, response_mask, temperature=0.7, share_prompt=share)
        assert len(calls) == (2 if share and method == "cached" else 1)
        loss = -(advantages[:, None] * logp * response_mask).sum()
        results[share] = (logp.detach(), grads_of(model, loss))
    for share, (logp, _) in results.items():
        gap = ((logp - truth) * response_mask).abs().max().item()
        assert gap < 1e-4, f"share_prompt={share}: log-probs {gap} from the per-row truth"
    assert relative_gap(results[True][1], results[False][1]) < 1e-4


def test_prompt_rows_may_repeat_anywhere(method):
    """One prompt row per response, repeats in any order and groups of different sizes: the same log-probs as
    distinct prompts answered by groups."""
    model = tiny_llama()
    ids, mask, responses, response_mask, _ = group_batch()
    grouped = response_logprobs(model, ids, mask, responses, response_mask)
    order = torch.randperm(responses.shape[0], generator=torch.Generator().manual_seed(0))[:5]  # groups of 2 and 3
    row_ids, row_mask = ids.repeat_interleave(3, 0)[order], mask.repeat_interleave(3, 0)[order]
    per_row = response_logprobs(model, row_ids, row_mask, responses[order], response_mask[order])
    assert ((per_row - grouped[order]) * response_mask[order]).abs().max() < 1e-5


def test_bad_input_is_refused_before_any_forward():
    model = tiny_llama()
    ids, mask, responses, response_mask, _ = group_batch()
    with pytest.raises(ValueError, match="5 responses to 2 prompts"):
        response_logprobs(model, ids, mask, responses[:5])
    with pytest.raises(ValueError, match="temperature"):
        response_logprobs(model, ids, mask, responses, temperature=0.0)
    with pytest.raises(ValueError, match="response_mask"):
        response_logprobs(model, ids, mask, responses, response_mask[:, :2])


def test_gradient_checkpointing(monkeypatch):
    """Packed (no cache) it scores as without checkpointing; through a cache, which transformers turns off under
    checkpointing in training, it refuses instead of scoring without the prompt."""
    model = tiny_llama().train()
    ids, mask, responses, response_mask, _ = group_batch()
    want = response_logprobs(model, ids, mask, responses, response_mask, share_prompt=False)
    model.gradient_checkpointing_enable()
    got = response_logprobs(model, ids, mask, responses, response_mask)
    assert ((got - want) * response_mask).abs().max() < 1e-5
    monkeypatch.setattr(scoring, "PACKED_MAX_LENGTH", 0)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        response_logprobs(model, ids, mask, responses)


def whole_weights(module):
    with GatheredParameters(missing_params(module.actor.parameters(), module.trainer.strategy.model)):
        return {n: p.detach().clone() for n, p in module.actor.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "stage,arch,lora,cached",
    [(3, "llama", True, False), (3, "llama", True, True), (2, "gpt2", False, False)],
    ids=["zero3-lora-packed", "zero3-lora-cached", "zero2-full-packed"],
)
def test_one_step_under_zero_equals_the_plain_forward(stage, arch, lora, cached, monkeypatch):
    """Under ZeRO (1 process), a step on shared-prompt log-probs moves the weights as the plain forward's step does:
    log-probs within 1e-4, the update (the gradient) within 1e-4 relative."""
    if cached:
        monkeypatch.setattr(scoring, "PACKED_MAX_LENGTH", 0)
    before = {n: p.detach().clone() for n, p in build(arch, lora).named_parameters()}
    updates, logprobs = {}, {}
    for share in (True, False):
        module = ScoringModule(build(arch, lora), share, group_batch())
        strategy = HybridEngineStrategy(config=ds_config(stage))
        fit(module, strategy, steps=1, loader=module.train_dataloader())
        after = whole_weights(module)
        updates[share] = {n: after[n] - before[n] for n in after}
        logprobs[share] = module.logprobs[0]
    assert (logprobs[True] - logprobs[False]).abs().max() < 1e-4
    assert relative_gap(updates[True], updates[False]) < 1e-4
