"""The portable path's KV cache.

By default (``kv_cache="dynamic"``) ``generate`` keeps transformers' own dynamic cache: it
grows with the sequence, so every step attends over the tokens so far, and nothing is held
between calls. With ``kv_cache="static"`` the workspace is transformers' ``StaticCache`` of
``max_out_tokens`` positions per sequence (greedy-identical), kept between calls and reset
rather than reallocated, rebuilt only when the batch shape, dtype or device changes, and
dropped after every generation when ``release_inference_cache=True``: fixed memory, but
each step attends over all ``max_out_tokens`` positions.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import StaticCache

from .hf import base_model, free_accelerator_memory, say_once


def cache_kwarg(model: nn.Module) -> str:
    """The keyword ``generate`` takes a cache by: ``cache`` in recent transformers, ``past_key_values`` before.

    ``generate``'s own signature hides it in ``**kwargs``; the model's forward names it.
    """
    base = base_model(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


CACHE_KWARGS = ("cache", "past_key_values", "cache_params")


class InferenceWorkspace:
    """The ``StaticCache`` of ``kv_cache="static"`` (with "dynamic" it is never asked for, and holds nothing)."""

    def __init__(self, max_out_tokens: int, release_after_use: bool) -> None:
        self.max_out_tokens = max_out_tokens
        self.release_after_use = release_after_use
        self.cache: StaticCache | None = None
        self.allocations = 0  # how many times a cache was built: the reuse a user can check
        self._key: tuple | None = None
        self._said: set[str] = set()

    def supports(self, model: nn.Module) -> bool:
        """Whether ``model`` can generate with a static cache (most decoder-only HF models can)."""
        base = base_model(model)
        name = type(base).__name__
        ok = getattr(base, "_can_compile_fullgraph", False) and hasattr(base, "config")
        if not ok:
            say_once(
                self._said,
                f"{name} does not support transformers' StaticCache; generation uses its default dynamic cache,"
                " so the workspace is not preallocated or reused for it.",
                stacklevel=3,
            )
        return ok

    def acquire(self, model: nn.Module, batch_size: int, dtype: torch.dtype, device: torch.device) -> StaticCache:
        """A reset cache for ``batch_size`` rows; the same object as last time when the shape allows."""
        key = (batch_size, dtype, device)
        if self.cache is None or key != self._key:
            self.release()
            config = base_model(model).config
            self.cache = StaticCache(config=config, max_cache_len=self.max_out_tokens)
            self._key = key
            self.allocations += 1
        else:
            self.cache.reset()
        return self.cache

    def after_generation(self) -> None:
        if self.release_after_use:
            self.release()

    def release(self, free: bool = True) -> None:
        """Drops the cache; ``free``: and returns its memory now (a caller about to do that itself passes False)."""
        if self.cache is None:
            return
        self.cache = None
        self._key = None
        if free:
            free_accelerator_memory()

    @property
    def nbytes(self) -> int:
        if self.cache is None:
            return 0
        total = 0
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total
