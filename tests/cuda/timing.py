"""A short timed comparison on one GPU, printed as one table (``bash tests/cuda/run.sh`` runs it).

SmolLM2-135M's shape built from its config (random weights: the real ones do not travel to a bare
GPU machine), a GRPO-shaped batch (``--prompts`` distinct prompts, ``--group`` rows each). Rows:
plain Hugging Face ``generate`` on the bare model (no DeepSpeed, no LoRA: the floor), and the
strategy's generation context on the PEFT LoRA actor under ZeRO-3 / ZeRO-2, timed around the whole
``with`` block (gather, fuse, generate, release), with one GRPO-like training step around it
(score the responses with ``response_logprobs``, group-normalized advantages, backward, AdamW).
Random weights make the tokens meaningless; every call generates exactly ``--new-tokens``.

CPU smoke run of the script itself: ``python tests/cuda/timing.py --device cpu --arch llama --new-tokens 4``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

import torch  # noqa: E402
from helpers import add_peft_lora, ds_config  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_hybrid import HybridEngineStrategy  # noqa: E402
from lightning_hybrid.scoring import response_logprobs  # noqa: E402
from lightning_hybrid.testing import tiny_causal_lm  # noqa: E402

DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grpo_prompts(args: argparse.Namespace, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    distinct = torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=g)
    ids = distinct.repeat_interleave(args.group, 0)  # GRPO's layout: a group of rows per prompt
    return ids, torch.ones_like(ids)


def sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True, top_k=0)


def plain_generate(args: argparse.Namespace, precision: str) -> dict:
    """HF generate on the bare model in ``precision``'s dtype: warm-up, then the median of the timed calls."""
    device = torch.device(args.device)
    model = tiny_causal_lm(args.arch).to(device, DTYPES[precision])
    ids, mask = (t.to(device) for t in grpo_prompts(args, model.config.vocab_size))
    times = []
    with torch.no_grad():
        for _ in range(args.steps):
            synchronize(device)
            start = time.perf_counter()
            model.generate(ids, attention_mask=mask, **sampling(args))
            synchronize(device)
            times.append(time.perf_counter() - start)
    del model
    gen_s = statistics.median(times[1:])  # the first call warms up
    return {"gen_s": gen_s, "tokens_per_s": ids.shape[0] * args.new_tokens / gen_s, "switch_s": 0.0, "step_s": None}


class GRPOStep(LightningModule):
    """One GRPO-like step per batch: generate in the context, score, group-normalized advantages, backward."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.actor = add_peft_lora(tiny_causal_lm(args.arch), r=8, targets=("q_proj", "v_proj"))
        self.ids, self.mask = grpo_prompts(args, self.actor.config.vocab_size)
        self.gen_s: list[float] = []
        self.switch_s: list[float] = []
        self.step_s: list[float] = []
        self._start = 0.0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(self.args.steps, 1)), batch_size=1)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        strategy = self.trainer.strategy
        ids, mask = self.ids.to(self.device), self.mask.to(self.device)
        start = time.perf_counter()
        with strategy.generation() as actor:
            out = actor.generate(ids, attention_mask=mask, **sampling(self.args))
        synchronize(self.device)
        self.gen_s.append(time.perf_counter() - start)
        self.switch_s.append(strategy.generation_stats.switch_s)
        responses = out[:, ids.shape[1] :]
        logp = response_logprobs(self.actor, ids, mask, responses)
        rewards = (responses % 7 == 0).float().mean(1).view(self.args.prompts, self.args.group)  # any token rule
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).view(-1)
        return -(advantages[:, None] * logp).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:  # after backward and the optimizer
        synchronize(self.device)
        self.step_s.append(time.perf_counter() - self._start)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.actor.parameters() if p.requires_grad], lr=1e-5)


def context_step(args: argparse.Namespace, stage: int, precision: str) -> dict:
    module = GRPOStep(args)
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        strategy=HybridEngineStrategy(config=ds_config(stage), max_out_tokens=args.prompt_len + args.new_tokens),
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    gen_s = statistics.median(module.gen_s[1:])  # the first step warms up
    return {
        "gen_s": gen_s,
        "tokens_per_s": module.ids.shape[0] * args.new_tokens / gen_s,
        "switch_s": statistics.median(module.switch_s[1:]),
        "step_s": statistics.median(module.step_s[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--arch", default="smollm2-135m", help="a key of lightning_hybrid.testing.CONFIGS")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="per row; the first is a warm-up")
    args = parser.parse_args()
    runs = [
        ("plain HF generate (no DeepSpeed, no LoRA)", "32-true", lambda: plain_generate(args, "32-true")),
        ("plain HF generate (no DeepSpeed, no LoRA)", "bf16-mixed", lambda: plain_generate(args, "bf16-mixed")),
        ("generation() ZeRO-3, LoRA + GRPO step", "32-true", lambda: context_step(args, 3, "32-true")),
        ("generation() ZeRO-3, LoRA + GRPO step", "bf16-mixed", lambda: context_step(args, 3, "bf16-mixed")),
        ("generation() ZeRO-2, LoRA + GRPO step", "bf16-mixed", lambda: context_step(args, 2, "bf16-mixed")),
    ]
    rows = []
    for name, precision, run in runs:
        result = run()
        rows.append((name, precision, result))
        print("TIMING " + json.dumps({"path": name, "precision": precision, **result}), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    rows_n = args.prompts * args.group
    print(
        f"\nTIMING table: {args.arch} (random weights), {args.prompts} prompts x {args.group} rows, "
        f"{args.prompt_len} prompt + {args.new_tokens} new tokens, sampled; median of {args.steps - 1} after a warm-up"
    )
    print("| path | precision | generate s | tokens/s | switch s | GRPO step s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, precision, r in rows:
        step = "" if r["step_s"] is None else f"{r['step_s']:.3f}"
        print(f"| {name} | {precision} | {r['gen_s']:.3f} | {r['tokens_per_s']:.0f} | {r['switch_s']:.3f} | {step} |")
    print(f"({rows_n} rows; tokens/s counts new tokens of all rows; generate s includes the switch for the context)")
    if torch.distributed.is_initialized():  # the fits' process group: left open, exiting waits on it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
