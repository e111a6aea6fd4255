"""``HybridEngineStrategy`` for the Trainer: Lightning's ``DeepSpeedStrategy`` with DeepSpeed's Hybrid Engine.

One set of actor weights trains under ZeRO and generates inside ``training_step``::

    with self.trainer.strategy.generation() as actor:
        out = actor.generate(input_ids, attention_mask=mask, max_new_tokens=64)

Everything but the Trainer glue is in ``strategy_core.py`` (shared with Fabric's strategy in
``fabric.py``). Here, in Lightning's lifecycle order: launcher, environment and distributed
set-up (CPU), engine construction (Lightning's two ``deepspeed.initialize`` calls), the
generation preconditions and metrics of a fit, and checkpoints.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import deepspeed
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from lightning.pytorch.strategies.deepspeed import remove_module_hooks
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from torch import nn
from typing_extensions import override

from .engine import HybridEngine
from .metrics import GenerationMetricsLogger, GenerationStats, StepTimes
from .strategy_core import HybridEngineCore, use_plain_gloo
from .training_tp import check_autotp_model, data_parallel_rank_and_size, zero_init_kwargs
from .zero_init import keep_class_decorators


class HybridEngineStrategy(HybridEngineCore, DeepSpeedStrategy):
    __doc__ = HybridEngineCore.__doc__

    _not_built_message = (
        "The hybrid engine does not exist yet: `strategy.generation()` works inside a running"
        " `trainer.fit()` (or validate/test/predict), e.g. in `training_step`."
    )

    @functools.cached_property
    def _step_times(self) -> StepTimes:  # this training step's generation contexts, for GenerationMetricsLogger
        return StepTimes()

    # -- launcher and environment --------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        self._check_before_launch()  # the earliest point where it is known, and still before any process
        super()._configure_launcher()

    @override
    def connect(self, model) -> None:
        # Before any process exists: a model AutoTP cannot slice evenly fails here (or, built in
        # configure_model, in setup()).
        if self.settings.training_tp_size > 1 and any(getattr(m, "config", None) is not None for m in model.modules()):
            check_autotp_model(model, self.settings.training_tp_size)
        super().connect(model)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        # The ranks of a tensor-parallel group compute one batch together: shard by data-parallel rank.
        rank, size = data_parallel_rank_and_size(
            self.global_rank, self.world_size, self.settings.training_tp_size, self.mpu
        )
        return {"num_replicas": size, "rank": rank}

    @override
    def setup_environment(self) -> None:
        if self._on_cuda:
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy refuses anything but CUDA

    @override
    def setup_distributed(self) -> None:
        if self._on_cuda:
            return super().setup_distributed()
        # DeepSpeedStrategy's version checks device indices, which CPU devices do not have.
        use_plain_gloo()
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    # -- engine construction -------------------------------------------------------------
    @override
    def setup(self, trainer) -> None:
        assert self.model is not None
        if self.settings.training_tp_size > 1:
            check_autotp_model(self.model, self.settings.training_tp_size)
        self._prepare_generation(self.model)
        if not any(isinstance(c, GenerationMetricsLogger) for c in trainer.callbacks):
            trainer.callbacks.append(GenerationMetricsLogger(self._step_times))
        super().setup(trainer)

    @contextmanager
    @override
    def model_sharded_context(self) -> Iterator[None]:
        # Lightning's, plus the user's mpu: ZeRO-3 then partitions over the data-parallel group; and the
        # decorators of model classes first imported inside it kept (zero_init.py).
        self._init_config_if_needed()
        with keep_class_decorators(
            deepspeed.zero.Init(
                enabled=self.zero_stage_3,
                remote_device=self.remote_device,
                config_dict_or_path=self.config,
                **zero_init_kwargs(self.mpu),
            )
        ):
            yield

    @override
    def _setup_model_and_optimizer(self, model: nn.Module, optimizer, lr_scheduler=None):
        with self._building_hybrid_engine():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    @override
    def _initialize_deepspeed_inference(self, model: nn.Module) -> None:
        # Lightning rebuilds the engine for validate()/predict() from a config reduced to
        # precision and ZeRO keys, dropping the hybrid engine. Keep it.
        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1, "hybrid_engine": self.config["hybrid_engine"]}
        for key in ("fp16", "bf16", "zero_optimization", "zero_allow_untested_optimizer", "tensor_parallel"):
            if key in self.config:
                config[key] = self.config[key]
        remove_module_hooks(model)
        with self._building_hybrid_engine():
            engine, _, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.root_device.index),
                config=config,
                model=model,
                optimizer=None,
                lr_scheduler=None,
                model_parameters=[],
                dist_init_required=False,
            )
        self.model = engine

    # -- generation: inside a running trainer, metrics per training step ---------------------
    def _check_generation_allowed(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.status != TrainerStatus.RUNNING:
            raise RuntimeError(
                "`strategy.generation()` was entered outside a running trainer: use it inside a LightningModule"
                " hook during `trainer.fit()` (e.g. `training_step`)."
            )

    def _record_generation(self, stats: GenerationStats, seconds: float) -> None:
        trainer = self.lightning_module.trainer
        if trainer.state.fn == TrainerFn.FITTING and trainer.training:  # GenerationMetricsLogger logs the step
            self._step_times.generation_s += seconds
            self._step_times.contexts.append(stats)

    @override
    def on_exception(self, exception: BaseException) -> None:
        if isinstance(self.model, HybridEngine):
            self.model.release_held()  # a step that failed between its generation and its backward
        super().on_exception(exception)

    # -- checkpoints ---------------------------------------------------------------------
    @override
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        self._refuse_inside_generation("A checkpoint")
        super().save_checkpoint({**checkpoint, **self._engine_checkpoint_state()}, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        self._restore_engine_checkpoint_state(checkpoint.get("hybrid_engine"))
        return checkpoint


HybridEngineStrategy.register_strategies(StrategyRegistry)
