"""Tiny causal LMs built from a config, for tests, examples and benchmarks (like ``lightning.pytorch.demos``).

``tiny_causal_lm(arch)`` builds one of the architectures in ``CONFIGS`` with random weights, seeded, so
the same call gives the same weights in every process: nothing is downloaded. Any config field can be
overridden by keyword: ``tiny_causal_lm("llama", num_hidden_layers=4, vocab_size=128)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 96
# Token ids 0, 1, 2 are pad, bos and eos in the tests' prompts (helpers.prompts draws from 3 upwards).
_SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# arch: (transformers config class, model class, config fields). Small enough that a forward takes
# milliseconds on a CPU, with enough heads and layers that sharding and attention masks are exercised.
CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **_SPECIAL,
        ),
    ),
    "neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            **_SPECIAL,
        ),
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            **_SPECIAL,
        ),
    ),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, pad_token_id=0, eos_token_id=2),
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global"], 2]],
            pad_token_id=0,
            eos_token_id=2,
        ),
    ),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    ),
    # SmolLM2-135M's shape (the examples' default model) with random weights: for timings where the
    # real weights are not at hand (a bare GPU machine). 134.5M parameters, tied embeddings.
    "smollm2-135m": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            pad_token_id=2,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


def tiny_causal_lm(arch: str, seed: int | None = 0, **overrides: Any) -> nn.Module:
    """A causal LM of architecture ``arch`` (a key of ``CONFIGS``), random weights, in eval mode.

    ``seed`` seeds torch's global RNG just before the weights are drawn, so equal calls build equal
    models; ``None`` leaves the RNG as it is (a caller that seeded everything itself). ``overrides``
    replace or add config fields.
    """
    import transformers  # here, so importing this module stays cheap

    if arch not in CONFIGS:
        raise ValueError(f"Unknown architecture {arch!r}: one of {sorted(CONFIGS)}.")
    config_name, model_name, fields = CONFIGS[arch]
    if seed is not None:
        torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**fields, **overrides})
    return getattr(transformers, model_name)(config).eval()
