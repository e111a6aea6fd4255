"""Where the switch of a LoRA generation context goes: entry and exit split into parts, per mode.

    python benchmarks/switch_breakdown.py                    # SmolLM2-135M + PEFT LoRA, 2 processes, ZeRO-3
    python benchmarks/switch_breakdown.py --model tiny --contexts 3
    python benchmarks/switch_breakdown.py --profile /tmp/switch.prof   # and cProfile rank 0's cached switches

The setup of rows 7/8 of ``generation.py`` (PEFT LoRA on ``--lora-targets``, ZeRO-3,
``pin_parameters=True``, ``cache_frozen_weights=True``) in one engine, whose contexts alternate
between re-gathering every weight (the frozen-weight cache set aside: its entries stay valid)
and the cached mode, so both modes see the same machine load. Every context generates
``--new-tokens`` greedy tokens, which must equal the first context's.

The parts are the package's own functions, wrapped with timers for the duration (exclusive
times: a part nested in another is not counted twice; "other" is what no wrapped function
covers). Rank 0 prints the median of each part per mode, the switch per rank as
``GenerationStats`` books it, and generation tokens/s per mode.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation as bench  # noqa: E402  (sets up DeepSpeed for CPU, imports lightning_hybrid from this checkout)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# (module, attribute path, phase-independent label): what is timed, where it exists in this version.
PARTS = [
    ("lightning_hybrid.generation", "GenerationContext.__enter__", "context (rest)"),
    ("lightning_hybrid.generation", "GenerationContext.__exit__", "context (rest)"),
    ("lightning_hybrid.generation", "GenerationContext._switch_modes", "eval + requires_grad off"),
    ("lightning_hybrid.generation", "GenerationContext._swap_rng", "RNG swap"),
    ("lightning_hybrid.generation", "GenerationContext._wrap_generate", "wrap generate"),
    ("lightning_hybrid.metrics", "PeakMemory.sample", "peak-memory sample"),
    ("lightning_hybrid.gather", "PinnedGather.__enter__", "materializer (rest)"),
    ("lightning_hybrid.gather", "PinnedGather.__exit__", "materializer (rest)"),
    ("lightning_hybrid.gather", "DetachedZeroHooks.__init__", "detach ZeRO-3 hooks"),
    ("lightning_hybrid.gather", "DetachedZeroHooks.restore", "restore ZeRO-3 hooks"),
    ("lightning_hybrid.gather", "PlainParameterDicts.__init__", "plain parameter dicts"),
    ("lightning_hybrid.gather", "PlainParameterDicts.restore", "restore parameter dicts"),
    ("lightning_hybrid.gather", "missing_params", "missing_params"),
    ("lightning_hybrid.gather", "lora_modules", "find LoRA modules"),
    ("lightning_hybrid.gather", "FrozenWeightCache.lookup", "cache lookup"),
    ("lightning_hybrid.gather", "FrozenWeightCache.store", "cache store"),
    ("lightning_hybrid.gather", "GatheredParameters.__enter__", "all-gather"),
    ("lightning_hybrid.gather", "GatheredParameters.__exit__", "re-partition"),
    ("lightning_hybrid.gather", "CoalescedGather.__enter__", "all-gather"),
    ("lightning_hybrid.gather", "CoalescedGather.__exit__", "re-partition"),
    ("lightning_hybrid.lora", "LoraFusion.fuse", "fuse LoRA"),
    ("lightning_hybrid.lora", "LoraFusion.unfuse", "unfuse LoRA"),
    ("lightning_hybrid.strategy", "HybridEngineStrategy._raise_if_any_rank_failed", "rank failure check"),
]


class PartTimers:
    """Wraps functions with exclusive timers while ``phase`` is set; ``take()`` returns and resets the sums."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.sums: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # per active call: [time spent in timed callees]
        self._patched: list[tuple[object, str, object]] = []

    def install(self) -> None:
        for module_name, path, label in PARTS:
            owner = importlib.import_module(module_name)
            *outer, name = path.split(".")
            for part in outer:
                owner = getattr(owner, part, None)
            if owner is None or name not in vars(owner):
                continue  # not in this version of the package
            original = vars(owner)[name]
            setattr(owner, name, self._wrap(original, label))
            self._patched.append((owner, name, original))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()

    def _wrap(self, fn, label: str):
        timers = self

        def timed(*args, **kwargs):
            if timers.phase is None:
                return fn(*args, **kwargs)
            timers._stack.append([0.0])
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                (nested,) = timers._stack.pop()
                timers.sums[f"{timers.phase}: {label}"] += elapsed - nested
                if timers._stack:
                    timers._stack[-1][0] += elapsed

        return timed

    def take(self) -> dict[str, float]:
        sums, self.sums = dict(self.sums), defaultdict(float)
        return sums


class Breakdown(bench.Bench):
    def run(self) -> None:
        outcome = self.row_strategy(pin=True, lora=True, cache=True)
        everyone = [None] * self.world
        dist.all_gather_object(everyone, outcome)
        if self.rank == 0:
            print(report(self.args, everyone), flush=True)
            if self.args.json:
                Path(self.args.json).write_text(json.dumps(everyone, indent=1) + "\n")
            if self.args.profile:
                print(f"[breakdown] cProfile of rank 0's cached switches: {self.args.profile}", flush=True)
                pstats.Stats(self.args.profile).sort_stats("cumulative").print_stats(30)
        dist.barrier()

    def strategy_calls(self, strategy) -> dict:
        engine = strategy.hybrid_engine
        cache = engine.frozen_cache
        timers = PartTimers()
        timers.install()
        records = []
        try:
            # cached first: its first context fills the cache (a full gather), and is dropped as warm-up.
            for i in range(2 * self.args.contexts):
                mode = "cached" if i % 2 == 0 else "regather"
                engine.frozen_cache = cache if mode == "cached" else None
                records.append({"mode": mode, **self.one_context(strategy, timers)})
            if self.args.profile:
                engine.frozen_cache = cache
                profiler = cProfile.Profile()
                for _ in range(2):
                    self.one_context(strategy, None, profiler if self.rank == 0 else None)
                if self.rank == 0:
                    profiler.dump_stats(self.args.profile)
        finally:
            timers.uninstall()
            engine.frozen_cache = cache
        return {"records": records}

    def one_context(self, strategy, timers: PartTimers | None, profiler: cProfile.Profile | None = None) -> dict:
        def phase(name: str | None) -> None:
            if timers is not None:
                timers.phase = name
            if profiler is not None:
                (profiler.enable if name else profiler.disable)()

        dist.barrier()  # ranks enter together, so the entry's collectives do not time another rank's lag
        start = time.perf_counter()
        phase("enter")
        with strategy.generation() as actor:
            phase(None)
            entered = time.perf_counter()
            out = actor.generate(self.input_ids, **self.gen_kwargs)
            generated = time.perf_counter()
            phase("exit")
        phase(None)
        left = time.perf_counter()
        if self.reference is None:
            self.reference = out
        stats = strategy.generation_stats
        return {
            "enter_s": entered - start,
            "exit_s": left - generated,
            "generate_s": generated - entered,
            "equal": bool(torch.equal(out, self.reference)),
            "stats": stats.as_dict(),
            "parts": timers.take() if timers is not None else {},
        }


def report(args, everyone: list[dict]) -> str:
    modes = ("regather", "cached")
    rank0 = everyone[0]["records"]
    # Per mode, the contexts that count: all but the first (the cached mode's first fills the cache).
    timed = {m: [i for i, r in enumerate(rank0) if r["mode"] == m][1:] for m in modes}

    def median(value, mode: str, ranks=(rank0,)) -> float:
        """Median over the mode's contexts of ``value(record)``, the slowest of ``ranks`` in each."""
        return statistics.median(max(value(records[i]) for records in ranks) for i in timed[mode])

    lines = [
        f"model {args.model}, {len(everyone)} ranks, LoRA r={args.lora_r} on {args.lora_targets}, batch {args.batch},"
        f" prompt {args.prompt_len}, {args.new_tokens} new tokens; median of {args.contexts - 1} contexts per mode"
        " (the first of each dropped); seconds",
        "",
        "| part (rank 0) | " + " | ".join(modes) + " |",
        "| --- | --- | --- |",
    ]
    labels = sorted({k for r in rank0 for k in r["parts"]})
    for phase in ("enter", "exit"):
        mine = [k for k in labels if k.startswith(phase)]
        for label in mine:
            cells = [median(lambda r, k=label: r["parts"].get(k, 0.0), m) for m in modes]
            lines.append(f"| {label} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
        other = [
            median(lambda r, p=phase, ks=mine: r[f"{p}_s"] - sum(r["parts"].get(k, 0.0) for k in ks), m) for m in modes
        ]
        total = [median(lambda r, p=phase: r[f"{p}_s"], m) for m in modes]
        lines.append(f"| {phase}: other | " + " | ".join(f"{c:.4f}" for c in other) + " |")
        lines.append(f"| **{phase} total** | " + " | ".join(f"**{c:.4f}**" for c in total) + " |")
    lines.append("")
    ranks = [rank["records"] for rank in everyone]
    for name in ("switch_s", "gather_s", "fuse_s", "release_s"):
        cells = [
            f"{m} " + " / ".join(f"{median(lambda r, n=name: r['stats'][n], m, (rec,)):.4f}" for rec in ranks)
            for m in modes
        ]
        lines.append(f"GenerationStats.{name} per rank: " + "; ".join(cells))
    switch = {m: median(lambda r: r["stats"]["switch_s"], m, ranks) for m in modes}
    lines.append(
        f"switch (slowest rank, median): regather {switch['regather']:.4f}, cached {switch['cached']:.4f}"
        f" = {switch['cached'] / switch['regather']:.1%} of regather"
    )
    tokens = args.batch * args.new_tokens
    speed = {m: tokens / median(lambda r: r["generate_s"], m, ranks) for m in modes}
    lines.append(
        f"generation tokens/s per rank (slowest rank): regather {speed['regather']:.1f}, cached {speed['cached']:.1f}"
    )
    equal = all(r["equal"] for records in ranks for r in records)
    lines.append(f"greedy tokens equal in every context: {'yes' if equal else 'NO'}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.workload_arguments(parser, new_tokens=16)
    parser.add_argument("--contexts", type=int, default=6, help="contexts per mode (the first of each is dropped)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU default: cores / ranks)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-targets", default="q_proj,v_proj")
    parser.add_argument("--json", default=None, help="write every rank's raw records here")
    parser.add_argument("--profile", default=None, help="also cProfile two cached switches on rank 0, to this file")
    args = parser.parse_args(argv)
    if args.contexts < 2:
        parser.error("--contexts must be at least 2 (the first of each mode is a warm-up)")
    args.gather_layers = 8  # what Bench expects of generation.py's arguments
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" not in bench.os.environ:
        return bench.launch(args, __file__)
    Breakdown(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
