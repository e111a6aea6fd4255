"""Tiny models and LightningModules for the tests: built from a config, nothing downloaded."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hybrid.testing import VOCAB, tiny_causal_lm


# The tests' names for tiny_causal_lm's architectures: one line each, used throughout the tests.
def tiny_llama(seed: int = 0, layers: int = 2, **overrides) -> nn.Module:
    return tiny_causal_lm("llama", seed, num_hidden_layers=layers, **overrides)


def tiny_neox(seed: int = 0, **overrides) -> nn.Module:
    return tiny_causal_lm("neox", seed, **overrides)


def tiny_opt(seed: int = 0, **overrides) -> nn.Module:
    return tiny_causal_lm("opt", seed, **overrides)


def tiny_gptj(seed: int = 0, **overrides) -> nn.Module:
    return tiny_causal_lm("gptj", seed, **overrides)


def tiny_gpt_neo(seed: int = 0, **overrides) -> nn.Module:
    return tiny_causal_lm("gpt_neo", seed, **overrides)


def tiny_bloom(seed: int = 0, **overrides) -> nn.Module:
    return tiny_causal_lm("bloom", seed, **overrides)


def tiny_gpt2(seed: int = 0, **overrides) -> nn.Module:
    return tiny_causal_lm("gpt2", seed, **overrides)


def tiny_qwen2(seed: int = 0, **overrides) -> nn.Module:
    return tiny_causal_lm("qwen2", seed, **overrides)


def add_peft_lora(model: nn.Module, r: int = 4, targets=("q_proj", "v_proj", "down_proj"), seed: int = 1) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0)
    )
    torch.manual_seed(seed)
    with torch.no_grad():  # non-zero B, so the adapter changes the output from the start
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


class DSChatLoRALinear(nn.Module):
    """DeepSpeed-Chat's ``LinearLayer_LoRA`` (dschat/utils/module/lora.py), trimmed to what matters."""

    def __init__(self, weight: torch.Tensor, r: int, alpha: float = 1.0, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        out_features, in_features = weight.shape
        self.lora_right_weight = nn.Parameter(torch.zeros(in_features, r))
        self.lora_left_weight = nn.Parameter(torch.zeros(r, out_features))
        self.lora_scaling = alpha / r
        nn.init.kaiming_uniform_(self.lora_right_weight, a=math.sqrt(5))
        nn.init.normal_(self.lora_left_weight, 0, 0.05)
        self.fuse_lora = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_lora:
            return F.linear(x, self.weight, self.bias)
        return (
            F.linear(x, self.weight, self.bias)
            + (x @ self.lora_right_weight @ self.lora_left_weight) * self.lora_scaling
        )


def add_dschat_lora(
    model: nn.Module, r: int = 4, targets=("q_proj", "v_proj", "down_proj"), seed: int = 1
) -> nn.Module:
    torch.manual_seed(seed)
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, DSChatLoRALinear(child.weight, r, alpha=2 * r, bias=child.bias))
    return model


def merged_reference(actor: nn.Module) -> nn.Module:
    """An unsharded copy of ``actor`` with its LoRA merged: what the policy *is*."""
    ref = copy.deepcopy(actor)
    if hasattr(ref, "merge_and_unload"):
        return ref.merge_and_unload().eval()
    for module in ref.modules():
        if isinstance(module, DSChatLoRALinear):
            module.weight.data += module.lora_scaling * (module.lora_left_weight.t() @ module.lora_right_weight.t())
            module.fuse_lora = True
    return ref.eval()


# -- the policy as it is, and what a generation context must leave as it found it ---------------------
def make_actor(lora: str | None) -> nn.Module:
    """The tests' actor: tiny Llama, with PEFT LoRA (``"peft"``), DeepSpeed-Chat LoRA (``"dschat"``) or none."""
    model = tiny_llama()
    if lora == "peft":
        return add_peft_lora(model)
    if lora == "dschat":
        return add_dschat_lora(model)
    return model


def _engine_of(module):
    # A RolloutModule in a fit, or the ``Run`` of ``train`` (Trainer or Fabric).
    return module.engine if isinstance(module, Run) else module.trainer.strategy.model


def whole(module):
    """The actor's weights whole for a block, leaving what ZeRO-3 itself fetched alone.

    ``module``: a RolloutModule in a fit, or the ``Run`` of ``train`` (Trainer or Fabric)."""
    from deepspeed.runtime.zero import GatheredParameters  # here: DS_ACCELERATOR is set before DeepSpeed loads

    from lightning_hybrid.gather import missing_params

    return GatheredParameters(missing_params(module.actor.parameters(), _engine_of(module)))


def unsharded_reference(
    module, lora: str | None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild the policy as it is right now, whole, with its LoRA merged in ``dtype`` on ``device``: the
    merge rounds as the context's fusion does only in the same dtype on the same kind of device."""
    actor = module.actor
    with whole(module):
        state = {k: v.detach().clone() for k, v in actor.state_dict().items()}
    fresh = make_actor(lora).to(device)
    for param in fresh.parameters():
        param.data = param.data.to(dtype)
    # Buffers as the policy holds them: DeepSpeed's bf16 casts parameters only (rotary inv_freq stays fp32).
    for name, buffer in actor.named_buffers():
        fresh.get_buffer(name).data = buffer.detach().to(device, copy=True)
    fresh.load_state_dict(state)
    return merged_reference(fresh)


def reference_generate(module, lora: str | None, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """What the policy as it is right now, unsharded with its LoRA merged, generates (plain transformers)."""
    from lightning_hybrid.gather import native_linear

    reference = unsharded_reference(module, lora)
    with torch.no_grad(), native_linear():
        return reference.generate(ids, attention_mask=mask, **kwargs)


def snapshot(module) -> dict[str, torch.Tensor]:
    """Every parameter of the actor, whole, cloned: for bitwise comparisons."""
    with whole(module):
        return {n: p.detach().clone() for n, p in module.actor.named_parameters()}


def hook_state(module: nn.Module) -> list:
    """ZeRO-3's per-module machinery: its hooks, in order, and its parameter dicts (by identity)."""
    return [
        (
            name,
            list(m._forward_pre_hooks),
            list(m._forward_hooks),
            list(m._forward_hooks_with_kwargs),
            id(m._parameters),
        )
        for name, m in module.named_modules()
    ]


def sharding_state(module: nn.Module) -> list:
    """Each ZeRO-3 parameter's status and local size (empty for a module ZeRO-3 does not manage)."""
    return [(n, p.ds_status, p.data.numel()) for n, p in module.named_parameters() if hasattr(p, "ds_id")]


def mode_state(module: nn.Module) -> tuple[list, list]:
    """Train/eval mode of every submodule and requires_grad of every parameter."""
    return [(n, m.training) for n, m in module.named_modules()], [
        (n, p.requires_grad) for n, p in module.named_parameters()
    ]


def log_probs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each prompt token's log-probability under ``model`` (0 on padding)."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]


# ZeRO-3 releasing each weight right after use (as the example does) and prefetching nothing (the example keeps
# the default): on the tiny models its defaults would keep every weight gathered across the step.
RELEASE_AFTER_USE = dict(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)


def ds_config(stage: int, bf16: bool = False, **zero) -> dict:
    """A DeepSpeed config whose ZeRO-3 really shards a tiny model (persistence threshold 0)."""
    zero_cfg = {"stage": stage, **zero}
    if stage == 3:
        zero_cfg.setdefault("stage3_param_persistence_threshold", 0)
    config = {"zero_optimization": zero_cfg, "zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": 2}
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def prompts(batch: int = 4, length: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths, as generation wants them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        pad = row % 3
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def prompt_loader(n: int = 8, batch: int = 2, length: int = 6) -> DataLoader:
    ids, mask = prompts(n, length)
    return DataLoader(TensorDataset(ids, mask), batch_size=batch)


def lm_loss(actor: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The tests' training loss: next-token cross entropy on the prompts."""
    logits = actor(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


class RolloutModule(LightningModule):
    """A minimal RLHF-shaped module: generate in the step, then train the actor on a loss.

    ``on_step(module, batch)`` runs inside ``training_step`` before the loss, e.g. to generate
    and record what the test checks. ``before_step(module)`` runs in ``on_train_batch_start``,
    outside the engine's forward: the place to gather whole weights for a reference.
    """

    def __init__(
        self,
        actor: nn.Module,
        on_step: Callable | None = None,
        lr: float = 1e-2,
        extra: nn.Module | None = None,
        optimizer: type = torch.optim.AdamW,
    ):
        super().__init__()
        self.optimizer_class = optimizer
        self.actor = actor
        self.reference = extra  # e.g. a frozen reference model with its own generate
        self.on_step = on_step
        self.before_step: Callable | None = None
        self.lr = lr
        self.losses: list[float] = []

    def on_train_batch_start(self, batch, batch_idx):
        if self.before_step is not None:
            self.before_step(self)

    def training_step(self, batch, batch_idx):
        ids, mask = batch
        if self.on_step is not None:
            self.on_step(self, batch)
        loss = lm_loss(self.actor, ids, mask)
        self.losses.append(loss.item())
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return self.optimizer_class([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class GatherOnceModule(RolloutModule):
    """Samples inside each step, then trains the actor with plain SGD (the weights then differ by lr x the
    gradients' difference, where Adam would turn summation-order noise in near-zero gradients into whole steps).
    Records each step's logged ``hybrid_engine/actor_gathers`` and the actor's ZeRO-3 state before each step;
    ``fail_at_step`` raises between that step's generation and its backward."""

    def __init__(self, actor: nn.Module, fail_at_step: int | None = None):
        super().__init__(actor, self.rollout, lr=0.05, optimizer=torch.optim.SGD)
        self.fail_at_step = fail_at_step
        self.gathers: list[float] = []
        self.between_steps: list[tuple] = []

    def rollout(self, module, batch):
        ids, mask = batch
        with self.trainer.strategy.generation() as actor:
            actor.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=True)
        if self.global_step == self.fail_at_step:
            raise ValueError("boom")

    def on_train_batch_start(self, batch, batch_idx):
        self.between_steps.append((sharding_state(self.actor), hook_state(self.actor)))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.gathers.append(float(self.trainer.callback_metrics["hybrid_engine/actor_gathers"]))


def fit(
    module: LightningModule,
    strategy,
    steps: int = 2,
    loader: DataLoader | None = None,
    val_loader: DataLoader | None = None,
    ckpt_path=None,
    **trainer_kwargs,
):
    """A short CPU fit with nothing written to disk unless asked."""
    from lightning.pytorch import Trainer

    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(trainer_kwargs)
    trainer = Trainer(strategy=strategy, **kwargs)
    trainer.fit(module, loader or prompt_loader(), val_loader, ckpt_path=ckpt_path)
    return trainer


# Variables an in-process fit leaves in os.environ (Lightning sets them for DeepSpeed). A child
# process that inherits them believes it is one rank of a finished job and waits forever.
_RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
)


def subprocess_env(**extra: str) -> dict[str, str]:
    """A clean environment for a script that launches its own ranks, on a free port."""
    import os
    import socket

    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONWARNINGS="ignore", **extra)
    return env


def launch_ranks(command: list[str], world: int, timeout: float, grace_s: float = 15.0):
    """Run ``command`` as ``world`` ranks started at once, as torchrun would: each with ``LOCAL_RANK``, ``NODE_RANK``
    and ``WORLD_SIZE`` set, so Lightning takes the processes as created externally instead of starting ranks
    1.. itself after rank 0 has imported everything (on 2 cores that import is most of a small scenario).

    A rank that fails gives the others ``grace_s`` to report their own errors, then every rank still running is
    killed, as on ``timeout``: nothing outlives the call. Returns a ``CompletedProcess`` with every rank's stdout
    and stderr (rank 0's first) and the first nonzero exit status (rank order); on timeout it raises
    ``subprocess.TimeoutExpired`` carrying that output.
    """
    import subprocess
    import tempfile
    import time

    env = subprocess_env(LOCAL_WORLD_SIZE=str(world), WORLD_SIZE=str(world), NODE_RANK="0")
    with tempfile.TemporaryDirectory() as logs:
        files = [(open(f"{logs}/{r}.out", "w+"), open(f"{logs}/{r}.err", "w+")) for r in range(world)]
        ranks = [
            subprocess.Popen(command, env={**env, "LOCAL_RANK": str(r)}, stdout=out, stderr=err, text=True)
            for r, (out, err) in enumerate(files)
        ]
        start, failed_at, timed_out = time.monotonic(), None, False
        while any(rank.poll() is None for rank in ranks):
            now = time.monotonic()
            if failed_at is None and any(rank.returncode not in (None, 0) for rank in ranks):
                failed_at = now
            timed_out = now - start > timeout
            if timed_out or (failed_at is not None and now - failed_at > grace_s):
                for rank in ranks:
                    rank.kill()
                for rank in ranks:
                    rank.wait()
                break
            time.sleep(0.2)
        texts = []
        for out, err in files:
            out.seek(0), err.seek(0)
            texts.append((out.read(), err.read()))
            out.close(), err.close()
    stdout, stderr = "".join(t[0] for t in texts), "".join(t[1] for t in texts)
    if timed_out:
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
    status = next((rank.returncode for rank in ranks if rank.returncode != 0), 0)
    return subprocess.CompletedProcess(command, status, stdout, stderr)


# -- the same training run under both front-ends -------------------------------------------------
FRONT_ENDS = ("trainer", "fabric")


def strategy_for(front_end: str, **kwargs):
    """The Trainer's ``HybridEngineStrategy`` or Fabric's, with the same arguments."""
    from lightning_hybrid import HybridEngineStrategy
    from lightning_hybrid.fabric import HybridEngineStrategy as FabricHybridEngineStrategy

    return (HybridEngineStrategy if front_end == "trainer" else FabricHybridEngineStrategy)(**kwargs)


class Run:
    """What a test's step callback sees, the same under the Trainer and under Fabric.

    ``strategy``, ``actor`` (the policy as the user built it), ``engine``, ``step``, ``rank``,
    ``losses``; ``trainer`` or ``fabric`` is the other one's None.
    """

    def __init__(self, strategy, actor: nn.Module, trainer=None, fabric=None) -> None:
        self.strategy, self.actor, self.trainer, self.fabric = strategy, actor, trainer, fabric
        self.step = 0
        self.losses: list[float] = []

    @property
    def engine(self):
        return self.strategy.model

    @property
    def rank(self) -> int:
        return self.strategy.global_rank


class Policy(nn.Module):
    """The module a Fabric loop hands to ``fabric.setup``: the actor, and the tests' loss as its forward."""

    def __init__(self, actor: nn.Module) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.actor, ids, mask)


def train(
    front_end: str,
    actor: nn.Module,
    strategy,
    on_step: Callable | None = None,
    steps: int = 2,
    lr: float = 1e-2,
    devices: int = 1,
    before_step: Callable | None = None,
    optimizer: type = torch.optim.AdamW,
) -> Run:
    """``steps`` training steps on ``prompt_loader()``: ``before_step(run)`` outside the engine's forward, then
    ``on_step(run, batch)`` (generation), then the loss, backward and optimizer step. The Trainer runs it as a
    ``RolloutModule`` fit; Fabric as the hand-written loop a Fabric user writes."""
    if front_end == "trainer":
        run = Run(strategy, actor)

        def view(module) -> Run:
            run.trainer, run.step = module.trainer, module.global_step
            return run

        module = RolloutModule(
            actor, on_step and (lambda m, batch: on_step(view(m), batch)), lr=lr, optimizer=optimizer
        )
        if before_step is not None:
            module.before_step = lambda m: before_step(view(m))
        fit(module, strategy, steps=steps, devices=devices)
        run.losses = module.losses
        return run
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=devices, strategy=strategy)
    fabric.launch()
    run = Run(fabric.strategy, actor, fabric=fabric)
    policy = Policy(actor)
    model, optimizer = fabric.setup(policy, optimizer([p for p in policy.parameters() if p.requires_grad], lr=lr))
    loader = fabric.setup_dataloaders(prompt_loader())
    while run.step < steps:
        for batch in loader:
            if run.step >= steps:
                break
            if before_step is not None:
                before_step(run)
            if on_step is not None:
                on_step(run, batch)
            loss = model(*batch)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            run.losses.append(loss.item())
            run.step += 1
    return run


def group_batch(prompts_n: int = 2, group: int = 3, response_len: int = 5, seed: int = 0):
    """A GRPO-shaped batch: distinct left-padded prompts, ``group`` responses each (some cut short by a mask)."""
    ids, mask = prompts(batch=prompts_n, length=7, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    responses = torch.randint(3, VOCAB, (prompts_n * group, response_len), generator=g)
    response_mask = torch.ones_like(responses)
    response_mask[::2, response_len - 2 :] = 0  # as after an early EOS
    advantages = torch.randn(prompts_n * group, generator=g)
    return ids, mask, responses, response_mask, advantages


class ScoringModule(LightningModule):
    """One policy-gradient step on a fixed batch, scored by ``response_logprobs`` with or without a shared prompt.

    SGD with a large learning rate turns the update into a precise read-out of the gradient:
    ``(after - before) / -lr`` is the gradient, to fp32 rounding of the update itself.
    """

    def __init__(self, actor: nn.Module, share_prompt: bool, batch: tuple, lr: float = 1e3):
        super().__init__()
        self.actor = actor
        self.share_prompt = share_prompt
        self.batch = batch
        self.lr = lr
        self.logprobs: list[torch.Tensor] = []

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1)

    def training_step(self, _, batch_idx):
        from lightning_hybrid.scoring import response_logprobs

        ids, mask, responses, response_mask, advantages = self.batch
        logp = response_logprobs(
            self.actor, ids, mask, responses, response_mask, temperature=0.7, share_prompt=self.share_prompt
        )
        self.logprobs.append((logp.detach() * response_mask).clone())
        return -(advantages[:, None] * logp * response_mask).sum() / response_mask.sum()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


# -- goodness of fit, for the samplers' tests ----------------------------------------------------
def chi_square_critical(df: int, z: float = 3.719) -> float:
    """The chi-square quantile for ``df`` degrees of freedom at the normal quantile ``z`` (3.719: 1 - 1e-4),
    by Wilson and Hilferty's approximation (within 1% for df >= 3)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, weights: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom of ``counts`` (draws per token) against ``weights`` (unnormalised),
    with the bins expected below 5 pooled into one, as the test requires."""
    draws = float(counts.sum())
    expected = (weights.double() / weights.double().sum() * draws).cpu()
    counts = counts.double().cpu()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().view(1)])
    wanted = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = wanted > 0
    return float(((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum()), int(keep.sum()) - 1
