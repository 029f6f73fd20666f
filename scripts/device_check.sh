#!/usr/bin/env bash
# One run on a lent GPU machine (16 cores, an H200), logs and JSON in $OUT, within BUDGET seconds
# (default 540: the machine's 15 minutes include its start and a rerun):
#
#   1. "Every core" (issue #19): scripts/bench_scale.py for numba, cuda and cupy (26,500 EuroSAT
#      tiles and 24 12-MP scenes end to end against OpenCV in Pool(cores), the warm one-image run,
#      peak memory of the run and of its decode processes), the tiles again for cuda and cupy with
#      GPU batches of 16 MP instead of 32 (--batch-size 4096: speed against host memory), the
#      thread-scaling table of `gpu-pipeline bench`, the GIL a tile (../shared/tools/gil_per_tile.py,
#      needs gilknocker, and scripts/gil_parts.py: how much of it is Python, and whose), the engine
#      alone with a decode process a core (scripts/engine_memory.py: the main process's CPU a file,
#      how busy the decode processes are, memory), and
#      gpu_pipeline.process on 8,192 tiles in memory, as a list and as one stack, per backend
#      (scripts/bench_api.py: on a GPU that is the host-included rate of issue #20 item 5);
#   2. the GPU check (issue #20): scripts/gpu_check.sh (GPU tests, verify, bench_gpu).
#
#   scripts/fetch_gpu_wheels.sh                 # here, once: the wheels the machine lacks, into .whl/
#   OUT=/some/dir scripts/device_check.sh       # there, with .whl carried (default OUT: /tmp/device_check)
#
# PARTS (default "scale batch bench gil engine api gpu"), BACKENDS ("numba cuda cupy"), TILES (26500) and SCENES (24)
# choose what runs. Each step gets its own time limit, cut to what is left of BUDGET; a step that
# fails or runs out of time is logged in failures.txt and the next one runs.
set -uo pipefail

source "$(dirname "$0")/device_env.sh"  # PYTHON, PYTHONPATH, NUMBA_CACHE_DIR, the carried wheels
LOG_DIR="${OUT:-/tmp/device_check}"
mkdir -p "$LOG_DIR"
PARTS="${PARTS:-scale batch bench gil engine api gpu}"
BACKENDS="${BACKENDS:-numba cuda cupy}"
TILES="${TILES:-26500}"
SCENES="${SCENES:-24}"
deadline=$(( $(date +%s) + ${BUDGET:-540} ))
# cores, and whether they are hyperthreads (16 CPUs of 8 cores stop scaling near 8 threads)
{ nproc; lscpu 2>/dev/null || cat /proc/cpuinfo; } > "$LOG_DIR/cores.txt"
status=0

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget is short),
# its output in NAME.log
step() {
    local name=$1 limit=$2 left
    shift 2
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt 10 ]; then
        echo "$name: skipped, the budget is spent" | tee -a "$LOG_DIR/failures.txt"
        status=1
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (at most $limit s)"
    timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    local code=${PIPESTATUS[0]}
    if [ "$code" -ne 0 ]; then
        echo "$name: exit $code" | tee -a "$LOG_DIR/failures.txt"
        status=1
    fi
}

# the 26,500 EuroSAT tiles, extracted once where ../shared/tools/gil_per_tile.py puts them
tiles_dir() {
    local dir
    dir=$("$PYTHON" -c 'import os, tempfile; print(os.path.join(tempfile.gettempdir(), "gil_per_tile"))')
    [ -d "$dir" ] || "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        ../shared/data/eurosat_rgb_26500.tar "$dir"
    echo "$dir"
}

for part in $PARTS; do
    case $part in
        scale)
            for backend in $BACKENDS; do
                step "scale_$backend" 110 "$PYTHON" scripts/bench_scale.py --backend "$backend" --only start tiles scenes \
                    --repeat 1 --compile-repeat 0 --tiles "$TILES" --scenes "$SCENES" --decode auto threads \
                    --json "$LOG_DIR/scale_$backend.json"
            done ;;
        batch)  # half the GPU batch: what it costs in speed, what it saves in host memory
            for backend in $BACKENDS; do
                [ "$backend" = numba ] && continue
                step "batch_$backend" 60 "$PYTHON" scripts/bench_scale.py --backend "$backend" --only tiles \
                    --repeat 1 --tiles "$TILES" --decode auto --run-args "--batch-size 4096" \
                    --json "$LOG_DIR/batch_$backend.json"
            done ;;
        bench)
            step bench 60 "$PYTHON" -m gpu_pipeline.cli bench --tiles 8000 --count 8 --repeat 1 \
                --json "$LOG_DIR/bench.json" ;;
        gil)  # gilknocker's thread may abort the interpreter at exit (134) after the figure is printed
            step gil_per_tile 40 "$PYTHON" ../shared/tools/gil_per_tile.py
            # the same figure with idle kernels, without dicts, without discovery: how much is Python
            step gil_parts 45 "$PYTHON" scripts/gil_parts.py "$(tiles_dir)" --repeat 1 \
                --json "$LOG_DIR/gil_parts.json"
            step gil_parts_cli 45 "$PYTHON" scripts/gil_parts.py "$(tiles_dir)" --repeat 1 --cli \
                --json "$LOG_DIR/gil_parts_cli.json"
            step gil_parts_batches 40 "$PYTHON" scripts/gil_parts.py "$(tiles_dir)" --repeat 1 --batches \
                --json "$LOG_DIR/gil_parts_batches.json" ;;
        engine)  # the engine alone, a stand-in backend, one decode process a core: the main process's
                 # CPU a file, how busy the decode processes are, memory (CPU-sized and GPU-sized batches)
            tiles=$(tiles_dir)
            for mp in 1 32; do
                step "engine_${mp}mp" 30 "$PYTHON" scripts/engine_memory.py "$tiles" --workers "$(nproc)" \
                    --decode processes --batch-mp "$mp"
            done ;;
        api)  # images in memory: a list against one (N, 64, 64, 3) stack, every core or the GPU
            tiles=$(tiles_dir)
            for backend in $BACKENDS; do
                step "api_$backend" 30 "$PYTHON" scripts/bench_api.py "$tiles" --backend "$backend" --repeats 3
            done ;;
        gpu)
            step gpu_check 330 env OUT="$LOG_DIR/gpu_check" scripts/gpu_check.sh ;;
        *)
            echo "unknown part: $part" | tee -a "$LOG_DIR/failures.txt"
            status=1 ;;
    esac
done

echo "device check exit $status; logs in $LOG_DIR" | tee "$LOG_DIR/status.txt"
exit "$status"
