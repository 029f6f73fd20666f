# Sourced by scripts/gpu_check.sh and scripts/device_check.sh: the environment of a run from the
# checkout on a lent GPU machine (nothing installed, no network). Sets PYTHON, PYTHONPATH and
# NUMBA_CACHE_DIR, and installs the wheels carried in .whl (scripts/fetch_gpu_wheels.sh) into /tmp:
# a numpy < 2.5 goes first on the path (the machine's numpy 2.5 breaks numba-cuda 0.30.4, issue #20),
# the others go last, so that what the machine has installed still wins.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/gpu-pipeline-numba-cache}"  # the checkout may be read-only
unset NUMBA_ENABLE_CUDASIM GPU_PIPELINE_CUDA_SMALL_TILES
PYTHON="${PYTHON:-python3}"
_wheels=(.whl/*.whl)
# compiled as they are installed: where PYTHONDONTWRITEBYTECODE is set (as on the 2-core VM) a module
# without its .pyc is compiled again at every import; numpy, Pillow and tifffile made a warm one-image
# run take 1.21 s instead of 0.77 (tifffile alone 0.2 s), and this checkout's own modules 0.07 s more
if [ -e "${_wheels[0]}" ]; then
    _numpy=(.whl/numpy-*.whl)
    if [ -e "${_numpy[0]}" ]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade \
            --target /tmp/numpy-first "${_numpy[@]}"
        export PYTHONPATH="/tmp/numpy-first:$PYTHONPATH"
    fi
    _others=()
    for _wheel in "${_wheels[@]}"; do
        case "$(basename "$_wheel")" in numpy-*) ;; *) _others+=("$_wheel") ;; esac
    done
    if [ "${#_others[@]}" -gt 0 ]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade \
            --target /tmp/site "${_others[@]}"
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
fi
# (what pip does for an installed package; nothing where the checkout is read-only)
"$PYTHON" -m compileall -q gpu_pipeline cpu_reference > /dev/null 2>&1 || true
