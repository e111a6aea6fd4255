"""Every setting of the strategy, in one frozen object, validated once.

``HybridEngineSettings.resolve`` runs in the strategy's constructor, before any process group or
engine exists, so a bad setting fails in the first second of a job. It merges the constructor's
arguments with the user's ``hybrid_engine`` block of the DeepSpeed config, checks each field and
the fields against each other, and writes DeepSpeed's fields back into the config. The strategy,
the engine and the generation context then read this one object; no other copy exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from deepspeed.runtime.config import HybridEngineConfig

InferenceBackend = Literal["auto", "deepspeed", "torch"]
INFERENCE_BACKENDS = ("auto", "deepspeed", "torch")
KVCache = Literal["dynamic", "static"]
KV_CACHES = ("dynamic", "static")
Sampler = Literal["inverse_cdf", "torch"]
SAMPLERS = ("inverse_cdf", "torch")

# Every key DeepSpeed's HybridEngineConfig accepts (it forbids unknown ones), and its own defaults,
# read from DeepSpeed so they never drift.
KNOWN_KEYS = tuple(HybridEngineConfig.model_fields)
DEEPSPEED_DEFAULTS = {name: field.default for name, field in HybridEngineConfig.model_fields.items()}
DEEPSPEED_FIELDS = (
    "max_out_tokens",
    "inference_tp_size",
    "release_inference_cache",
    "pin_parameters",
    "tp_gather_partition_size",
)


@dataclass(frozen=True)
class HybridEngineSettings:
    """The settings in force. See ``HybridEngineCore`` for what each one does.

    The first five are DeepSpeed's ``hybrid_engine`` fields (its names and defaults); ``zero_stage``
    and ``training_tp_size`` are read from the rest of the DeepSpeed config, for the checks across fields.
    """

    max_out_tokens: int = DEEPSPEED_DEFAULTS["max_out_tokens"]
    inference_tp_size: int = DEEPSPEED_DEFAULTS["inference_tp_size"]
    release_inference_cache: bool = DEEPSPEED_DEFAULTS["release_inference_cache"]
    pin_parameters: bool = DEEPSPEED_DEFAULTS["pin_parameters"]
    tp_gather_partition_size: int = DEEPSPEED_DEFAULTS["tp_gather_partition_size"]
    generation_module: str | None = None
    inference_backend: InferenceBackend = "auto"
    kernel_check_interval: int = 100
    cache_frozen_weights: bool = False
    gather_once_per_step: bool = False
    kv_cache: KVCache = "dynamic"
    share_prompt_prefill: bool = True
    sampler: Sampler = "inverse_cdf"
    zero3_leaf_modules: str | tuple[str, ...] | None = None
    oom_split_min_batch: int = 1
    zero_stage: int = 3
    training_tp_size: int = 1

    def __post_init__(self) -> None:
        self._check_fields()
        self._check_combinations()

    def _check_fields(self) -> None:
        for name in ("max_out_tokens", "inference_tp_size", "tp_gather_partition_size", "oom_split_min_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__}).")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}. Set `{name}=1` or larger.")
        for name in (
            "release_inference_cache",
            "pin_parameters",
            "cache_frozen_weights",
            "gather_once_per_step",
            "share_prompt_prefill",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__}).")
        if self.inference_backend not in INFERENCE_BACKENDS:
            raise ValueError(
                f"`inference_backend` must be one of {INFERENCE_BACKENDS}, got {self.inference_backend!r}."
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {self.sampler!r}.")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"`kv_cache` must be one of {KV_CACHES}, got {self.kv_cache!r}.")
        if self.generation_module is not None and (
            not isinstance(self.generation_module, str) or not self.generation_module
        ):
            raise TypeError(
                f"`generation_module` must be a dotted attribute path or None, got {self.generation_module!r}."
            )
        interval = self.kernel_check_interval
        if isinstance(interval, bool) or not isinstance(interval, int):
            raise TypeError(f"`kernel_check_interval` must be an int, got {interval!r}.")
        if interval < 0:
            raise ValueError(f"`kernel_check_interval` must be >= 0 (0 never checks the kernels), got {interval}.")
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"`stage` must be 1, 2 or 3, got {self.zero_stage!r}.")
        leaves = self.zero3_leaf_modules
        if leaves is not None:
            names_ok = isinstance(leaves, tuple) and leaves and all(isinstance(n, str) and n for n in leaves)
            if leaves != "auto" and not names_ok:
                raise ValueError(
                    f"`zero3_leaf_modules` must be 'auto', a list of module class names or None, got {leaves!r}."
                )

    def _check_combinations(self) -> None:
        tp = self.inference_tp_size
        if self.reslices_for_inference and self.zero_stage != 3:
            raise ValueError(
                f"`inference_tp_size={tp}` needs ZeRO stage 3 (as in DeepSpeed-Chat), but the stage is"
                f" {self.zero_stage}. Use stage=3 or inference_tp_size=1."
            )
        if self.reslices_for_inference and (self.cache_frozen_weights or self.inference_backend == "deepspeed"):
            raise ValueError(
                f"`inference_tp_size={tp}` slices the actor afresh in every generation context on the portable"
                " path: it cannot be combined with cache_frozen_weights=True or inference_backend='deepspeed'."
            )
        if self.training_tp_size > 1 and tp not in (1, self.training_tp_size):
            raise ValueError(
                f"`inference_tp_size={tp}` conflicts with training_tp_size={self.training_tp_size}: a"
                " tensor-parallel actor generates with its training layout. Use inference_tp_size=1 or"
                f" inference_tp_size={self.training_tp_size}."
            )
        if self.cache_frozen_weights and (self.zero_stage != 3 or not self.pin_parameters):
            raise ValueError(
                "`cache_frozen_weights=True` keeps ZeRO-3 gathered weights between generations, so it needs stage=3"
                f" and pin_parameters=True (got stage={self.zero_stage}, pin_parameters={self.pin_parameters})."
            )
        if self.gather_once_per_step and (
            self.zero_stage != 3 or not self.pin_parameters or self.reslices_for_inference
        ):
            raise ValueError(
                "`gather_once_per_step=True` keeps the actor ZeRO-3 gathered from generation through the backward, so"
                f" it needs stage=3, pin_parameters=True and inference_tp_size=1 (got stage={self.zero_stage},"
                f" pin_parameters={self.pin_parameters}, inference_tp_size={self.inference_tp_size})."
            )
        if self.zero3_leaf_modules is not None and self.zero_stage != 3:
            raise ValueError(
                "`zero3_leaf_modules` applies to ZeRO stage 3 only (it changes how ZeRO-3 fetches weights), but"
                f" the stage is {self.zero_stage}. Remove it, or use stage=3."
            )

    @property
    def reslices_for_inference(self) -> bool:
        """Generation slices the actor afresh across ``inference_tp_size`` ranks (an actor trained
        tensor-parallel already is sliced, in the same layout)."""
        return self.inference_tp_size > 1 and self.training_tp_size == 1

    @property
    def hybrid_block(self) -> dict[str, Any]:
        """DeepSpeed's ``hybrid_engine`` config block for these settings."""
        block = {name: getattr(self, name) for name in DEEPSPEED_FIELDS}
        if not self.reslices_for_inference:
            block["inference_tp_size"] = 1  # a tensor-parallel actor: nothing for DeepSpeed to slice
        return {"enabled": True, **block}

    @classmethod
    def resolve(cls, config: dict[str, Any], **arguments: Any) -> HybridEngineSettings:
        """The settings in force: the constructor's ``arguments`` merged with the config's ``hybrid_engine``
        block, which is then rewritten with them (``config`` is edited in place).

        A value in the user's block wins over a constructor argument left at DeepSpeed's default; a
        constructor argument set to anything else must agree with the block.
        """
        if isinstance(arguments.get("zero3_leaf_modules"), list):
            arguments["zero3_leaf_modules"] = tuple(arguments["zero3_leaf_modules"])
        arguments.update(_user_block(config.get("hybrid_engine"), arguments))
        settings = cls(**arguments)
        config["hybrid_engine"] = settings.hybrid_block
        return settings


def _user_block(block: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed fields the user's ``hybrid_engine`` block sets, checked against the ``arguments``."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise TypeError(f"The DeepSpeed config's `hybrid_engine` must be a dict, got {type(block).__name__}.")
    unknown = sorted(set(block) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in the DeepSpeed config's `hybrid_engine` block. DeepSpeed accepts only"
            f" {list(KNOWN_KEYS)}: remove or rename them."
        )
    if block.get("enabled", True) is not True:
        raise ValueError(
            f"The DeepSpeed config sets `hybrid_engine.enabled` to {block['enabled']!r}; HybridEngineStrategy needs"
            " it true. Remove the key, or use Lightning's `DeepSpeedStrategy` to train without a hybrid engine."
        )
    if block.get("enable_cuda_graph", False):
        raise ValueError(
            "`hybrid_engine.enable_cuda_graph=true` is not supported by HybridEngineStrategy: DeepSpeed captures"
            " graphs only for its kernel containers and only without ZeRO-3. Remove the key."
        )
    merged = {}
    for name in DEEPSPEED_FIELDS:
        if name not in block:
            continue
        ours, theirs = arguments.get(name, DEEPSPEED_DEFAULTS[name]), block[name]
        if ours != DEEPSPEED_DEFAULTS[name] and theirs != ours:
            raise ValueError(
                f"`{name}` disagrees: HybridEngineStrategy({name}={ours!r}) but the DeepSpeed config's"
                f" `hybrid_engine.{name}` is {theirs!r}. Set one of them, or make them equal."
            )
        merged[name] = theirs
    return merged


def zero_stage(config: dict[str, Any]) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))
