"""Real DeepSpeed with 2 processes over gloo: each scenario is tests/scripts/two_ranks.py in a subprocess.

Each run starts its ranks at once (``launch_ranks``) on their own port, under a hard timeout, so a hang fails the
test instead of CI. Small scenarios share a launch (a module-scoped fixture), as starting the ranks costs more than
they do.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import launch_ranks

SCRIPT = Path(__file__).parent / "scripts" / "two_ranks.py"
# Above the scripts' own timeouts (540 s at most, in a fixture's setup), so theirs fires first and shows the output.
pytestmark = pytest.mark.timeout(660)


def run(*args: str, timeout: int = 240, world: int = 2) -> subprocess.CompletedProcess:
    return launch_ranks([sys.executable, str(SCRIPT), *args], world, timeout)


def passed(result: subprocess.CompletedProcess, scenario: str) -> bool:
    return f"{scenario.upper()} OK" in result.stdout


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def fits_run() -> subprocess.CompletedProcess:
    """Fits generating each step: layer-wise (pin_parameters=False: eos, fit), whole actor pinned under ZeRO-3 and
    ZeRO-2 (fit_pinned), and inference_tp_size=2 (tp), in one launch."""
    return run("eos", "fit", "fit_pinned", "tp", "--stage", "3", "--pin", "0", timeout=540)


@pytest.fixture(scope="module")
def front_ends_and_score_run() -> subprocess.CompletedProcess:
    """Both front ends, scoring, the bf16 / gather-once step, then a rank failing (which ends the launch)."""
    return run("front_ends", "score", "step", "rank_fault", timeout=540)


@pytest.fixture(scope="module")
def training_tp_run(tmp_path_factory) -> subprocess.CompletedProcess:
    """training_tp_size=2 (AutoTP; ZeRO-1, 2, 3), a user's mpu, checkpoint, resume and export, a fit without
    tensor parallelism, then a rank failing while its inference_tp_size=2 group waits to pool prompts (which ends
    the launch)."""
    directory = tmp_path_factory.mktemp("tp_checkpoint")
    args = ("autotp", "mpu", "tp_checkpoint", "plain_after_tp", "rank_fault", "--stage", "0", "--tp", "2")
    args += ("--dir", str(directory))
    return run(*args, timeout=540)


@pytest.mark.parametrize("stage,pin", [(3, 1), (3, 0), (2, 1)])
def test_two_ranks_fit_generate_parity_and_agreement(stage, pin, fits_run):
    if pin == 0:
        assert passed(fits_run, "fit"), output(fits_run)
    else:
        assert f"FIT STAGE {stage} OK" in fits_run.stdout and passed(fits_run, "fit_pinned"), output(fits_run)


def test_rank_dependent_eos_finishes(fits_run):
    """pin_parameters=False gathers in every forward: a rank that stops early must keep stepping."""
    assert passed(fits_run, "eos"), output(fits_run)


@pytest.mark.parametrize(
    "tp,rank0_error",
    [
        (1, "RuntimeError: Generation failed on rank 1 of 2: RuntimeError: injected fault"),
        # Rank 0 is waiting to pool prompts with rank 1 when rank 1 fails.
        (2, "ValueError: Tensor-parallel generation: rank 1 of its group: RuntimeError: injected fault"),
    ],
    ids=["tp1", "tp2"],
)
def test_a_rank_failing_inside_generation_ends_the_run_on_every_rank(tp, rank0_error, request):
    result = request.getfixturevalue("front_ends_and_score_run" if tp == 1 else "training_tp_run")
    assert result.returncode != 0
    assert "[rank1]: RuntimeError: injected fault on rank 1" in result.stderr
    assert f"[rank0]: {rank0_error}" in result.stderr, result.stderr[-5000:]


def test_tensor_parallel_generation_matches_the_unsharded_model(fits_run):
    """inference_tp_size=2: each rank's rows equal the merged reference's (Llama with LoRA, GPT-NeoX), its
    forward logits match within 1e-5, the layers are held in halves, and training after it has the same losses
    as after tp=1 generation."""
    assert passed(fits_run, "tp"), output(fits_run)


def test_both_front_ends_keep_parity_and_lose_nothing_on_two_ranks(front_ends_and_score_run):
    """The Trainer's and Fabric's strategy on 2 ranks, ZeRO-3 pinned, layer-wise and with the frozen-weight cache,
    and ZeRO-2, PEFT LoRA: every rank's greedy tokens equal the merged reference's each step, the weights are bitwise
    as before each context, and a fault inside one restores everything (``scenario_front_ends``)."""
    assert passed(front_ends_and_score_run, "front_ends"), output(front_ends_and_score_run)


def test_autotp_training_matches_the_unsharded_model(training_tp_run):
    """training_tp_size=2 (DeepSpeed's AutoTP) on 2 ranks, ZeRO-1, 2 and 3 in one launch, default sampler: both
    ranks get the same batches, every sliced linear of the actor and of a frozen reference holds half the weight,
    3 steps' losses equal plain torch training of an unsharded copy (rel 1e-5), greedy generation in the context
    (two prompt lengths, left padding) equals the copy's before and after optimizer steps (inference_tp_size=2
    with ZeRO-2: the same, in the training layout), and different prompts within the TP group are refused."""
    result = training_tp_run
    assert "AUTOTP OK" in result.stdout, output(result)
    for stage in (1, 2, 3):
        assert f"stage {stage}: 14 linears sliced" in result.stdout


def test_a_users_mpu_trains_and_generates_like_the_unsharded_model(training_tp_run):
    """mpu= with the test's own torch groups and a model it sliced with DeepSpeed's AutoTP layers (ZeRO-1, then
    ZeRO-3): the engine holds that mpu, ZeRO works over its data-parallel group, and slices, losses and generation
    are checked as for AutoTP."""
    result = training_tp_run
    assert "MPU OK" in result.stdout, output(result)
    assert "mpu, stage 1: 14 linears sliced" in result.stdout and "mpu, stage 3: 14 linears sliced" in result.stdout


def test_a_fit_without_tensor_parallelism_after_fits_with_it(training_tp_run):
    """DeepSpeed keeps the last mpu, AutoTP mesh and AutoTP mode in its globals: a later engine without training
    TP in the same process once failed in deepspeed.initialize; it now trains data-parallel over both ranks, and
    inference_tp_size=2 generates over its own group."""
    assert passed(training_tp_run, "plain_after_tp"), output(training_tp_run)


def test_four_ranks_as_two_data_parallel_by_two_tensor_parallel():
    """training_tp_size=2 on 4 ranks, ZeRO-3: the ranks of each TP group get the same batches and sample the same
    tokens, the two data-parallel groups get different batches, and the replicas end with the same weights."""
    result = run("dp_tp", "--stage", "3", timeout=180, world=4)
    assert result.returncode == 0 and "DP_TP OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


def test_autotp_checkpoint_resume_and_export(training_tp_run):
    """training_tp_size=2, ZeRO-3: resuming from the step-2 checkpoint (one file per TP rank) gives the uninterrupted
    run's losses and greedy and sampled generations at steps 2 and 3; export_actor writes one unsliced model
    (same shapes as the unsharded one, one safetensors file) that plain transformers loads and that generates the
    context's greedy tokens; a standalone validate() rebuilds the engine with the TP groups and generates them
    too."""
    assert passed(training_tp_run, "tp_checkpoint"), output(training_tp_run)


def test_bf16_parity_and_gather_once_per_step_on_two_ranks(front_ends_and_score_run):
    """bf16-mixed on 2 ranks (ZeRO-3 + LoRA, ZeRO-2 full): greedy tokens with shared prompt prefill equal the whole
    merged bf16 policy's, nothing lost; gather_once_per_step: today's weights after 3 steps (fp32 tolerance), one
    all-gather of the actor per step instead of ~3 (``scenario_step``)."""
    assert passed(front_ends_and_score_run, "step"), output(front_ends_and_score_run)


def test_shared_prompt_scoring_under_zero_on_two_ranks(front_ends_and_score_run):
    """response_logprobs under ZeRO-3 (Qwen2, full) and ZeRO-2 (GPT-NeoX + LoRA), 2 ranks with their own batches:
    log-probs within 1e-4 of the plain forward's and the step's update within 1e-4 relative."""
    assert passed(front_ends_and_score_run, "score"), output(front_ends_and_score_run)
