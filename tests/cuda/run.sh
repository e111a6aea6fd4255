#!/usr/bin/env bash
# The GPU proof in one command, for a bare machine with one GPU (under 8 minutes in all):
#   bash tests/cuda/run.sh
# 0. Needs torch (CUDA), transformers, lightning, peft, and pytest (the [test] extra). DeepSpeed,
#    pytest and their small dependencies install from wheels in .whl/ when missing (a GPU box
#    without network); anything else missing stops here with the command that installs it.
# 1. cuda: the CUDA-marked tests, in a pytest process of their own (DeepSpeed on CUDA): the strategy
#    on CUDA, and the generation context's parity and nothing-lost checks (ZeRO-2/3, fp32/bf16,
#    PEFT LoRA, one GPU; tests/cuda/test_generation_cuda.py), and the RL step's pieces on CUDA: rollout
#    log-probs against the scoring forward, gather_once_per_step, the inverse-CDF sampler's draws and
#    speed against torch.multinomial (tests/cuda/test_rl_step_cuda.py).
# 2. cpu-subset: fast CPU tests (fits under ZeRO-2/3, the context's parity and nothing-lost), on the
#    CPU on this GPU machine (CUDA_VISIBLE_DEVICES untouched: tests/conftest.py puts DeepSpeed on the
#    CPU in any pytest process run without `-m cuda`).
# 3. timing: generation context vs plain HF generate on a SmolLM2-135M-shaped model, and a GRPO-like
#    step (tests/cuda/timing.py): one table.
# 4. kernels: DeepSpeed's kernel path against the portable path (the first test JIT-compiles
#    DeepSpeed's inference ops), then 5. probe: deepspeed.init_inference on its own.
# Each stage runs under `timeout`, cut to what is left of BUDGET_S (470 s); a stage with no time
# left is reported as skipped and fails the run. GENCUDA/TIMING/KERNELS/PROBE lines are the numbers;
# full logs in $LOGS. Exit status: the first failing stage's.
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-470}
LOGS=${LOGS:-/tmp/lightning-hybrid-cuda}
mkdir -p "$LOGS"
status=0

missing() { # missing MODULE...: true when one of them does not import
  local m
  for m in "$@"; do $PY -c "import $m" 2>/dev/null || return 0; done
  return 1
}
if missing deepspeed pytest && ls .whl/*.whl >/dev/null 2>&1; then
  echo "== installing from .whl/ into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
  timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if missing pytest; then
  echo "pytest is needed (the [test] extra): pip install -e '.[test]', or put pytest's wheels in .whl/" >&2
  exit 2
fi
if missing torch deepspeed transformers lightning peft; then
  echo "torch (CUDA), deepspeed, transformers, lightning and peft are needed: install your CUDA torch," \
    "then pip install -e '.[test]' (or put DeepSpeed's wheels in .whl/)" >&2
  exit 2
fi
$PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || {
  echo "no CUDA GPU visible to torch: this script is for a GPU machine (the CPU suite: pytest)" >&2
  exit 2
}
missing pytest_timeout && echo "(pytest-timeout is not installed: no per-test limit; each stage keeps its own)"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset DS_ACCELERATOR # tests/conftest.py picks it per pytest process
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, deepspeed, transformers, lightning, peft; print('torch', torch.__version__, 'deepspeed', \
deepspeed.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', \
peft.__version__, 'cuda', torch.cuda.is_available())"

stage() { # stage NAME CAP_S COMMAND...: under `timeout`, at most what is left of the budget
  local name=$1 cap=$2 left limit rc start
  shift 2
  left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "== $name: SKIPPED, ${left} s left of the ${BUDGET_S} s budget"
    [ "$status" -eq 0 ] && status=124
    return
  fi
  limit=$((cap < left ? cap : left))
  echo "== $name (limit ${limit} s): $*"
  start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  grep -E "^(GENCUDA|TIMING|KERNELS|PROBE|FAILED|ERROR)|^\||[0-9]+ (passed|failed|error)|Error" "$LOGS/$name.log" | tail -40
  echo "== $name: exit $rc in $((SECONDS - start)) s$([ "$rc" -eq 124 ] && echo ' (timed out)')"
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
}

PYTEST="$PY -m pytest -q -rfEs -p no:cacheprovider"
stage cuda 240 $PYTEST -s -m cuda tests/test_strategy.py tests/cuda/test_generation_cuda.py tests/cuda/test_metrics_cuda.py \
  tests/cuda/test_rl_step_cuda.py
G=tests/test_generation.py
stage cpu-subset 150 $PYTEST tests/test_config.py tests/test_lora.py tests/test_zero3_leaves.py \
  tests/test_strategy.py::test_fit_builds_a_hybrid_engine_and_trains \
  "$G::test_parity_with_unsharded_merged_reference[trainer-3-True-peft-dynamic-False]" \
  "$G::test_parity_with_unsharded_merged_reference[fabric-3-True-peft-dynamic-False]" \
  "$G::test_nothing_lost_over_cycles[trainer-3-True-False]"
stage timing 150 $PY tests/cuda/timing.py
# The first kernel test compiles DeepSpeed's inference ops: no per-test limit but the stage's.
stage kernels 240 $PYTEST -s -m cuda -o timeout=0 tests/cuda/test_kernels_cuda.py
stage probe 45 $PY tests/cuda/kernel_probe.py
echo "== done in ${SECONDS} s, exit $status"
exit $status
