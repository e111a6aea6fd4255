"""Multi-node on one machine: the tiny example as 2 nodes x 1 process on loopback, through Lightning's own environment.

Each "node" is one ``python examples/rlhf.py fit ...`` started by hand, as a cluster's per-node
command would be: the same MASTER_ADDR and MASTER_PORT everywhere, NODE_RANK 0 and 1, and
``--trainer.num_nodes=2 --trainer.devices=1``. No launcher of ours is involved.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "rlhf.py"
TIMEOUT_S = 240
# Above the two nodes' own timeouts (waited for one after the other), so theirs fires first.
pytestmark = pytest.mark.timeout(2 * TIMEOUT_S + 120)


def test_the_example_runs_as_two_nodes_on_loopback(tmp_path: Path) -> None:
    env = subprocess_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        str(EXAMPLE),
        "fit",
        "--config",
        str(ROOT / "examples" / "configs" / "tiny.yaml"),
        "--trainer.num_nodes=2",
        "--trainer.devices=1",
    ]
    nodes = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**env, "NODE_RANK": str(rank)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} exit {node.returncode}\n{out[-6000:]}"
    first, second = outputs
    # One world of two ranks across the two "nodes" (DeepSpeed's own count), trained to the end.
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in first and "GLOBAL_RANK: 1, MEMBER: 2/2" in second
    assert "`Trainer.fit` stopped: `max_steps=6` reached" in first
    assert "Sample answers (greedy), before vs after training" in first
    (run_dir,) = (tmp_path / "runs").glob("*/version_*")  # written by global rank 0 only
    assert (run_dir / "metrics.csv").stat().st_size > 0
