#!/usr/bin/env bash
# The CUDA checks, as one run on a lent GPU machine (the device tool): its image has torch, transformers, accelerate
# and peft; the packages it lacks travel as wheels in .whl/ (diffusers, hydra-core, omegaconf, antlr4). Logs go
# to $OUT (or ./gpu_out). Each step has its own time limit, so one that hangs does not take the others with it.
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; uptime
  python3 -c "import torch, diffusers, transformers, accelerate, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.log"
status=0
timeout ${MEM_S:-150} python3 scripts/bench_memory.py --batch 1 2 2>&1 | grep -v "should be kept in float32" | tee "$OUT/bench_memory.log" || status=1
timeout ${TEST_S:-240} python3 -m pytest -q -n 4 -p no:cacheprovider -p no:logging tests/test_cuda.py -rA 2>&1 | tail -150 > "$OUT/test_cuda.log" || status=1
tail -25 "$OUT/test_cuda.log"
timeout ${ITER_S:-200} python3 scripts/bench_iteration.py --device cuda --compile --iterations 16 2>&1 | tee "$OUT/bench_iteration.log" || status=1
exit $status  # non-zero when any step failed or ran out of time
