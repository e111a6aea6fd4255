#!/usr/bin/env bash
# The CUDA checks in one command, for a machine with one GPU (under 8 minutes):
#   bash tests/cuda/run.sh
# Installs DeepSpeed and its small dependencies from wheels in .whl/ when they are not
# importable (a GPU box without network), runs the CUDA-marked tests (the strategy on CUDA,
# then DeepSpeed's kernel path against the portable path: the first one JIT-compiles
# DeepSpeed's inference ops), then the kernel probe. KERNELS/PROBE lines are the numbers.
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if ! $PY -c "import deepspeed" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, deepspeed, transformers, lightning, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__)"
status=0
timeout 100 $PY -m pytest -m cuda -q -p no:cacheprovider tests/test_strategy.py || status=$?
log=$(mktemp)
timeout 300 $PY -m pytest -m cuda -q -s -p no:cacheprovider tests/cuda/test_kernels_cuda.py 2>&1 | tee "$log" | grep -E "passed|failed|error|Error" | tail -20
kernels=${PIPESTATUS[0]}
[ "$kernels" -ne 0 ] && status=$kernels
grep -E "^KERNELS" "$log"
timeout 45 $PY tests/cuda/kernel_probe.py 2>&1 | grep -E "^PROBE|Error|error" | tail -20
exit $status
