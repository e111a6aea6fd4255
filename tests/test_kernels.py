"""DeepSpeed's kernel path on CPU: which backend a run gets and why, every refusal, and the parity guard.

The kernels themselves need CUDA (tests/cuda/test_kernels_cuda.py). Here the guard is given a
generation path that is wrong on purpose, at the seam the kernels use (``engine.kernels``).
"""

from __future__ import annotations

import csv
import logging
from contextlib import contextmanager

import pytest
import torch
from helpers import (
    RolloutModule,
    add_peft_lora,
    ds_config,
    fit,
    merged_reference,
    prompts,
    tiny_bloom,
    tiny_gpt2,
    tiny_gpt_neo,
    tiny_gptj,
    tiny_llama,
    tiny_neox,
    tiny_opt,
    tiny_qwen2,
)

from lightning_hybrid import GenerationStats, HybridEngineStrategy
from lightning_hybrid.kernels import (
    PARITY_EPS,
    PROBE_ROWS,
    KernelParityError,
    KernelRefused,
    KernelRouting,
    ParityGuard,
    base_model,
    compare_paths,
    kernel_refusal,
    logprob_tolerance,
    select_backend,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


class CorruptedPath:
    """A generation path that is wrong on purpose: while active, the output head's weights carry noise."""

    def __init__(self, model: torch.nn.Module, scale: float = 1.0) -> None:
        self.model, self.scale = model, scale
        self.activations = 0

    @contextmanager
    def active(self):
        head = base_model(self.model).get_output_embeddings().weight
        original = head.data
        noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(0)).to(original.dtype)
        head.data = original + self.scale * noise
        self.activations += 1
        try:
            yield
        finally:
            head.data = original


class EqualPath(CorruptedPath):
    """The same model unchanged: what a correct kernel path produces."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, scale=0.0)


# -- backend selection -------------------------------------------------------------------------


def test_auto_on_cpu_picks_the_portable_path_and_says_why():
    assert select_backend("auto", CPU) == (
        "torch",
        "inference_backend='auto' picked the portable path (on CPU: DeepSpeed's kernels need CUDA)",
    )
    assert select_backend("torch", CUDA, tiny_gptj())[0] == "torch"


def test_deepspeed_on_cpu_names_the_setting_and_the_fix():
    with pytest.raises(ValueError, match="inference_backend='deepspeed' needs CUDA") as error:
        select_backend("deepspeed", CPU, tiny_gptj())
    assert "Use inference_backend='auto' or 'torch'" in str(error.value)


def test_auto_is_said_once_per_strategy(caplog):
    class Module(RolloutModule):
        def validation_step(self, batch, batch_idx):
            pass

    strategy = HybridEngineStrategy(config=ds_config(3))
    module = Module(tiny_llama())
    with caplog.at_level(logging.INFO):
        trainer = fit(module, strategy, steps=1, limit_val_batches=1)
        trainer.validate(module, module.trainer.train_dataloader, verbose=False)
    said = [r.getMessage() for r in caplog.records if "picked the portable path" in r.getMessage()]
    assert said == [
        "HybridEngineStrategy: inference_backend='auto' picked the portable path (on CPU: DeepSpeed's kernels need"
        " CUDA); generation module 'actor'."
    ]
    assert strategy.backend == "torch"


CACHE_REFUSAL = "takes its KV cache as a transformers Cache object (argument `{}`)"


@pytest.mark.parametrize(
    "make_model,expected",
    [
        (tiny_llama, ["'llama'", CACHE_REFUSAL.format("cache"), "DeepSpeed issues 6522, 5388 and 4788"]),
        (tiny_opt, ["'opt'", CACHE_REFUSAL.format("cache"), "populate_all_inference_policies"]),
        (tiny_gptj, ["'gptj'", CACHE_REFUSAL.format("cache"), "HFGPTJLayerPolicy", "tests/cuda/run.sh"]),
        (tiny_gpt_neo, ["'gpt_neo'", CACHE_REFUSAL.format("layer_past"), "HFGPTNEOLayerPolicy", "tests/cuda/run.sh"]),
        (tiny_qwen2, ["no inference policy for 'qwen2'", "silently fall back", "DeepSpeed issue 4954"]),
        (tiny_gpt2, ["'gpt2'", "HFGPT2LayerPolicy", "inference-only"]),
        # DeepSpeed's policy itself fails on these transformers layers (measured, no GPU needed):
        (tiny_neox, ["GPTNEOXLayerPolicy cannot read transformers", "GPTNeoXLayer", "no attribute 'hidden_size'"]),
        (tiny_bloom, ["BLOOMLayerPolicy cannot read transformers", "BLOOM inference with DeepSpeed is no longer"]),
    ],
    ids=[
        "llama-cache-api",
        "opt-cache-api",
        "gptj-cache-api",
        "gpt-neo-cache-api",
        "no-policy",
        "inference-only-policy",
        "neox-policy",
        "bloom-policy",
    ],
)
def test_deepspeed_on_cuda_refuses_known_breaks_with_reason_and_upstream(make_model, expected):
    with pytest.raises(KernelRefused) as error:
        select_backend("deepspeed", CUDA, make_model())
    message = str(error.value)
    assert message.startswith("inference_backend='deepspeed' refused: ")
    assert message.endswith("Use inference_backend='auto' or 'torch' for the portable path.")
    for part in expected:
        assert part in message
    # "auto" takes the portable path for the same reason, instead of raising.
    backend, why = select_backend("auto", CUDA, make_model())
    assert backend == "torch" and expected[-1] in why


@pytest.mark.parametrize("make_model,argument", [(tiny_gptj, "cache"), (tiny_gpt_neo, "layer_past")])
def test_gptj_and_gpt_neo_are_refused_for_the_cache_their_layers_take(make_model, argument):
    """transformers 5's GPT-J and GPT-Neo layers take a Cache (GPT-Neo as `layer_past`): no kernels, and why.

    A GPU run showed their kernels generating wrong tokens (GPT-J) or failing (GPT-Neo) on such layers.
    """
    import transformers

    actor = add_peft_lora(make_model(), targets=("q_proj", "v_proj"))
    reason = kernel_refusal(actor)
    layer = type(base_model(actor).transformer.h[0]).__name__
    assert reason is not None, f"{layer} takes a transformers Cache, yet DeepSpeed's kernels were not refused"
    assert reason.startswith(
        f"transformers {transformers.__version__}'s {layer} ({base_model(actor).config.model_type!r}) takes its KV"
        f" cache as a transformers Cache object (argument `{argument}`)"
    )
    assert "legacy tuple-cache contract" in reason and "never update the Cache" in reason
    backend, why = select_backend("auto", CUDA, actor)
    assert backend == "torch" and f"(argument `{argument}`)" in why


def test_deepspeed_refuses_lora_the_kernels_cannot_see():
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(tiny_gptj(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(KernelRefused, match=r"LoRA layers \['Linear'\] use a variant \(DoRA"):
        select_backend("deepspeed", CUDA, dora)


def test_kernel_check_interval_is_validated():
    with pytest.raises(ValueError, match=r"`kernel_check_interval` must be >= 0 \(0 never checks"):
        HybridEngineStrategy(kernel_check_interval=-1)
    with pytest.raises(TypeError, match="`kernel_check_interval` must be an int"):
        HybridEngineStrategy(kernel_check_interval=True)


# -- the parity guard --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "interval,due",
    [
        (1, [True] * 7),
        (3, [True, False, False, True, False, False, True]),
        (0, [False] * 7),
    ],
)
def test_guard_checks_the_first_and_every_nth_generation(interval, due):
    guard = ParityGuard(interval)
    assert [guard.due() for _ in range(7)] == due


def through(path):
    """``generate`` of the path's model, with the path active around it."""

    def generate(**kwargs):
        with path.active():
            return path.model.generate(**kwargs)

    return generate


def test_compare_paths_catches_a_corrupted_path_and_passes_an_equal_one():
    model = tiny_llama()
    ids, mask = prompts(batch=2)

    same = compare_paths(through(EqualPath(model)), model.generate, ids, mask, dtype=torch.float32)
    assert same.passed and same.tokens_equal and same.first_mismatch is None and same.max_logprob_diff == 0.0

    bad = compare_paths(through(CorruptedPath(model)), model.generate, ids, mask, dtype=torch.float32)
    assert not bad.passed and not bad.tokens_equal
    assert bad.first_mismatch == 0 and bad.max_logprob_diff > 1.0
    assert bad.describe().startswith(
        f"max |log-prob diff| {bad.max_logprob_diff:.3g} (tolerance {bad.tolerance:.3g} for float32)"
    )
    assert bad.describe().endswith("first differing new token at position 0")


def test_compare_paths_names_nan_logits_instead_of_reporting_no_difference():
    """NaN logits (a broken fp16 kernel) change the greedy tokens: the report must not say the logits agree."""
    model = tiny_llama()
    ids, mask = prompts(batch=2)
    broken = CorruptedPath(model, scale=float("nan"))  # every head weight NaN while active

    report = compare_paths(through(broken), model.generate, ids, mask, dtype=torch.float32)

    assert not report.passed and report.nonfinite == "candidate path at new token 0"
    assert report.max_logprob_diff == float("inf")
    assert report.describe().startswith(
        "non-finite logits from the candidate path at new token 0: max |log-prob diff| inf"
    )
    assert "max |log-prob diff| 0 " not in report.describe()


def bf16_llama(attn_implementation: str, head_scale: float = 16.0) -> torch.nn.Module:
    """A bf16 tiny Llama whose logits reach ~8 (the head scaled up), as a trained model's do."""
    model = tiny_llama(attn_implementation=attn_implementation).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


def test_compare_paths_passes_bf16_rounding_and_fails_a_real_divergence():
    """Two bf16 implementations (eager and SDPA attention) differ only by rounding: they pass.

    A real divergence that keeps every greedy token (logits sharpened by 1.25, a temperature change)
    fails on the log-probs alone.
    """
    ids, mask = prompts(batch=2)
    reference = bf16_llama("sdpa").generate

    rounding = compare_paths(bf16_llama("eager").generate, reference, ids, mask, dtype=torch.bfloat16, pad_token_id=0)
    assert rounding.passed, rounding.describe()
    assert 0.0 < rounding.max_logprob_diff <= rounding.tolerance

    sharper = compare_paths(
        bf16_llama("sdpa", head_scale=16.0 * 1.25).generate, reference, ids, mask, dtype=torch.bfloat16, pad_token_id=0
    )
    assert sharper.tokens_equal and not sharper.passed, sharper.describe()
    assert sharper.max_logprob_diff > sharper.tolerance


def test_parity_tolerance_is_derived_from_the_dtype_and_the_logits_magnitude():
    eps = {dtype: torch.finfo(dtype).eps for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    for dtype in eps:
        assert logprob_tolerance(dtype, 8.0) == PARITY_EPS * eps[dtype] * 8.0
        assert logprob_tolerance(dtype, 0.1) == logprob_tolerance(dtype, 1.0)  # small logits: absolute floor
    # One bf16 step at logit 8 is 0.0625: the tolerance must allow more than one step.
    assert logprob_tolerance(torch.bfloat16, 8.0) > 0.0625
    assert logprob_tolerance(torch.float32, 8.0) < logprob_tolerance(torch.float16, 8.0)
    assert logprob_tolerance(torch.float16, 8.0) < logprob_tolerance(torch.bfloat16, 8.0)


class RowsSeen(EqualPath):
    """An unchanged path that records how many rows the first decoder layer's first forward of each block gets.

    That forward is where DeepSpeed's kernel layer sizes its workspace, and ``KernelPath`` re-arms it
    for every block.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.rows: list[int] = []

    @contextmanager
    def active(self):
        first_layer = base_model(self.model).model.layers[0]
        seen: list[int] = []
        handle = first_layer.register_forward_pre_hook(
            lambda _, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
            with_kwargs=True,
        )
        try:
            with super().active():
                yield
        finally:
            handle.remove()
        self.rows.append(seen[0])


def test_each_kernel_block_first_sees_its_own_calls_rows():
    """The parity probe (2 rows) and the real call (4 prompts x 2 sequences) each get their own block.

    DeepSpeed sizes the kernels' workspace at the first forward of a block: were the probe's block
    the only one sized, the 8-row call would write past a 2-row workspace.
    """
    model = tiny_llama()
    ids, mask = prompts(batch=4)
    path = RowsSeen(model)
    routing = KernelRouting(path, ParityGuard(1), on_mismatch="raise")
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    for _ in range(2):
        routing.generate(model.generate, dict(call), GenerationStats(), torch.float32)
    assert path.rows == [PROBE_ROWS, 8, PROBE_ROWS, 8]


def test_routing_checks_on_interval_and_generates_through_the_path():
    model = tiny_llama()
    ids, mask = prompts()
    path = EqualPath(model)
    routing = KernelRouting(path, ParityGuard(2), on_mismatch="raise")
    stats = GenerationStats()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for call in range(4):
        got = routing.generate(
            model.generate,
            dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False),
            stats,
            torch.float32,
        )
        assert torch.equal(got, want)
        assert stats.kernel_checks == call // 2 + 1  # checked on calls 1 and 3
    # Each check runs the probe once through the path, plus every real call: 2 + 4.
    assert path.activations == 6 and routing.enabled and stats.kernel_fallbacks == 0


def corrupted_kernels_fit(requested: str, tmp_path, steps: int = 2, interval: int = 1):
    """A real ZeRO-3 fit whose engine routes generation through a corrupted path, as it would the kernels."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_hybrid.kernels import KernelRouting, ParityGuard

    ids, mask = prompts()
    actor = add_peft_lora(tiny_llama())
    want = merged_reference(actor).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    record = []

    def on_step(module, batch):
        engine = module.trainer.strategy.model
        if engine.kernels is None:  # the seam KernelPath plugs into on CUDA
            on_mismatch = "raise" if requested == "deepspeed" else "fallback"
            engine.kernels = KernelRouting(CorruptedPath(module.actor), ParityGuard(interval), on_mismatch)
        with module.trainer.strategy.generation() as policy:
            got = policy.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        record.append((got, module.trainer.strategy.generation_stats))

    strategy = HybridEngineStrategy(config=ds_config(3), inference_backend="auto", kernel_check_interval=interval)
    module = RolloutModule(actor, on_step, lr=0.0)  # lr 0: the policy stays the reference's
    fit(module, strategy, steps=steps, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    return want, record, strategy


def test_auto_falls_back_to_the_portable_path_with_one_warning_and_a_metric(tmp_path):
    with pytest.warns(
        UserWarning, match=r"DeepSpeed's kernels disagree with the portable path \(max \|log-prob diff\|"
    ) as seen:
        want, record, strategy = corrupted_kernels_fit("auto", tmp_path, steps=3)
    fallbacks = [w for w in seen if "disagree" in str(w.message)]
    assert len(fallbacks) == 1 and "generates on the portable path from now on" in str(fallbacks[0].message)
    # Every generation, the checked one included, returns the portable path's tokens.
    assert all(torch.equal(got, want) for got, _ in record)
    first, *rest = [stats for _, stats in record]
    assert (first.kernel_checks, first.kernel_fallbacks, first.backend) == (1, 1, "torch")
    assert all((s.kernel_checks, s.kernel_fallbacks, s.backend) == (0, 0, "torch") for s in rest)
    assert strategy.model.kernels.enabled is False
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [float(r["hybrid_engine/kernel_fallbacks"]) for r in rows if r.get("hybrid_engine/kernel_fallbacks")]
    assert logged == [1.0, 0.0, 0.0]


def test_deepspeed_raises_with_the_numbers_when_the_kernels_disagree(tmp_path):
    with pytest.raises(KernelParityError) as error:
        corrupted_kernels_fit("deepspeed", tmp_path, steps=1)
    message = str(error.value)
    assert "DeepSpeed's kernels disagree with the portable path" in message
    assert "max |log-prob diff|" in message and " for float32)" in message
    assert "first differing new token at position 0" in message
    assert "Use inference_backend='torch'" in message
