#!/usr/bin/env python3
"""Peak host memory of the engine alone, with a GPU backend's batches, on any machine (no GPU).

    python scripts/engine_memory.py PATHS... [--batch-mp 32] [--workers 16] [--decode threads] [--compute-ms 0]

Runs the engine (decode pool, batches, records into a JSONL file) on PATHS with a stand-in backend
that wants GPU-sized batches and returns zeros (after ``--compute-ms`` a batch: a compute slower
than decoding, so that decoders wait for room, as they may on many cores), and prints the peak RSS
of the run and the peak PSS summed over its process tree (decode processes included), sampled
every 20 ms, the CPU time of the run's own process a file (with decode processes: the engine's
plumbing alone), and how busy the decode processes were (decoding, rather than waiting for the next
request). What a real GPU backend adds on top (pinned staging, the CUDA context, the libraries) is
not in these figures: see docs/backends.md, "Where the host memory goes".
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scale import _pss_kib, _tree  # the process tree and its PSS, as bench_scale samples them

REPO = Path(__file__).resolve().parent.parent


def run_engine(paths: list[str], batch_mp: float, workers: int, decode: str, out: str, compute_ms: float = 0) -> None:
    """In this process: the engine over ``paths`` with a backend that wants ``batch_mp`` MP a call
    and takes ``compute_ms`` a call (asleep, as a kernel that releases the GIL)."""
    sys.path.insert(0, str(REPO))
    from gpu_pipeline.backends.base import Backend, BatchResult
    from gpu_pipeline.engine.stream import Engine
    from gpu_pipeline.inputs.discover import find_files
    from gpu_pipeline.outputs.plan import open_sink

    class StandIn(Backend):
        name = "stand-in"

        def batch_pixels(self) -> int:
            return int(batch_mp * 2**20)

        calls = 0

        def process(self, images, config, keep_images=False):
            StandIn.calls += 1
            time.sleep(compute_ms / 1000)
            return BatchResult.empty(len(images), keep_images)

    files = find_files(paths)
    sink = open_sink(out + ".warm-up", resume=False)  # imports and kernels loaded (numba formats the records)
    Engine(StandIn(), workers=workers, processes=False).run(files[:64], sink)
    sink.close()
    sink = open_sink(out, resume=False)
    start, cpu, StandIn.calls = time.perf_counter(), time.process_time(), 0
    Engine(StandIn(), workers=workers, processes=decode == "processes").run(files, sink)
    sink.close()
    # with decode processes, the main process's own CPU: its plumbing, what bounds its threads
    print(f"{len(files):,} files in {time.perf_counter() - start:.2f} s, {StandIn.calls} batches; CPU of the run's "
          f"process {(time.process_time() - cpu) / len(files) * 1e6:.1f} us a file", flush=True)


def _peak_rss_kib(pid: int) -> int:
    """VmHWM: the high-water mark of the process's own memory."""
    try:
        with open(f"/proc/{pid}/status") as lines:
            return next((int(line.split()[1]) for line in lines if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--batch-mp", type=float, default=32.0, help="megapixels a call (GPU backends: 32)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--decode", choices=["threads", "processes"], default="threads")
    parser.add_argument("--compute-ms", type=float, default=0.0, help="milliseconds the stand-in takes a batch")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as scratch:
            run_engine(args.paths, args.batch_mp, args.workers, args.decode, str(Path(scratch) / "out.jsonl"),
                       args.compute_ms)
        return
    child = subprocess.Popen([sys.executable, __file__, "--child", *sys.argv[1:]])
    peak_rss = peak_tree = 0
    decoders: dict[int, tuple[float, float, float]] = {}  # pid: CPU seconds, first and last seen
    while child.poll() is None:
        peak_rss = max(peak_rss, _peak_rss_kib(child.pid))
        tree = _tree(child.pid)
        peak_tree = max(peak_tree, sum(_pss_kib(pid) for pid in tree))
        now = time.perf_counter()
        for pid in tree:
            parent, cpu = _parent_and_cpu(pid)
            if parent not in (None, child.pid) and pid != child.pid:  # a decode process (the fork server's child)
                decoders[pid] = (cpu, decoders.get(pid, (0, now, now))[1], now)
        time.sleep(0.02)
    print(f"batches of {args.batch_mp:g} MP, {args.workers} decoders in {args.decode}: "
          f"peak RSS of the run {peak_rss / 1024:.0f} MiB, peak PSS of its process tree {peak_tree / 1024:.0f} MiB")
    lives = sum(last - first for _, first, last in decoders.values())
    if lives > 0:  # how much of its life a decode process decoded, rather than waited for a request
        busy = sum(cpu for cpu, _, _ in decoders.values()) / lives
        print(f"decode processes busy {busy:.0%} of their lives (CPU time over life, sampled every 20 ms)")
    elif decoders:
        print("decode processes: the run was too short to sample how busy they were (every 20 ms)")
    sys.exit(child.returncode)


def _parent_and_cpu(pid: int) -> tuple[int | None, float]:
    """The parent of ``pid`` and its CPU seconds so far (user and system), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None, 0.0
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
