#!/usr/bin/env bash
# The GPU check: every @pytest.mark.gpu test of every backend, verify of the GPU backends against the
# reference and OpenCV on data/ (and ../shared/data when present), a GPU made to fail
# (scripts/device_failure_check.py), then the GPU benchmark.
#
#   scripts/gpu_check.sh            # from the checkout, nothing installed: PYTHONPATH=.
#   OUT=/some/dir scripts/gpu_check.sh   # logs and bench_gpu.json go there (default /tmp/gpu_check)
#
# Needs python3 with numba, numba-cuda, cupy, cv2, pytest, hypothesis, and gpu-pipeline's own runtime
# dependencies Pillow, tifffile and imagecodecs: where those are missing (the lent GPU machines have no
# network), run scripts/fetch_gpu_wheels.sh here first and carry .whl; scripts/device_env.sh installs
# them into /tmp (a numpy < 2.5 first on the path: numba-cuda cannot load on the machine's numpy 2.5).
# Where neither GPU backend can run (no GPU, no driver) it says why in one line, exit 1. Budget: under
# 5 minutes on an H100 (timeouts: tests 150 s, a failed GPU 2 x 30 s, verify 3 x 30 s, bench 90 s).
set -uo pipefail

source "$(dirname "$0")/device_env.sh"  # PYTHON, PYTHONPATH, NUMBA_CACHE_DIR, the carried wheels
LOG_DIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$LOG_DIR"

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF'
import importlib
for name in ("numpy", "numba", "numba_cuda", "cupy", "cv2", "PIL", "tifffile", "imagecodecs", "pytest",
             "hypothesis"):
    try:
        print(f"{name:>10} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:
        print(f"{name:>10} missing ({type(exc).__name__})")
EOF
} > "$LOG_DIR/environment.txt" 2>&1
cat "$LOG_DIR/environment.txt"

# A stack numba-cuda cannot load (numba-cuda 0.30.4 with numpy 2.5) is one line here, and the cuda
# tests are left out, instead of a test run full of the same traceback.
cuda_reason=$("$PYTHON" -c "from gpu_pipeline.backends.numba_cuda import unavailable_reason as r; print(r() or '')" 2>&1 | tail -n 1)
cuda_tests=()
if [ -n "$cuda_reason" ]; then
    echo "cuda backend: unavailable: $cuda_reason" | tee "$LOG_DIR/cuda_stack.txt"
    cuda_tests=(--ignore=tests/test_numba_cuda.py)
fi
# Neither GPU backend can run (no GPU, no driver): one line, not minutes of skipped tests and a CPU benchmark.
cupy_reason=$("$PYTHON" -c "from gpu_pipeline.backends.registry import unavailable_reason as r; print(r('cupy') or '')" \
    2>&1 | tail -n 1)
if [ -n "$cuda_reason" ] && [ -n "$cupy_reason" ]; then
    echo "no GPU backend can run here: cuda: $cuda_reason; cupy: $cupy_reason" | tee "$LOG_DIR/status.txt"
    exit 1
fi

echo "== GPU tests"
timeout 150 "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider --durations=15 "${cuda_tests[@]}" tests 2>&1 \
    | tee "$LOG_DIR/pytest_gpu.log"
tests_status=${PIPESTATUS[0]}

# A kernel that faults leaves its process's CUDA context unusable: each backend in a process of its own.
echo "== a GPU that fails for good: DeviceFailed, not an error record per image"
failure_status=0
for backend in cupy cuda; do
    [ "$backend" = cuda ] && [ -n "$cuda_reason" ] && continue  # (said above)
    timeout 30 "$PYTHON" scripts/device_failure_check.py "$backend" 2>&1 | tee "$LOG_DIR/device_failure_$backend.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failure_status=1
done

echo "== verify: numba, cuda, cupy against the reference and OpenCV"
verify_status=0
for data in data ../shared/data; do
    [ -d "$data" ] || { echo "$data: absent, skipped"; continue; }
    log="$LOG_DIR/verify_$(basename "$(dirname "$PWD/$data")")_$(basename "$data").log"
    backends=numba,cuda,cupy
    [ -n "$cuda_reason" ] && backends=numba,cupy
    timeout 30 "$PYTHON" -m gpu_pipeline.cli verify --backends "$backends" --against-opencv "$data" 2>&1 | tee "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || verify_status=1
done
# The integer CNN label model on the device (cupy) against the numba labels of the reference.
timeout 30 "$PYTHON" -m gpu_pipeline.cli verify --backends cupy --model eurosat-cnn data 2>&1 \
    | tee "$LOG_DIR/verify_cnn.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || verify_status=1

echo "== GPU benchmark"
timeout 90 "$PYTHON" scripts/bench_gpu.py --json "$LOG_DIR/bench_gpu.json" 2>&1 | tee "$LOG_DIR/bench_gpu.log"
bench_status=${PIPESTATUS[0]}

echo "tests exit $tests_status, verify exit $verify_status, bench exit $bench_status," \
    "device failure exit $failure_status; logs in $LOG_DIR" | tee "$LOG_DIR/status.txt"
[ "$tests_status" -eq 0 ] && [ "$verify_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$failure_status" -eq 0 ]
