"""The RL step benchmark: the example's GRPO step, today's plain path and the shared-prompt path, side by side.

    python benchmarks/rl_step.py                          # SmolLM2-135M-Instruct + LoRA, 1 and 2 processes
    python benchmarks/rl_step.py --model tiny --processes 1 --steps 3   # a quick check of the harness

Each run is ``examples/rlhf.py fit`` on its embedded default (or ``examples/configs/tiny.yaml``),
in a fresh subprocess, for ``--steps`` steps, one path after the other for each process count
(``--repeats`` alternates them again). The two paths:

* ``plain``: every row computes its prompt again: ``share_prompt_prefill=False`` in the strategy,
  ``share_prompts=False`` in scoring, a frozen copy of the model as the KL reference (as before);
* ``shared``: each prompt once per group in generation and in scoring, the reference from the
  actor with its adapter disabled (the example's defaults).

The example logs each step's phases (``hybrid_engine/generate_s`` and ``switch_s`` from the
strategy, ``time/reference_s``, ``time/policy_forward_s``, ``time/backward_s``,
``time/optimizer_s`` and ``memory/peak_rss_mb``, the largest over ranks); the first step is
ZeRO-3's tracing warm-up and is left out. Prints a markdown table, writes JSON (``--json``,
default ``benchmarks/results/rl_step_<model>.json``). See benchmarks/README.md.

On this project's shared 2-core machines the speed of the machine drifts 1.5-2x within minutes, so two
fits run one after the other can disagree by more than the paths do. ``--alternate`` (the default on one
process, for ``--paths plain,shared`` and ``shared,shared+once``) therefore also runs one more fit in which
every batch is stepped twice, by each of the two paths (the order swapped every other batch): the same
process, engine, batches and moment, so the ratio it reads is the paths' own. Memory can only come from
the separate fits (one fit holds both paths' models).

``--floor`` also times the same step in plain PyTorch in this process (no DeepSpeed, no Lightning:
``transformers`` generate, the example's scoring and loss, AdamW), both paths alternated step by step:
the compute floor of each path, so the ratio the strategy reaches can be read against the ratio the
arithmetic allows on this machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "rlhf.py"
PATHS = {
    "plain": [
        "--trainer.strategy.init_args.share_prompt_prefill=false",
        "--model.share_prompts=false",
        "--model.reference=copy",
    ],
    "shared": [],
    # issue 27: the precision users train in, and the actor held gathered from generation through the backward
    "shared+once": ["--trainer.strategy.init_args.gather_once_per_step=true"],
    "bf16": ["--trainer.precision=bf16-mixed"],
    "bf16+once": ["--trainer.precision=bf16-mixed", "--trainer.strategy.init_args.gather_once_per_step=true"],
}
PHASES = {  # name in the table: metric logged by the example
    "generate": "hybrid_engine/generate_s",
    "switch (gather, fuse, release)": "hybrid_engine/switch_s",
    "reference log-probs": "time/reference_s",
    "policy forward": "time/policy_forward_s",
    "backward": "time/backward_s",
    "optimizer": "time/optimizer_s",
    "whole step": "hybrid_engine/step_s",
    "actor all-gathers per step": "hybrid_engine/actor_gathers",
    "rollout log-prob gap, max": "rollout_logprob_gap_max",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument(
        "--paths", default="plain,shared", help=f"comma-separated, the first is the baseline; of {list(PATHS)}"
    )
    parser.add_argument("--steps", type=int, default=5, help="steps per run; the first is left out")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each path per process count, alternated")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--floor", action="store_true", help="also time both paths in plain PyTorch (see above)")
    parser.add_argument(
        "--alternate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time both paths within one fit, batch by batch (one process only; see above)",
    )
    parser.add_argument(
        "example_args", nargs="*", help="after --: more arguments for examples/rlhf.py fit (both paths)"
    )
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is ZeRO-3's warm-up)")
    args.processes = [int(p) for p in args.processes.split(",")]
    args.paths = args.paths.split(",")
    if len(args.paths) < 2 or any(path not in PATHS for path in args.paths):
        parser.error(f"--paths: two or more of {list(PATHS)}")
    if args.paths not in ALTERNATE_PAIRS:
        args.alternate = False  # one fit stepping each batch by both paths: for the pairs it knows
    if args.paths != ["plain", "shared"]:
        args.floor = False
    args.json = args.json or ROOT / "benchmarks" / "results" / f"rl_step_{args.model}.json"
    return args


def run_example(args: argparse.Namespace, path: str, processes: int, workdir: Path) -> dict:
    """One ``fit`` of the example; its per-step metrics (warm-up step dropped) and wall time.

    ``path="alternate"``: the fit of :func:`alternate_worker`, ``2 * steps`` steps, both paths' first left out.
    """
    if path == "alternate":
        command = [sys.executable, str(Path(__file__).resolve()), ALTERNATE_WORKER, ",".join(args.paths), "fit"]
        if args.paths == [
            "plain",
            "shared",
        ]:  # a frozen copy for the plain path's steps; the shared path's: the adapter
            command += ["--model.reference=copy"]
        command += ["--trainer.use_distributed_sampler=false"]  # one process: its batch sampler stays as it is
    else:
        command = [sys.executable, str(EXAMPLE), "fit", *PATHS[path]]
    steps = 2 * args.steps if path == "alternate" else args.steps
    if args.model == "tiny":
        command += ["--config", str(ROOT / "examples" / "configs" / "tiny.yaml")]
    command += [f"--trainer.max_steps={steps}", f"--trainer.devices={processes}", "--model.num_samples=0"]
    command += ["--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={workdir}"]
    command += args.example_args
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    started = time.perf_counter()
    proc = subprocess.run(
        command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=args.timeout
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{path} x{processes} failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}")
    (metrics_csv,) = workdir.glob("*/version_*/metrics.csv")
    by_step: dict[int, dict[str, float]] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}
            by_step.setdefault(int(row["step"]), {}).update(values)
    logged = [m for _, m in sorted(by_step.items()) if "hybrid_engine/step_s" in m]
    if path != "alternate":
        return {"path": path, "processes": processes, "wall_s": wall, "steps": logged[1:]}
    first, second = args.paths
    both = {name: [m for m in logged if m["bench/second"] == (name == second)][1:] for name in (first, second)}
    return {"path": path, "processes": processes, "wall_s": wall, "steps": both}


def summarize(runs: list[dict]) -> dict:
    """Medians over every measured step of every run of one path."""
    steps = [s for run in runs for s in run["steps"]]
    summary = {name: statistics.median(s.get(metric, 0.0) for s in steps) for name, metric in PHASES.items()}
    tokens = sum(s["hybrid_engine/new_tokens"] for s in steps)
    summary["generated tokens/s"] = tokens / sum(s["hybrid_engine/generate_s"] for s in steps)
    summary["peak RSS (MiB, largest rank)"] = max(s["memory/peak_rss_mb"] for s in steps)
    summary["prompt positions reused per step"] = statistics.median(
        s.get("hybrid_engine/prompt_tokens_reused", 0.0) for s in steps
    )
    summary["mean reward"] = statistics.fmean(s["reward"] for s in steps)
    summary["measured steps"] = len(steps)
    return summary


NO_RATIO = ("prompt positions reused per step", "actor all-gathers per step", "rollout log-prob gap, max")


def comparison_rows(by_path: dict[str, dict], names: list[str]) -> list[str]:
    """A markdown table, one column per path; the ratios say how many times better each path is than the first."""
    paths = list(by_path)
    base = paths[0]
    lines = [
        "| | " + " | ".join(paths) + " | " + " | ".join(f"{base} / {p}" for p in paths[1:]) + " |",
        "| --- |" + " --- |" * (2 * len(paths) - 1),
    ]
    for name in names:
        values = [by_path[p].get(name, 0.0) for p in paths]
        cells = [f"{v:.3g}" if name in NO_RATIO else f"{v:.3f}" for v in values]
        ratios = []
        for v in values[1:]:
            if name in NO_RATIO:
                ratios.append("")
            elif name == "generated tokens/s":  # a rate: more is better
                ratios.append(
                    f"{v / values[0]:.2f}x ({'this' if len(paths) > 2 else paths[1]} / {base})" if values[0] else "-"
                )
            else:
                ratios.append(f"{values[0] / v:.2f}x" if v else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return lines


SUMMARY_ROWS = [*PHASES, "generated tokens/s", "peak RSS (MiB, largest rank)", "prompt positions reused per step"]


def table(results: dict[int, dict[str, dict]]) -> str:
    lines = []
    for processes, by_path in results.items():
        lines += [f"\n{processes} process(es):\n", *comparison_rows(by_path, SUMMARY_ROWS)]
    return "\n".join(lines)


def alternate_table(by_path: dict[str, dict]) -> str:
    # No memory row: one fit holds both paths' models.
    names = [name for name in SUMMARY_ROWS if not name.startswith("peak RSS")]
    return "\n".join(comparison_rows(by_path, names))


def verdict(by_path: dict[str, dict]) -> str:
    """Each path's whole step and generation against the first path's."""
    paths = list(by_path)
    base = by_path[paths[0]]
    parts = []
    for path in paths[1:]:
        step = base["whole step"] / by_path[path]["whole step"]
        generation = by_path[path]["generated tokens/s"] / base["generated tokens/s"]
        memory = by_path[path]["peak RSS (MiB, largest rank)"] / base["peak RSS (MiB, largest rank)"]
        parts.append(f"{path}: whole step {step:.2f}x, generation {generation:.2f}x, peak memory {memory:.2f}x")
    return f"against {paths[0]}: " + "; ".join(parts)


FLOOR_PHASES = [name for name in PHASES if name not in NO_RATIO]  # the same phases, timed by hand in plain PyTorch


def floor(args: argparse.Namespace) -> dict[str, dict]:
    """Both paths' step in plain PyTorch, alternated step by step in this process; medians per phase.

    The same work as the example's ``training_step`` on the same prompts and seeds, with what
    DeepSpeed and Lightning add taken away: generation on the LoRA-merged actor (``merge_adapter``,
    timed as the switch) with the context's ``decode_linear``, the shared path's prefill through
    ``lightning_hybrid.prefix_cache``.
    """
    import torch
    import yaml

    sys.path.insert(0, str(EXAMPLE.parent))
    import rlhf
    import rlhf_support

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    rlhf_support.keep_freed_memory()  # as the example's own process does on CPU
    settings = {"num_samples": 0}
    data_settings = {}
    if args.model == "tiny":
        config = yaml.safe_load((ROOT / "examples" / "configs" / "tiny.yaml").read_text())
        settings |= config["model"]
        data_settings = config.get("data", {})
    modules = {
        "plain": rlhf.GRPO(**settings, reference="copy", share_prompts=False),
        "shared": rlhf.GRPO(**settings),
    }
    for module in modules.values():
        module.build(torch.float32)
    optimizers = {path: module.configure_optimizers() for path, module in modules.items()}
    data = rlhf.PromptData(**data_settings)
    torch.manual_seed(0)
    batches = list(data.train_dataloader())
    times: dict[str, list[dict[str, float]]] = {path: [] for path in modules}
    for step in range(args.steps):
        batch = batches[step % len(batches)]
        for path, module in modules.items():
            torch.manual_seed(step)  # both paths sample from the same stream
            times[path].append(_floor_step(rlhf, module, optimizers[path], batch, shared=path == "shared"))
    return {path: {k: statistics.median(t[k] for t in ts[1:]) for k in FLOOR_PHASES} for path, ts in times.items()}


def _floor_step(rlhf, module, optimizer, batch, shared: bool) -> dict[str, float]:
    import torch

    from lightning_hybrid.decode_linear import decode_linear
    from lightning_hybrid.prefix_cache import PromptGroups, prefill

    G, hp = module.hparams.group_size, module.hparams
    times: dict[str, float] = {}
    started = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - last
        last = now

    prompt_ids, prompt_mask = module.encode([item["prompt"] for item in batch])
    ids, mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
    actor = module.actor
    actor.eval()
    actor.merge_adapter()
    lap("switch (gather, fuse, release)")
    with torch.no_grad(), decode_linear():  # the generation context's own products
        kwargs = {"attention_mask": mask, "max_new_tokens": hp.max_new_tokens, "do_sample": True}
        kwargs |= {"temperature": hp.temperature, "top_k": 0, "pad_token_id": module.tokenizer.pad_token_id}
        kwargs["eos_token_id"] = module.eos_ids
        if shared:  # what the generation context does: each distinct prompt prefilled once
            kwargs["past_key_values"], _ = prefill(actor, ids[:, :-1], mask[:, :-1], PromptGroups.of(ids, mask))
        responses = actor.generate(ids, **kwargs)[:, ids.shape[1] :]
    lap("generate")
    actor.unmerge_adapter()
    actor.train()
    lap("switch (gather, fuse, release)")
    resp_mask, finished = module.response_mask(responses)
    answers = [item["answers"] for item in batch for _ in range(G)]
    rewards = module.score(module.decode(responses, resp_mask), finished, answers)
    advantages = rlhf.group_advantages(rewards, G)
    last = time.perf_counter()  # rewards are not the model's work
    logp = module.token_logprobs(actor, prompt_ids, prompt_mask, responses, resp_mask)
    lap("policy forward")
    ref_logp = module.reference_logprobs(prompt_ids, prompt_mask, responses, resp_mask)
    lap("reference log-probs")
    loss, _ = module.loss(logp, ref_logp, advantages, resp_mask)
    loss.backward()
    lap("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("optimizer")
    times["whole step"] = time.perf_counter() - started
    return times


class _EachBatchTwice:
    """A batch sampler: every batch of ``batches`` twice in a row, one step of each path on the same prompts."""

    def __init__(self, batches) -> None:
        self.batches = batches
        self.batch_size = batches.batch_size  # read by Lightning's DeepSpeed strategy

    def __iter__(self):
        for batch in self.batches:
            yield batch
            yield batch

    def __len__(self) -> int:
        return 2 * len(self.batches)


ALTERNATE_PAIRS = (["plain", "shared"], ["shared", "shared+once"])


def alternate_worker(pair: str, cli_args: list[str]) -> None:
    """The example's CLI and defaults, with each batch stepped by both paths of ``pair`` (see the module docstring).

    Steps ``2k`` and ``2k + 1`` share a batch; the first path goes first in even pairs, the second in odd ones. A
    step's path is logged as ``bench/second``. One process: Lightning would not spread this loader's batches over
    ranks.
    """
    import dataclasses

    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    sys.path.insert(0, str(EXAMPLE.parent))
    import rlhf
    import rlhf_support

    class BothPaths(rlhf.GRPO):
        def training_step(self, batch, batch_idx):
            second = batch_idx % 2 != (batch_idx // 2) % 2
            engine = self.trainer.strategy.model  # the strategy's settings, switched for this step
            if pair == "plain,shared":
                self.hparams.share_prompts = second
                self.reference_mode = "adapter" if second else "copy"
                engine.settings = dataclasses.replace(engine.settings, share_prompt_prefill=second)
            else:  # shared,shared+once
                engine.settings = dataclasses.replace(engine.settings, gather_once_per_step=second)
            self.log("bench/second", float(second), batch_size=1)
            return super().training_step(batch, batch_idx)

    class BatchesTwice(rlhf.PromptData):
        def train_dataloader(self) -> DataLoader:
            batches = BatchSampler(RandomSampler(self.prompts), self.prompts_per_step, drop_last=False)
            return DataLoader(self.prompts, batch_sampler=_EachBatchTwice(batches), collate_fn=list)

    rlhf_support.main(BothPaths, BatchesTwice, cli_args)  # the example's CLI: its defaults, timing and report


def main(argv=None) -> None:
    args = parse_args(argv)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rl_step_") as tmp:
        for processes in args.processes:
            for repeat in range(args.repeats):
                order = args.paths if repeat % 2 == 0 else args.paths[::-1]
                for path in order:
                    workdir = Path(tmp) / f"{path}_{processes}_{repeat}"
                    workdir.mkdir()
                    run = run_example(args, path, processes, workdir)
                    print(f"{path} x{processes} (repeat {repeat}): {run['wall_s']:.0f} s", flush=True)
                    runs.append(run)
        alternated = None
        if args.alternate and 1 in args.processes:
            workdir = Path(tmp) / "alternate"
            workdir.mkdir()
            run = run_example(args, "alternate", 1, workdir)
            print(f"both paths in one fit x1: {run['wall_s']:.0f} s", flush=True)
            runs.append(run)
            alternated = {path: summarize([{"steps": run["steps"][path]}]) for path in args.paths}
    results = {
        p: {path: summarize([r for r in runs if r["processes"] == p and r["path"] == path]) for path in args.paths}
        for p in args.processes
    }
    header = (
        f"model {args.model}, examples/rlhf.py defaults ({'tiny.yaml' if args.model == 'tiny' else 'embedded'}),"
        f" {args.steps} steps per run (first left out), {args.repeats} run(s) per path, seconds per step (median);"
        f" {platform.machine()} with {os.cpu_count()} cores"
    )
    print(header + table(results))
    for processes, by_path in results.items():
        print(f"{processes} process(es): {verdict(by_path)}")
    if alternated:
        print(f"\nBoth paths in one fit, each batch stepped by both ({args.steps} steps per path, first left out):\n")
        print(alternate_table(alternated))
        print(f"1 process, one fit: {verdict(alternated)}")
    floors = floor(args) if args.floor else None
    if floors:
        print(f"\nPlain PyTorch, in this process, both paths alternated ({args.steps} steps, first left out):\n")
        print("\n".join(comparison_rows(floors, FLOOR_PHASES)))
        ratio = floors["plain"]["whole step"] / floors["shared"]["whole step"]
        print(f"compute floor of the ratio: whole step {ratio:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"header": header, "results": results, "runs": runs}
    report |= ({"alternated": alternated} if alternated else {}) | ({"floor": floors} if floors else {})
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


ALTERNATE_WORKER = "--alternate-worker"  # this script, run by run_example as the alternating fit

if __name__ == "__main__":
    if sys.argv[1:2] == [ALTERNATE_WORKER]:
        alternate_worker(sys.argv[2], sys.argv[3:])
    else:
        main()
