"""GPU benchmark: megapixels per second of every available GPU backend of the registry, against
the numba CPU backend and OpenCV with all cores, compute-only and end to end, written as JSON.

    PYTHONPATH=. python scripts/bench_gpu.py [--json FILE] [--quick] [--repeats N]

Three workloads, each timed by gpu_pipeline.bench (what ``gpu-pipeline bench`` runs): 96 RGB
scenes of 1000 x 1000, 8 RGB scenes of 4000 x 3000 (12 MP) and 16,384 RGB tiles of 64 x 64 cut from
1024 x 1024 scenes (an eighth of each with ``--quick``, one 12 MP scene), from the benchmark's scene generator (parcels, roads, noise: edges form
chains as in real imagery), written as JPEG. For each backend and workload:

* ``warmup``: ``startup_s`` (construction: kernel compilation or cache load) and ``first_pass_s``
  (the first pass over the workload: allocations, first launches), excluded from the rates;
* ``compute``: ``process()`` on the decoded images in memory, in batches of 32 scenes or 4,096
  tiles (512 with ``--quick``); for GPU backends this includes staging and host<->device copies.
  A backend with ``device_times`` (the cuda backend) also reports GPU time per phase (``device``:
  kernels versus copies, and ``kernels_mp_per_s``);
* ``end_to_end``: the JPEG files through gpu_pipeline's engine (decode pool, batches, labels),
  next to the decode pool alone (``decode_only``).

``gpu_counters`` (GPU backends that run here): one ``process()`` call on the workload's decoded images,
with its hysteresis launches and host finishes per sub-batch (the cuda backend counts both; cupy its host
finishes) and the microseconds per image of that call, host included (``us_per_image``; for the
tiles also ``us_per_image_stacked``: the same images as one ``(N, H, W, 3)`` array, as
``gpu_pipeline.process`` takes a stack). A backend that runs the ``eurosat-cnn``
label model on its device (cupy) also reports the same call with the model attached, and the share
of the time the labelling adds (``cnn_share``; the target is at most 10 %).

Each rate is the median of ``--repeats`` runs, with min and max; ``ratios`` are against OpenCV in
``multiprocessing.Pool`` with one process per core (``opencv-pool``, what a user replaces); OpenCV in
threads of one process is a row of its own. ``--scaling`` adds, for the tiles, each backend with 1,
2, 4, ... cores (compute and end to end). GPU backends that cannot run are listed with the reason, so
the script also runs on a machine without a GPU. The JSON holds, per workload, the report of
``gpu-pipeline bench --json`` (schema ``gpu-pipeline-bench/1``, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gpu_pipeline.backends import registry
from gpu_pipeline.bench import (OPENCV, OPENCV_POOL, BenchSettings, cut_tiles, load_corpus, print_report, run_benchmark,
                                synthetic_scene, usable_cores, write_images)
from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.images import ImageBatch
from gpu_pipeline.diagnostics.info import collect_info


def workloads(folder: Path, quick: bool, rng: np.random.Generator) -> Iterator[tuple[str, list[Path], int]]:
    """Each workload's name, JPEG files and batch size, written when the previous one is done."""
    scale = 8 if quick else 1
    scenes = (synthetic_scene(rng, 1000, 1000) for _ in range(96 // scale))
    yield "1mp_rgb", write_images(scenes, folder, "scene")["jpeg"], 32
    large = (synthetic_scene(rng, 3000, 4000) for _ in range(max(1, 8 // scale)))
    yield "12mp_rgb", write_images(large, folder, "large")["jpeg"], 4
    big = (synthetic_scene(rng, 1024, 1024) for _ in itertools.count())
    yield "tiles_64", write_images(cut_tiles(big, 16384 // scale), folder, "tile")["jpeg"], 4096 // scale


def gpu_counters(images: list[np.ndarray]) -> dict:
    """Per GPU backend that runs here: one process() call on ``images`` (the best of three: the first
    meets fresh memory), its wall time per image and what the backend counts (hysteresis launches,
    sub-batches, finishes on the host)."""
    from gpu_pipeline.bench.stats import time_repeats
    from gpu_pipeline.config import PipelineConfig
    from gpu_pipeline.labels.model import load_model

    def best_of(call) -> float:
        return min(time_repeats(3, call))

    counters = {}
    for name in ("cuda", "cupy"):
        if registry.unavailable_reason(name) is not None:
            continue
        with registry.create(name) as backend:
            backend.process(images[:1], PipelineConfig())  # warm
            seconds = best_of(lambda: backend.process(images, PipelineConfig()))
            times = getattr(backend, "device_times", None)  # what one more call counts
            if times is not None:
                times.__init__()
            host_finishes_before = getattr(backend, "host_finishes", 0)
            backend.process(images, PipelineConfig())
            entry = {"images": len(images), "us_per_image": 1e6 * seconds / len(images),
                     "host_finishes": getattr(backend, "host_finishes", 0) - host_finishes_before}
            if times is not None:
                entry.update(sub_batches=times.sub_batches, hysteresis_launches=times.hysteresis_launches,
                             host_finishes=times.host_finishes,
                             launches_per_sub_batch=times.hysteresis_launches / max(1, times.sub_batches))
            if len({image.shape for image in images}) == 1:  # the notebook use: one (N, H, W, 3) array
                stacked = ImageBatch.stacked(np.stack(images))
                entry["us_per_image_stacked"] = 1e6 * best_of(lambda: backend.process(stacked, PipelineConfig())) / len(images)
            if backend.attach_label_model(load_model("eurosat-cnn")):
                backend.process(images[:1], PipelineConfig())  # the model's first launches
                result = backend.process(images, PipelineConfig())
                assert result.label_features is not None
                with_cnn = best_of(lambda: backend.process(images, PipelineConfig()))
                entry.update(us_per_image_with_cnn=1e6 * with_cnn / len(images), cnn_share=with_cnn / seconds - 1)
            counters[name] = entry
    return counters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="small batches (a smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling", action="store_true", help="a thread-scaling table for the tiles")
    args = parser.parse_args(argv)

    threads = usable_cores()
    # every backend but the plain-NumPy reference (far too slow for these workloads), then OpenCV
    names = [name for name in registry.backend_names() if name != "reference"] + [OPENCV_POOL, OPENCV]
    report: dict = {"machine": collect_info(), "workloads": {}}
    console = Console(soft_wrap=True, highlight=False, stderr=args.json is None)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        for name, paths, batch_size in workloads(Path(tmp), args.quick, np.random.default_rng(20260801)):
            corpus = load_corpus(paths, {"source": "generated", "format": "jpeg", "workload": name},
                                 DecodeOptions(), threads)
            settings = BenchSettings(repeats=args.repeats, threads=threads, batch_size=batch_size)
            result = run_benchmark(corpus, names, settings, baseline_order=(OPENCV_POOL, OPENCV),
                                   progress=lambda contender, name=name: console.print(f"{name}: {contender}"),
                                   scaling=args.scaling and name == "tiles_64")
            print_report(console, result)
            report["workloads"][name] = result.to_json()
            report["workloads"][name]["gpu_counters"] = counters = gpu_counters(corpus.images)
            for backend_name, entry in counters.items():
                console.print(f"{name}: {backend_name} {entry}")
            for path in paths:  # room for the next workload's files
                path.unlink()
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
