"""benchmarks/generation.py runs end to end on a tiny model: every row, the table, the JSON.

Harness correctness only: the numbers of a tiny model on a shared CPU mean nothing, so
nothing here asserts on time or memory beyond "measured".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "generation.py"
TIMEOUT_S = 600
pytestmark = pytest.mark.timeout(TIMEOUT_S + 300)  # the script's own timeout fires first and shows its output


def test_generation_benchmark_tiny(tmp_path):
    out = tmp_path / "generation.json"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny", "--processes", "2", "--batch", "2"]
    cmd += ["--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--json", str(out)]
    # The script launches its own ranks; variables of an outer launcher would make it a worker.
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        output, _ = proc.communicate()
        pytest.fail(f"benchmark did not finish in {TIMEOUT_S} s:\n{output[-5000:]}")
    assert proc.returncode == 0, output[-5000:]

    report = json.loads(out.read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert sorted(rows) == list(range(1, 10))
    assert rows[6]["status"].startswith("n/a")
    measured = [1, 2, 3, 4, 5, 7, 8, 9]
    for n in measured:
        row = rows[n]
        assert row["status"] == "ok", row
        assert row["outputs_equal_row1"] is True, f"row {n}: greedy output differs from row 1"
        assert row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0
        assert len(row["peak_memory_bytes_per_rank"]) == 2
    for n in (3, 4, 5, 7, 8, 9):  # rows with a mode switch
        assert rows[n]["switch_s"] is not None and rows[n]["switch_s"] >= 0
    for n in (4, 5, 7, 8):  # the context's own rows: the switch split into its parts
        assert set(rows[n]["switch_parts_s"]) == {"gather_s", "fuse_s", "release_s"}
    assert rows[1]["ratio_to_row1"] == 1.0
    for n in (4, 5, 7, 8, 9):  # context rows: plain generate timed beside every repeat
        assert len(rows[n]["plain_beside_s"]) == 1 and rows[n]["ratio_to_plain_beside"] > 0
    assert report["all_gather_s"] > 0
    assert report["config"]["processes"] == 2
    assert set(report["targets"]) == {
        "row4_ge_0.95x_plain",
        "row4_ge_9x_row2",
        "row5_peak_below_row4",
        "row8_switch_le_10pct_row7",
        "row8_ge_0.95x_plain",
        "row9_peak_below_row4",
    }

    table = [line for line in output.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| # | method | tokens/s")
    for n in range(1, 10):
        assert any(line.startswith(f"| {n} | ") for line in table), f"row {n} missing from the table"
    assert any(line.startswith("| 6 | ") and "n/a" in line for line in table)
    assert any(line.startswith("row 8 switch (s): gather ") for line in output.splitlines())


def test_switch_breakdown_tiny():
    script = ROOT / "benchmarks" / "switch_breakdown.py"
    cmd = [sys.executable, str(script), "--model", "tiny", "--processes", "2", "--batch", "2", "--prompt-len", "8"]
    cmd += ["--new-tokens", "2", "--contexts", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    for part in ("enter: all-gather", "enter: fuse LoRA", "exit: restore ZeRO-3 hooks", "**enter total**"):
        assert f"| {part} |" in output, part
    assert "greedy tokens equal in every context: yes" in output


def assert_every_phase_timed(by_path: dict) -> None:
    for path in ("plain", "shared"):
        for phase in ("generate", "reference log-probs", "policy forward", "backward", "optimizer", "whole step"):
            assert by_path[path][phase] > 0, (path, phase)


def test_rl_step_benchmark_tiny(tmp_path):
    """benchmarks/rl_step.py: both paths of the example's step, every phase in the table and the JSON, from
    separate fits and from one fit that steps each batch by both paths, and the same step's plain-PyTorch floor
    (--floor)."""
    out = tmp_path / "rl_step.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rl_step.py"), "--model", "tiny", "--processes", "1"]
    cmd += ["--steps", "2", "--floor", "--json", str(out)]
    env = subprocess_env(OMP_NUM_THREADS="1")  # a port of its own: an earlier in-process fit may hold one
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    results = json.loads(out.read_text())["results"]["1"]
    assert_every_phase_timed(results)
    for path in ("plain", "shared"):
        assert results[path]["measured steps"] == 1
    assert results["plain"]["prompt positions reused per step"] == 0
    assert results["shared"]["prompt positions reused per step"] > 0
    assert "| whole step |" in proc.stdout and "1 process(es): against plain: shared: whole step" in proc.stdout
    alternated = json.loads(out.read_text())["alternated"]  # each batch by both paths, in one fit
    assert_every_phase_timed(alternated)
    for path in ("plain", "shared"):
        assert alternated[path]["measured steps"] == 1
    assert alternated["plain"]["prompt positions reused per step"] == 0
    assert alternated["shared"]["prompt positions reused per step"] > 0
    assert "1 process, one fit: against plain: shared: whole step" in proc.stdout
    floor = json.loads(out.read_text())["floor"]
    assert_every_phase_timed(floor)
    assert "compute floor of the ratio: whole step" in proc.stdout
