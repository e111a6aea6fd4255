"""lightning-hybrid: DeepSpeed's Hybrid Engine as a Lightning strategy, for RLHF."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: no probing, no warning

from .config import HybridEngineSettings
from .engine import HybridEngine
from .metrics import GenerationStats
from .strategy import HybridEngineStrategy

__all__ = ["GenerationStats", "HybridEngine", "HybridEngineSettings", "HybridEngineStrategy"]
__version__ = "0.1.0"
