"""How much of the GIL a tile that ../shared/tools/gil_per_tile.py reports is Python, and whose.

    python scripts/gil_parts.py [FOLDER] [--repeat 3] [--cli | --batches] [--json FILE]      # needs: pip install gilknocker

gil_per_tile.py measures how long gilknocker's thread waits for the GIL while ``gpu_pipeline.run``
streams FOLDER (default: the 26,500 EuroSAT tiles where gil_per_tile.py extracts them) with one
decode and one compute thread (numba). Where busy threads outnumber the cores, that wait also holds
the time a thread that has the GIL waits for a CPU: the kernels and the decode processes keep the
cores busy. This script takes the same measurement, with the same settings, four ways (each the
median of ``--repeat`` runs, the four ways alternated):

* ``as is``: what gil_per_tile.py reports;
* ``idle kernels``: the numba kernels replaced by sleeps as long as they computed (calibrated on
  the same tiles), so they hold no CPU; what this removes is waiting for a CPU, not Python;
* ``+ no dicts``: the records are counted, not built as the API's dicts;
* ``+ files found before``: the discovery of the files is not in the run.

The last is the engine's own Python (decode hand-overs, batches, compute calls, labels, records)
on a machine with a core to spare (the stand-ins make every histogram and edge count zero).
``--cli`` measures ``gpu-pipeline run FOLDER --out FILE`` instead (in this process, the same
settings; the nightly job's path: JSON lines, no dicts), without the ``+ no dicts`` way;
``--batches`` measures ``gpu_pipeline.run_batches`` (the API's arrays a batch at a time, no dicts) so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WAYS = ("as is", "idle kernels", "+ no dicts", "+ files found before")
CLI_WAYS = ("as is", "idle kernels", "+ files found before")  # (--batches too: neither makes dicts)


def calibrate(backend, files: list[str]) -> dict[str, float]:
    """Seconds a work item (a tile) each kernel computes, from a run of the real backend on ``files``."""
    import gpu_pipeline

    spent: dict[str, list[float]] = {}
    real = backend._on_workers

    def timed(kernel, workers, before, after):
        started = time.perf_counter()
        real(kernel, workers, before, after)
        spent.setdefault(kernel.__name__, []).append((time.perf_counter() - started) / max(1, len(before[-1])))

    for _ in gpu_pipeline.run(files[:1], backend="numba", threads=1, workers=1):  # kernels loaded, caches warm
        pass
    backend._on_workers = timed
    try:
        for _ in gpu_pipeline.run(files, backend="numba", threads=1, workers=1):
            pass
    finally:
        del backend._on_workers
    return {name: statistics.median(times) for name, times in spent.items()}


@contextlib.contextmanager
def idle_kernels(seconds_per_item: dict[str, float]):
    """Every numba backend's kernels (the API's and the one the command line makes) as sleeps of the
    time they computed; a kernel not calibrated runs."""
    from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend

    real = NumbaCpuBackend._on_workers

    def sleeping(backend, kernel, workers, before, after):
        per_item = seconds_per_item.get(kernel.__name__)
        if per_item is None:
            return real(backend, kernel, workers, before, after)
        time.sleep(per_item * len(before[-1]))  # before[-1]: the items, in the order they are claimed
        after[-1][...] = 0  # the kernel's output, one row or value per item: zeros, not garbage

    NumbaCpuBackend._on_workers = sleeping
    try:
        yield
    finally:
        NumbaCpuBackend._on_workers = real


@contextlib.contextmanager
def no_dicts():
    from gpu_pipeline.outputs.records import RecordBatch

    real = RecordBatch.__iter__
    RecordBatch.__iter__ = lambda batch: iter(range(len(batch)))
    try:
        yield
    finally:
        RecordBatch.__iter__ = real


@contextlib.contextmanager
def files_found_before(paths: list[str]):
    from gpu_pipeline.engine import job
    from gpu_pipeline.inputs import discover

    real = discover.find_files
    found = real(paths)
    discover.find_files = job.find_files = lambda given, glob=None, unlisted=None: found  # the API's and the command's
    try:
        yield
    finally:
        discover.find_files = job.find_files = real


def api_run(paths: list[str]) -> int:
    """``gpu_pipeline.run`` over ``paths`` (gil_per_tile.py's settings); the records it yielded."""
    import gpu_pipeline

    return sum(1 for _ in gpu_pipeline.run(paths, backend="numba", threads=1, workers=1))


def batches_run(paths: list[str]) -> int:
    """``gpu_pipeline.run_batches`` over ``paths`` (gil_per_tile.py's settings); the files its batches held."""
    import gpu_pipeline

    return sum(len(batch) for batch in gpu_pipeline.run_batches(paths, backend="numba", threads=1, workers=1))


def cli_run(paths: list[str]) -> int:
    """``gpu-pipeline run`` over ``paths`` into a JSON Lines file, in this process; the lines it wrote."""
    from gpu_pipeline.cli.app import app

    with tempfile.TemporaryDirectory(prefix="gil-parts-") as scratch:
        out = os.path.join(scratch, "records.jsonl")
        try:
            app(["run", *paths, "--backend", "numba", "--threads", "1", "--workers", "1", "--quiet", "--out", out],
                standalone_mode=False)
        except SystemExit as exit:  # exit 1: some images failed, their records are written all the same
            if exit.code not in (None, 0, 1):
                raise
        with open(out, "rb") as lines:
            return sum(1 for _ in lines)


def gil_us_per_image(paths: list[str], run=api_run) -> tuple[float, int, float]:
    """GIL µs an image, images and seconds of one ``run`` of ``paths``, as gil_per_tile.py measures it."""
    from gilknocker import KnockKnock

    knock = KnockKnock(polling_interval_micros=100, sampling_interval_micros=1000, sleeping_interval_micros=100)
    knock.start()
    started = time.perf_counter()
    images = run(paths)
    seconds = time.perf_counter() - started
    share = knock.contention_metric
    knock.stop()
    return share * seconds / max(1, images) * 1e6, images, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=os.path.join(tempfile.gettempdir(), "gil_per_tile"))
    parser.add_argument("--repeat", type=int, default=3)
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--cli", action="store_true", help="measure `gpu-pipeline run --out FILE` instead of the API")
    path.add_argument("--batches", action="store_true", help="measure gpu_pipeline.run_batches instead of run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        import gilknocker  # noqa: F401  (imported where it is used; checked here, before any work)
    except ImportError:
        print("gil_parts.py needs gilknocker: pip install gilknocker", file=sys.stderr)
        return 2
    if not os.path.isdir(args.folder):
        print(f"no folder {args.folder} (run ../shared/tools/gil_per_tile.py once to extract the tiles there)",
              file=sys.stderr)
        return 2
    from gpu_pipeline.api import shared_backend
    from gpu_pipeline.inputs.discover import find_files

    paths = [args.folder]
    backend = shared_backend("numba", 1)
    per_item = calibrate(backend, find_files(paths)[:4096])
    ways = {
        "as is": lambda: contextlib.nullcontext(),
        "idle kernels": lambda: idle_kernels(per_item),
        "+ no dicts": lambda: _all(idle_kernels(per_item), no_dicts()),
        "+ files found before": lambda: _all(idle_kernels(per_item), no_dicts(), files_found_before(paths)),
    }
    if args.cli or args.batches:
        ways["+ files found before"] = lambda: _all(idle_kernels(per_item), files_found_before(paths))
    if args.cli:
        cli_run(find_files(paths)[:1])  # the command's own imports, before any measured run
    measured = CLI_WAYS if args.cli or args.batches else WAYS
    run, name, path = ((cli_run, "gpu-pipeline run", "cli") if args.cli else
                       (batches_run, "gpu_pipeline.run_batches", "batches") if args.batches else
                       (api_run, "gpu_pipeline.run", "api"))
    found: dict[str, list[tuple[float, int, float]]] = {way: [] for way in measured}
    for _ in range(args.repeat):
        for way in measured:
            with ways[way]():
                found[way].append(gil_us_per_image(paths, run))
    images = found["as is"][0][1]
    print(f"{images} images, {name}, numba, "
          f"1 decode + 1 compute thread, {os.cpu_count()} cores; kernels calibrated at "
          + ", ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in per_item.items()) + " a tile")
    print(f"{'':22} GIL us an image (median, min-max of {args.repeat})   seconds a run")
    report = {"images": images, "cores": os.cpu_count(), "path": path,
              "kernel_us_per_tile": {k: v * 1e6 for k, v in per_item.items()}}
    for way in measured:
        us = [u for u, _, _ in found[way]]
        seconds = statistics.median(s for _, _, s in found[way])
        print(f"{way:22} {statistics.median(us):6.1f}  ({min(us):.1f}-{max(us):.1f}){'':24} {seconds:.2f}")
        report[way] = {"gil_us_per_image": us, "median": statistics.median(us), "seconds_median": seconds}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


@contextlib.contextmanager
def _all(*managers):
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)  # gilknocker's thread may abort the interpreter at a normal exit
