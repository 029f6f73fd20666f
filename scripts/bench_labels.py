"""What a label costs: the default rule and the shipped models, per tile, as ``run --model`` calls them.

The labeller gets a batch of decoded tiles, their gray histograms and edge counts (computed here
once, by the numba backend, and not timed) and returns one label per tile. Timed: the whole
labeller call, best of ``--repeats``, per batch of ``--batch-size`` tiles, with ``--threads``
numba threads; also the feature kernel alone, with one thread, in thread CPU time (what one
core spends, whatever else the machine is doing).

CNN models (``eurosat-cnn``, any ``--cnn FILE``, and ``--shapes SIZE:W1,W2,...`` for networks of
that shape with random int8 weights): the labeller call (resample, network, dense layer, argmax)
with 1, 2, 4 ... threads up to the cores, beside the model's multiply-adds and the accuracy its
file records; one row per model, the cost column of docs/labels.md's accuracy-against-cost table.

Tiles: the EuroSAT sample (``../shared/data/eurosat_rgb``) when present, else random 64 x 64 RGB.

    python scripts/bench_labels.py [--threads 2] [--batch-size 256] [--repeats 7] [--cnn FILE ...]
"""

from __future__ import annotations

import argparse
import os
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
from cpu_reference.cnn import ConvBlock, IntegerCnn
from gpu_pipeline.labels.cnn import CnnModel
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
    parser.add_argument("--cnn", nargs="*", default=[], help="more CNN model files for the cost table")
    parser.add_argument("--shapes", nargs="*", default=[],
                        help="CNN shapes with random weights for the cost table, e.g. 32:16,32,64")
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
    cnn_table(["eurosat-cnn", *args.cnn, *args.shapes], batches, args.repeats)


def thread_counts() -> list[int]:
    cores = numba.config.NUMBA_NUM_THREADS
    return sorted({1 << k for k in range(cores.bit_length()) if 1 << k <= cores} | {cores})


def random_cnn(shape: str) -> CnnModel:
    """A network of ``shape`` (``SIZE:W1,W2,...``) with seeded random int8 weights and shifts that
    keep its activations spread over 0..255, as a trained network's are."""
    size, widths = shape.split(":")
    rng = np.random.default_rng(0)
    blocks, channels = [], 3
    for width in map(int, widths.split(",")):
        blocks.append(ConvBlock(rng.integers(-127, 128, (3, 3, channels, width)).astype(np.int8),
                                rng.integers(-60_000, 60_000, width).astype(np.int32),
                                rng.integers(2 ** 30, 2 ** 31, width).astype(np.int64),
                                np.full(width, 38 + (channels > 3) * 2, np.int64)))
        channels = width
    network = IntegerCnn(int(size), tuple(blocks), rng.integers(-127, 128, (10, channels)).astype(np.int8),
                         np.zeros(10, np.int32))
    return CnnModel(tuple(map(str, range(10))), network, {"random weights": True})


def cnn_table(models: list[str], batches, repeats: int) -> None:
    """One row per CNN model: its size, multiply-adds, recorded accuracy, us/tile by thread count."""
    counts = thread_counts()
    print(f"\nCNN label models, labeller call (resample + network + dense + argmax), us/tile, {os.cpu_count()} cores:")
    print("| model | input | blocks | M multiply-adds | accuracy | " + " | ".join(f"{t} thr" for t in counts) + " |")
    print("|---|---|---|---|---|" + "---|" * len(counts))
    for name in models:
        model = random_cnn(name) if ":" in name else load_model(name)
        model.labels(*batches[0])  # compile (or load numba's cache) before timing
        training = model.training
        if "cross_validation" in training:
            accuracy = f"{100 * training['cross_validation']['accuracy']:.1f} % (5-fold)"
        elif "held_out_accuracy" in training:
            accuracy = f"{100 * training['held_out_accuracy']:.1f} % (fold {training['fold']})"
        else:
            accuracy = "random weights" if ":" in name else "-"
        times = []
        for threads in counts:
            numba.set_num_threads(threads)
            times.append(best_per_tile(model.labels, batches, repeats))
        print(f"| {name} | {model.size} | {', '.join(map(str, model.widths))} | {model.multiply_adds / 1e6:.2f} | "
              f"{accuracy} | " + " | ".join(f"{t:.0f}" for t in times) + " |")


if __name__ == "__main__":
    main()
