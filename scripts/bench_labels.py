"""What a label costs: the default rule and the ``eurosat`` model, per tile, as ``run --model`` calls them.

The labeller gets a batch of decoded tiles, their gray histograms and edge counts (computed here
once, by the numba backend, and not timed) and returns one label per tile. Timed: the whole
labeller call, best of ``--repeats``, per batch of ``--batch-size`` tiles, with ``--threads``
numba threads; also the feature kernel alone, with one thread, in thread CPU time (what one
core spends, whatever else the machine is doing).

Tiles: the EuroSAT sample (``../shared/data/eurosat_rgb``) when present, else random 64 x 64 RGB.

    python scripts/bench_labels.py [--threads 2] [--batch-size 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numba
import numpy as np

from gpu_pipeline.backends.registry import create
from gpu_pipeline.labels.labeller import default_labels
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.labels.features import FEATURE_NAMES, STRIP_PIXELS, _stack_features, entropy_table
from gpu_pipeline.inputs.decode import decode_image
from gpu_pipeline.inputs.discover import discover
from gpu_pipeline.labels.model import load_model

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eurosat_rgb"


def tiles(count: int) -> tuple[list[np.ndarray], str]:
    if SAMPLE.is_dir():
        paths = discover([SAMPLE])[:count]
        return [decode_image(p, DecodeOptions()) for p in paths], f"{len(paths)} EuroSAT tiles"
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(count)], f"{count} random 64x64 RGB"


def best_per_tile(function, batches, repeats: int, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeats):
        for batch in batches:
            started = clock()
            function(*batch)
            best = min(best, (clock() - started) / len(batch[0]))
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tiles", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    images, what = tiles(args.tiles)
    with create("numba", threads=args.threads) as backend:
        results = backend.process(images, PipelineConfig())
    histograms = np.stack([r.histogram for r in results])
    edge_counts = np.array([r.edge_count for r in results])
    batches = [(images[s:s + args.batch_size], histograms[s:s + args.batch_size], edge_counts[s:s + args.batch_size])
               for s in range(0, len(images), args.batch_size)]
    model = load_model("eurosat")
    model.labels(*batches[0])  # compile (or load numba's cache) before timing
    numba.set_num_threads(args.threads)
    print(f"{what}, batches of {args.batch_size}, {args.threads} numba threads, best of {args.repeats}:")
    print(f"  default rule:            {best_per_tile(default_labels, batches, args.repeats):6.2f} us/tile")
    print(f"  eurosat model (labeller): {best_per_tile(model.labels, batches, args.repeats):6.2f} us/tile")
    print(f"  eurosat scores alone:    "
          f"{best_per_tile(lambda x: model.predict(x), [(np.zeros((len(b[0]), len(FEATURE_NAMES))),) for b in batches], args.repeats):6.2f} us/tile")
    stacks = [(np.stack(b[0]), b[1], b[2], STRIP_PIXELS // b[0][0].shape[1], entropy_table(),
               np.empty((len(b[0]), len(FEATURE_NAMES))))
              for b in batches]
    numba.set_num_threads(1)
    print(f"  feature kernel, 1 thread, thread CPU time: "
          f"{best_per_tile(_stack_features, stacks, args.repeats, time.thread_time):6.2f} us/tile")


if __name__ == "__main__":
    main()
