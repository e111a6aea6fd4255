"""Every DeepSpeed internal this project relies on, in one place, each checked where it is read.

DeepSpeed's public API does not reach what a hybrid engine needs: ZeRO-3's module hooks and
in-flight prefetches, its parameter dicts, the class wrapping of ``zero.Init``. Each such name is
read here and nowhere else, so a DeepSpeed release that moves one fails with the name and the
installed version, not with an ``AttributeError`` deep inside a fit. Tested with the versions
``pyproject.toml`` allows (``TESTED``).
"""

from __future__ import annotations

from collections.abc import Iterator

import deepspeed
import torch
from deepspeed.runtime.zero import partition_parameters
from torch import nn

__all__ = [
    "GatherCounter",
    "ORIGINAL_INIT",
    "arm_workspace",
    "kernel_workspace",
    "policy_layer_classes",
    "reset_kernel_class_state",
    "DeepSpeedIncompatible",
    "ZeROOrderedDict",
    "disable_shm_comm",
    "forget_model_parallel_groups",
    "module_classes",
    "partition_stamp",
    "wait_for_prefetch",
    "zero3_hook_ids",
    "zero3_linear_wrap",
    "zero3_offload",
    "zero_init_active",
]

TESTED = "deepspeed>=0.16,<0.20"


class DeepSpeedIncompatible(RuntimeError):
    """The installed DeepSpeed lacks an internal this project needs."""


def _missing(what: str) -> DeepSpeedIncompatible:
    return DeepSpeedIncompatible(
        f"lightning-hybrid needs DeepSpeed's {what}, which deepspeed {deepspeed.__version__} does not have"
        f" (tested with {TESTED}). Install a tested version, or report it with this message."
    )


try:  # ZeRO-3's parameter dict: its __getitem__ gathers a partitioned weight on access
    from deepspeed.runtime.zero.parameter_offload import ZeROOrderedDict
except ImportError as error:  # pragma: no cover - only on an untested DeepSpeed
    raise _missing("deepspeed.runtime.zero.parameter_offload.ZeROOrderedDict") from error

try:  # what every ZeRO-3 engine puts in place of torch.nn.functional.linear, process-wide
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
except ImportError as error:  # pragma: no cover
    raise _missing("deepspeed.runtime.zero.linear.zero3_linear_wrap") from error


def zero3_offload(engine: nn.Module):
    """The object that owns ZeRO-3's module hooks (the optimizer's parameter offload, or the inference-only one)."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    if offload is None or not hasattr(offload, "forward_hooks") or not hasattr(offload, "backward_hooks"):
        raise _missing("ZeRO-3 parameter offload with `forward_hooks`/`backward_hooks` on the engine's optimizer")
    return offload


def zero3_hook_ids(engine: nn.Module) -> set[int]:
    """The ids of ZeRO-3's module hook handles (keys in the modules' hook dicts)."""
    offload = zero3_offload(engine)
    return {handle.id for handle in (*offload.forward_hooks, *offload.backward_hooks)}


def wait_for_prefetch(engine: nn.Module, params: list[torch.Tensor]) -> None:
    """Waits for ZeRO-3's own in-flight prefetch of ``params``; they then count as gathered, ZeRO-3's to release."""
    coordinator = zero3_offload(engine).get_param_coordinator()
    registry = getattr(coordinator, "_PartitionedParameterCoordinator__inflight_param_registry", None)
    if registry is None:
        raise _missing("ZeRO-3's in-flight parameter registry (PartitionedParameterCoordinator)")
    for param in params:
        registry.pop(param).wait()


def partition_stamp(param: torch.Tensor) -> tuple[int, int]:
    """Where a ZeRO-3 partition lives and how often it was written: any change means its weight changed."""
    return param.ds_tensor.data_ptr(), param.ds_tensor._version


def disable_shm_comm() -> None:
    """DeepSpeed's shared-memory collective JIT-compiles for half a minute on CPU (and crashes under AutoTP)."""
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if ops is None:
        raise _missing("deepspeed.ops.__compatible_ops__")
    ops["deepspeed_shm_comm"] = False


# DeepSpeed keeps the model-parallel unit and AutoTP's device mesh of the last engine that had one in module globals,
# and every later engine in the process reads them first.
_MODEL_PARALLEL_GLOBALS = (
    "mpu",
    "mesh_device",
    "_TENSOR_MODEL_PARALLEL_GROUP",
    "_MODEL_PARALLEL_GROUP",
    "_DATA_PARALLEL_GROUP",
    "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
    "_MPU_TENSOR_MODEL_PARALLEL_RANK",
)


def forget_model_parallel_groups() -> None:
    """Clears what an earlier engine in this process left of its model parallelism, before a new one is built.

    Left in ``deepspeed.utils.groups``, a fit without tensor parallelism after one with it fails in
    ``deepspeed.initialize`` (``'NoneType' object has no attribute 'get_model_parallel_rank'``), and a user's mpu
    after AutoTP would partition over AutoTP's stale data-parallel group. Left in AutoTP's training mode (which
    ``deepspeed.initialize`` turns on and never off), inference-TP slicing takes AutoTP's training group instead
    of the one it is given. The new engine sets what it needs (its mpu, AutoTP's mesh and mode); the process
    groups themselves stay alive for whoever still holds them.
    """
    from deepspeed.module_inject import layers
    from deepspeed.utils import groups

    missing = [f"utils.groups.{name}" for name in _MODEL_PARALLEL_GLOBALS if not hasattr(groups, name)]
    missing += [] if callable(getattr(layers, "set_autotp_mode", None)) else ["module_inject.layers.set_autotp_mode"]
    if missing:
        raise _missing(f"deepspeed.{missing[0]}")
    for name in _MODEL_PARALLEL_GLOBALS:
        setattr(groups, name, None)
    layers.set_autotp_mode(training=False)


# -- zero.Init's class wrapping (zero_init.py) --------------------------------------------------
def zero_init_active() -> bool:
    """Whether ``zero.Init`` has wrapped the ``__init__`` of every module class right now."""
    if not hasattr(partition_parameters, "top_level_context"):
        raise _missing("partition_parameters.top_level_context")
    return partition_parameters.top_level_context is not None


def module_classes() -> Iterator[type]:
    """Every ``nn.Module`` subclass, as ``zero.Init`` walks them."""
    yield from partition_parameters.get_all_subclasses(nn.Module)


ORIGINAL_INIT = "_old_init"  # where zero.Init keeps a class's own __init__ while it wraps it


# -- DeepSpeed's kernel containers (kernels.py) ------------------------------------------------
def policy_layer_classes(policy: type) -> list[type]:
    """The transformers layer classes a DeepSpeed injection policy replaces (read from the installed transformers)."""
    policy(None)  # an instance made with None learns its layer class, as populate_all_inference_policies does
    if not hasattr(policy, "_orig_layer_class"):
        raise _missing(f"{policy.__name__}._orig_layer_class")
    layers = policy._orig_layer_class
    return [layer for layer in (layers if isinstance(layers, list) else [layers]) if layer is not None]


def reset_kernel_class_state() -> None:
    """Starts DeepSpeed's per-class kernel state afresh, for a new kernel path.

    DeepSpeed keeps it per class, not per model: layer counters (the attention's overwrites the layer's id, and
    tells the kernels which layer is last, where the token position advances), the workspace op (its dtype) and
    the buffers split Q/K/V and gate/up are merged into. All of it is set by the first kernel layer a process
    builds, so a second path (validate after fit, another dtype) would run with the first one's: layer 0 never
    sizing the workspace, positions never advancing, fp16 weights cast into an fp32 buffer.
    """
    from deepspeed.model_implementations.transformers.ds_transformer import DeepSpeedTransformerInference
    from deepspeed.ops.transformer.inference.ds_attention import DeepSpeedSelfAttention
    from deepspeed.ops.transformer.inference.ds_mlp import DeepSpeedMLP

    DeepSpeedTransformerInference.layer_id = 0
    DeepSpeedTransformerInference.workspace = None
    DeepSpeedSelfAttention.num_layers = 0
    DeepSpeedSelfAttention._qkv_buffers = []
    DeepSpeedMLP._inter_w_buffers = []


def kernel_workspace():
    """DeepSpeed's global inference workspace (the kernels' KV cache), as the kernel layers hold it."""
    from deepspeed.model_implementations.transformers.ds_transformer import DeepSpeedTransformerInference

    return DeepSpeedTransformerInference.workspace


def arm_workspace(kernel_module: nn.Module) -> None:
    """Makes a kernel layer's next forward (re)allocate DeepSpeed's workspace for the batch it sees."""
    if not hasattr(kernel_module, "_should_allocate_workspace"):
        raise _missing("DeepSpeedTransformerInference._should_allocate_workspace")
    kernel_module._should_allocate_workspace = True


class GatherCounter:
    """Counts the bytes of ``params`` that ZeRO-3 all-gathers, whoever asks: its own fetches before each
    forward and backward of a module (``all_gather_coalesced``), ``GatheredParameters`` (``all_gather``).

    Each ZeRO-3 parameter carries both as instance attributes (set in ``zero.Init``'s
    ``_convert_to_deepspeed_param``); they are wrapped in place. What counts is what is partitioned at the
    call, i.e. what the call will fetch (on one rank too, where the "gather" is a local copy).
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = [p for p in params if hasattr(p, "ds_id")]
        self.actor_bytes = sum(p.ds_numel * p.element_size() for p in self.params)
        self.bytes = 0
        for param in self.params:
            for name in ("all_gather", "all_gather_coalesced"):
                gather = getattr(param, name, None)
                if not callable(gather):
                    raise _missing(f"ZeRO-3 parameter method `{name}`")
                setattr(
                    param,
                    name,
                    self._counting(param, gather, first_name="param_list" if name == "all_gather" else "params"),
                )

    def _counting(self, param: torch.Tensor, gather, first_name: str):
        not_available = partition_parameters.ZeroParamStatus.NOT_AVAILABLE

        def counted(*args, **kwargs):
            args, params = list(args), (args[0] if args else kwargs.get(first_name))
            params = [param] if params is None else list(params)  # all_gather() alone gathers its own param
            if args:
                args[0] = params
            elif first_name in kwargs:
                kwargs[first_name] = params
            self.bytes += sum(p.ds_numel * p.element_size() for p in params if p.ds_status == not_available)
            return gather(*args, **kwargs)

        return counted
