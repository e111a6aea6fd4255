"""Small helpers every module shares: the model under a PEFT wrapper, notices said once, freeing memory."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable

import torch
from torch import nn


def base_model(module: nn.Module) -> nn.Module:
    """The Hugging Face model itself: under a PEFT wrapper, the wrapped model; otherwise ``module``."""
    get = getattr(module, "get_base_model", None)
    return get() if callable(get) else module


def say_once(said: set[str], message: str, *, say: Callable[[str], None] | None = None, stacklevel: int = 2) -> bool:
    """Give ``message`` once per ``said`` registry (a run's): as a warning, or through ``say``. True if said now."""
    if message in said:
        return False
    said.add(message)
    if say is None:
        warnings.warn(message, stacklevel=stacklevel + 1)
    else:
        say(message)
    return True


def free_accelerator_memory() -> None:
    """Unreachable tensors collected and, on a GPU, the allocator's cache returned (before a retry, after a release)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
