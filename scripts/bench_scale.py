"""Nightly-scale benchmark: throughput, peak memory and engine overhead of a whole `gpu-pipeline run`.

    python scripts/bench_scale.py --files 50000 5000 --backend numba --json scale.json

Replicates the EuroSAT tiles of ../shared/data/eurosat_rgb (or data/eurosat) to N files (hard links,
so setup is fast and the page cache holds them as it would on a second nightly pass), then in ONE run:

* runs the real command line on each corpus and reports images/s and the peak RSS of that process;
* runs OpenCV in a ``multiprocessing.Pool`` of one process per core over the same files (cv2.imread
  plus the contract's cv2 calls), the competitor the issue names;
* measures the engine's own per-image overhead: the engine with decode served from memory and a
  backend that returns a fixed result, so what is left is batching, records, JSON and the sink.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SOURCES = [REPO.parent / "shared" / "data" / "eurosat_rgb", REPO / "data" / "eurosat"]


def replicate(source: Path, target: Path, count: int) -> Path:
    tiles = sorted(source.rglob("*.jpg"))
    if not tiles:
        sys.exit(f"no JPEG tiles under {source}")
    target.mkdir(parents=True)
    for index in range(count):
        folder = target / f"{index // 1000:03d}"
        folder.mkdir(exist_ok=True)
        destination = folder / f"{index:06d}_{tiles[index % len(tiles)].name}"
        try:
            os.link(tiles[index % len(tiles)], destination)
        except OSError:
            shutil.copyfile(tiles[index % len(tiles)], destination)
    return target


def run_cli(folder: Path, out: Path, backend: str, batch_size: int) -> dict:
    command = [sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", str(out),
               "--backend", backend, "--batch-size", str(batch_size), "-q", "--overwrite"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"run failed: {process.stderr.read().decode()}")
    lines = sum(1 for _ in open(out, "rb"))
    return {"files": lines, "seconds": round(seconds, 3), "images_per_s": round(lines / seconds, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def _opencv_one(path: str) -> int:
    import cv2

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    cv2.calcHist([gray], [0], None, [256], [0, 256])
    edges = cv2.Canny(cv2.GaussianBlur(cv2.equalizeHist(gray), (5, 5), 0), 100, 200)
    return cv2.countNonZero(edges)


def _opencv_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core, as users run it


def opencv_pool(folder: Path, processes: int) -> dict:
    paths = [str(p) for p in sorted(folder.rglob("*.jpg"))]
    start = time.perf_counter()
    with multiprocessing.Pool(processes, initializer=_opencv_init) as pool:
        for _ in pool.imap(_opencv_one, paths, chunksize=256):
            pass
    seconds = time.perf_counter() - start
    return {"files": len(paths), "processes": processes, "seconds": round(seconds, 3),
            "images_per_s": round(len(paths) / seconds, 1)}


def engine_overhead(count: int, batch_size: int) -> dict:
    """Microseconds per image spent in the engine itself (no decode, no compute)."""
    from gpu_pipeline import engine as engine_module
    from gpu_pipeline.backends.base import Backend, StageResult
    from gpu_pipeline.sinks import open_sink

    tile = np.zeros((64, 64, 3), np.uint8)
    histogram = np.bincount(np.arange(4096) % 256, minlength=256).astype(np.int64)

    class FixedBackend(Backend):
        name = "fixed"

        def process(self, images, config, keep_images=False):
            return [StageResult(histogram, 123) for _ in images]

    real_decode = engine_module.decode_image
    engine_module.decode_image = lambda path, options: tile
    try:
        with tempfile.TemporaryDirectory() as scratch:
            sink = open_sink(str(Path(scratch) / "out.jsonl"), resume=False)
            paths = [Path(f"/nightly/{i:06d}.jpg") for i in range(count)]
            engine = engine_module.Engine(FixedBackend(), batch_size=batch_size, workers=1)
            start = time.perf_counter()
            engine.run(paths, sink)
            seconds = time.perf_counter() - start
            sink.close()
    finally:
        engine_module.decode_image = real_decode
    return {"images": count, "us_per_image": round(seconds / count * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[50_000, 5_000])
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    source = next((s for s in SOURCES if s.is_dir()), None)
    if source is None:
        sys.exit("no EuroSAT tiles found (../shared/data/eurosat_rgb or data/eurosat)")

    report = {"backend": args.backend, "cores": os.cpu_count(), "source": str(source), "runs": []}
    report["engine_overhead"] = engine_overhead(20_000, args.batch_size)
    print(f"engine overhead: {report['engine_overhead']['us_per_image']} us/image")
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-scale-") as scratch:
        for count in args.files:
            folder = replicate(source, Path(scratch) / f"tiles{count}", count)
            ours = run_cli(folder, Path(scratch) / f"out{count}.jsonl", args.backend, args.batch_size)
            theirs = opencv_pool(folder, args.processes)
            ratio = ours["images_per_s"] / theirs["images_per_s"]
            report["runs"].append({"files": count, "gpu_pipeline": ours, "opencv_pool": theirs,
                                   "ratio": round(ratio, 2)})
            print(f"{count:>7} files: gpu-pipeline {ours['images_per_s']:>8.0f} img/s "
                  f"(peak RSS {ours['peak_rss_mib']} MiB) | OpenCV pool({args.processes}) "
                  f"{theirs['images_per_s']:>8.0f} img/s | ratio {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
