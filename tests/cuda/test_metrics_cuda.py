"""On one GPU: the generation metrics time the device's work and leave CUDA's peak counter alone."""

from __future__ import annotations

import pytest
import torch

from lightning_hybrid.metrics import PeakMemory, Stopwatch

pytestmark = pytest.mark.cuda


def test_stopwatch_laps_wait_for_the_gpu():
    """A lap ends after the queued kernels have run: all-gathers and fuse matmuls return at once on CUDA, and their
    time would otherwise land in whatever is timed next (gather_s/fuse_s reading ~0)."""
    device = torch.device("cuda", torch.cuda.current_device())
    a = torch.randn(4096, 4096, device=device)
    watch = Stopwatch(device)
    for _ in range(20):
        a = a @ a
        a = a / a.norm()
    watch.lap()
    assert torch.cuda.current_stream(device).query(), "work still queued after the lap"


def test_peak_memory_leaves_the_process_wide_peak_counter_alone():
    """The user's (or DeviceStatsMonitor's) peak is not reset by a generation context's measurement."""
    device = torch.device("cuda", torch.cuda.current_device())
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    del big
    before = torch.cuda.max_memory_allocated(device)
    peak = PeakMemory(device)
    small = torch.empty(2**20, dtype=torch.uint8, device=device)
    measured = peak.sample()
    assert torch.cuda.max_memory_allocated(device) == before  # not reset
    assert torch.cuda.memory_allocated(device) <= measured < before
    del small
