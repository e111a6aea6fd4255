"""Tensor-parallel *training*: DeepSpeed's AutoTP or a user's Megatron-style ``mpu``.

The actor trains already sliced: each rank of a tensor-parallel (TP) group of ``T`` ranks
holds 1/T of every sliced linear, and ZeRO partitions and reduces over the data-parallel (DP)
group only. Two ways in, never both:

* **AutoTP**: ``"tensor_parallel": {"autotp_size": T}`` in the DeepSpeed config (or the
  strategy's ``training_tp_size=T``). DeepSpeed slices the Hugging Face models of the
  LightningModule inside ``deepspeed.initialize`` and builds the groups itself
  (``deepspeed.utils.groups``: a (DP, TP) mesh, so TP groups are ``T`` consecutive ranks).
* **A user's mpu**: an object with the API DeepSpeed reads (``get_{model,data}_parallel_{rank,
  group,world_size}``), for a model the user sliced; handed to every ``deepspeed.initialize``
  and to ``zero.Init``.

Either way the ranks of one TP group must see the same batch: the data sampler shards by DP
rank. Everything here is a plain function any strategy (Trainer or Fabric) can call.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from .lora import is_dschat_lora, is_peft_lora

# What DeepSpeed reads of an mpu (deepspeed/runtime/engine.py, zero/partition_parameters.py).
MPU_METHODS = (
    "get_model_parallel_rank",
    "get_model_parallel_group",
    "get_model_parallel_world_size",
    "get_data_parallel_rank",
    "get_data_parallel_group",
    "get_data_parallel_world_size",
)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    return value


def resolve_training_tp(config: dict[str, Any], training_tp_size: int | None, mpu: Any | None) -> int:
    """The AutoTP training size in force; writes it into ``config["tensor_parallel"]``.

    ``training_tp_size=None`` takes the config's ``autotp_size`` (default 1). A size given both
    ways must agree. An ``mpu`` is checked for DeepSpeed's API and excludes AutoTP (it would
    slice the model a second time and build its own groups).
    """
    block = config.get("tensor_parallel")
    if block is not None and not isinstance(block, dict):
        raise TypeError(f"The DeepSpeed config's `tensor_parallel` must be a dict, got {type(block).__name__}.")
    in_config = (block or {}).get("autotp_size")
    if in_config is not None:
        in_config = _positive_int("tensor_parallel.autotp_size", in_config)
    if training_tp_size is not None:
        training_tp_size = _positive_int("training_tp_size", training_tp_size)
        if in_config is not None and in_config != training_tp_size:
            raise ValueError(
                f"`training_tp_size` disagrees: HybridEngineStrategy(training_tp_size={training_tp_size}) but the"
                f" DeepSpeed config's `tensor_parallel.autotp_size` is {in_config}. Set one of them, or make them"
                " equal."
            )
    size = training_tp_size or in_config or 1
    if mpu is not None:
        missing = [name for name in MPU_METHODS if not callable(getattr(mpu, name, None))]
        if missing:
            raise TypeError(
                f"`mpu` must have DeepSpeed's model-parallel API; {type(mpu).__name__} lacks {missing}."
                " Pass a Megatron-style mpu (e.g. megatron.core.parallel_state) or leave mpu=None."
            )
        if size > 1:
            raise ValueError(
                f"`mpu` and AutoTP (training_tp_size / tensor_parallel.autotp_size = {size}) exclude each other: an"
                " mpu describes a model you already sliced, AutoTP slices it again with groups of its own. Drop one."
            )
    if size > 1:
        config["tensor_parallel"] = {**(block or {}), "autotp_size": size}
    return size


def check_inference_tp(inference_tp_size: int, mpu: Any | None) -> None:
    """An actor sliced by the user's mpu generates in that layout (AutoTP's sizes are checked by the settings)."""
    if mpu is not None and inference_tp_size > 1:
        raise ValueError(
            f"`inference_tp_size={inference_tp_size}` with an `mpu`: the actor is already sliced by your mpu and"
            " generates in that layout. Use inference_tp_size=1."
        )


def check_world_size(training_tp_size: int, world_size: int, num_nodes: int, num_processes: int) -> None:
    if world_size % training_tp_size:
        raise ValueError(
            f"`training_tp_size={training_tp_size}` must divide the world size {world_size} ({num_nodes} node(s)"
            f" x {num_processes} process(es)): the ranks form groups of {training_tp_size}. Pick a divisor of"
            f" {world_size}."
        )


def _hf_models(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost submodules of ``root`` with a Hugging Face ``config`` (AutoTP slices each)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "hidden_size"):
            continue
        if not any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            found.append((name, module))
    return found


def check_autotp_model(root: nn.Module, tp_size: int) -> None:
    """Refuses, before any work, a LightningModule that AutoTP training cannot slice evenly.

    AutoTP slices *every* Hugging Face model in the module (actor and a frozen reference
    alike): each one's heads, key/value heads and widths must divide by ``tp_size``. LoRA is
    refused: AutoTP would slice the adapter's own linears as if they were the model's.
    """
    lora = [name for name, m in root.named_modules() if is_peft_lora(m) or is_dschat_lora(m)]
    if lora:
        raise ValueError(
            f"training_tp_size={tp_size} (AutoTP training) does not support LoRA: DeepSpeed's AutoTP slices the"
            f" adapter's linears as model layers ({lora[0]!r} and {len(lora) - 1} more). Train LoRA with"
            " training_tp_size=1 (ZeRO-3 shards it), or fully fine-tune with AutoTP."
        )
    models = _hf_models(root)
    if not models:
        raise ValueError(
            f"training_tp_size={tp_size}: {type(root).__name__} holds no Hugging Face model (a module with a"
            " `config`) for AutoTP to slice. Use training_tp_size=1, or pass the mpu of a model you sliced yourself."
        )
    for name, model in models:
        config = model.config
        config = getattr(config, "text_config", None) or config
        sizes = {
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_key_value_heads": getattr(config, "num_key_value_heads", None)
            or getattr(config, "num_attention_heads", None),
            "hidden_size": getattr(config, "hidden_size", None),
            "intermediate_size": getattr(config, "intermediate_size", None),
        }
        for field, value in sizes.items():
            if value is not None and value % tp_size:
                raise ValueError(
                    f"training_tp_size={tp_size} does not divide {name or type(root).__name__}'s {field}={value}:"
                    f" AutoTP gives each rank an equal slice. Pick a training_tp_size that divides {value}."
                )


def data_parallel_rank_and_size(
    global_rank: int, world_size: int, training_tp_size: int, mpu: Any | None
) -> tuple[int, int]:
    """This rank's place among the data-parallel replicas (what the sampler shards by).

    AutoTP's mesh is (DP, TP) in row-major order: TP groups are consecutive ranks.
    """
    if mpu is not None:
        return int(mpu.get_data_parallel_rank()), int(mpu.get_data_parallel_world_size())
    return global_rank // training_tp_size, world_size // training_tp_size


def training_tp_group(engine: Any) -> Any | None:
    """The engine's TP process group, or None when the actor trains unsliced."""
    mpu = getattr(engine, "mpu", None)
    if mpu is None:
        return None
    size = (
        mpu.get_tensor_model_parallel_world_size()
        if hasattr(mpu, "get_tensor_model_parallel_world_size")
        else mpu.get_model_parallel_world_size()
    )
    if size <= 1:
        return None
    if hasattr(mpu, "get_tensor_model_parallel_group"):
        return mpu.get_tensor_model_parallel_group()
    return mpu.get_model_parallel_group()


def data_parallel_rank(engine: Any) -> int:
    """The engine's DP rank: ranks of one TP group share it (and so their sampling stream)."""
    mpu = getattr(engine, "mpu", None)
    if mpu is not None:
        return int(mpu.get_data_parallel_rank())
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's raw bytes, any dtype (numpy has no bfloat16)."""
    return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def check_same_request(group: Any, prompt: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """The ranks of a TP group compute every forward together: they must ask for the same generation.

    Raises on every rank of the group (with what differs) instead of letting mismatched
    collectives hang or mix rows.
    """
    digest = hashlib.sha256(tensor_bytes(prompt))
    settings = sorted((k, repr(v)) for k, v in kwargs.items() if not isinstance(v, torch.Tensor))
    for key in sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor)):
        digest.update(key.encode())
        digest.update(tensor_bytes(kwargs[key]))
    mine = (tuple(prompt.shape), digest.hexdigest(), repr(settings))
    everyone: list[Any] = [None] * torch_dist.get_world_size(group)
    torch_dist.all_gather_object(everyone, mine, group=group)
    if len(set(everyone)) > 1:
        shapes = [shape for shape, _, _ in everyone]
        raise ValueError(
            "The ranks of a tensor-parallel group called generate() with different prompts or settings (prompt"
            f" shapes {shapes}); a tensor-parallel actor computes each forward with the whole group, so its ranks"
            " must generate the same batch. Their batches come from the data sampler sharded by data-parallel rank:"
            " derive prompts from the batch, not from the global rank."
        )


def initialize_kwargs(mpu: Any | None) -> dict[str, Any]:
    """Extra keyword arguments for ``deepspeed.initialize``."""
    return {} if mpu is None else {"mpu": mpu}


def zero_init_kwargs(mpu: Any | None) -> dict[str, Any]:
    """Extra keyword arguments for ``deepspeed.zero.Init``.

    Its ``mpu`` only feeds the config's batch arithmetic; the group it partitions over is
    ``data_parallel_group`` (the whole world when None), so both are given. Called when the
    model is built sharded (``configure_model``), after the LightningModule's ``setup``: the
    mpu's groups must exist by then.
    """
    if mpu is None:
        return {}
    return {"mpu": mpu, "data_parallel_group": mpu.get_data_parallel_group()}


def gather_tensor_parallel_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (``module.state_dict()``, ZeRO-3 already gathered) with every AutoTP slice made whole.

    DeepSpeed's AutoTP layers know how they were cut (``TensorParallel_Layer.gather_params``);
    gathering runs on every rank of the TP group (a collective), in module order.
    """
    from deepspeed.module_inject.layers import TensorParallel_Layer

    whole = dict(state)
    for name, layer in module.named_modules():
        if not isinstance(layer, TensorParallel_Layer):
            continue
        params = [p for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)) if p is not None]
        saved = [p.data for p in params]
        try:
            layer.gather_params(params)
            for key, p in (("weight", layer.weight), ("bias", getattr(layer, "bias", None))):
                if p is not None and f"{name}.{key}" in whole:
                    whole[f"{name}.{key}"] = p.detach().to("cpu", copy=True)
        finally:
            for p, data in zip(params, saved):
                p.data = data
    return whole


def _fingerprint(value: Any) -> str:
    """A digest of every tensor and plain value in a (nested) batch."""
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten(value)
    digest = hashlib.sha256(repr(spec).encode())
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            digest.update(repr((tuple(leaf.shape), leaf.dtype)).encode())
            digest.update(tensor_bytes(leaf))
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


def replace_batch_check(engine: Any) -> None:
    """Swaps DeepSpeed's first-batch TP consistency check for one that reads nested batches.

    DeepSpeed's (``engine.first_dataloader_check``) compares only flat lists and dicts: a
    Lightning ``training_step(batch, batch_idx)`` with ``batch = [ids, mask]`` makes it raise
    "Boolean value of Tensor ... is ambiguous". Ours compares digests of the whole structure
    on the first forward, then removes itself, as DeepSpeed's does.
    """
    hook = getattr(engine, "first_dataloader_check", None)
    group = training_tp_group(engine)
    if hook is None or group is None:
        return
    hook.remove()

    def check(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        everyone: list[Any] = [None] * torch_dist.get_world_size(group)
        torch_dist.all_gather_object(everyone, _fingerprint((args, kwargs)), group=group)
        engine.first_dataloader_check.remove()
        if len(set(everyone)) > 1:
            raise ValueError(
                "The ranks of a tensor-parallel group got different batches: they compute each step together and"
                " must see the same data. Shard the sampler by data-parallel rank (the strategy's"
                " distributed_sampler_kwargs; keep Trainer(use_distributed_sampler=True) or use them in your own"
                " sampler)."
            )

    engine.first_dataloader_check = engine.module.register_forward_pre_hook(check, prepend=True, with_kwargs=True)
