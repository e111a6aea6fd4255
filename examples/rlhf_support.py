"""What `examples/rlhf.py` runs around the GRPO job: the CLI, its reporting, the step timing, process tuning.

Nothing here is RL: copy `rlhf.py` for the algorithm. The CLI (`main`) wires these in as Lightning
callbacks, so the GRPO module never calls into them:

* `StepTimer`: each step's `time/*` phases and `memory/*` peaks, logged beside the module's metrics;
* `RunReport`: greedy answers before and after training (`samples.txt`) and `report.png`;
* `KeepFreedMemory`: glibc's malloc told to keep freed memory, on CPU only;
* `ByteTokenizer` and `tiny_llama`: the tiny random model the tests run on.
"""

from __future__ import annotations

import csv
import ctypes
import importlib.util
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

# -----------------------------------------------------------------------------
# the tiny random model, for tests: nothing to download or train


class ByteTokenizer:
    """UTF-8 bytes as tokens. Implements the few pieces of a Hugging Face tokenizer that `rlhf.py` uses."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    offset = 3  # byte b is token b + 3
    vocab_size = 256 + offset
    chat_template = None

    def __call__(self, texts: list[str], **_: Any) -> dict[str, torch.Tensor]:
        rows = [[b + self.offset for b in t.encode()] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding, as generation wants
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return [
            bytes(t - self.offset for t in row.tolist() if t >= self.offset).decode(errors="replace") for row in ids
        ]


def tiny_llama(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ByteTokenizer]:
    """A 2-layer Llama with random weights (drawn from the RNG as it stands), and its byte tokenizer."""
    from lightning_hybrid.testing import tiny_causal_lm

    tokenizer = ByteTokenizer()
    model = tiny_causal_lm(
        "llama",
        seed=None,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=512,
        pad_token_id=ByteTokenizer.pad_token_id,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
    )
    return model.train().to(dtype), tokenizer


# -----------------------------------------------------------------------------
# where a step's time and memory go, beyond the strategy's own hybrid_engine/* numbers


class StepTimer(Callback):
    """Logs each step's ``time/<phase>`` for the module's methods named in ``phases``, ``time/backward_s``,
    ``time/optimizer_s``, the process's ``memory/peak_rss_mb`` and, on CUDA, ``memory/peak_cuda_mb`` and
    ``memory/step_cuda_mb``: each the largest over ranks.

    Args:
        phases: metric name -> name of a method of the LightningModule: each call of it during a step is
            timed (a wrapper on the instance, installed at setup and removed at teardown).
    """

    def __init__(self, phases: dict[str, str] | None = None) -> None:
        self.phases = phases or {}
        self.times: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._cuda_at_start = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for phase, method in self.phases.items():
            setattr(pl_module, method, self._timed(phase, getattr(pl_module, method)))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for method in self.phases.values():
            pl_module.__dict__.pop(method, None)  # the class's method again

    def _timed(self, phase: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start

        return timed

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.times = {}
        if pl_module.device.type == "cuda":
            self._cuda_at_start = torch.cuda.memory_allocated(pl_module.device)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._started["backward_s"] = time.perf_counter()

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.times["backward_s"] = time.perf_counter() - self._started.pop("backward_s")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._started["optimizer_s"] = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if "optimizer_s" in self._started:
            self.times["optimizer_s"] = time.perf_counter() - self._started.pop("optimizer_s")
        metrics = {f"time/{k}": v for k, v in self.times.items()}
        metrics["memory/peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        if pl_module.device.type == "cuda":
            # The allocator's high-water mark, read and never reset: resetting the process-wide counter would
            # corrupt every other reader (the strategy's generation metrics read it too). The step's own
            # need is that mark less what the step started with (weights, optimizer states).
            peak = torch.cuda.max_memory_allocated(pl_module.device)
            metrics["memory/peak_cuda_mb"] = peak / 2**20
            metrics["memory/step_cuda_mb"] = max(peak - self._cuda_at_start, 0) / 2**20
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, sync_dist=True, reduce_fx="max")


# -----------------------------------------------------------------------------
# the report: samples before vs after, and a plot of reward and step time


class RunReport(Callback):
    """Greedy answers before and after training, and a PNG of the logged metrics (rank 0 writes).

    The module must have ``answer(items) -> (texts, rewards)``; the datamodule a ``prompts`` list.
    """

    def __init__(self, num_samples: int = 4) -> None:
        self.num_samples = num_samples
        self.before: tuple[list[str], list[float]] = ([], [])
        self.can_plot = True

    def _prompts(self, trainer: Trainer) -> list[dict[str, Any]]:
        return list(getattr(trainer.datamodule, "prompts", []))[: self.num_samples]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.can_plot = importlib.util.find_spec("matplotlib") is not None
        if not self.can_plot:  # said now, not after the training
            rank_zero_warn(
                "RunReport: matplotlib is not installed, so the run will write metrics.csv and samples.txt but no"
                " report.png. `pip install matplotlib` (or `pip install -e .[examples]`) for the plot."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._prompts(trainer):
            self.before = pl_module.answer(self._prompts(trainer))  # every rank generates (ZeRO-3 gathers)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        prompts = self._prompts(trainer)
        after = pl_module.answer(prompts) if prompts else ([], [])
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: log_dir broadcasts
        if trainer.global_rank != 0:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if prompts:
            self.write_samples(out_dir / "samples.txt", prompts, after)
        logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if logger is None:
            rank_zero_warn("RunReport: no CSVLogger, so no plot (it reads the logged metrics from metrics.csv).")
            return
        logger.save()  # flush what is still buffered
        if not self.can_plot:
            rank_zero_warn(f"RunReport: no report.png (matplotlib is not installed); metrics are in {logger.log_dir}.")
            return
        try:
            plot(Path(logger.log_dir) / "metrics.csv", out_dir / "report.png")
        except Exception as error:  # a finished run's results are already on disk: never lose them to a plot
            rank_zero_warn(f"RunReport: the plot failed ({type(error).__name__}: {error}); metrics.csv is complete.")
            return
        rank_zero_info(f"RunReport: wrote {out_dir / 'report.png'} and {out_dir / 'samples.txt'}")

    def write_samples(self, path: Path, items: list[dict[str, Any]], after: tuple[list[str], list[float]]) -> None:
        lines = []
        for item, old, old_r, new, new_r in zip(items, *self.before, *after):
            lines += [
                f"PROMPT: {item['prompt']}  (accepted: {', '.join(item['answers'])})",
                f"  before (reward {old_r:.2f}): {old!r}",
                f"  after  (reward {new_r:.2f}): {new!r}",
                "",
            ]
        lines.append(f"mean reward: before {fmean(self.before[1]):.2f}, after {fmean(after[1]):.2f}")
        text = "\n".join(lines)
        print("\nSample answers (greedy), before vs after training:\n" + text)
        path.write_text(text)


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """metrics.csv as {step: {name: value}}, empty cells dropped."""
    steps: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}
            steps.setdefault(int(row["step"]), {}).update(values)
    return steps


def plot(metrics_csv: Path, out: Path) -> None:
    """Mean reward per step, and each step's time split into gather / generate / switch / train."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = read_metrics(metrics_csv)
    rows = [(s, m) for s, m in sorted(steps.items()) if "reward" in m and "hybrid_engine/step_s" in m]
    x = [s for s, _ in rows]
    get = lambda name: [m.get(f"hybrid_engine/{name}", 0.0) for _, m in rows]  # noqa: E731
    gather, generate, step = get("gather_s"), get("generate_s"), get("step_s")
    switch = [a + b for a, b in zip(get("fuse_s"), get("release_s"))]  # fuse LoRA, unfuse + re-partition
    train = [s * t for s, t in zip(step, get("training_share"))]  # outside generation(): log-probs, backward, step
    other = [max(s - g - n - w - t, 0.0) for s, g, n, w, t in zip(step, gather, generate, switch, train)]

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    rewards = [m["reward"] for _, m in rows]
    window = 5  # each step sees only a few prompts, so the per-step mean is noisy: show a running mean too
    running = [
        sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
        for i in range(len(rewards))
    ]
    ax1.plot(x, rewards, marker="o", alpha=0.4, label="per step")
    ax1.plot(x, running, linewidth=2, label=f"mean of the last {window} steps")
    ax1.set_ylabel("mean reward")
    ax1.legend(fontsize=8)
    ax1.set_title("GRPO with HybridEngineStrategy")
    ax1.grid(alpha=0.3)
    bottom = [0.0] * len(x)
    for label, values in [
        ("gather (ZeRO-3 all-gather)", gather),
        ("generate", generate),
        ("LoRA fuse + release", switch),
        ("train (log-probs, backward, step)", train),
        ("other generation overhead", other),
    ]:
        ax2.bar(x, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax2.set_xlabel("step")
    ax2.set_ylabel("seconds")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# process tuning


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for the next allocation instead of handing it back to the OS.

    Under ZeRO-3 on CPU each forward and backward gathers every weight into fresh buffers and frees
    them after; with glibc's defaults freed blocks go back to the OS (blocks over a moving mmap
    threshold are unmapped, a heap top with enough free is trimmed), so every pass faults the same
    pages in again. Measured here (SmolLM2 + LoRA, one CPU process): half the page faults, steps ~10%
    faster, peak RSS +4%. Not off glibc, nor where the environment already tunes malloc.
    """
    if any(k.startswith("MALLOC_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest: blocks up to 32 MiB come from the heap
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # never trim the heap's free top


class KeepFreedMemory(Callback):
    """`keep_freed_memory()` on CPU, before the module builds its model (its ``setup`` runs after this one).

    On a GPU the weights live in CUDA's caching allocator: host malloc settings would only cost memory.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type == "cpu":
            keep_freed_memory()


# -----------------------------------------------------------------------------
# the CLI and its embedded default: SmolLM2-135M-Instruct + LoRA, ZeRO-3, one process, CPU

TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "strategy": {
        "class_path": "lightning_hybrid.HybridEngineStrategy",
        "init_args": {
            "generation_module": "actor",  # explicit: with full fine-tuning a frozen reference copy can generate too
            "max_out_tokens": 96,  # prompt + max_new_tokens per sequence: longer requests are refused
            # ZeRO-3 fetches each decoder layer whole instead of hooking its ~60 LoRA-wrapped submodules:
            # the same numbers, a fraction of the per-pass hook overhead (lightning_hybrid/zero3_leaves.py).
            "zero3_leaf_modules": "auto",
            "config": {  # a DeepSpeed config (with one, Lightning's own ZeRO arguments are ignored)
                "zero_optimization": {
                    "stage": 3,
                    # Release each weight right after use. The default (1e9 elements) makes ZeRO-3's
                    # release search scan the whole trace of the model at every submodule: the first
                    # traced step took 100 s instead of 18 s here (actor plus a reference copy).
                    "stage3_max_reuse_distance": 0,
                },
                "zero_allow_untested_optimizer": True,  # a torch AdamW
            },
        },
    },
    "max_steps": 24,
    "log_every_n_steps": 1,
    "gradient_clip_val": 1.0,
    "enable_checkpointing": False,  # a ZeRO-3 checkpoint of actor + reference is large; turn on when needed
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs", "name": "rlhf", "flush_logs_every_n_steps": 1},
    },
}


def _config_files(args: list[str]) -> Iterator[Any]:
    """The parsed ``--config`` / ``-c`` values of a command line (a file's path, or YAML text)."""
    for arg, value in zip(args, [*args[1:], None]):
        if arg.startswith("--config="):
            arg, value = "--config", arg.removeprefix("--config=")
        if arg in ("--config", "-c") and value is not None:
            yield yaml.safe_load(Path(value).read_text() if Path(value).is_file() else value)


def trainer_defaults(args: list[str]) -> dict[str, Any]:
    """`TRAINER_DEFAULTS`, less their strategy's settings where a ``--config`` file names a strategy class.

    jsonargparse merges a config file's ``init_args`` into the default's when both name the same
    class: the default's CPU-tuned DeepSpeed ``config`` and ``zero3_leaf_modules`` would then leak
    into a file that never asked for them (and with a ``config``, Lightning ignores the file's own
    ``stage``). A file that names the ``class_path`` states the whole strategy; one that sets only
    ``init_args`` tunes the default's. The class stays the default, so that command-line settings of the
    strategy (``--trainer.strategy.init_args.x=...``) work before the ``--config`` as after it.
    """
    for config in _config_files(args):
        strategy = (config.get("trainer") or {}).get("strategy") if isinstance(config, dict) else None
        if isinstance(strategy, str) or (isinstance(strategy, dict) and "class_path" in strategy):
            return {**TRAINER_DEFAULTS, "strategy": {"class_path": TRAINER_DEFAULTS["strategy"]["class_path"]}}
    return TRAINER_DEFAULTS


class ExampleCLI(LightningCLI):
    """The Lightning CLI, with the example's timing, report and process tuning added to the Trainer's callbacks."""

    #: metric name (logged as ``time/<name>``) -> the method of the module it times
    phases = {"policy_forward_s": "policy_logprobs", "reference_s": "reference_logprobs"}

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        num_samples = self.model.hparams.get("num_samples", 0)
        trainer.callbacks += [KeepFreedMemory(), RunReport(num_samples), StepTimer(self.phases)]
        return trainer


def main(
    model_class: type[LightningModule], datamodule_class: type[LightningDataModule], args: list[str] | None = None
) -> None:
    """The command line: ``args`` as after ``python examples/rlhf.py`` (default: ``sys.argv``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices that would repeat every step under the progress bar: transformers 5
    # renamed generate's `past_key_values` to `cache`; torch renamed the collectives DeepSpeed calls.
    warnings.filterwarnings("ignore", message=".*`past_key_values` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*`torch.distributed.[a-z_]+` is deprecated.*")
    defaults = trainer_defaults(sys.argv[1:] if args is None else args)
    ExampleCLI(model_class, datamodule_class, trainer_defaults=defaults, seed_everything_default=42, args=args)
    if torch.distributed.is_initialized():  # leaving it alive can abort at interpreter exit (gloo threads)
        torch.distributed.destroy_process_group()
