"""Generation metrics: what each generation context cost, and how a step's time was spent.

DeepSpeed's hybrid engine only ``print()``s its latencies on rank 0. Here every context
fills a ``GenerationStats`` (on ``strategy.generation_stats``) and, inside a fit, the
numbers go to the LightningModule's logger under ``hybrid_engine/...``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import psutil
import torch
from lightning.pytorch import Callback, LightningModule, Trainer


@dataclass
class GenerationStats:
    gather_s: float = 0.0  # materializing weights (ZeRO-3 all-gather), incl. layer-wise gathers
    fuse_s: float = 0.0  # folding LoRA into the weights
    generate_s: float = 0.0  # inside generate()/forward calls
    release_s: float = 0.0  # unfuse, re-partition, restore hooks, free the workspace
    calls: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prompt_tokens_reused: int = 0  # prompt positions not computed again: rows sharing one prefill of their prompt
    prompt_sharing_skipped: int = 0  # calls with repeated prompts that could not share them (the reason is warned)
    oom_splits: int = 0  # batches split in halves after running out of memory
    peak_memory_bytes: int = 0  # CUDA allocator peak, or process RSS peak on CPU
    gathered_bytes: int = 0  # bytes all-gathered on entry
    fused_copy_bytes: int = 0  # fused LoRA weights held beside their originals (ZeRO-1/2; ZeRO-3 fuses in place)
    frozen_cache_bytes: int = 0  # resident frozen-weight copies and fused-LoRA scratch (cache_frozen_weights)
    workspace_bytes: int = 0  # KV cache held
    sliced_bytes: int = 0  # inference_tp_size > 1: this rank's tensor-parallel slices
    kernel_checks: int = 0  # DeepSpeed kernel generations checked against the portable path
    kernel_fallbacks: int = 0  # checks that failed and switched the run to the portable path ("auto")
    peak_memory_bytes_per_rank: list[int] = field(default_factory=list)  # ZeRO-3, several ranks: every rank's
    backend: str = "torch"  # the path the context's last generation took

    @property
    def switch_s(self) -> float:
        """Entering plus leaving inference mode: the cost of the switch itself."""
        return self.gather_s + self.fuse_s + self.release_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.generate_s if self.generate_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        out = {k: v for k, v in asdict(self).items() if k not in ("backend", "peak_memory_bytes_per_rank")}
        out.update({f"peak_memory_bytes_rank{r}": v for r, v in enumerate(self.peak_memory_bytes_per_rank)})
        out.update(switch_s=self.switch_s, tokens_per_s=self.tokens_per_s)
        return out


class PeakMemory:
    """Peak memory over a span: the CUDA allocator's, or RSS sampled at checkpoints on CPU.

    CUDA's peak counter is process-wide and others read it (the user, ``DeviceStatsMonitor``), so it
    is never reset here: the span's peak is the counter where it rose during the span, else the
    largest allocation sampled at the checkpoints (the true peak then lies below the earlier one).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.peak = 0
        self._peak_before = torch.cuda.max_memory_allocated(device) if self.cuda else 0
        self.sample()

    def sample(self) -> int:
        if self.cuda:
            counter = torch.cuda.max_memory_allocated(self.device)
            now = counter if counter > self._peak_before else torch.cuda.memory_allocated(self.device)
            self.peak = max(self.peak, now)
        else:
            self.peak = max(self.peak, psutil.Process().memory_info().rss)
        return self.peak


class Stopwatch:
    """Wall time between laps. On CUDA each lap first waits for the device: kernels and collectives
    return before they finish, and their time would land in whatever is timed next."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.cuda = device is not None and device.type == "cuda"
        self.device = device
        self._sync()
        self.t0 = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def lap(self) -> float:
        self._sync()
        now = time.perf_counter()
        elapsed, self.t0 = now - self.t0, now
        return elapsed


@dataclass
class StepTimes:
    """Per training step: seconds spent inside generation contexts, and their stats."""

    start: float = 0.0
    generation_s: float = 0.0
    contexts: list[GenerationStats] = field(default_factory=list)


class GenerationMetricsLogger(Callback):
    """Logs the generation contexts of each training step; added by the strategy."""

    def __init__(self, step: StepTimes) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self.step.start = time.perf_counter()
        self.step.generation_s = 0.0
        self.step.contexts.clear()
        counter = getattr(trainer.strategy.model, "actor_gathers", None)
        if counter is not None:
            counter.bytes = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.step.contexts:
            return
        total = GenerationStats()
        for stats in self.step.contexts:
            for name, value in asdict(stats).items():
                if name == "peak_memory_bytes_per_rank":
                    before = total.peak_memory_bytes_per_rank
                    total.peak_memory_bytes_per_rank = [max(a, b) for a, b in zip(value, before)] if before else value
                elif name.endswith("_bytes"):
                    setattr(total, name, max(getattr(total, name), value))
                elif name != "backend":
                    setattr(total, name, getattr(total, name) + value)
        step_s = max(time.perf_counter() - self.step.start, 1e-9)
        metrics = {f"hybrid_engine/{k}": float(v) for k, v in total.as_dict().items()}
        metrics["hybrid_engine/generation_share"] = self.step.generation_s / step_s
        metrics["hybrid_engine/training_share"] = 1.0 - self.step.generation_s / step_s
        metrics["hybrid_engine/step_s"] = step_s
        counter = getattr(trainer.strategy.model, "actor_gathers", None)
        if counter is not None and counter.actor_bytes:  # ZeRO-3: the actor's sizes all-gathered this step
            metrics["hybrid_engine/actor_gathers"] = counter.bytes / counter.actor_bytes
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("gen_tok/s", total.tokens_per_s, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
