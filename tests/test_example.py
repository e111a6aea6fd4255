"""End to end: ``examples/rlhf.py`` from the Lightning CLI, on the tiny random model, in a subprocess.

The example runs as a user runs it (``python examples/rlhf.py fit --config ...``): as 2 processes, the Trainer's
example runs as two "nodes" on loopback, each started by hand as a cluster's per-node command would be (the same
MASTER_ADDR and MASTER_PORT, NODE_RANK 0 and 1, ``--trainer.num_nodes=2 --trainer.devices=1``; nothing of ours
launches anything), and the Fabric example with ``--devices=2``, which Lightning's launcher re-runs once per rank.
Each run gets its own MASTER_PORT and a temporary working directory.
"""

from __future__ import annotations

import csv
import ctypes
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "rlhf.py"
CONFIGS = ROOT / "examples" / "configs"
TIMEOUT_S = 600  # generous for a loaded CI machine; a run takes tens of seconds


def run_example(
    cwd: Path, *args: str, timeout: int = TIMEOUT_S, without_matplotlib: bool = False, nodes: int = 1
) -> subprocess.CompletedProcess:
    """The example's command in ``cwd``; with ``nodes`` > 1, once per node (NODE_RANK 0, 1, ...), all at once.
    Returns node 0's output, with ``node_outputs`` holding every node's stdout and stderr."""
    # 1 thread per process: no oversubscription on a 2-core machine.
    env = subprocess_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    command = [sys.executable, str(EXAMPLE), *args]
    command += [f"--trainer.num_nodes={nodes}", "--trainer.devices=1"]
    if without_matplotlib:
        env["PYTHONWARNINGS"] = "default"  # the run says so as a warning
    if without_matplotlib:  # as if it were not installed: importlib finds no spec for a None entry (set after
        # Lightning's import, whose torchmetrics imports matplotlib whenever its package metadata is there)
        # (the script's folder first on sys.path, as `python examples/rlhf.py` puts it).
        launch = "import os, runpy, sys, lightning.pytorch; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:];"
        launch += " sys.path.insert(0, os.path.dirname(sys.argv[0]));"
        command = [sys.executable, "-c", launch + " runpy.run_path(sys.argv[0], run_name='__main__')", *command[1:]]
    # Files, not pipes: a node blocked on a full pipe would stall the collective the other waits in.
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(nodes)]
    procs = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env={**env, "NODE_RANK": str(node)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            text=True,
        )
        for node, (out, err) in enumerate(logs)
    ]
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:  # one node failed or timed out: the others would wait for it forever
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for out, err in logs:
        out.seek(0), err.seek(0)
        outputs.append((out.read(), err.read()))
        out.close(), err.close()
    for node, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, (
            f"node {node} of {nodes}: exit {proc.returncode}\n--- stdout\n{stdout[-6000:]}\n"
            f"--- stderr\n{stderr[-6000:]}"
        )
    result = subprocess.CompletedProcess(command, 0, *outputs[0])
    result.node_outputs = outputs
    return result


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("config", "nodes", "plot", "extra"),
    [
        ("tiny.yaml", 1, True, ()),
        ("tiny.yaml", 2, True, ("--trainer.strategy.init_args.gather_once_per_step=true",)),
        ("tiny_full_finetune.yaml", 1, False, ("--model.updates_per_rollout=2",)),
    ],
    ids=["lora-1proc", "lora-2nodes-gather-once", "full-finetune-1proc-no-matplotlib-2-updates-per-rollout"],
)
def test_rlhf_example_end_to_end(tmp_path: Path, config: str, nodes: int, plot: bool, extra: tuple) -> None:
    """The run finishes and writes its metrics, samples and plot; without matplotlib it says so before training
    and still writes everything else. Rollout log-probs are the scoring forward's within 1e-4 (fp32); with
    gather_once_per_step the actor is all-gathered once a step; 2 updates per rollout (PPO's clipped ratio against
    the rollout's log-probs) train to the end. As 2 nodes x 1 process on loopback: one world of two ranks across
    the nodes (DeepSpeed's own count), its files written by global rank 0 only."""
    proc = run_example(
        tmp_path, "fit", "--config", str(CONFIGS / config), *extra, without_matplotlib=not plot, nodes=nodes
    )
    out = proc.stdout + proc.stderr
    if nodes == 2:
        first, second = ("".join(output) for output in proc.node_outputs)
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in first and "GLOBAL_RANK: 1, MEMBER: 2/2" in second
    assert "`Trainer.fit` stopped: `max_steps=6` reached" in out
    assert "Sample answers (greedy), before vs after training" in out
    if not plot:
        said = proc.stderr.index("matplotlib is not installed, so the run will write")
        assert said < proc.stderr.index("`Trainer.fit` stopped"), "the missing plot must be said before the training"

    # Exactly one run directory, written by rank 0 only.
    (run_dir,) = (tmp_path / "runs").glob("*/version_*")
    rows = read_csv(run_dir / "metrics.csv")
    rewards = [float(r["reward"]) for r in rows if r.get("reward")]
    assert len(rewards) == 6 and all(0.0 <= r <= 1.0 for r in rewards)
    for name in ("hybrid_engine/gather_s", "hybrid_engine/generate_s", "hybrid_engine/step_s", "gen_tok/s", "kl"):
        values = [float(r[name]) for r in rows if r.get(name)]
        assert len(values) == 6, name
    for name in (
        "time/policy_forward_s",
        "time/reference_s",
        "time/backward_s",
        "time/optimizer_s",
        "memory/peak_rss_mb",
    ):
        values = [float(r[name]) for r in rows if r.get(name)]
        assert len(values) == 6 and all(v > 0 for v in values), name
    assert all(float(r["hybrid_engine/new_tokens"]) > 0 for r in rows if r.get("hybrid_engine/new_tokens"))
    gaps = [float(r["rollout_logprob_gap_max"]) for r in rows if r.get("rollout_logprob_gap_max")]
    assert gaps and max(gaps) < 1e-4, gaps
    if extra and "gather_once" in extra[0]:
        assert all(float(r["hybrid_engine/actor_gathers"]) == 1.0 for r in rows if r.get("hybrid_engine/actor_gathers"))
    # Each prompt's group of 4 rows shares one prefill: 3 of every 4 rows reuse it.
    assert all(float(r["hybrid_engine/prompt_tokens_reused"]) > 0 for r in rows if r.get("hybrid_engine/calls"))

    if plot:
        png = (run_dir / "report.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    else:
        assert not (run_dir / "report.png").exists()
    samples = (run_dir / "samples.txt").read_text()
    assert samples.count("PROMPT:") == 2 and "before (reward" in samples and "after  (reward" in samples
    assert "mean reward: before" in samples
    assert (run_dir / "config.yaml").exists()  # LightningCLI saved the resolved config


def load_example(monkeypatch, name: str = "rlhf"):
    """``examples/<name>.py`` as a module, imported in this process as a run of the script would: its folder on
    sys.path (``rlhf.py`` imports ``rlhf_support`` from there); the env it sets is undone after the test."""
    monkeypatch.setattr(sys, "path", [str(EXAMPLE.parent), *sys.path])
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # set at the example's import
    monkeypatch.delitem(sys.modules, "rlhf_support", raising=False)  # this test's import, not an earlier one
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLE.parent / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.fixture
def print_config(monkeypatch, capsys):
    """The resolved config of ``python examples/rlhf.py fit <args> --print_config``, parsed in this process."""
    example = load_example(monkeypatch)

    def run(*args: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as done, warnings.catch_warnings():
            example.main(["fit", *args, "--print_config"])
        assert done.value.code in (0, None), capsys.readouterr().err[-4000:]
        return capsys.readouterr().out

    return run


def test_default_yaml_is_the_embedded_default(print_config) -> None:
    embedded = print_config()
    assert "smollm2-135m-instruct" in embedded and "HybridEngineStrategy" in embedded
    assert print_config("--config", str(CONFIGS / "default.yaml")) == embedded


def test_cuda_config_resolves_to_what_it_says(print_config) -> None:
    """Not run here (8 GPUs), but every key must be valid, and the strategy must be the file's: none of the
    embedded default's CPU tuning (its DeepSpeed ``config``, in which Lightning ignores ``stage``, and
    ``zero3_leaf_modules``) merged in."""
    text = print_config("--config", str(CONFIGS / "cuda_llama_zero3_8gpu.yaml"))
    trainer = yaml.safe_load(text)["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("cuda", 8, "bf16-mixed")
    strategy = trainer["strategy"]
    assert strategy["class_path"] == "lightning_hybrid.HybridEngineStrategy"
    settings = strategy["init_args"]
    assert settings["stage"] == 3 and settings["config"] is None, "a `config` would override `stage: 3`"
    assert settings["zero3_leaf_modules"] is None
    assert settings["cache_frozen_weights"] is True and settings["max_out_tokens"] == 256
    assert "stage3_max_reuse_distance" not in text


def test_a_config_that_sets_only_init_args_tunes_the_default_strategy(print_config, tmp_path: Path) -> None:
    """Without a ``class_path`` a file tunes the embedded strategy (its CPU settings stay); with one it replaces it."""
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text("trainer:\n  strategy:\n    init_args:\n      max_out_tokens: 128\n")
    settings = yaml.safe_load(print_config("--config", str(tuned)))["trainer"]["strategy"]["init_args"]
    assert settings["max_out_tokens"] == 128 and settings["zero3_leaf_modules"] == "auto"
    assert "stage3_max_reuse_distance" in str(settings["config"])
    replaced = tmp_path / "replaced.yaml"
    replaced.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_hybrid.HybridEngineStrategy\n    init_args:\n      stage: 2\n"
    )
    # A command-line setting before the --config still applies (merged as jsonargparse does for one class).
    text = print_config("--trainer.strategy.init_args.max_out_tokens=64", f"--config={replaced}")
    settings = yaml.safe_load(text)["trainer"]["strategy"]["init_args"]
    assert settings["stage"] == 2 and settings["config"] is None and settings["zero3_leaf_modules"] is None
    assert settings["max_out_tokens"] == 64


FABRIC_EXAMPLE = ROOT / "examples" / "rlhf_fabric.py"


@pytest.mark.parametrize("devices", [1, 2], ids=["1proc", "2proc"])
def test_rlhf_fabric_example_end_to_end(tmp_path: Path, devices: int) -> None:
    """The same job as a hand-written Fabric loop (``examples/rlhf_fabric.py``), on the same tiny config."""
    env = subprocess_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    args = [sys.executable, str(FABRIC_EXAMPLE), "--config", str(CONFIGS / "tiny.yaml"), f"--devices={devices}"]
    proc = subprocess.run(
        args, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-8000:]}"
    assert "`fabric loop` stopped: max_steps=6 reached" in out
    assert "Sample answers (greedy), before vs after training" in out

    (run_dir,) = (tmp_path / "runs").glob("*_fabric/version_*")  # rank 0 only
    rows = read_csv(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(6))  # one row per step, as under the Trainer
    for row in rows:
        assert 0.0 <= float(row["reward"]) <= 1.0 and float(row["hybrid_engine/new_tokens"]) > 0
        assert float(row["hybrid_engine/gather_s"]) > 0 and float(row["kl"]) >= 0
    assert (run_dir / "report.png").read_bytes().startswith(b"\x89PNG")
    assert "mean reward: before" in (run_dir / "samples.txt").read_text()


def test_malloc_settings_are_left_to_an_environment_that_sets_them(monkeypatch) -> None:
    """The example tunes glibc's malloc only where nobody else did: with MALLOC_* or GLIBC_TUNABLES set, it does not;
    and only on CPU (on a GPU the weights are in CUDA's allocator)."""
    support = load_example(monkeypatch, "rlhf_support")
    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=lambda *args: calls.append(args)))
    for key in [k for k in os.environ if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))]:
        monkeypatch.delenv(key)
    support.keep_freed_memory()
    assert len(calls) == 2
    for key, value in [("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")]:
        with monkeypatch.context() as env:
            env.setenv(key, value)
            support.keep_freed_memory()
    assert len(calls) == 2
    for device, tuned in [("cuda", 0), ("cpu", 2)]:  # the callback the CLI installs, at the Trainer's setup
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        support.KeepFreedMemory().setup(trainer, None, "fit")
        assert len(calls) == 2 + tuned, device


def test_the_grpo_module_logs_no_timing_of_its_own(monkeypatch) -> None:
    """Phase timing is the CLI's wrapper around the module's methods: the module neither calls a timer nor keeps
    the wrapper after the run."""
    example = load_example(monkeypatch)
    assert not any(word in EXAMPLE.read_text() for word in ("StepTimer", "perf_counter", "import time"))
    module = example.GRPO(model=example.TINY, kl_coef=0)
    timer = load_example(monkeypatch, "rlhf_support").StepTimer({"reference_s": "reference_logprobs"})
    timer.setup(None, module, "fit")
    assert module.reference_logprobs(None, None, None, None) is None  # no KL reference built yet: returns at once
    assert timer.times["reference_s"] > 0
    timer.teardown(None, module, "fit")
    assert "reference_logprobs" not in vars(module)
