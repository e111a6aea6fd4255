"""Which accelerator DeepSpeed runs on in a pytest process, and what is skipped where.

DeepSpeed reads ``DS_ACCELERATOR`` once, when it is first imported, so one pytest process runs one
accelerator. The CPU tests run on the CPU on every machine, a GPU machine included (``fit`` and
``train`` in helpers ask Lightning for the CPU, and DeepSpeed must agree). The tests marked
``cuda`` run in a pytest process of their own, selected with ``-m cuda`` (``bash tests/cuda/run.sh``
does that), which puts DeepSpeed on CUDA when a GPU is visible. A ``DS_ACCELERATOR`` already set
in the environment wins; tests that cannot run on the accelerator this process has are skipped
with the command that runs them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (the README's `pytest -n 2`) each worker takes its share of the cores: with torch's default of
# every core per worker, OpenMP's threads oversubscribe them and the tiny models' tests ran up to 7x slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def _selects_cuda(markexpr: str) -> bool:
    # `-m cuda`, `-m "cuda and not slow"`: a selection of CUDA tests; `-m "not cuda"` is not one.
    words = markexpr.replace("(", " ").replace(")", " ").split()
    return "cuda" in words and "not" not in words[: words.index("cuda")][-1:]


def pytest_configure(config: pytest.Config) -> None:
    # Here, not at import: the `-m` selection is known now, and DeepSpeed is not imported yet
    # (the test modules import it when they are collected, after this).
    wanted = "cuda" if _selects_cuda(config.option.markexpr or "") and torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", wanted)


TORCH_LINEAR = torch.nn.functional.linear  # taken before any test imports DeepSpeed


@pytest.fixture(autouse=True)
def _torch_linear_after_each_test():
    # ZeRO-3's zero.Init puts its own linear in F.linear and leaves it there ("This will persist unless
    # manually reset", DeepSpeed says): put torch's back, so no test depends on the tests before it.
    yield
    torch.nn.functional.linear = TORCH_LINEAR


def _first_doc_line(item: pytest.Item) -> str:
    doc = (getattr(getattr(item, "function", None), "__doc__", None) or "").strip().splitlines()
    return f" It checks: {doc[0]}" if doc else ""


# pytest-timeout limits above a module's own subprocess timeouts, for a module that does not carry its
# own `pytestmark = pytest.mark.timeout(...)` (test_example.py's scripts have 600 s each).
SUBPROCESS_MODULE_LIMITS_S = {"test_example.py": 900}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    accelerator = os.environ["DS_ACCELERATOR"]
    for item in items:
        limit = SUBPROCESS_MODULE_LIMITS_S.get(item.path.name)
        if limit is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit))
        cuda_test = item.get_closest_marker("cuda") is not None  # the mark (keywords also hold folder names)
        if cuda_test and not torch.cuda.is_available():
            reason = "needs a CUDA GPU; this machine has none (bash tests/cuda/run.sh on one)."
        elif cuda_test and accelerator != "cuda":
            reason = (
                f"a CUDA test, and DeepSpeed is on {accelerator!r} in this process (DS_ACCELERATOR is read once, "
                "at import): run the CUDA tests in a process of their own, `pytest -m cuda` (tests/cuda/run.sh)."
            )
        elif not cuda_test and accelerator == "cuda":
            reason = (
                "a CPU test, and DeepSpeed is on 'cuda' in this process (DS_ACCELERATOR=cuda): run the CPU tests "
                "without `-m cuda` and without DS_ACCELERATOR=cuda."
            )
        else:
            continue
        # Say what the skipped test would have checked (its docstring's first line).
        item.add_marker(pytest.mark.skip(reason=reason + _first_doc_line(item)))
