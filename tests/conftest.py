import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "cuda" in item.keywords:
            # Say what the skipped test would have checked (its docstring's first line).
            doc = (getattr(item.function, "__doc__", None) or "").strip().splitlines()
            checks = f" It checks: {doc[0]}" if doc else ""
            reason = f"needs a CUDA GPU; this machine has none (bash tests/cuda/run.sh on one).{checks}"
            item.add_marker(pytest.mark.skip(reason=reason))
