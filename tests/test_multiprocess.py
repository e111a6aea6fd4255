"""Real DeepSpeed with 2 processes over gloo: each scenario is tests/scripts/two_ranks.py in a subprocess.

Each run gets its own port and a hard timeout, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

SCRIPT = Path(__file__).parent / "scripts" / "two_ranks.py"


def run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("stage,pin", [(3, 1), (3, 0), (2, 1)])
def test_two_ranks_fit_generate_parity_and_agreement(stage, pin):
    result = run("fit", "--stage", str(stage), "--pin", str(pin))
    assert result.returncode == 0 and "FIT OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


def test_rank_dependent_eos_finishes():
    """pin_parameters=False gathers in every forward: a rank that stops early must keep stepping."""
    result = run("eos", "--pin", "0", timeout=180)
    assert result.returncode == 0 and "EOS OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


def test_a_rank_failing_inside_generation_ends_the_run_on_every_rank():
    result = run("rank_fault", timeout=180)
    assert result.returncode != 0
    assert "[rank1]: RuntimeError: injected fault on rank 1" in result.stderr
    assert "[rank0]: RuntimeError: Generation failed on rank 1 of 2: RuntimeError: injected fault" in result.stderr
