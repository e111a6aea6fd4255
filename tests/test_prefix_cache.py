"""The prompt-sharing plan as a pure function: which calls may share a prefill, read from the config
transformers resolves for the call (no fit needed)."""

from __future__ import annotations

import pytest
import torch
from helpers import add_peft_lora, prompts, tiny_llama
from transformers import DynamicCache, GenerationConfig

from lightning_hybrid.generation import prepare_call
from lightning_hybrid.prefix_cache import sharing_refusal


def refusal(model, static_workspace: bool = False, **kwargs) -> str | None:
    ids, mask = prompts(batch=4, length=6)
    call = prepare_call(model, 512, (ids,), {"attention_mask": mask, "max_new_tokens": 4, **kwargs})
    return sharing_refusal(model, call.config, call.kwargs, static_workspace=static_workspace)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({}, None),
        ({"do_sample": True, "num_return_sequences": 2}, None),
        ({"use_cache": False}, "use_cache=False"),
        ({"generation_config": GenerationConfig(use_cache=False, max_new_tokens=4)}, "use_cache=False"),
        ({"num_beams": 2}, "beam search"),
        ({"generation_config": GenerationConfig(num_beams=2, max_new_tokens=4)}, "beam search"),
        ({"cache_implementation": "static"}, "cache_implementation='static'"),
        ({"output_hidden_states": True, "return_dict_in_generate": True}, "output_hidden_states"),
        ({"prompt_lookup_num_tokens": 3}, "assisted generation"),
        ({"past_key_values": DynamicCache()}, "own cache"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_sharing_refusal_reads_the_resolved_config(kwargs, reason):
    got = refusal(add_peft_lora(tiny_llama()), **kwargs)
    assert got == reason if reason is None else reason in got


def test_the_models_own_defaults_count():
    model = tiny_llama()
    model.generation_config.use_cache = False
    assert "use_cache=False" in refusal(model)
    model.generation_config.use_cache = True
    assert refusal(model) is None


def test_sampled_num_return_sequences_become_explicit_rows_and_greedy_ones_are_refused_as_transformers_does():
    model = tiny_llama()
    ids, mask = prompts(batch=2, length=5)
    call = prepare_call(
        model, 512, (ids,), dict(attention_mask=mask, max_new_tokens=3, do_sample=True, num_return_sequences=3)
    )
    assert torch.equal(call.kwargs["input_ids"], ids.repeat_interleave(3, 0))
    assert torch.equal(call.kwargs["attention_mask"], mask.repeat_interleave(3, 0))
    assert call.kwargs["num_return_sequences"] == 1 and torch.equal(call.prompt, ids)
    with pytest.raises(ValueError, match="Greedy methods.*num_return_sequences"):
        prepare_call(model, 512, (ids,), dict(max_new_tokens=3, num_return_sequences=3))
