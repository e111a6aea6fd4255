"""lightning-hybrid: DeepSpeed's Hybrid Engine as a Lightning strategy, for RLHF.

``lightning_hybrid.HybridEngineStrategy`` is the Trainer's; ``lightning_hybrid.fabric.HybridEngineStrategy``
is Fabric's. Importing the package registers both under the same names (``"hybrid_engine"``, ...).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: no probing, no warning

from . import fabric  # noqa: E402  registers the Fabric strategy's names
from .config import HybridEngineSettings  # noqa: E402
from .engine import HybridEngine  # noqa: E402
from .metrics import GenerationStats  # noqa: E402
from .strategy import HybridEngineStrategy  # noqa: E402

__all__ = ["GenerationStats", "HybridEngine", "HybridEngineSettings", "HybridEngineStrategy", "fabric"]
__version__ = "0.1.0"
