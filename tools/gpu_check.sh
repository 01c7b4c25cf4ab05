#!/usr/bin/env bash
# The GPU check: every GPU-gated test and the CuPy benchmarks, in one run on a machine with a CUDA
# GPU, in under 8 minutes (docs/performance.md, "How to run the GPU checks").
#
#   bash tools/gpu_check.sh          # or: make gpu-check
#
# Installs nothing. Python: $PYTHON, else .venv/bin/python (built by `make`) if it imports torch,
# else python3 (a GPU image with torch and CuPy). Packages such a machine lacks (SpikingJelly,
# snnTorch, ...) come from .gpu-deps/, which `make gpu-deps` fills from the venv on a machine
# that has one. Results go to $OUT if set (the device tool's folder), else results/gpu-check/:
#
#   env.txt                   GPUs (nvidia-smi -L), Python, torch/CUDA/CuPy/SpikingJelly/snnTorch
#   bench-cupy.txt, .json     python -m tpp_plugin bench --backend cupy (kernels vs torch vs copy)
#   pytest-gpu.txt            pytest -m gpu, SpikingJelly 2.x (every GPU test but the nccl one)
#   pytest-nccl.txt           the torchrun/nccl test, one process per visible GPU
#   pytest-gpu-sj-legacy.txt  the SpikingJelly GPU tests again on SpikingJelly 0.0.0.0.14
#   summary.txt               each stage's exit status and time, the test totals, the bench table
#
# Each stage has a time limit, and all of them together at most $GPU_CHECK_BUDGET seconds
# (default 465): a stage gets what is left, and is skipped when less than 20 s are. The exit
# status is 0 only if every stage passed.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
OUT=${OUT:-$ROOT/results/gpu-check}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-465}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
        PYTHON=$ROOT/.venv/bin/python
    else
        PYTHON=python3
    fi
fi
SITE=""
[ -d "$ROOT/.gpu-deps/site" ] && SITE=$ROOT/.gpu-deps/site
LEGACY=""
for d in "$ROOT/.gpu-deps/sj-0.0.0.0.14" "$ROOT/.venv/sj-0.0.0.0.14"; do
    if [ -z "$LEGACY" ] && [ -d "$d/spikingjelly" ]; then LEGACY=$d; fi
done
pythonpath() {  # the repository, then the given folders, then what was set before
    local p=$ROOT d
    for d in "$@"; do [ -n "$d" ] && p=$p:$d; done
    echo "$p${PYTHONPATH:+:$PYTHONPATH}"
}
MAIN_PATH=$(pythonpath "$SITE")
LEGACY_PATH=$(pythonpath "$LEGACY" "$SITE")

SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=0
START=$SECONDS

# stage NAME LIMIT LOG PYTHONPATH COMMAND...: run COMMAND with at most LIMIT seconds (less if the
# budget has less left), its output into LOG; record the exit status
stage() {
    local name=$1 limit=$2 log=$3 path=$4
    shift 4
    local left=$((BUDGET - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "== $name: skipped, $left s of the budget left" | tee -a "$SUMMARY"
        FAILED=1
        return
    fi
    echo "== $name (limit $limit s)"
    local t0=$SECONDS rc
    PYTHONPATH=$path timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (timed out)"
    echo "== $name: exit $rc$note after $((SECONDS - t0)) s -> $(basename "$log")" | tee -a "$SUMMARY"
    [ "$rc" -ne 0 ] && FAILED=1
}

# -- the machine --------------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "python: $PYTHON"
    echo "PYTHONPATH: $MAIN_PATH"
    echo "legacy SpikingJelly: ${LEGACY:-not found}"
    echo "--- nvidia-smi -L"
    nvidia-smi -L 2>&1 || echo "nvidia-smi failed"
} >"$OUT/env.txt"
stage "environment" 60 "$OUT/env-python.txt" "$MAIN_PATH" "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.version.cuda)
print("devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ("cupy", "spikingjelly", "snntorch"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as error:
        print(name, "NOT IMPORTABLE:", error)
import tpp_plugin
from tpp_plugin.adapters.spikingjelly import IS_LEGACY
from tpp_plugin.kernels import cupy as kernels
print("tpp_plugin", tpp_plugin.__file__, "| SpikingJelly legacy line:", IS_LEGACY)
print("cupy backend available:", kernels.available())
EOF
cat "$OUT/env-python.txt" >>"$OUT/env.txt" && rm -f "$OUT/env-python.txt"
cat "$OUT/env.txt"

# -- the benchmark (docs/performance.md, "CuPy backend on a GPU") -----------------------------
stage "bench --backend cupy" 110 "$OUT/bench-cupy.txt" "$MAIN_PATH" \
    "$PYTHON" -m tpp_plugin bench --backend cupy --device cuda --T 4 8 32 \
    --shape 256 64 32 32 --repeats 20 --json "$OUT/bench-cupy.json"

# -- the GPU tests ----------------------------------------------------------------------------
PYTEST=("$PYTHON" -m pytest -p no:cacheprovider --continue-on-collection-errors -v -rfEs
        --durations=15)
stage "pytest -m gpu (SpikingJelly 2.x)" 200 "$OUT/pytest-gpu.txt" "$MAIN_PATH" \
    "${PYTEST[@]}" -m "gpu and not slow" -k "not nccl" tests
stage "pytest nccl (torchrun, every visible GPU)" 75 "$OUT/pytest-nccl.txt" "$MAIN_PATH" \
    "${PYTEST[@]}" -m gpu -k nccl tests/test_evaluate.py
if [ -n "$LEGACY" ]; then
    stage "pytest -m gpu (SpikingJelly 0.0.0.0.14)" 60 "$OUT/pytest-gpu-sj-legacy.txt" \
        "$LEGACY_PATH" "${PYTEST[@]}" -m "gpu and not slow" -k "not nccl" \
        tests/test_cupy.py tests/test_conversion.py tests/test_calibration.py \
        tests/test_hardening.py tests/test_bench.py
else
    echo "== pytest -m gpu (SpikingJelly 0.0.0.0.14): skipped, no legacy SpikingJelly" \
        "(make gpu-deps puts it in .gpu-deps/)" | tee -a "$SUMMARY"
fi

# -- summary ----------------------------------------------------------------------------------
{
    echo
    echo "total: $((SECONDS - START)) s of a $BUDGET s budget; $( [ $FAILED -eq 0 ] && echo \
        'every stage passed' || echo 'SOME STAGE FAILED')"
    for log in pytest-gpu pytest-nccl pytest-gpu-sj-legacy; do
        [ -f "$OUT/$log.txt" ] || continue
        echo "--- $log: failures and totals"
        grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed|error|skipped).* =+$" "$OUT/$log.txt" \
            | tail -25
    done
    if [ -f "$OUT/bench-cupy.txt" ]; then
        echo "--- bench-cupy"
        grep -vE "^python -m tpp_plugin bench" "$OUT/bench-cupy.txt" | tail -45
    fi
} >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
