"""The GRPO job of ``examples/rlhf.py`` as a hand-written Lightning Fabric loop.

The same task, reward, model loading and defaults: this script imports the ``GRPO`` module and the
``PromptData`` of ``rlhf.py`` and runs the module's own ``training_step`` under Fabric (a
LightningModule under Fabric sees ``self.trainer.strategy`` as ``fabric.strategy``), with Fabric's
``HybridEngineStrategy``. It reads the same YAML files as ``rlhf.py`` (``seed_everything``,
``trainer.accelerator/devices/max_steps/gradient_clip_val/strategy.init_args``, ``model``, ``data``).

    python examples/rlhf_fabric.py                                      # SmolLM2-135M-Instruct + LoRA, CPU
    python examples/rlhf_fabric.py --config examples/configs/tiny.yaml  # tiny random Llama, < 1 minute
    python examples/rlhf_fabric.py --config examples/configs/tiny.yaml --devices 2

Writes ``runs/<name>_fabric/version_<n>/``: metrics.csv (one row per step), report.png, samples.txt.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import Any

import rlhf  # rlhf.py, next to this file; first: it sets OMP_WAIT_POLICY before torch loads OpenMP
import rlhf_support
import torch
import yaml
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger, Logger

from lightning_hybrid.fabric import HybridEngineStrategy


class StepMetrics(Logger):
    """Collects what one training step logs (the module's ``self.log`` and the strategy's ``hybrid_engine/*``),
    so that the step becomes one row of metrics.csv, as under the Trainer. Records on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "step_metrics"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.metrics.update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def pop(self) -> dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics


def job(config_path: str | None) -> dict[str, Any]:
    """The job's settings: ``rlhf.py``'s embedded defaults, overridden by a YAML file of the same shape."""
    trainer = dict(rlhf_support.TRAINER_DEFAULTS)  # a file's `trainer.strategy` replaces the default's whole
    config: dict[str, Any] = {"seed_everything": 42, "model": {}, "data": {}}
    if config_path:
        with open(config_path) as f:
            loaded = yaml.safe_load(f) or {}
        trainer.update(loaded.get("trainer") or {})
        config.update({k: loaded[k] for k in ("seed_everything", "model", "data") if k in loaded})
    config["trainer"] = trainer
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML file as for rlhf.py (default: rlhf.py's embedded default)")
    parser.add_argument("--devices", type=int, help="processes (overrides trainer.devices)")
    parser.add_argument("--max_steps", type=int, help="training steps (overrides trainer.max_steps)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*`torch.distributed.[a-z_]+` is deprecated.*")  # as in rlhf.py
    config = job(args.config)
    trainer = config["trainer"]
    max_steps = args.max_steps or trainer["max_steps"]

    strategy_args = dict(trainer["strategy"]["init_args"])
    # DeepSpeed clips gradients itself under Fabric: the Trainer's gradient_clip_val goes into its config.
    strategy_args["config"] = {**strategy_args.get("config", {}), "gradient_clipping": trainer["gradient_clip_val"]}
    collected = StepMetrics()
    name = trainer["logger"]["init_args"]["name"] if isinstance(trainer.get("logger"), dict) else "rlhf"
    csv_logger = CSVLogger(root_dir="runs", name=f"{name}_fabric", flush_logs_every_n_steps=1)
    fabric = Fabric(
        accelerator=trainer["accelerator"],
        devices=args.devices or trainer["devices"],
        strategy=HybridEngineStrategy(**strategy_args),
        loggers=collected,
    )
    fabric.launch()
    fabric.seed_everything(config["seed_everything"])
    if fabric.device.type == "cpu":
        rlhf_support.keep_freed_memory()  # see rlhf_support.KeepFreedMemory

    module = rlhf.GRPO(**config["model"])
    module.build(torch.float32)  # Fabric runs here in its default precision, fp32
    data = rlhf.PromptData(**config["data"])
    model, optimizer = fabric.setup(module, module.configure_optimizers())
    model.mark_forward_method("training_step")  # through the engine's forward, as the Trainer runs it
    loader = fabric.setup_dataloaders(data.train_dataloader())

    samples = data.prompts[: module.hparams.num_samples]
    report = rlhf_support.RunReport(module.hparams.num_samples)
    report.before = module.answer(samples)  # every rank generates (ZeRO-3 gathers from all)
    collected.pop()

    step, started = 0, time.perf_counter()
    while step < max_steps:
        model.train()
        module.on_train_epoch_start()  # the frozen reference back to eval
        for batch in loader:
            if step >= max_steps:
                break
            t0 = time.perf_counter()
            loss = model.training_step(batch, step)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            metrics = collected.pop()
            step_s = time.perf_counter() - t0
            switch = sum(metrics.get(f"hybrid_engine/{k}", 0.0) for k in ("gather_s", "generate_s", "fuse_s"))
            switch += metrics.get("hybrid_engine/release_s", 0.0)
            metrics.update({"hybrid_engine/step_s": step_s, "hybrid_engine/training_share": 1 - switch / step_s})
            reward = fabric.all_reduce(torch.tensor(metrics["reward"]), reduce_op="mean").item()
            metrics["reward"] = reward  # over all ranks, as the Trainer's sync_dist=True
            if fabric.is_global_zero:
                csv_logger.log_metrics(metrics, step=step)
            fabric.print(f"step {step}: reward {reward:.3f}, loss {metrics['loss']:.4f}, {step_s:.1f} s")
            step += 1
    fabric.print(f"`fabric loop` stopped: max_steps={max_steps} reached in {time.perf_counter() - started:.0f} s")

    after = module.answer(samples)
    if fabric.is_global_zero:
        csv_logger.finalize("success")
        out_dir = Path(csv_logger.log_dir)
        report.write_samples(out_dir / "samples.txt", samples, after)
        rlhf_support.plot(out_dir / "metrics.csv", out_dir / "report.png")
        print(f"wrote {out_dir / 'report.png'} and {out_dir / 'samples.txt'}")
    if torch.distributed.is_initialized():  # leaving it alive can abort at interpreter exit (gloo threads)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
