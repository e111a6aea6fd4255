"""A LightningCLI entry point for tests/test_cli.py: prints the strategy it was given after a short fit.

python tests/scripts/cli.py fit --trainer.strategy=hybrid_engine_stage_2 ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import json  # noqa: E402

import torch  # noqa: E402
from helpers import RolloutModule, prompt_loader, tiny_llama  # noqa: E402
from lightning.pytorch import LightningDataModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

import lightning_hybrid  # noqa: E402, F401  (registers the strategy names)


class TinyActor(RolloutModule):
    def __init__(self, lr: float = 1e-2):
        super().__init__(tiny_llama(), on_step=self.rollout, lr=lr)

    def rollout(self, module, batch):
        with self.trainer.strategy.generation() as actor:
            actor.generate(batch[0], attention_mask=batch[1], max_new_tokens=3, do_sample=False)

    def on_train_end(self):
        strategy = self.trainer.strategy
        if self.global_rank == 0:
            report = {
                "class": type(strategy).__name__,
                "stage": strategy.config["zero_optimization"]["stage"],
                "hybrid_engine": strategy.config["hybrid_engine"],
                "engine": type(strategy.model).__name__,
                "calls": strategy.generation_stats.calls,
            }
            print("STRATEGY " + json.dumps(report), flush=True)


class Prompts(LightningDataModule):
    def train_dataloader(self):
        return prompt_loader()


def main(args: list[str] | None = None) -> None:
    LightningCLI(TinyActor, Prompts, save_config_callback=None, args=args)


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # leaving it alive can abort at interpreter exit
        torch.distributed.destroy_process_group()
