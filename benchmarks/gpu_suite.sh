#!/usr/bin/env bash
# The CUDA checks in one go (run on a GPU machine from the repo root): the optimizer's CUDA tests, then the
# CUDA benchmarks; each prints its JSON last. Results land in $OUT (default ./gpu_results).
# Missing pure-Python deps (jsonargparse for the CLI tests) can be pre-installed from wheels in .whl/.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? ($name)"; tail -n 1 "$OUT/$name.log"
}
step optimizer_tests 150 python3 -m pytest -q -p no:cacheprovider tests/optimizers/test_ademamix.py -k "cuda or agree or hand_computed"
step optimizer_step 150 python3 -m benchmarks.optimizer_step --device cuda
step minillm_rollout 200 python3 -m benchmarks.minillm_rollout --device cuda --repeats 3
step probe_overhead 60 python3 -m benchmarks.probe_overhead --device cuda --quick
