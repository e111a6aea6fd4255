"""Probe: do DeepSpeed's inference kernels (the hybrid engine's containers) work on this stack?

For a tiny random OPT and a tiny random Llama in fp16 on one GPU: greedy tokens of plain
Hugging Face generate vs ``deepspeed.init_inference(..., replace_with_kernel_inject=True)``,
and how long building the kernels took. Prints one JSON line per architecture.
Evidence for which architectures ``inference_backend="deepspeed"`` may ever be verified on.
"""

from __future__ import annotations

import json
import time
import traceback

import deepspeed
import torch
import transformers

from lightning_hybrid.testing import tiny_causal_lm


def tiny(arch: str) -> torch.nn.Module:
    """A 2-layer OPT or Llama of width 256 (DeepSpeed's kernels want wider heads than the tests' models)."""
    wide = dict(vocab_size=512, hidden_size=256, max_position_embeddings=512)
    if arch == "opt":
        special = dict(pad_token_id=1, bos_token_id=2, eos_token_id=2)
        return tiny_causal_lm("opt", **wide, ffn_dim=1024, word_embed_proj_dim=256, **special).train()
    return tiny_causal_lm("llama", **wide, intermediate_size=512, num_key_value_heads=4, pad_token_id=None).train()


def probe(arch: str) -> dict:
    model = tiny(arch).half().cuda().eval()
    ids = torch.randint(3, 500, (4, 16), device="cuda")
    want = model.generate(ids, max_new_tokens=16, do_sample=False)
    result = {"arch": arch, "transformers": transformers.__version__, "deepspeed": deepspeed.__version__}
    start = time.perf_counter()
    try:
        engine = deepspeed.init_inference(model, dtype=torch.float16, replace_with_kernel_inject=True)
        result["build_s"] = round(time.perf_counter() - start, 1)
        injected = sum("DeepSpeed" in type(m).__name__ for m in engine.module.modules())
        got = engine.module.generate(ids, max_new_tokens=16, do_sample=False)
        result.update(
            injected_modules=injected,
            tokens_equal=bool(torch.equal(got, want)),
            token_match=float((got == want).float().mean()),
        )
    except Exception as error:  # the probe reports, it does not judge
        result.update(
            build_s=round(time.perf_counter() - start, 1),
            error=f"{type(error).__name__}: {error}"[:600],
            where=traceback.format_exc().splitlines()[-3][:300],
        )
    return result


if __name__ == "__main__":
    for arch in ("opt", "llama"):
        print("PROBE " + json.dumps(probe(arch)), flush=True)
