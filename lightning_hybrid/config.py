"""The ``hybrid_engine`` block of a DeepSpeed config: validation and merging.

Everything here runs in the strategy's constructor, before any process group or engine
exists, so a bad setting fails in the first second of a job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from deepspeed.runtime.config import HybridEngineConfig

InferenceBackend = Literal["auto", "deepspeed", "torch"]
INFERENCE_BACKENDS = ("auto", "deepspeed", "torch")
KVCache = Literal["dynamic", "static"]
KV_CACHES = ("dynamic", "static")

# Every key DeepSpeed's HybridEngineConfig accepts (it forbids unknown ones).
KNOWN_KEYS = tuple(HybridEngineConfig.model_fields)
# DeepSpeed's own defaults, read from DeepSpeed so they never drift.
DEEPSPEED_DEFAULTS = {name: field.default for name, field in HybridEngineConfig.model_fields.items()}


@dataclass(frozen=True)
class HybridEngineSettings:
    """The hybrid engine fields this project honours (DeepSpeed's names and defaults)."""

    max_out_tokens: int = 512
    inference_tp_size: int = 1
    release_inference_cache: bool = False
    pin_parameters: bool = True
    tp_gather_partition_size: int = 8

    def __post_init__(self) -> None:
        for name in ("max_out_tokens", "inference_tp_size", "tp_gather_partition_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__}).")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}. Set `{name}=1` or larger.")
        for name in ("release_inference_cache", "pin_parameters"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__}).")

    def as_block(self) -> dict[str, Any]:
        return {"enabled": True, **asdict(self)}


def merge_hybrid_block(config: dict[str, Any], settings: HybridEngineSettings) -> HybridEngineSettings:
    """Write ``settings`` into ``config["hybrid_engine"]``, reconciling a block the user wrote.

    A value in the user's block wins over a constructor argument left at DeepSpeed's default;
    a constructor argument set to anything else must agree with the block. Returns the
    settings actually in force.
    """
    user_block = config.get("hybrid_engine")
    if user_block is None:
        config["hybrid_engine"] = settings.as_block()
        return settings
    if not isinstance(user_block, dict):
        raise TypeError(f"The DeepSpeed config's `hybrid_engine` must be a dict, got {type(user_block).__name__}.")

    unknown = sorted(set(user_block) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in the DeepSpeed config's `hybrid_engine` block. DeepSpeed accepts only"
            f" {list(KNOWN_KEYS)}: remove or rename them."
        )
    if user_block.get("enabled", True) is not True:
        raise ValueError(
            "The DeepSpeed config sets `hybrid_engine.enabled` to"
            f" {user_block['enabled']!r}; HybridEngineStrategy needs it true. Remove the key, or use Lightning's"
            " `DeepSpeedStrategy` to train without a hybrid engine."
        )
    if user_block.get("enable_cuda_graph", False):
        raise ValueError(
            "`hybrid_engine.enable_cuda_graph=true` is not supported by HybridEngineStrategy: DeepSpeed captures"
            " graphs only for its kernel containers and only without ZeRO-3. Remove the key."
        )

    merged = {}
    for name, ours in asdict(settings).items():
        if name not in user_block:
            merged[name] = ours
            continue
        theirs = user_block[name]
        if ours != DEEPSPEED_DEFAULTS[name] and theirs != ours:
            raise ValueError(
                f"`{name}` disagrees: HybridEngineStrategy({name}={ours!r}) but the DeepSpeed config's"
                f" `hybrid_engine.{name}` is {theirs!r}. Set one of them, or make them equal."
            )
        merged[name] = theirs
    in_force = HybridEngineSettings(**merged)
    config["hybrid_engine"] = in_force.as_block()
    return in_force


def zero_stage(config: dict[str, Any]) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))
