"""Benchmark the numba CPU backend against the reference, OpenCV and scikit-image, in one run.

Every contender works on the same generated corpus (RGB images written as JPEG and PNG into a
temporary folder) plus the EuroSAT sample tiles when present, with the same thread count:

* numba      -- gpu_pipeline's ``numba`` backend, ``threads`` numba threads, batches by pixels.
* reference  -- the plain-NumPy specification, one thread (on a subset: it is slow).
* opencv     -- each stage the contract's cv2 call, ``cv2.setNumThreads(threads)``, one image
                after another (OpenCV parallelises inside each call).
* opencv-pool -- the same calls in ``multiprocessing.Pool(threads)``, 1 OpenCV thread per process.
* skimage-pool -- rgb2gray, equalize_hist, feature.canny in ``multiprocessing.Pool(threads)``:
                  what users run today (a similar pipeline, not byte-identical).

Modes: ``compute`` (decoded images already in memory; pool workers hold their own copy, so no
pickling is timed), ``e2e`` (decode included: numba and opencv decode in a thread pool of
``threads`` threads that runs while the kernels work; pool workers decode their own files), and
``decode`` (decode only, in the same thread pool). numba and skimage-pool decode with
gpu_pipeline.io (Pillow); opencv and opencv-pool with ``cv2.imread`` (its own libjpeg/libpng).
JIT compile time is excluded from all timings and reported separately. Each timing is the best
of ``--repeats`` runs.

Example (the full default run):  python scripts/bench_cpu.py --json bench_cpu.json
A quick run:                     python scripts/bench_cpu.py --large 4 --small 100 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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

from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.io import decode_image

CONFIG = PipelineConfig()
DECODE = DecodeOptions()


# --- corpus ------------------------------------------------------------------------------------


def synthetic_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """An RGB image with satellite-like structure: smooth fields at several scales, sharp
    boundaries (parcels, roads) and fine texture, so Canny finds a realistic share of edges."""
    import cv2

    image = np.zeros((size, size, 3), np.float32)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.15)):
        grid = rng.random((cells, cells, 3)).astype(np.float32)
        image += weight * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    parcels = max(2, size // 32)
    blocks = rng.random((parcels, parcels, 3)).astype(np.float32)
    image = 0.6 * image + 0.4 * cv2.resize(blocks, (size, size), interpolation=cv2.INTER_NEAREST)
    for _ in range(max(1, size // 128)):
        y = int(rng.integers(0, size))
        image[max(0, y - 1):y + 2, :, :] = 0.9
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def write_corpus(folder: Path, name: str, count: int, size: int, seed: int) -> dict[str, list[Path]]:
    """``count`` scenes of ``size`` x ``size`` as JPEG (quality 90) and PNG files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files: dict[str, list[Path]] = {"jpeg": [], "png": []}
    for index in range(count):
        picture = Image.fromarray(synthetic_scene(rng, size))
        for fmt, suffix in (("jpeg", "jpg"), ("png", "png")):
            path = folder / f"{name}_{index:05d}.{suffix}"
            picture.save(path, quality=90) if fmt == "jpeg" else picture.save(path, compress_level=6)
            files[fmt].append(path)
    return files


# --- the contenders' pipelines ----------------------------------------------------------------


def opencv_pipeline(image: np.ndarray, bgr: bool = False) -> int:
    """The contract, one cv2 call per stage; returns the edge count."""
    import cv2

    if image.ndim == 3:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
    else:
        gray = image
    cv2.calcHist([gray], [0], None, [256], [0, 256])
    equalized = cv2.equalizeHist(gray)
    blurred = cv2.GaussianBlur(equalized, (CONFIG.blur_ksize,) * 2, 0)
    edges = cv2.Canny(blurred, CONFIG.low_threshold, CONFIG.high_threshold, apertureSize=3,
                      L2gradient=CONFIG.l2_gradient)
    return cv2.countNonZero(edges)


def opencv_file(path: Path) -> int:
    import cv2

    return opencv_pipeline(cv2.imread(str(path), cv2.IMREAD_COLOR), bgr=True)


def skimage_pipeline(image: np.ndarray) -> int:
    from skimage import color, exposure, feature

    gray = color.rgb2gray(image) if image.ndim == 3 else image / 255.0
    exposure.histogram(gray, nbins=256)
    equalized = exposure.equalize_hist(gray)
    return int(feature.canny(equalized, sigma=1.0).sum())


def skimage_file(path: Path) -> int:
    return skimage_pipeline(decode_image(path, DECODE))


# Pool workers: a module-level corpus (compute mode) and picklable task functions.
_WORKER_IMAGES: list[np.ndarray] = []


def _worker_init(paths: list[Path] | None) -> None:
    import cv2

    cv2.setNumThreads(1)
    _WORKER_IMAGES[:] = [decode_image(path, DECODE) for path in paths or []]


def _opencv_indexed(index: int) -> int:
    return opencv_pipeline(_WORKER_IMAGES[index])


def _skimage_indexed(index: int) -> int:
    return skimage_pipeline(_WORKER_IMAGES[index])


def _nothing(_: int) -> None:
    return None


# --- timing ------------------------------------------------------------------------------------


def best_of(repeats: int, run, clock=time.perf_counter) -> float:
    """The shortest of ``repeats`` runs, by wall clock (or by ``clock``, e.g. CPU time)."""
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return min(times)


def batches(images: list, pixels_per_batch: int):
    """Consecutive groups of about ``pixels_per_batch`` pixels, as the engine would batch them."""
    batch, pixels = [], 0
    for image in images:
        batch.append(image)
        pixels += image.shape[0] * image.shape[1]
        if pixels >= pixels_per_batch:
            yield batch
            batch, pixels = [], 0
    if batch:
        yield batch


def numba_compute(backend, images, pixels_per_batch):
    for batch in batches(images, pixels_per_batch):
        backend.process(batch, CONFIG)


def numba_end_to_end(backend, paths, threads, pixels_per_batch):
    with ThreadPoolExecutor(threads) as pool:  # decodes ahead while the kernels run
        numba_compute(backend, pool.map(lambda path: decode_image(path, DECODE), paths), pixels_per_batch)


def thread_pool_map(function, items, threads):
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(function, items))


def process_pool(threads: int, paths: list[Path] | None):
    """A started spawn pool (spawn: forking after OpenMP started is unsafe), workers warm."""
    pool = multiprocessing.get_context("spawn").Pool(threads, _worker_init, (paths,))
    pool.map(_nothing, range(threads * 4), chunksize=1)
    return pool


def first_megapixels(images: list[np.ndarray], megapixels: float) -> list[np.ndarray]:
    """The leading images that add up to at most ``megapixels`` (at least one image)."""
    total = np.cumsum([im.shape[0] * im.shape[1] for im in images])
    return images[:max(1, int(np.searchsorted(total, megapixels * 1e6, side="right")))]


def chunk(count: int, threads: int) -> int:
    return max(1, count // (threads * 8))


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
        print(f"  {dataset:8} {mode:8} {source:6} {contender:13} {row['mp_per_s']:9.1f} MP/s "
              f"{row['images_per_s']:10.1f} img/s  {note}", flush=True)


def measure_dataset(table: Table, dataset: str, files: dict[str, list[Path]], args, backend) -> None:
    import cv2

    threads, repeats = args.threads, args.repeats
    images = [decode_image(path, DECODE) for path in files["jpeg"]]
    pixels = sum(im.shape[0] * im.shape[1] for im in images)
    count = len(images)

    # compute only
    cv2.setNumThreads(threads)
    table.add(dataset, "compute", "memory", "numba",
              best_of(repeats, lambda: numba_compute(backend, images, args.batch_pixels)), count, pixels)
    table.add(dataset, "compute", "memory", "opencv",
              best_of(repeats, lambda: [opencv_pipeline(im) for im in images]), count, pixels)
    subset = first_megapixels(images, args.reference_megapixels)
    from gpu_pipeline.backends.reference import ReferenceBackend

    reference = ReferenceBackend()
    table.add(dataset, "compute", "memory", "reference", best_of(1, lambda: reference.process(subset, CONFIG)),
              len(subset), sum(im.shape[0] * im.shape[1] for im in subset),
              f"first {len(subset)} images, 1 thread")
    sk_count = len(first_megapixels(images, args.skimage_megapixels))
    sk_pixels = sum(im.shape[0] * im.shape[1] for im in images[:sk_count])
    with process_pool(threads, files["jpeg"]) as pool:
        table.add(dataset, "compute", "memory", "opencv-pool", best_of(repeats, lambda: pool.map(
            _opencv_indexed, range(count), chunksize=chunk(count, threads))), count, pixels)
        note = "" if sk_count == count else f"first {sk_count} images"
        table.add(dataset, "compute", "memory", "skimage-pool", best_of(repeats, lambda: pool.map(
            _skimage_indexed, range(sk_count), chunksize=chunk(sk_count, threads))), sk_count, sk_pixels, note)

    # end to end and decode only
    cv2.setNumThreads(1)  # opencv: one image per pool thread, as the numba path decodes
    with process_pool(threads, None) as pool:
        for source in [source for source in ("jpeg", "png") if files[source]]:
            measure_files(table, dataset, source, files[source], (pixels, sk_count, sk_pixels), args, backend, pool)


def measure_files(table: Table, dataset: str, source: str, paths: list[Path], sizes: tuple, args, backend,
                  pool) -> None:
    """Decode-only and end-to-end rows for one file format of a dataset.

    ``sizes``: pixels of all files, and how many files (and pixels) scikit-image gets.
    """
    import cv2

    threads, repeats = args.threads, args.repeats
    count = len(paths)
    pixels, sk_count, sk_pixels = sizes
    table.add(dataset, "decode", source, "pillow",
              best_of(repeats, lambda: thread_pool_map(lambda p: decode_image(p, DECODE), paths, threads)),
              count, pixels, "gpu_pipeline.io, thread pool")
    table.add(dataset, "decode", source, "cv2.imread",
              best_of(repeats, lambda: thread_pool_map(lambda p: cv2.imread(str(p)), paths, threads)),
              count, pixels, "thread pool")
    table.add(dataset, "e2e", source, "numba",
              best_of(repeats, lambda: numba_end_to_end(backend, paths, threads, args.batch_pixels)),
              count, pixels, "decode: gpu_pipeline.io in a thread pool")
    table.add(dataset, "e2e", source, "opencv", best_of(repeats, lambda: thread_pool_map(opencv_file, paths, threads)),
              count, pixels, "cv2.imread + calls, thread pool")
    table.add(dataset, "e2e", source, "opencv-pool", best_of(repeats, lambda: pool.map(
        opencv_file, paths, chunksize=chunk(count, threads))), count, pixels, "cv2.imread")
    table.add(dataset, "e2e", source, "skimage-pool", best_of(repeats, lambda: pool.map(
        skimage_file, paths[:sk_count], chunksize=chunk(sk_count, threads))), sk_count, sk_pixels,
        "decode: gpu_pipeline.io" + ("" if sk_count == count else f", first {sk_count} images"))


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
    lut = kernels.equalize_luts(histogram.reshape(1, 256), np.array([height * width]))[0]
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
        "whole OpenCV pipeline, 1 thread": lambda: opencv_pipeline(image),
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
        lines.append(f"  {row['dataset']:8} {key[1]:8} {row['source']:6} numba / {row['contender']:13} "
                     f"{ours[key]['mp_per_s'] / row['mp_per_s']:6.2f}x" + ("  (e2e / decode-only)"
                                                                       if row["mode"] == "decode" else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
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
                        help="the reference (slow) runs on the first images up to this many megapixels")
    parser.add_argument("--skimage-megapixels", type=float, default=17,
                        help="scikit-image runs on the first images up to this many megapixels")
    parser.add_argument("--no-compile-time", action="store_true", help="skip measuring the cold JIT compile")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-stage profile")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()

    import numba

    from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend

    report: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv), "threads": args.threads,
                    "machine": {"cpus": os.cpu_count(), "usable_cpus": cores, "platform": platform.platform(),
                                "processor": platform.processor()}}
    if not args.no_compile_time:
        report["compile"] = compile_times()
        print(f"JIT: cold compile {report['compile']['cold_s']:.1f} s, "
              f"start from cache {report['compile']['cached_s']:.2f} s", flush=True)
    backend = NumbaCpuBackend(threads=args.threads)
    backend.warm_up()
    report["threading_layer"] = numba.threading_layer()
    table = Table()
    with tempfile.TemporaryDirectory(prefix="bench_cpu_") as folder:
        datasets = {}
        if args.large:
            datasets["large"] = write_corpus(Path(folder), "large", args.large, args.large_size, seed=1)
        if args.small:
            datasets["small"] = write_corpus(Path(folder), "small", args.small, args.small_size, seed=2)
        if args.eurosat.is_dir():  # JPEG only, as published
            datasets["eurosat"] = {"jpeg": sorted(args.eurosat.rglob("*.jpg")), "png": []}
        print(f"{'dataset':10} {'mode':8} {'source':6} {'contender':13} {'MP/s':>9}      {'images/s':>10}")
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
