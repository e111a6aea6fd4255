"""DeepSpeed's kernel inference containers for the generation module, and the guard that checks them.

Three parts, in the order a run meets them:

* ``select_backend``: which inference path a run gets, and why. The portable path ("torch")
  works everywhere. DeepSpeed's fused CUDA kernels ("deepspeed") only exist on CUDA, only for
  layers DeepSpeed has a hybrid-engine policy for (read from DeepSpeed's own policy list), and
  are refused up front where they cannot work: every layer that takes a transformers ``Cache``
  object (all of transformers 5), with what a GPU run saw (``CACHE_EVIDENCE``). ``"auto"`` picks the
  kernels only for architectures listed in ``VERIFIED_KERNEL_POLICIES``, which stays empty
  until a GPU run has shown kernel generation matching the portable path.
* ``KernelPath``: the containers, built for the generation module only (never the reference
  or reward models next to it), switched on around one ``generate`` call. CUDA only.
* ``ParityGuard`` and ``KernelRouting``: the first kernel generation, and every N-th after it,
  is compared with the portable path on a small probe; a mismatch falls back ("auto") or
  raises ("deepspeed") with the numbers.
"""

from __future__ import annotations

import gc
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .deepspeed_compat import arm_workspace, kernel_workspace, policy_layer_classes, reset_kernel_class_state
from .hf import base_model
from .lora import is_peft_lora, peft_fusable

KERNEL_BACKEND = "deepspeed"
PORTABLE_BACKEND = "torch"

# DeepSpeed policies whose container can serve the hybrid engine (a ``HybridEngineContainer``:
# training and inference views of the same weights). DeepSpeed's docs list exactly these; its
# other policies (GPT-2, BERT, CLIP, DistilBERT, Megatron) are inference-only containers.
HYBRID_ENGINE_POLICIES = frozenset(
    {
        "HFOPTLayerPolicy",
        "BLOOMLayerPolicy",
        "HFGPTJLayerPolicy",
        "HFGPTNEOLayerPolicy",
        "GPTNEOXLayerPolicy",
        "LLAMALayerPolicy",
        "LLAMA2LayerPolicy",
        "InternLMLayerPolicy",
    }
)

# Policies "auto" may pick: only after a GPU run of tests/cuda/run.sh showed kernel generation
# matching the portable path on this stack. None has been run yet.
VERIFIED_KERNEL_POLICIES: frozenset[str] = frozenset()

# Names a transformers decoder layer takes its KV cache by, the Cache-object names first. ``layer_past``
# is GPT-Neo's: a transformers Cache since 4.45, a tuple of tensors before, so a name alone does not
# decide it (``cache_argument`` also asks whether the layer's module uses the Cache class).
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_position")


@dataclass(frozen=True)
class CacheEvidence:
    """What was seen when a DeepSpeed policy's kernels ran a transformers layer that takes a Cache object."""

    policy: str
    seen: str
    source: str


# Evidence quoted in the refusal: the refusal itself covers every policy whose layer takes a Cache.
CACHE_EVIDENCE = (
    CacheEvidence(
        "LLAMALayerPolicy",
        "generation repeats tokens or turns to gibberish; on an H200 (DeepSpeed 0.19.8, transformers 5.17) the"
        " kernels failed with 'The expanded size of the tensor (64) must match the existing size (32)'",
        "DeepSpeed issues 6522, 5388 and 4788",
    ),
    CacheEvidence(
        "HFOPTLayerPolicy",
        "on an H200 (DeepSpeed 0.19.8, transformers 5.17) the kernels failed with \"'tuple' object has no attribute"
        " 'size'\"; DeepSpeed's own check skips layers taking `cache_position`/`past_key_values` but misses the newer"
        " `cache` name",
        "DeepSpeed runtime/hybrid_engine.py, populate_all_inference_policies",
    ),
    CacheEvidence(
        "HFGPTJLayerPolicy",
        "on an H200 (DeepSpeed 0.19.8, transformers 5.17) fp32 logits differed by 0.075 from the second new token",
        "tests/cuda/run.sh",
    ),
    CacheEvidence(
        "HFGPTNEOLayerPolicy",
        "on an H200 (DeepSpeed 0.19.8, transformers 5.17) fp32 generation failed in DeepSpeed's softmax_context with"
        " 'The specified pointer resides on host memory'",
        "tests/cuda/run.sh",
    ),
)


class KernelRefused(ValueError):
    """``inference_backend="deepspeed"`` asked for kernels that cannot serve this model."""


def architecture(module: nn.Module) -> str:
    config = getattr(base_model(module), "config", None)
    return getattr(config, "model_type", None) or type(base_model(module)).__name__


def deepspeed_layer_policies() -> dict[type, type]:
    """Decoder layer class -> DeepSpeed policy class, as DeepSpeed's hybrid engine builds the table.

    Each policy learns its layer class from the installed transformers when instantiated with
    ``None`` (what ``populate_all_inference_policies`` does).
    """
    from deepspeed.module_inject.replace_policy import replace_policies

    return {layer: policy for policy in replace_policies for layer in policy_layer_classes(policy)}


def policy_layers(module: nn.Module) -> list[tuple[nn.Module, type]]:
    """The decoder layers of ``module`` DeepSpeed has a policy for, in order, with their policy."""
    table = deepspeed_layer_policies()
    found: list[tuple[nn.Module, type]] = []
    for sub in module.modules():
        policy = table.get(type(sub))
        if policy is not None:
            found.append((sub, policy))
    return found


def cache_argument(layer_class: type) -> str | None:
    """The argument by which ``layer_class.forward`` takes a transformers ``Cache`` object (None: it takes none)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # transformers before the Cache API: tuples only
        return None
    parameters = inspect.signature(layer_class.forward).parameters
    namespace = vars(sys.modules[layer_class.__module__]).values()
    module_uses_cache = any(isinstance(value, type) and issubclass(value, Cache) for value in namespace)
    for name in _CACHE_ARGUMENTS:
        parameter = parameters.get(name)
        if parameter is None:
            continue
        if name == "cache_position" or "Cache" in str(parameter.annotation) or module_uses_cache:
            return name
    return None


def kernel_refusal(module: nn.Module) -> str | None:
    """Why DeepSpeed's kernels cannot serve ``module`` (None: nothing known against them)."""
    arch = architecture(module)
    layers = policy_layers(module)
    if not layers:
        return (
            f"DeepSpeed has no inference policy for {arch!r} ({type(base_model(module)).__name__}); its hybrid"
            " engine would silently fall back to plain generate (DeepSpeed issue 4954). Its kernels cover OPT,"
            " BLOOM, GPT-J, GPT-Neo, GPT-NeoX, Llama and InternLM"
        )
    layer, policy = layers[0]
    if policy.__name__ not in HYBRID_ENGINE_POLICIES:
        return (
            f"DeepSpeed's policy for {arch!r} ({policy.__name__}) is inference-only: it has no hybrid-engine container"
            " sharing weights with training"
        )
    try:
        describe_layer(layer, policy, layer_id=0, max_out_tokens=64, model_config=base_model(module).config)
    except Exception as error:  # DeepSpeed's policy reads attributes this transformers layer no longer has
        import transformers

        return (
            f"DeepSpeed's {policy.__name__} cannot read transformers {transformers.__version__}'s"
            f" {type(layer).__name__}: {type(error).__name__}: {error}"
        )
    unfusable = sorted({type(m).__name__ for m in module.modules() if is_peft_lora(m) and not peft_fusable(m)})
    if unfusable:
        return (
            f"LoRA layers {unfusable} use a variant (DoRA, lora_bias, ...) that cannot be fused into the weights the"
            " kernels read, and the kernels bypass PEFT's adapter path"
        )
    argument = cache_argument(type(layer))
    if argument is not None:
        import transformers

        seen = "".join(f"; {e.seen} ({e.source})" for e in CACHE_EVIDENCE if e.policy == policy.__name__)
        return (
            f"transformers {transformers.__version__}'s {type(layer).__name__} ({arch!r}) takes its KV cache as a"
            f" transformers Cache object (argument `{argument}`), and DeepSpeed's kernel layers ({policy.__name__})"
            " implement only the legacy tuple-cache contract: they keep their own KV cache, never update the Cache,"
            f" and return an `(output, presents)` tuple (transformers 5's models pass a tensor on){seen}"
        )
    return None


def describe_layer(layer: nn.Module, policy_class: type, *, layer_id: int, max_out_tokens: int, model_config) -> Any:
    """DeepSpeed's container for ``layer`` with its tensors and config read, kernels not built yet.

    The steps of ``DeepSpeedHybridEngine.new_inference_container`` that are plain Python (no CUDA
    op), so they also run on CPU: where DeepSpeed's policy cannot read a transformers layer, it
    fails here.
    """
    from deepspeed.inference.config import DeepSpeedInferenceConfig
    from deepspeed.module_inject.utils import policy_to_ds_container

    container = policy_to_ds_container(
        policy=policy_class(layer, inference=True),
        config=DeepSpeedInferenceConfig(
            set_empty_params=True,
            dtype=next(layer.parameters()).dtype,
            max_out_tokens=max_out_tokens,
            min_out_tokens=max_out_tokens,
            transposed_mode=True,
        ),
        model_config=model_config,
        layer_id=layer_id,
        child=layer,
    )
    container.set_tensor_parallel_config(1, None)
    container.initialize_tensors(enable_training=True)
    container.create_ds_model_config()
    return container


def select_backend(requested: str, device: torch.device, module: nn.Module | None = None) -> tuple[str, str]:
    """The inference backend to build, and why; raises where ``requested`` cannot be honoured.

    ``module`` is the generation module; without it only the device is checked (the early
    check at ``Trainer(...)``, before the model is known).
    """
    if requested == PORTABLE_BACKEND:
        return PORTABLE_BACKEND, "inference_backend='torch' was asked for"
    if device.type != "cuda":
        if requested == KERNEL_BACKEND:
            raise ValueError(
                f"inference_backend='deepspeed' needs CUDA (DeepSpeed's inference kernels), but this run is on"
                f" {device.type!r}. Use inference_backend='auto' or 'torch' for the portable path."
            )
        return (
            PORTABLE_BACKEND,
            "inference_backend='auto' picked the portable path (on CPU: DeepSpeed's kernels need CUDA)",
        )
    if module is None:  # the early device check: the rest is decided at setup
        backend = KERNEL_BACKEND if requested == KERNEL_BACKEND else PORTABLE_BACKEND
        return backend, f"inference_backend={requested!r}: the generation module is not known yet"
    refusal = kernel_refusal(module)
    if requested == KERNEL_BACKEND:
        if refusal is not None:
            raise KernelRefused(
                f"inference_backend='deepspeed' refused: {refusal}. Use inference_backend='auto' or 'torch' for the"
                " portable path."
            )
        return KERNEL_BACKEND, (
            f"inference_backend='deepspeed' was asked for: DeepSpeed's kernel containers for {architecture(module)!r},"
            " not yet verified on this stack, so the parity guard checks them"
        )
    if refusal is not None:
        return PORTABLE_BACKEND, f"inference_backend='auto' picked the portable path: {refusal}"
    policy = policy_layers(module)[0][1].__name__
    if policy in VERIFIED_KERNEL_POLICIES:
        return KERNEL_BACKEND, f"inference_backend='auto' picked DeepSpeed's kernels (verified for {policy})"
    return PORTABLE_BACKEND, (
        f"inference_backend='auto' picked the portable path (no verified DeepSpeed kernel path for"
        f" {architecture(module)!r}; inference_backend='deepspeed' runs the unverified kernels under the parity guard)"
    )


# -- the kernel path (CUDA) --------------------------------------------------------------------


class GenerationPath(Protocol):
    """Something that, while active, makes the generation module generate a different way."""

    def active(self) -> Any: ...


class KernelPath:
    """DeepSpeed's inference containers for the generation module's decoder layers (CUDA only).

    Built like ``DeepSpeedHybridEngine.new_inference_container``, with two differences:

    * only the generation module is searched (DeepSpeed walks ``engine.module``, which under
      Lightning is the whole LightningModule, reference and reward models included);
    * every container is wired the way DeepSpeed wires them under ZeRO-3 (``Z3_enabled=True``),
      at any stage: the kernel modules hold the layers' own ``Parameter`` objects and merge
      Q/K/V and gate/up at every forward. The training weights are never re-pointed at a
      container buffer, so LoRA fused by ``lora.LoraFusion`` (which swaps ``.data``) is what the
      kernels read, and unfusing restores the weights bit for bit. DeepSpeed's own LoRA fusion
      (``container.fuse_lora``, in place, DeepSpeed-Chat LoRA only) is never called.

    Embeddings, final norm and head keep their PyTorch forward (DeepSpeed's auxiliary
    ``LinearLayer``/``EmbeddingLayer`` replacements only matter for tensor parallelism).
    """

    def __init__(
        self, module: nn.Module, *, max_out_tokens: int, release_inference_cache: bool, transform_per_forward: bool
    ) -> None:
        self.module = module
        self.release_inference_cache = release_inference_cache
        self.transform_per_forward = transform_per_forward
        model_config = base_model(module).config

        reset_kernel_class_state()  # one kernel path is in use at a time per process
        self.layers: list[tuple[nn.Module, Any]] = []
        for layer_id, (layer, policy_class) in enumerate(policy_layers(module)):
            container = describe_layer(
                layer, policy_class, layer_id=layer_id, max_out_tokens=max_out_tokens, model_config=model_config
            )
            container.create_module()
            container.set_params_wo_copy(Z3_enabled=True)
            self.layers.append((layer, container))
        if not self.layers:
            raise RuntimeError(f"No DeepSpeed kernel container could be built for {architecture(module)!r}.")
        self.workspace = kernel_workspace()
        self.kernel_modules = [container.module for _, container in self.layers]

    def _arm_workspace(self) -> None:
        """Let this call's first forward size DeepSpeed's workspace for the batch it really has.

        A kernel layer allocates the workspace on layer 0's first forward and then never again
        (``_should_allocate_workspace``), so a first call of 2 rows (the parity probe) would leave
        every larger later batch writing past it. DeepSpeed's own ``prepare_shared_prefill``
        re-allocates per call the same way; the allocation grows the buffer only when it must, and
        records the batch the kernels index the KV cache by. Armed rather than allocated here: the
        rows layer 0 sees include ``num_return_sequences`` and beams, which the prompt does not show.
        """
        for module in self.kernel_modules:
            arm_workspace(module)

    def _retake_workspace(self) -> None:
        # DeepSpeed's retake_inference_cache: only needed after a release.
        if not self.release_inference_cache or self.workspace.retake_workspace():
            return
        gc.collect()
        torch.cuda.empty_cache()
        if not self.workspace.retake_workspace():
            raise RuntimeError(
                "Could not take back DeepSpeed's inference workspace: lower max_out_tokens or the batch."
            )

    @contextmanager
    def active(self) -> Iterator[None]:
        """Decoder layers run DeepSpeed's kernels for the block, reading the weights as they are now.

        The weights must be gathered and LoRA fused already: for the whole block (pinned), or by a
        layer's forward pre-hook (``pin_parameters=False``), in which case the container's layout
        change (e.g. GPT-NeoX's per-head QKV) happens inside each forward, on the gathered weights.
        """
        self._retake_workspace()
        self._arm_workspace()
        switched: list[tuple[nn.Module, Any, Any]] = []  # (layer, container, its own forward or None)
        try:
            for layer, container in self.layers:
                switched.append((layer, container, layer.__dict__.get("forward")))
                if self.transform_per_forward:
                    layer.forward = _transforming(container)
                else:
                    container.transform_for_inference()
                    layer.forward = container.module.forward
                # Hooks live in __call__, not forward: ZeRO-3's and layer-wise gathering still fire.
            yield
        finally:
            for layer, container, own_forward in reversed(switched):
                if own_forward is not None:
                    layer.forward = own_forward
                else:
                    del layer.forward
                if not self.transform_per_forward:
                    container.transform_for_training()
            if self.release_inference_cache:
                self.workspace.release_workspace()
                gc.collect()
                torch.cuda.empty_cache()


def _transforming(container: Any) -> Callable[..., Any]:
    """The kernel forward, with the container's inference layout applied and undone around it."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        container.transform_for_inference()
        try:
            return container.module.forward(*args, **kwargs)
        finally:
            container.transform_for_training()

    return forward


# -- the parity guard --------------------------------------------------------------------------

# The probe compares log-probabilities (log-softmax of each step's logits): a shift common to a
# row's logits changes no sampling, so it is no difference. Allowed per row and step: PARITY_EPS
# times the dtype's epsilon times the row's largest |logit| (at least 1), since rounding errors
# scale with both (one bf16 step at logit 8 is 0.0625). Measured on CPU: bf16 and fp16 generation
# of SmolLM2-135M (30 layers) differs from fp32 by up to 2.4 of these units, tiny models by under
# 1; two implementations in one format can each be that far from exact, so 8 leaves a margin.
PARITY_EPS = 8.0
PROBE_ROWS = 2
PROBE_NEW_TOKENS = 4


def logprob_tolerance(dtype: torch.dtype, magnitude: float | torch.Tensor) -> float | torch.Tensor:
    """How far two computations in ``dtype`` may differ in log-probability where |logits| reach ``magnitude``."""
    if isinstance(magnitude, torch.Tensor):
        return PARITY_EPS * torch.finfo(dtype).eps * magnitude.clamp(min=1.0)
    return PARITY_EPS * torch.finfo(dtype).eps * max(magnitude, 1.0)


@dataclass(frozen=True)
class ParityReport:
    tokens_equal: bool
    first_mismatch: int | None  # index of the first new token that differs, over the probe rows
    max_logprob_diff: float  # at the row and step furthest over (or closest to) its tolerance
    tolerance: float  # that row and step's tolerance (``logprob_tolerance``)
    dtype: torch.dtype
    nonfinite: str | None = None  # which path gave NaN/inf logits, and at which new token

    @property
    def passed(self) -> bool:
        return self.tokens_equal and self.nonfinite is None and self.max_logprob_diff <= self.tolerance

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        numbers = f"max |log-prob diff| {self.max_logprob_diff:.3g} (tolerance {self.tolerance:.3g} for {dtype})"
        if self.nonfinite is not None:
            numbers = f"non-finite logits from the {self.nonfinite}: {numbers}"
        if self.first_mismatch is None:
            return f"{numbers}, greedy tokens equal"
        where = f"first differing new token at position {self.first_mismatch}"
        if self.nonfinite is None and self.max_logprob_diff <= self.tolerance:
            where += " (a near-tie: the log-probs agree within the tolerance, greedy picked differently)"
        return f"{numbers}, {where}"


def compare_paths(
    candidate: Callable[..., Any],
    reference: Callable[..., Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    dtype: torch.dtype,
    new_tokens: int = PROBE_NEW_TOKENS,
    **extra: Any,
) -> ParityReport:
    """Greedy generation of ``new_tokens`` through two paths (``generate``-like callables), compared.

    ``dtype``: the format both paths compute in, which sets the tolerance. ``reference`` is the
    trusted path: its logits set the magnitude the tolerance scales with.
    """
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        return_dict_in_generate=True,
        output_logits=True,
        **extra,
    )
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    got, want = candidate(**kwargs), reference(**kwargs)
    prompt = input_ids.shape[1]
    got_new, want_new = got.sequences[:, prompt:], want.sequences[:, prompt:]
    steps = min(got_new.shape[1], want_new.shape[1], len(got.logits), len(want.logits))
    differs = (got_new[:, :steps] != want_new[:, :steps]).any(dim=0).nonzero()
    first = int(differs[0]) if len(differs) else (None if got_new.shape == want_new.shape else steps)
    # Past the first differing token the two paths see different inputs: compare up to it.
    compared = steps if first is None else min(first + 1, steps)
    worst_diff, worst_tolerance, worst_ratio = 0.0, logprob_tolerance(dtype, 1.0), -1.0
    nonfinite = None
    for step in range(compared):
        got_logits, want_logits = got.logits[step].float(), want.logits[step].float()
        got_logprobs, want_logprobs = got_logits.log_softmax(-1), want_logits.log_softmax(-1)
        # Equal entries (a -inf both paths mask) are no difference; NaN anywhere in a row makes it NaN.
        diff = torch.where(got_logprobs == want_logprobs, 0.0, (got_logprobs - want_logprobs).abs()).amax(-1)
        magnitude = torch.where(want_logits.isfinite(), want_logits.abs(), 0.0).amax(-1)
        tolerance = logprob_tolerance(dtype, magnitude)
        if nonfinite is None and not diff.isfinite().all():
            # Python's max() would drop a NaN (NaN > x is False): name it instead of reporting 0.
            path = "candidate path" if not got_logits.isfinite().all() else "reference path"
            nonfinite = f"{path} at new token {step}"
            worst_diff, worst_tolerance, worst_ratio = float("inf"), float(tolerance.min()), float("inf")
        ratio = diff / tolerance
        row = int(torch.nan_to_num(ratio, nan=float("inf")).argmax())
        if nonfinite is None and float(ratio[row]) > worst_ratio:
            worst_diff, worst_tolerance, worst_ratio = float(diff[row]), float(tolerance[row]), float(ratio[row])
    return ParityReport(first is None, first, worst_diff, worst_tolerance, dtype, nonfinite)


class KernelParityError(RuntimeError):
    """The kernel path's generation differs from the portable path's beyond the tolerance."""


@dataclass
class ParityGuard:
    """Decides which kernel generations are checked: the first, then every ``interval``-th (0: never)."""

    interval: int
    generations: int = 0  # kernel generations seen so far

    def due(self) -> bool:
        due = self.interval > 0 and self.generations % self.interval == 0
        self.generations += 1
        return due


def _all_ranks_agree(passed: bool) -> bool:
    """Every rank must take the same path (ZeRO-3 ranks step together): pass only if all passed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return passed
    flags: list[bool | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, passed)
    return all(flags)


@dataclass
class KernelRouting:
    """Routes a generation context's ``generate`` calls through a kernel path, under the guard.

    ``on_mismatch``: "fallback" (``inference_backend="auto"``): warn once, use the portable path
    for the rest of the run; "raise" (``"deepspeed"``): a ``KernelParityError`` with the numbers.
    ``path`` is anything with an ``active()`` context manager (``KernelPath`` on CUDA).
    """

    path: GenerationPath
    guard: ParityGuard
    on_mismatch: str  # "fallback" or "raise"
    enabled: bool = True
    reports: list[ParityReport] = field(default_factory=list)

    def generate(self, generate: Callable[..., Any], kwargs: dict[str, Any], stats, dtype: torch.dtype) -> Any | None:
        """Generate through the kernels; None when the guard just switched this run to the portable path.

        ``generate`` is the model's own ``generate`` (the portable path when no kernel path is active).
        """
        if self.guard.due():
            report = self._check(generate, kwargs, dtype)
            stats.kernel_checks += 1
            self.reports.append(report)
            if not _all_ranks_agree(report.passed):
                if self.on_mismatch == "raise":
                    raise KernelParityError(
                        f"DeepSpeed's kernels disagree with the portable path on a probe of this generation:"
                        f" {report.describe()}. Use inference_backend='torch' (or 'auto'), or report it with these"
                        " numbers."
                    )
                self.enabled = False
                stats.kernel_fallbacks += 1
                warnings.warn(
                    f"DeepSpeed's kernels disagree with the portable path ({report.describe()}): this run generates"
                    " on the portable path from now on (metric hybrid_engine/kernel_fallbacks).",
                    stacklevel=4,
                )
                return None
        with self.path.active():
            return generate(**kwargs)

    def _check(self, generate: Callable[..., Any], kwargs: dict[str, Any], dtype: torch.dtype) -> ParityReport:
        ids = kwargs["input_ids"][:PROBE_ROWS]
        mask = kwargs.get("attention_mask")
        mask = mask[:PROBE_ROWS] if isinstance(mask, torch.Tensor) else None
        extra = {k: kwargs[k] for k in ("pad_token_id", "eos_token_id", "synced_gpus") if kwargs.get(k) is not None}

        def through_kernels(**probe: Any) -> Any:
            with self.path.active():
                return generate(**probe)

        return compare_paths(through_kernels, generate, ids, mask, dtype=dtype, **extra)
