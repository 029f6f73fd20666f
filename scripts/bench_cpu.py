"""Benchmark the numba CPU backend against the reference, OpenCV and scikit-image, in one run.

Every contender works on the same generated corpus (RGB scenes of gpu_pipeline.bench's generator,
written as JPEG and PNG into a temporary folder) plus the EuroSAT sample tiles when present, with
the same thread count:

* numba      -- gpu_pipeline's ``numba`` backend, ``threads`` numba threads, batches by pixels.
* reference  -- the plain-NumPy specification, one thread (on an evenly spread subset: it is slow).
* opencv     -- each stage the contract's cv2 call, ``cv2.setNumThreads(threads)``, one image
                after another (OpenCV parallelises inside each call).
* opencv-pool -- the same calls in ``multiprocessing.Pool(threads)``, 1 OpenCV thread per process.
* skimage-pool -- rgb2gray, equalize_hist, feature.canny in ``multiprocessing.Pool(threads)``:
                  what users run today (a similar pipeline, not byte-identical).

Modes: ``compute`` (decoded images already in memory; pool workers hold their own copy, so no
pickling is timed), ``e2e`` (decode included: numba through gpu_pipeline's engine, whose decode
pool of ``threads`` threads runs while the kernels work; opencv decodes in a thread pool of
``threads`` threads; pool workers decode their own files), and ``decode`` (decode only: the
engine's decode pool, and cv2.imread in a thread pool). numba and skimage-pool decode with
gpu_pipeline.inputs.decode; opencv and opencv-pool with ``cv2.imread`` (its own libjpeg/libpng). JIT compile
time is excluded from all timings and reported separately. Each timing is the best of
``--repeats`` runs. The corpus, the contenders' pipelines, the pools and the timing helpers are
gpu_pipeline.bench's (``gpu-pipeline bench``); this script adds the datasets, opencv-pool, the
cold-compile time and the per-stage profile.

Example (the full default run):  python scripts/bench_cpu.py --json bench_cpu.json
A quick run:                     python scripts/bench_cpu.py --large 4 --small 100 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gpu_pipeline.bench import (BenchSettings, decode_with_io, decode_with_opencv, load_corpus, opencv_edge_count,
                                pool_compute, pool_files, read_with_opencv, run_compute, run_end_to_end, spread_step,
                                start_pool, synthetic_scene, time_repeats, usable_cores, write_images)
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.inputs.decode import decode_image

CONFIG = PipelineConfig()
DECODE = DecodeOptions()


def write_corpus(folder: Path, name: str, count: int, size: int, seed: int) -> dict[str, list[Path]]:
    """``count`` scenes of ``size`` x ``size`` as JPEG (quality 90) and PNG files."""
    rng = np.random.default_rng(seed)
    return write_images((synthetic_scene(rng, size, size) for _ in range(count)), folder, name, ("jpeg", "png"))


def best_of(repeats: int, run, clock=time.perf_counter) -> float:
    """The shortest of ``repeats`` runs, by wall clock (or by ``clock``, e.g. CPU time)."""
    return min(time_repeats(repeats, run, clock))


def one_in(step: int) -> str:
    """How a subset of every ``step``-th image is noted ("" for all images)."""
    return "" if step == 1 else f"1 image in {step}"


def opencv_files(paths: list[Path], threads: int) -> None:
    """cv2.imread and the contract's calls, one file per task in a thread pool."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda path: opencv_edge_count(read_with_opencv(path)), paths))


# --- measurements ------------------------------------------------------------------------------


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, dataset: str, mode: str, source: str, contender: str, seconds: float, images: int,
            pixels: int, note: str = "") -> None:
        self.rows.append({"dataset": dataset, "mode": mode, "source": source, "contender": contender,
                          "seconds": seconds, "images": images, "megapixels": pixels / 1e6,
                          "mp_per_s": pixels / 1e6 / seconds, "images_per_s": images / seconds, "note": note})
        row = self.rows[-1]
        print(f"  {dataset:8} {mode:8} {source:6} {contender:15} {row['mp_per_s']:9.1f} MP/s "
              f"{row['images_per_s']:10.1f} img/s  {note}", flush=True)


def measure_dataset(table: Table, dataset: str, files: dict[str, list[Path]], args, backend) -> None:
    import cv2

    from gpu_pipeline.backends.reference import ReferenceBackend

    threads, repeats = args.threads, args.repeats
    corpus = load_corpus(files["jpeg"], {}, DECODE, threads)
    images, pixels, count = corpus.images, corpus.pixels, len(corpus.images)
    # batches by pixels only, as many images as fit in --batch-pixels
    settings = BenchSettings(repeats=repeats, threads=threads, batch_size=count, batch_pixels=args.batch_pixels)

    # compute only
    cv2.setNumThreads(threads)
    table.add(dataset, "compute", "memory", "numba",
              best_of(repeats, lambda: run_compute(backend, images, settings)), count, pixels)
    table.add(dataset, "compute", "memory", "opencv",
              best_of(repeats, lambda: [opencv_edge_count(im) for im in images]), count, pixels)
    sizes = [im.shape[0] * im.shape[1] for im in images]
    subset = corpus.spread_subset(args.reference_megapixels)
    reference = ReferenceBackend()
    table.add(dataset, "compute", "memory", "reference", best_of(1, lambda: reference.process(subset.images, CONFIG)),
              len(subset.images), subset.pixels,
              ", ".join(filter(None, [one_in(spread_step(sizes, args.reference_megapixels)), "1 thread"])))
    sk_step = spread_step(sizes, args.skimage_megapixels)
    sk = corpus.spread_subset(args.skimage_megapixels)
    sk_note = one_in(sk_step)
    with start_pool("opencv", threads, corpus.paths, DECODE) as pool:
        table.add(dataset, "compute", "memory", "opencv-pool",
                  best_of(repeats, lambda: pool_compute(pool, count, threads)), count, pixels)
    with start_pool("skimage", threads, sk.paths, DECODE) as pool:
        table.add(dataset, "compute", "memory", "skimage-pool",
                  best_of(repeats, lambda: pool_compute(pool, len(sk.images), threads)), len(sk.images), sk.pixels,
                  sk_note)

    # end to end and decode only
    cv2.setNumThreads(1)  # opencv: one image per pool thread, as the numba path decodes
    with start_pool("opencv", threads, [], DECODE) as cv_pool, start_pool("skimage", threads, [], DECODE) as sk_pool:
        for source in [source for source in ("jpeg", "png") if files[source]]:
            paths = files[source]  # the lambdas below run at once, inside best_of
            table.add(dataset, "decode", source, "gpu_pipeline.inputs.decode", best_of(repeats, lambda: decode_with_io(
                paths, settings)), count, pixels, "the engine's decode pool")
            table.add(dataset, "decode", source, "cv2.imread", best_of(repeats, lambda: decode_with_opencv(
                paths, threads)), count, pixels, "thread pool")
            table.add(dataset, "e2e", source, "numba", best_of(repeats, lambda: run_end_to_end(
                backend, paths, settings)), count, pixels, "the engine: gpu_pipeline.inputs.decode in its decode pool")
            table.add(dataset, "e2e", source, "opencv", best_of(repeats, lambda: opencv_files(paths, threads)),
                      count, pixels, "cv2.imread + calls, thread pool")
            table.add(dataset, "e2e", source, "opencv-pool", best_of(repeats, lambda: pool_files(
                cv_pool, paths, threads)), count, pixels, "cv2.imread")
            table.add(dataset, "e2e", source, "skimage-pool", best_of(repeats, lambda: pool_files(
                sk_pool, paths[::sk_step], threads)), len(sk.images), sk.pixels,
                "decode: gpu_pipeline.inputs.decode" + (f", {sk_note}" if sk_note else ""))


def compile_times() -> dict:
    """Seconds to get the kernels ready: from an empty cache (cold) and from a warm one."""
    probe = ("import time; t = time.perf_counter(); "
             "from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend; NumbaCpuBackend().warm_up(); "
             "print(time.perf_counter() - t)")
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in ("cold", "cached"):  # the second run finds what the first compiled
            env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(REPO))
            done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
            result[f"{name}_s"] = float(done.stdout.strip().splitlines()[-1])
    return result


def staggered(shape: tuple, dtype, index: int) -> np.ndarray:
    """A zeroed array whose start is shifted by ``index`` cache lines plus a bit.

    Large arrays from malloc start on the same page offset; walking several of them in lockstep
    (as a stage does with its input and output rows) then makes their loads collide in the
    same L1 sets (4K aliasing) and runs several times slower than the kernel's small ring
    buffers ever do. Shifting each start avoids measuring that artefact.
    """
    count = int(np.prod(shape))
    shift = (index + 1) * 80 // np.dtype(dtype).itemsize
    return np.zeros(count + shift, dtype)[shift:].reshape(shape)


def stage_profile(image: np.ndarray) -> dict:
    """CPU ns per pixel of each stage kernel alone, one thread, against OpenCV's calls, one thread.

    Each stage runs over the whole image on the reference's intermediates (real gradients for
    the suppression); what the fused kernel spends beyond their sum (flood seeds, flood, ring
    bookkeeping, edge map borders) is reported as the rest.
    """
    import cv2
    import numba
    from numba import njit

    import cpu_reference as ref
    from gpu_pipeline.backends import _numba_kernels as kernels
    from gpu_pipeline.backends import _numba_rows as rows
    from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend

    numba.set_num_threads(1)
    cv2.setNumThreads(1)
    height, width = image.shape[:2]
    ksize = CONFIG.blur_ksize
    low, high = ref.stages.canny_thresholds(CONFIG.low_threshold, CONFIG.high_threshold, CONFIG.l2_gradient)
    gray = ref.gray(image)
    histogram = ref.histogram(gray)
    dx_ref, dy_ref = ref.sobel(ref.gaussian_blur(ref.equalize(gray), ksize))

    rgb = staggered((height * width * 3,), np.uint8, 0)
    rgb[:] = image.reshape(-1)
    gray_out = staggered((height, width), np.uint8, 1)
    counts = staggered((4, 256), np.int64, 2)
    lut = np.empty(256, np.uint8)
    kernels.equalize_lut(histogram, height * width, lut)
    padded = staggered((width + ksize,), np.int32, 3)
    sums = staggered((ksize, width), np.int32, 4)
    blurred = staggered((3, width + 2), np.int32, 5)
    dx, dy = staggered((height, width), np.int32, 6), staggered((height, width), np.int32, 7)
    dx[:], dy[:] = dx_ref, dy_ref
    mag = staggered((height + 2, width + 2), np.int32, 8)
    mag[1:-1, 1:-1] = np.abs(dx_ref) + np.abs(dy_ref)
    edge_map = staggered(((height + 2) * (width + 2),), np.uint8, 9)
    gradient = staggered((3, width), np.int32, 10)
    ring_mag = staggered((width + 2,), np.int32, 11)

    @njit
    def gray_and_histogram(rgb, gray, counts):
        for y in range(height):
            rows.rgb_row_to_gray(rgb[3 * y * width:3 * (y + 1) * width], gray[y])
            rows.count_row(gray[y], counts)

    @njit
    def equalize_and_row_sums(gray, lut, padded, sums):
        for y in range(height):
            rows.equalized_row_sums(gray[y], lut, padded, ksize, sums[y % ksize])

    @njit
    def column_sums(sums, blurred):
        for y in range(height):
            rows.blur_column_sums(sums, y, height, ksize, blurred[y % 3])

    @njit
    def sobel(blurred, gradient, ring_mag):
        for _ in range(height):
            rows.sobel_magnitude_row(blurred[0], blurred[1], blurred[2], False, gradient[0], gradient[1], ring_mag)

    @njit
    def suppress(mag, dx, dy, edge_map):
        for y in range(height):
            rows.suppress_row(mag[y], mag[y + 1], mag[y + 2], dx[y], dy[y], low, high,
                              edge_map[(y + 1) * (width + 2):(y + 2) * (width + 2)])

    stages = {
        "gray + histogram": lambda: gray_and_histogram(rgb, gray_out, counts),
        "equalize LUT + horizontal blur": lambda: equalize_and_row_sums(gray_out, lut, padded, sums),
        "vertical blur": lambda: column_sums(sums, blurred),
        "sobel + magnitude": lambda: sobel(blurred, gradient, ring_mag),
        "non-maximum suppression": lambda: suppress(mag, dx, dy, edge_map),
    }
    pixels = height * width
    cpu = time.process_time  # one thread each: CPU time is immune to other processes' load
    result = {}
    for name, run in stages.items():
        run()
        result[name] = best_of(5, run, cpu) / pixels * 1e9
    backend = NumbaCpuBackend(threads=1)
    whole = best_of(5, lambda: backend.process([image], CONFIG), cpu) / pixels * 1e9
    result["rest: flood, seeds, rings, batch set-up"] = whole - sum(result.values())
    result["whole numba backend, 1 thread"] = whole
    equalized = cv2.equalizeHist(gray)
    blurred_cv = cv2.GaussianBlur(equalized, (ksize, ksize), 0)
    opencv = {
        "cv2.cvtColor": lambda: cv2.cvtColor(image, cv2.COLOR_RGB2GRAY),
        "cv2.calcHist": lambda: cv2.calcHist([gray], [0], None, [256], [0, 256]),
        "cv2.equalizeHist": lambda: cv2.equalizeHist(gray),
        "cv2.GaussianBlur": lambda: cv2.GaussianBlur(equalized, (ksize, ksize), 0),
        "cv2.Canny": lambda: cv2.Canny(blurred_cv, CONFIG.low_threshold, CONFIG.high_threshold),
        "whole OpenCV pipeline, 1 thread": lambda: opencv_edge_count(image),
    }
    for name, run in opencv.items():
        run()
        result[name] = best_of(5, run, cpu) / pixels * 1e9
    return result


def ratios(rows: list[dict]) -> list[str]:
    """numba's throughput over each other contender's, per dataset, mode and source."""
    lines = []
    ours = {(r["dataset"], r["mode"], r["source"]): r for r in rows if r["contender"] == "numba"}
    for row in rows:
        key = (row["dataset"], "compute" if row["mode"] == "compute" else "e2e", row["source"])
        if row["contender"] == "numba" or key not in ours:
            continue
        lines.append(f"  {row['dataset']:8} {key[1]:8} {row['source']:6} numba / {row['contender']:15} "
                     f"{ours[key]['mp_per_s'] / row['mp_per_s']:6.2f}x" + ("  (e2e / decode-only)"
                                                                       if row["mode"] == "decode" else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cores = usable_cores()
    parser.add_argument("--threads", type=int, default=cores, help="threads (and pool processes) for everyone")
    parser.add_argument("--large", type=int, default=64, help="number of large RGB images")
    parser.add_argument("--large-size", type=int, default=1024)
    parser.add_argument("--small", type=int, default=1000, help="number of small RGB tiles")
    parser.add_argument("--small-size", type=int, default=64)
    parser.add_argument("--eurosat", type=Path, default=REPO.parent / "shared" / "data" / "eurosat_rgb",
                        help="EuroSAT JPEG folder, used when it exists")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--batch-pixels", type=int, default=16 << 20, help="pixels per numba batch")
    parser.add_argument("--reference-megapixels", type=float, default=4.2,
                        help="the reference (slow) runs on every k-th image, up to this many megapixels")
    parser.add_argument("--skimage-megapixels", type=float, default=17,
                        help="scikit-image runs on every k-th image, up to this many megapixels")
    parser.add_argument("--no-compile-time", action="store_true", help="skip measuring the cold JIT compile")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-stage profile")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()

    import numba

    from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend

    report: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv), "threads": args.threads,
                    "machine": {"cpus": os.cpu_count(), "usable_cores": cores, "platform": platform.platform(),
                                "processor": platform.processor()}}
    if not args.no_compile_time:
        report["compile"] = compile_times()
        print(f"JIT: cold compile {report['compile']['cold_s']:.1f} s, "
              f"start from cache {report['compile']['cached_s']:.2f} s", flush=True)
    backend = NumbaCpuBackend(threads=args.threads)
    backend.warm_up()
    # The numba backend runs nogil kernels on its own Python threads: numba's threading layer is
    # never started by it (only a model's feature kernel may start it).
    report["compute_threads"] = f"{backend.name} backend's own threads (nogil kernels)"
    table = Table()
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as folder:
        datasets = {}
        if args.large:
            datasets["large"] = write_corpus(Path(folder), "large", args.large, args.large_size, seed=1)
        if args.small:
            datasets["small"] = write_corpus(Path(folder), "small", args.small, args.small_size, seed=2)
        if args.eurosat.is_dir():  # JPEG only, as published
            datasets["eurosat"] = {"jpeg": sorted(args.eurosat.rglob("*.jpg")), "png": []}
        print(f"{'dataset':10} {'mode':8} {'source':6} {'contender':15} {'MP/s':>9}      {'images/s':>10}")
        for name, files in datasets.items():
            measure_dataset(table, name, files, args, backend)
        if not args.no_profile and args.large:
            report["profile_ns_per_pixel"] = stage_profile(decode_image(datasets["large"]["jpeg"][0], DECODE))
    report["results"] = table.rows
    print("\nratios (numba's MP/s over theirs; for decode: numba end to end over decode only)")
    print("\n".join(ratios(table.rows)))
    if "profile_ns_per_pixel" in report:
        print("\nper-stage profile, one thread, ns per pixel (large image)")
        for name, value in report["profile_ns_per_pixel"].items():
            print(f"  {name:38} {value:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
