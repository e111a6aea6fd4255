"""``HybridEngineStrategy`` for Fabric: Lightning Fabric's ``DeepSpeedStrategy`` with DeepSpeed's Hybrid Engine.

The same strategy as the Trainer's (``lightning_hybrid.HybridEngineStrategy``), for hand-written loops::

    fabric = Fabric(strategy=HybridEngineStrategy(stage=3), accelerator="cpu", devices=2)
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)
    with fabric.strategy.generation() as actor:
        out = actor.generate(input_ids, attention_mask=mask, max_new_tokens=64)

It mirrors ``lightning.fabric.strategies.DeepSpeedStrategy`` as ``lightning_hybrid.HybridEngineStrategy``
mirrors ``lightning.pytorch.strategies.DeepSpeedStrategy``. Everything but the Fabric glue is in
``strategy_core.py``. Here, in Fabric's lifecycle order: launcher, environment and distributed
set-up (CPU), engine construction (``fabric.setup``), where metrics go, and checkpoints
(``fabric.save`` / ``fabric.load``).

What differs from the Trainer: there is no LightningModule, so the generation module is found in the
module given to ``fabric.setup``; the context yields that module itself, not the ``_FabricModule``
wrapper (which refuses calls to submodules outside ``forward``); and metrics go to ``fabric.log_dict``
when the Fabric has loggers (and are always on ``generation_stats``).
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import AbstractContextManager
from typing import Any

from lightning.fabric import Fabric
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy, DeepSpeedStrategy
from lightning.fabric.utilities.seed import reset_seed
from torch import nn
from typing_extensions import override

from .metrics import GenerationStats
from .strategy_core import CHECKPOINT_KEY, HybridEngineCore, use_plain_gloo
from .zero_init import keep_class_decorators

__all__ = ["HybridEngineStrategy"]


class HybridEngineStrategy(HybridEngineCore, DeepSpeedStrategy):
    __doc__ = HybridEngineCore.__doc__

    _not_built_message = (
        "The hybrid engine does not exist yet: call `model, optimizer = fabric.setup(model, optimizer)` before"
        " `fabric.strategy.generation()`."
    )

    # -- launcher and environment --------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        if self.mpu is not None or self.settings.training_tp_size > 1:  # at Fabric(...), before any process
            raise ValueError(
                "`training_tp_size > 1` and `mpu` are not supported by the Fabric strategy yet (untested under"
                " Fabric). Use the Trainer's lightning_hybrid.HybridEngineStrategy for tensor-parallel training."
            )
        self._check_before_launch()  # the earliest point where it is known, and still before any process
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        if self._on_cuda:
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy refuses anything but CUDA; this runs _setup_distributed

    @override
    def _setup_distributed(self) -> None:
        if self._on_cuda:
            return super()._setup_distributed()
        # DeepSpeedStrategy's version checks device indices, which CPU devices do not have.
        use_plain_gloo()
        reset_seed()
        self._set_world_ranks()
        self._init_deepspeed_distributed()
        if not self._config_initialized:
            self._format_config()
            self._config_initialized = True

    # -- engine construction: fabric.init_module(), fabric.setup(model, optimizer) -----------
    @override
    def module_sharded_context(self) -> AbstractContextManager:
        # Lightning's zero.Init, keeping the decorators of model classes first imported inside it (zero_init.py).
        return keep_class_decorators(super().module_sharded_context())

    @override
    def setup_module_and_optimizers(self, module: nn.Module, optimizers: list, scheduler: Any = None):
        self._fabric = _calling_fabric(self)
        return super().setup_module_and_optimizers(module, optimizers, scheduler)

    @override
    def setup_module(self, module: nn.Module):
        self._fabric = _calling_fabric(self)
        return super().setup_module(module)

    @override
    def _initialize_engine(self, model: nn.Module, optimizer=None, scheduler=None):
        self._prepare_generation(model)
        with self._building_hybrid_engine():
            return super()._initialize_engine(model, optimizer, scheduler)

    # -- generation: metrics per context, to the Fabric's loggers ----------------------------
    def _record_generation(self, stats: GenerationStats, seconds: float) -> None:
        fabric = self._fabric() if getattr(self, "_fabric", None) is not None else None  # a weak reference
        if fabric is not None and fabric.loggers:
            fabric.log_dict({f"hybrid_engine/{k}": float(v) for k, v in stats.as_dict().items()})

    # -- checkpoints: fabric.save / fabric.load ----------------------------------------------
    @override
    def save_checkpoint(self, path, state: dict[str, Any], storage_options: Any = None, filter: Any = None) -> None:
        self._refuse_inside_generation("fabric.save()")
        state = {**state, **self._engine_checkpoint_state()}
        super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)

    @override
    def load_checkpoint(self, path, state: Any = None, strict: bool = True, weights_only: bool | None = None):
        self._refuse_inside_generation("fabric.load()")
        remainder = super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)
        self._restore_engine_checkpoint_state(remainder.pop(CHECKPOINT_KEY, None))
        return remainder


def _calling_fabric(strategy: HybridEngineStrategy) -> weakref.ref | None:
    """The Fabric whose ``setup`` is running: Fabric gives its strategy no reference to itself."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Fabric) and owner.strategy is strategy:
            return weakref.ref(owner)
        frame = frame.f_back
    return None


HybridEngineStrategy.register_strategies(STRATEGY_REGISTRY)
