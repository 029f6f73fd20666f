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
#   OUT=/tmp/dc scripts/device_check.sh; tar -czf "$OUT/device_check.tgz" -C /tmp dc
#                                               # there, with .whl carried (only 8 files of $OUT come back)
#
# PARTS (default "scale batch bench gil engine api gpu"), BACKENDS ("numba cuda cupy"), TILES (26500) and SCENES (24)
# choose what runs (default OUT: /tmp/device_check). A backend that cannot run here is one line in
# failures.txt, and its steps are left out. Each step gets its own time limit, cut to what is left of
# BUDGET, and its seconds go to timings.txt; a step that fails or runs out of time is logged in
# failures.txt and the next one runs. ../shared does not travel to a lent machine (a shared/ inside the
# checkout does, and SHARED names another): without its tarball the tiles are those at hand (its
# eurosat_rgb, else data/eurosat) linked over and over, and without its tools/gil_per_tile.py
# gil_parts.py's "as is" is that figure.
set -uo pipefail

deadline=$(( $(date +%s) + ${BUDGET:-540} ))  # (the wheels' install below counts too)
source "$(dirname "$0")/device_env.sh"  # PYTHON, PYTHONPATH, NUMBA_CACHE_DIR, the carried wheels
LOG_DIR="${OUT:-/tmp/device_check}"
mkdir -p "$LOG_DIR"
PARTS="${PARTS:-scale batch bench gil engine api gpu}"
BACKENDS="${BACKENDS:-numba cuda cupy}"
TILES="${TILES:-26500}"
SCENES="${SCENES:-24}"
# the shared folder beside the checkout (the EuroSAT tarball, gil_per_tile.py); it does not travel to
# a lent machine, where only a shared/ inside the checkout does
SHARED="${SHARED:-../shared}"
[ -d "$SHARED" ] || SHARED=shared
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
# cores, and whether they are hyperthreads (two to a core share its units: a scaling table reads against it)
{ nproc; lscpu 2>/dev/null || cat /proc/cpuinfo; } > "$LOG_DIR/cores.txt"
status=0

# step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget is short),
# its output in NAME.log, its seconds in timings.txt (to size the limits)
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
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    local code=${PIPESTATUS[0]}
    echo "$name $(( SECONDS - started )) s of $limit, exit $code" >> "$LOG_DIR/timings.txt"
    if [ "$code" -ne 0 ]; then
        echo "$name: exit $code" | tee -a "$LOG_DIR/failures.txt"
        status=1
    fi
}

# TILES EuroSAT tiles in one folder, for every part: the shared tarball's 26,500, extracted once where
# ../shared/tools/gil_per_tile.py puts them (the first TILES of them linked into $SCRATCH when fewer),
# else the tiles at hand (the tarball does not travel to a lent machine) linked over and over
tiles_dir() {
    "$PYTHON" - "$SHARED/data" "$TILES" "$SCRATCH/tiles" <<'EOF'
import os, sys, tarfile, tempfile
from pathlib import Path
sys.path.insert(0, "scripts")
from bench_scale import replicate
data, count, folder = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
tar = data / "eurosat_rgb_26500.tar"
if tar.exists():
    source = Path(tempfile.gettempdir()) / "gil_per_tile"
    if not source.is_dir():  # as gil_per_tile.py extracts it: never half a folder
        with tarfile.open(tar) as archive:
            archive.extractall(f"{source}.part", filter="data")
        os.rename(f"{source}.part", source)
else:
    source = next(s for s in (data / "eurosat_rgb", Path("data/eurosat")) if s.is_dir())
tiles = sorted(source.rglob("*.jpg"))
if count != len(tiles):
    replicate(tiles, count, folder)
print(source if count == len(tiles) else folder)
EOF
}

# Backends that cannot run here (no GPU, a stack that cannot load): one line each, and no steps
# (where the check itself fails, each step says why)
checked=$("$PYTHON" -c 'import sys
from gpu_pipeline.backends.registry import unavailable_reason
for name in sys.argv[1:]:
    print(name, " ".join((unavailable_reason(name) or "").split()), sep="\t")' $BACKENDS) \
    || checked=$(printf '%s\t\n' $BACKENDS)
usable=()
while IFS=$'\t' read -r backend reason; do
    if [ -n "$reason" ]; then
        echo "$backend: unavailable, its steps left out: $reason" | tee -a "$LOG_DIR/failures.txt"
        status=1
    elif [ -n "$backend" ]; then
        usable+=("$backend")
    fi
done <<< "$checked"
BACKENDS="${usable[*]}"
case " $PARTS " in *" scale "*|*" batch "*|*" gil "*|*" engine "*|*" api "*)
    TILES_DIR=$(tiles_dir) || { echo "tiles: none made" | tee -a "$LOG_DIR/failures.txt"; exit 1; } ;;
esac

for part in $PARTS; do
    case $part in
        scale)
            for backend in $BACKENDS; do
                step "scale_$backend" 110 "$PYTHON" scripts/bench_scale.py --backend "$backend" --only start tiles scenes \
                    --repeat 1 --compile-repeat 0 --tiles "$TILES" --tiles-from "$TILES_DIR" --scenes "$SCENES" \
                    --decode auto threads --json "$LOG_DIR/scale_$backend.json"
            done ;;
        batch)  # half the GPU batch: what it costs in speed, what it saves in host memory
            for backend in $BACKENDS; do
                [ "$backend" = numba ] && continue
                step "batch_$backend" 60 "$PYTHON" scripts/bench_scale.py --backend "$backend" --only tiles \
                    --repeat 1 --tiles "$TILES" --tiles-from "$TILES_DIR" --decode auto --run-args "--batch-size 4096" \
                    --json "$LOG_DIR/batch_$backend.json"
            done ;;
        bench)  # the backends and the anchor (the reference and the other baselines would take a third)
            names=$(IFS=,; echo "${usable[*]}")
            step bench 75 "$PYTHON" -m gpu_pipeline.cli bench --tiles $(( TILES < 8000 ? TILES : 8000 )) --count 8 \
                --repeat 1 --backends "${names:+$names,}opencv-pool" --json "$LOG_DIR/bench.json" ;;
        gil)
            if [ -f "$SHARED/tools/gil_per_tile.py" ]; then  # ended by os._exit, as gil_parts.py ends:
                # gilknocker's thread may abort the interpreter at a normal exit (134), the figure printed
                step gil_per_tile 40 "$PYTHON" -c 'import os, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
sys.stdout.flush()
os._exit(0)' "$SHARED/tools/gil_per_tile.py" "$TILES_DIR"
            else
                echo "gil_per_tile.py is absent (no ../shared/tools nor shared/tools): gil_parts' \"as is\"" \
                    "is its figure" | tee "$LOG_DIR/gil_per_tile.log"
            fi
            # the same figure with idle kernels, without dicts, without discovery: how much is Python
            step gil_parts 45 "$PYTHON" scripts/gil_parts.py "$TILES_DIR" --repeat 1 \
                --json "$LOG_DIR/gil_parts.json"
            step gil_parts_cli 45 "$PYTHON" scripts/gil_parts.py "$TILES_DIR" --repeat 1 --cli \
                --json "$LOG_DIR/gil_parts_cli.json"
            step gil_parts_batches 40 "$PYTHON" scripts/gil_parts.py "$TILES_DIR" --repeat 1 --batches \
                --json "$LOG_DIR/gil_parts_batches.json" ;;
        engine)  # the engine alone, a stand-in backend, one decode process a core: the main process's
                 # CPU a file, how busy the decode processes are, memory (CPU-sized and GPU-sized batches)
            for mp in 1 32; do
                step "engine_${mp}mp" 30 "$PYTHON" scripts/engine_memory.py "$TILES_DIR" --workers "$(nproc)" \
                    --decode processes --batch-mp "$mp"
            done ;;
        api)  # images in memory: a list against one (N, 64, 64, 3) stack, every core or the GPU
            for backend in $BACKENDS; do
                step "api_$backend" 30 "$PYTHON" scripts/bench_api.py "$TILES_DIR" --backend "$backend" --repeats 3
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
