#!/usr/bin/env bash
# The GPU check in one go (≤ 5 minutes on one GPU), run from the repo root:
#
#     bash benchmarks/gpu/gpu_check.sh [--dry-run] [OUT_DIR]        (OUT_DIR default: gpu_results)
#
# 1. the CUDA tests (static-cache sampler with CUDA graphs, AdEMAMix CUDA/triton paths; skipped without a GPU);
# 2. the GPU benchmarks, each against its anchor in the same run:
#    - minillm_rollout: teacher-mixed rollout (α = 0.2, static cache + CUDA graphs) vs student.generate +
#      one teacher forward, and student-only sampling vs generate (~110M Llama pair, bf16, batch 64, prompt 64,
#      256 new tokens, eos off on both sides); the eager dynamic-cache path alongside;
#    - dpo_throughput: a DPO training step on a ~113M Llama (768-d, 12 layers, byte vocabulary), bf16-mixed,
#      64 pairs of ~250 tokens per sequence: tokens/s and MFU (peak looked up from the GPU's name); TRL's
#      DPOTrainer at the same settings when trl is importable (else skipped, the JSON says so), the two sides
#      interleaved over 3 repeats (one repeat is too noisy to compare: medians);
#    - optimizer_step: AdEMAMix (fused and the other paths) vs AdamW(fused=True);
#    - probe_overhead: the over-squashing probes' overhead on a training run.
# Everything lands in OUT_DIR: one log per step and gpu_check.json (command, date, machine, each step's exit
# status, seconds and JSON result, or why it was skipped). Without CUDA the benchmarks are skipped (saying so);
# --dry-run runs them all on the CPU at tiny settings instead (to test this script, not to measure).
# Needs only torch, transformers, lightning (no extras): the repo goes on PYTHONPATH; pure-Python wheels found
# in .whl/ (e.g. jsonargparse for the CLI tests) are installed to /tmp/site first. PY picks the interpreter.
set -u
ARGS="$*"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-gpu_results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  > "$OUT/nvidia-smi.txt" 2>&1
: > "$OUT/steps.tsv"

step() {  # name, timeout seconds, command... (the command writes $OUT/<name>.json or prints JSON last)
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >> "$OUT/steps.tsv"
  echo "exit $rc ($name, $((SECONDS - t0)) s)"
}
skip() {  # name, reason
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$OUT/steps.tsv"
  echo "=== $1: skipped ($2)"
}

step cuda_tests 90 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" \
  tests/lit_modules/test_sampling_static.py tests/optimizers/test_ademamix.py tests/optimizers/test_ademamix_triton.py \
  -k "cuda or triton_path or fall_back"

if [ "$CUDA" = 1 ] && [ "$DRY" = 0 ]; then
  step minillm_rollout 140 "$PY" -m benchmarks.speed.minillm_rollout --device cuda --size 100m --batch 64 --prompt-len 64 \
    --new-tokens 256 --dtype bf16 --repeats 3 --no-train-step --out "$OUT/minillm_rollout.json"
  step dpo_throughput 220 "$PY" -m benchmarks.speed.dpo_throughput --device cuda --precision bf16-mixed --hidden 768 \
    --layers 12 --batch 64 --prompt-bytes 248 --steps 15 --warmup 3 --repeats 3 --sides ours,trl \
    --out "$OUT/dpo_throughput.json"
  step optimizer_step 90 "$PY" -m benchmarks.speed.optimizer_step --device cuda
  step probe_overhead 45 "$PY" -m benchmarks.speed.probe_overhead --device cuda --quick
elif [ "$DRY" = 1 ]; then
  step minillm_rollout 300 "$PY" -m benchmarks.speed.minillm_rollout --device cpu --size tiny --batch 4 --prompt-len 8 \
    --new-tokens 12 --repeats 1 --no-train-step --out "$OUT/minillm_rollout.json"
  step dpo_throughput 300 "$PY" -m benchmarks.speed.dpo_throughput --device cpu --precision bf16-mixed --hidden 64 \
    --layers 1 --batch 2 --prompt-bytes 16 --steps 2 --warmup 2 --repeats 1 --peak-tflops 1 \
    --out "$OUT/dpo_throughput.json"
  step optimizer_step 300 "$PY" -m benchmarks.speed.optimizer_step --device cpu --quick --repeats 1 --steps 2
  step probe_overhead 300 "$PY" -m benchmarks.speed.probe_overhead --device cpu --quick --repeats 1
else
  for name in minillm_rollout dpo_throughput optimizer_step probe_overhead; do
    skip "$name" "no CUDA device (torch.cuda.is_available() is False); --dry-run runs it on the CPU at tiny settings"
  done
fi

"$PY" - "$OUT" "$STARTED" "$DRY" "$0 $ARGS" <<'EOF'
import json, os, platform, sys, xml.etree.ElementTree as ET

import torch, transformers, lightning

out, started, dry, cmd = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]


def result_of(name):
    """The step's JSON: OUT/<name>.json if it wrote one, else the last stdout line that parses as JSON."""
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    log = os.path.join(out, f"{name}.log")
    for line in reversed(open(log).read().splitlines() if os.path.exists(log) else []):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


steps = {}
for row in open(os.path.join(out, "steps.tsv")).read().splitlines():
    name, rc, seconds, what = row.split("\t")
    if rc == "skipped":
        steps[name] = {"skipped": what}
        continue
    entry = {"command": what, "exit": int(rc), "seconds": int(seconds), "timed_out": rc in ("124", "137")}
    if name == "cuda_tests" and os.path.exists(os.path.join(out, "cuda_tests.xml")):
        suite = ET.parse(os.path.join(out, "cuda_tests.xml")).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        entry["result"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        entry["result"]["skip_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
    else:
        entry["result"] = result_of(name)
    steps[name] = entry
report = {
    "check": "benchmarks/gpu/gpu_check.sh", "command": f"bash {cmd}".strip(), "started": started, "dry_run": dry,
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                "lightning": lightning.__version__},
    "steps": steps,
}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1)
print(json.dumps({k: (v.get("exit", v.get("skipped")), v.get("seconds")) for k, v in steps.items()}))
print("wrote", os.path.join(out, "gpu_check.json"))
EOF
