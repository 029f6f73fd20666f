"""Where the time goes: microseconds per image of each stage of `gpu-pipeline run`, measured alone.

    python scripts/bench_stages.py                          # this checkout
    python scripts/bench_stages.py --code /tmp/old-checkout # another checkout (e.g. `git archive` of an
                                                            # older commit, from the stage-folder layout
                                                            # on), to compare before / after

Stages, each timed on its own over the same images (median of ``--repeat``; CPU time of the whole
process, all threads, so a shared machine inflates it less than wall time):

* decode: the engine's decoder (``decode_each``; ``decode_image`` in code before it) on one thread;
* plumbing: the engine's decode pool and batching with decoding replaced by a lookup (what the
  pool, the hand-over and the batches cost);
* compute: the numba backend on the decoded images, in the engine's batches, on ``--threads``;
* labels: the default rule for a batch;
* records: building and encoding the JSON lines of a batch (:mod:`gpu_pipeline.outputs.records`).

Workloads: ``--tiles`` EuroSAT tiles and ``--scenes`` 4000x3000 JPEG mosaics of them (see
scripts/bench_scale.py for the files). ``--sweep`` instead times the numba backend alone on one
thread over the same 1024x1024 image cut into tiles of 32 to 1024 pixels: CPU ns per pixel by tile
size, which shows the fixed cost per image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def cpu_us_per_image(work, images: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return statistics.median(times) / images * 1e6


def measure(files: list[Path], threads: int, repeat: int) -> dict[str, float]:
    from bench_scale import decoded_from_memory
    from gpu_pipeline.engine import stream as engine_module
    try:  # the decode pool's module (in engine/stream.py before it had its own)
        from gpu_pipeline.engine import decoding as pool_module
    except ImportError:
        pool_module = engine_module
    from gpu_pipeline.backends import create
    from gpu_pipeline.labels.labeller import default_labels
    from gpu_pipeline.config import DecodeOptions, PipelineConfig
    from gpu_pipeline.images import ImageBatch
    from gpu_pipeline.inputs.decode import decode_image

    options = DecodeOptions()
    decoded = {path: decode_image(path, options) for path in files}
    backend = create("numba", threads=threads)
    backend.warm_up()
    batch_pixels = backend.batch_pixels()
    batch_size = None
    config = PipelineConfig()
    whole = engine_module.DecodedPart(list(files), ImageBatch.of([decoded[path] for path in files]))
    batches = list(engine_module.part_batches(iter([whole]), batch_size or 256, batch_pixels))
    results = [backend.process(batch.images, config) for batch in batches]
    stages = {}
    # the engine's decoder (decode_each: files read a group at a time), or decode_or_error in code before it
    each = hasattr(pool_module, "decode_each")
    if each:
        stages["decode"] = cpu_us_per_image(lambda: list(pool_module.decode_each(files, options)), len(files), repeat)
    else:
        stages["decode"] = cpu_us_per_image(lambda: [decode_image(path, options) for path in files], len(files), repeat)

    def plumbing() -> None:
        name = "decode_each" if each else "decode_or_error"
        real = getattr(pool_module, name)
        setattr(pool_module, name, decoded_from_memory(decoded.__getitem__) if each
                else (lambda path, options: decoded[path]))
        try:
            parts = pool_module.decode_parts(files, options, threads, *(() if batch_size is None else (256 + 2 * threads,)))
            for _ in engine_module.part_batches(parts, batch_size or 256, batch_pixels):
                pass
        finally:
            setattr(pool_module, name, real)

    stages["plumbing"] = cpu_us_per_image(plumbing, len(files), repeat)
    stages["compute"] = cpu_us_per_image(
        lambda: [backend.process(batch.images, config) for batch in batches], len(files), repeat)

    def as_arrays(result):
        if hasattr(result, "histograms"):
            return result.histograms, result.edge_counts
        return (np.array([r.histogram for r in result], np.int64), np.array([r.edge_count for r in result], np.int64))

    arrays = [as_arrays(result) for result in results]
    stages["labels"] = cpu_us_per_image(
        lambda: [default_labels(batch.images, *pair) for batch, pair in zip(batches, arrays)],
        len(files), repeat)
    stages["records"] = cpu_us_per_image(lambda: records_text(engine_module, backend, batches, results), len(files),
                                         repeat)
    return {name: round(value, 2) for name, value in stages.items()}


def records_text(engine_module, backend, batches, results) -> None:
    """The JSON lines of every batch, as the engine and the JSONL sink of that checkout make them."""
    from gpu_pipeline.outputs.records import jsonl_text

    engine = engine_module.Engine(backend)
    for batch, result in zip(batches, results):
        jsonl_text(engine.records(batch, engine_module.Outcome(result)))


def tile_size_sweep(repeat: int) -> dict[int, float]:
    """CPU ns per pixel of the numba backend (1 thread) on one 1024x1024 RGB image cut into tiles."""
    from gpu_pipeline.backends import create
    from gpu_pipeline.config import PipelineConfig

    rng = np.random.default_rng(0)
    image = (rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8) // 4 * 3).astype(np.uint8)
    backend = create("numba", threads=1)
    backend.warm_up()
    found = {}
    for side in (32, 64, 128, 256, 1024):
        tiles = [np.ascontiguousarray(image[y:y + side, x:x + side])
                 for y in range(0, 1024, side) for x in range(0, 1024, side)]
        found[side] = round(cpu_us_per_image(lambda: backend.process(tiles, PipelineConfig()), len(tiles), repeat)
                            * 1000 / (side * side), 2)
        print(f"{side}x{side} tiles: {found[side]} ns/px", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose gpu_pipeline is measured")
    parser.add_argument("--tiles", type=int, default=4096)
    parser.add_argument("--tiles-from", type=Path, help="take the tiles from the JPEGs under this folder "
                        "(default: the EuroSAT tiles, as scripts/bench_scale.py finds them)")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="only the tile-size sweep")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(args.code))
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_scale

    report = {"code": str(args.code)}
    if args.sweep:
        report["sweep_ns_per_pixel"] = tile_size_sweep(args.repeat)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-stages-") as scratch_name:
        scratch = Path(scratch_name)
        tiles = bench_scale.tile_files(scratch, args.tiles, args.tiles_from)
        report["tiles"] = measure(tiles, args.threads, args.repeat)
        print("tiles  (us/image):", report["tiles"], flush=True)
        scenes = bench_scale.scene_files(scratch, tiles, args.scenes)
        report["scenes"] = measure(scenes, args.threads, args.repeat)
        print("scenes (us/image):", report["scenes"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
