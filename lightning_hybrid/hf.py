"""Small helpers every module shares: the Hugging Face model under a PEFT wrapper, and notices said once."""

from __future__ import annotations

import warnings
from collections.abc import Callable

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
