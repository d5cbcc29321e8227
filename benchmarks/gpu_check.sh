#!/usr/bin/env bash
# One run on the GPU machine (no network; torch, triton, timm, pytest and pytest-benchmark preinstalled): build the
# C++/CUDA extension, run the whole test suite on the GPU (the gpu-marked tests included), time the model with
# `python -m ghostfused bench` (torch.compile, bf16 autocast, 224x224, batch 256 inference / 128 training) and run
# the op microbenchmarks. A failing stage is recorded and the next one still runs.
#
#   bash benchmarks/gpu_check.sh                 # every stage: build test bench micro micro-compile
#   bash benchmarks/gpu_check.sh build bench     # only these (build again on a fresh machine: it is quick to skip)
#
# Everything lands under $OUT (default benchmarks/results/gpu_check-<date>-<time>), in 7 files, 2 folders deep:
#   summary.txt          machine, versions, each stage's exit status and time, the bench and microbenchmark tables
#   bench/bench.{json,png,log}   the bench's raw results, chart and log
#   micro.json, micro-compile.json   every microbenchmark case: median (do_bench), check error, provider
#   logs.tar.gz          every stage's full log, pytest-benchmark's JSON, junit XML (rewritten after every stage)
# Environment: OUT; TORCH_CUDA_ARCH_LIST (default 9.0); BENCH_ARGS (more bench options); MICRO_ARGS (pytest options
# for the micro stage, default: the quick shapes at batch 1,8,64,256 without compile); MICRO_COMPILE_ARGS (default:
# the quick shapes at batch 256, compile only); PYTEST_ARGS (the test stage); STAGE_TIMEOUT (seconds per stage,
# 0 = none).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/results/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
SUMMARY=$OUT/summary.txt
PYTHON=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test bench micro micro-compile)
failed=()

note() { echo "$*" | tee -a "$SUMMARY"; }

bundle() { tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null || true; }

# run_stage NAME COMMAND...: the command's output goes to the terminal and to $LOGS/NAME.log.
run_stage() {
  local name=$1
  shift
  note "== $name: $*"
  local start=$SECONDS
  timeout "${STAGE_TIMEOUT:-0}" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  note "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -ne 0 ] && failed+=("$name")
  bundle
  return 0
}

fused_gpu_backends() {
  "$PYTHON" - <<'EOF' 2>/dev/null
import torch
from ghostfused import benchmark
print(",".join(benchmark.fused_backends(torch.device("cuda"))))
EOF
}

: > "$SUMMARY"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
note "ghostfused gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $commit, stages: ${stages[*]}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv 2>&1 | tee -a "$SUMMARY"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton:", error)
EOF

for stage in "${stages[@]}"; do
  case $stage in
    build)
      run_stage build "$PYTHON" -m pip install -e . --no-build-isolation --no-deps
      "$PYTHON" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
from ghostfused import backends
print("backends:", {name: backends.unavailable_reason(name) or "available" for name in backends.BACKENDS})
EOF
      ;;
    test)
      # shellcheck disable=SC2086
      run_stage test "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider tests/ --junitxml="$LOGS/junit.xml" \
        ${PYTEST_ARGS:-}
      grep -E "^(FAILED|ERROR)|passed|failed" "$LOGS/test.log" | tail -40 >> "$SUMMARY" ;;
    bench)
      # shellcheck disable=SC2086
      run_stage bench "$PYTHON" -m ghostfused bench --compile --batch-size 256 --train-batch-size 128 --dtype bf16 \
        --resolution 224 --output "$OUT/bench" --no-progress ${BENCH_ARGS:-}
      sed -n '/^phase /,$p' "$LOGS/bench.log" >> "$SUMMARY" ;;
    micro)
      fused=$(fused_gpu_backends)
      # shellcheck disable=SC2086
      run_stage micro "$PYTHON" -m pytest benchmarks/ -q -p no:cacheprovider --summary-json "$OUT/micro.json" \
        --benchmark-json "$LOGS/micro-benchmark.json" \
        ${MICRO_ARGS:---batch-sizes 1,8,64,256 --providers eager${fused:+,$fused}}
      sed -n '/ghostfused ops on/,$p' "$LOGS/micro.log" >> "$SUMMARY" ;;
    micro-compile)
      fused=$(fused_gpu_backends)
      # shellcheck disable=SC2086
      run_stage micro-compile "$PYTHON" -m pytest benchmarks/ -q -p no:cacheprovider \
        --summary-json "$OUT/micro-compile.json" --benchmark-json "$LOGS/micro-compile-benchmark.json" \
        ${MICRO_COMPILE_ARGS:---batch-sizes 256 --providers eager,compile${fused:+,$fused}}
      sed -n '/ghostfused ops on/,$p' "$LOGS/micro-compile.log" >> "$SUMMARY" ;;
    *)
      note "unknown stage $stage (expected build, test, bench, micro, micro-compile)"
      failed+=("$stage") ;;
  esac
done

note "failed stages: ${failed[*]:-none}"
bundle
rm -rf "$LOGS"
[ ${#failed[@]} -eq 0 ]
