"""Linear layers at decoding batch sizes on CPU: the same product, in the layout the BLAS runs fastest.

Each decoding step multiplies a few rows (one per sequence) by every weight of the model.
``F.linear`` computes ``x @ W.T``; on this project's 2-core machines MKL's threaded sgemm,
given that layout with 16-48 rows, takes 2-3x as long for a SmolLM2 layer as ``(W @ x.T).T``,
which returns the same bits (with one thread the two take the same time: it is how the
work is split between threads, not the arithmetic). Which layout wins, and whether
the two agree to the bit, depends on the BLAS, the CPU and the thread count, so nothing is
assumed: the first call of each (rows, weight shape, dtype, bias, threads) tries both on
random rows and keeps the weight-left product only if it gives the very same result and is
clearly faster. Every other call (a strided input among them) is ``F.linear``, unchanged, so
generation's tokens and logits are exactly what ``F.linear`` gives.

The generation context turns it on for its block (``decode_linear()``); training never
sees it (it steps aside whenever autograd records).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

TORCH_LINEAR = torch._C._nn.linear  # F.linear as torch ships it
# Rows where the layout can matter: one per sequence at decode time. A prefill's rows (batch x
# prompt length) are beyond it and go to F.linear untried.
MIN_ROWS, MAX_ROWS = 2, 64
MIN_SPEEDUP = 1.1  # below this a timing on a busy machine is noise, not a reason to switch
_TRIES = 3

# (rows, weight shape and strides, dtype, bias, threads) -> whether the weight-left product is used
_weight_left: dict[tuple, bool] = {}


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.mm(weight, x.t()).t()
    return (out if bias is None else out + bias).contiguous()


def _speedup(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """Best of a few alternated timings of both layouts: linear's time over the weight-left one's."""
    best = {TORCH_LINEAR: float("inf"), _product: float("inf")}
    for _ in range(_TRIES):
        for fn in best:
            start = time.perf_counter()
            fn(x, weight, bias)
            best[fn] = min(best[fn], time.perf_counter() - start)
    return best[TORCH_LINEAR] / max(best[_product], 1e-9)


def _weight_left_wins(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``(W @ x.T).T`` gives F.linear's bits, faster, for ``rows`` x this weight.

    Tried on the real weight and random rows from a private generator: the caller's RNG stream,
    which generation samples from, is not touched.
    """
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(rows.shape, generator=generator, dtype=rows.dtype)
    if not torch.equal(TORCH_LINEAR(probe, weight, bias), _product(probe, weight, bias)):
        return False
    return _speedup(probe, weight, bias) >= MIN_SPEEDUP


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with decoding-sized CPU products in the faster of two bit-identical layouts."""
    if (
        input.device.type != "cpu"
        or weight.dim() != 2
        or input.dim() < 1
        or torch.is_grad_enabled()
        or not input.is_contiguous()  # e.g. the lm_head's last position of a prefill: another BLAS path
        or weight.layout != torch.strided
        or weight.shape[1] != input.shape[-1]
        or not input.is_floating_point()
        or input.dtype != weight.dtype
        or (bias is not None and (bias.dtype != weight.dtype or bias.dim() != 1))
    ):
        return TORCH_LINEAR(input, weight, bias)
    rows = input.numel() // max(input.shape[-1], 1)
    if not MIN_ROWS <= rows <= MAX_ROWS:
        return TORCH_LINEAR(input, weight, bias)
    x = input.view(rows, input.shape[-1])
    key = (rows, weight.shape, weight.stride(), weight.dtype, bias is not None, torch.get_num_threads())
    wins = _weight_left.get(key)
    if wins is None:
        wins = _weight_left[key] = _weight_left_wins(x, weight, bias)
    if not wins:
        return TORCH_LINEAR(input, weight, bias)
    return _product(x, weight, bias).view(*input.shape[:-1], weight.shape[0])


@contextmanager
def decode_linear() -> Iterator[None]:
    """``F.linear`` is :func:`linear` for the block, where it was torch's own; any other replacement stays."""
    if F.linear is not TORCH_LINEAR:
        yield
        return
    F.linear = linear
    try:
        yield
    finally:
        F.linear = TORCH_LINEAR
