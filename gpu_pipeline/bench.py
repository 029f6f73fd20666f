"""``gpu-pipeline bench``: megapixels per second of every backend, beside OpenCV and the
scikit-image pool, on the same images in the same run.

A corpus (generated, or the user's files) is measured three ways:

* compute: ``process()`` on the images already decoded in memory, in the engine's batches;
* end to end: the files through :class:`~gpu_pipeline.engine.Engine` (its decode pool running
  gpu_pipeline.io, batches, labels, records into a sink that drops them), as ``gpu-pipeline run``
  does;
* decode only: the engine's decode pool alone, and ``cv2.imread`` in as many threads.

Contenders: every registered backend (one that cannot run here is listed with the reason),
OpenCV with the same number of threads (the contract's calls, one image per thread), and the
scikit-image pipeline in a ``multiprocessing.Pool`` of as many processes: the baseline users
have today (a similar pipeline, not byte-identical). Each contender is warmed up first (JIT
compile or cache load, first launches, pool start; reported apart), then timed ``repeats``
times: the median, and min-max as the spread. Ratios are taken against the baseline: the
scikit-image pool, else the reference.

cv2, skimage and matplotlib are optional: imported only when used, reported when missing.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpu_pipeline.backends import registry
from gpu_pipeline.backends.base import Backend
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine import DEFAULT_BATCH_PIXELS, Decoded, Engine, batches, decode_stream, one_line
from gpu_pipeline.io import UsageError, decode_image
from gpu_pipeline.verify import OpenCvOracle

SCHEMA = "gpu-pipeline-bench/1"
OPENCV = "opencv"
SKIMAGE_POOL = "skimage-pool"
#: Contenders besides the registered backends; ``--backends`` may name them too.
BASELINES = (OPENCV, SKIMAGE_POOL)
#: Ratios are taken against the first of these that was measured.
BASELINE_ORDER = (SKIMAGE_POOL, "reference")
#: Slow contenders run on an evenly spread subset of at most this many megapixels.
SUBSET_MEGAPIXELS = {"reference": 2.0, SKIMAGE_POOL: 8.0}
#: The compute runs keep the decoded corpus in memory: it holds at most this many pixels.
MAX_CORPUS_PIXELS = 256 * 1024 * 1024
TILE_SIZE = 64
FORMATS = {"jpeg": (".jpg", {"quality": 90}), "png": (".png", {"compress_level": 6})}
DECODE_IO = "gpu_pipeline.io"
DECODE_OPENCV = "cv2.imread"
#: Short row names of the decoders in the table.
DECODE_LABELS = {DECODE_IO: "decode (io)", DECODE_OPENCV: "decode (cv2)"}


def usable_cpus() -> int:
    """Cores this process may run on (the affinity mask, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --- what the command line asks for -----------------------------------------------------------

DEFAULT_SIZE = "512x512"
DEFAULT_COUNT = 16
DEFAULT_TILES = 48
DEFAULT_FORMAT = "jpeg"


def parse_contenders(text: str | None) -> list[str]:
    """``"numba, opencv"`` -> ``["numba", "opencv"]``; None means every backend and baseline.

    A contender named explicitly must be able to run here (else UsageError, as for ``verify``);
    from the default set, the ones that cannot run are listed with the reason.
    """
    known = contender_names()
    if text is None:
        return known
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise UsageError(f"--backends takes comma-separated names such as numba,opencv, got {text!r}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"unknown backend {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    for name in names:
        reason = unavailable_reason(name)
        if reason is not None:
            raise UsageError(f"{name!r} cannot run here: {reason}")
    return list(dict.fromkeys(names))


def parse_size(text: str) -> tuple[int, int]:
    """``"640x480"`` -> ``(640, 480)``; a single number is a square."""
    parts = text.lower().split("x")
    try:
        width, height = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
    except ValueError:
        raise UsageError(f"--size takes WIDTHxHEIGHT such as 512x512, got {text!r}") from None
    if width < 1 or height < 1:
        raise UsageError(f"--size must be at least 1x1, got {text!r}")
    return width, height


def generation_request(size: str | None, count: int | None, tiles: int | None, fmt: str | None) -> dict:
    """The keyword arguments of :func:`generate_corpus` (less the folder), defaults filled in."""
    width, height = parse_size(size or DEFAULT_SIZE)
    count = DEFAULT_COUNT if count is None else count
    tiles = DEFAULT_TILES if tiles is None else tiles
    fmt = (fmt or DEFAULT_FORMAT).lower()
    if count < 1:
        raise UsageError(f"--count must be >= 1, got {count}")
    if tiles < 0:
        raise UsageError(f"--tiles must be >= 0, got {tiles}")
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    pixels = count * width * height + tiles * TILE_SIZE ** 2
    if pixels > MAX_CORPUS_PIXELS:
        raise UsageError(f"the corpus would hold {pixels / 1e6:,.0f} MP; bench keeps it decoded in memory, "
                         f"at most {MAX_CORPUS_PIXELS / 1e6:.0f} MP: lower --count or --size")
    return {"count": count, "width": width, "height": height, "tiles": tiles, "fmt": fmt}


def default_batch_size(images: int) -> int:
    """The engine's batch size, lowered so that the corpus makes at least 4 batches: decode
    overlaps compute only across batches, and a nightly run has thousands of them."""
    return max(1, min(Engine.batch_size, math.ceil(images / 4)))


# --- corpus ------------------------------------------------------------------------------------


#: Land-cover colours (RGB in [0, 1]) of the parcels: crops, forest, bare soil, dry grass, water, built-up.
LAND_COVER = np.array([[0.30, 0.42, 0.20], [0.16, 0.28, 0.16], [0.50, 0.40, 0.30], [0.62, 0.56, 0.38],
                       [0.14, 0.20, 0.28], [0.55, 0.54, 0.52]], np.float32)
#: Typical parcel side in pixels (fields at a fixed ground resolution).
PARCEL = 40


def synthetic_scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB image that looks like farmland from above, not the speckle of pure noise.

    Parcels of land-cover colours in irregular strips (sharp boundaries), lit by smooth fields
    at three scales, crossed by a few roads, with fine noise: Canny then finds chains of edges
    as in real imagery (about 3% of the pixels of a 512x512 scene with the default settings).
    """
    image = _parcels(rng, height, width)
    light = sum(weight * _smooth_field(rng, cells, height, width, 1)
                for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)))
    image *= 0.6 + 0.8 * light
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    for _ in range(max(1, (height + width) // 400)):  # straight roads, at any angle
        angle = rng.uniform(0, np.pi)
        centre = rng.uniform(0, height), rng.uniform(0, width)
        distance = np.abs((rows - centre[0]) * np.cos(angle) - (cols - centre[1]) * np.sin(angle))
        image[distance < rng.uniform(1, 2.5)] = 0.75
    image += 0.02 * rng.standard_normal((height, width, 1), dtype=np.float32)  # sensor noise, same in each band
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def _parcels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Strips of random height, each cut into fields of random width and land cover."""
    image = np.empty((height, width, 3), np.float32)
    top = 0
    while top < height:
        bottom = top + int(rng.integers(PARCEL // 2, 2 * PARCEL))
        left = 0
        while left < width:
            right = left + int(rng.integers(PARCEL // 2, 3 * PARCEL))
            image[top:bottom, left:right] = LAND_COVER[rng.integers(len(LAND_COVER))] * rng.uniform(0.8, 1.2)
            left = right
        top = bottom
    return image


def _smooth_field(rng: np.random.Generator, cells: int, height: int, width: int, bands: int) -> np.ndarray:
    """A random ``cells`` x ``cells`` grid in [0, 1), upsampled bicubically: (height, width, bands)."""
    grid = rng.random((cells, cells, bands), dtype=np.float32)
    down, down_weights = _cubic_taps(cells, height)
    across, across_weights = _cubic_taps(cells, width)
    rows = np.einsum("yk,ykxb->yxb", down_weights, grid[down])  # (height, cells, bands)
    return np.einsum("xk,yxkb->yxb", across_weights, rows[:, across])


def _cubic_taps(cells: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``size`` output pixels, its 4 grid neighbours (clamped) and Catmull-Rom weights."""
    centre = (np.arange(size) + 0.5) * cells / size - 0.5
    base = np.floor(centre).astype(np.int64)
    offsets = np.arange(-1, 3)
    distance = np.abs(offsets - (centre - base)[:, None])
    a = -0.5
    weights = np.where(distance <= 1, ((a + 2) * distance - (a + 3)) * distance ** 2 + 1,
                       np.where(distance < 2, a * (((distance - 5) * distance + 8) * distance - 4), 0.0))
    return np.clip(base[:, None] + offsets, 0, cells - 1), weights.astype(np.float32)


def cut_tiles(scenes: Iterable[np.ndarray], count: int, size: int = TILE_SIZE) -> list[np.ndarray]:
    """``count`` tiles of ``size`` x ``size``, cut row by row from ``scenes`` in turn."""
    tiles: list[np.ndarray] = []
    source = iter(scenes)
    while len(tiles) < count:
        scene = next(source)
        height, width = scene.shape[:2]
        tiles += [np.ascontiguousarray(scene[top:top + size, left:left + size])
                  for top in range(0, height - size + 1, size) for left in range(0, width - size + 1, size)]
    return tiles[:count]


def write_images(images: Iterable[np.ndarray], folder: Path, prefix: str,
                 formats: Sequence[str] = ("jpeg",)) -> dict[str, list[Path]]:
    """Write each image once per format (JPEG quality 90, PNG level 6), one at a time."""
    from PIL import Image

    written: dict[str, list[Path]] = {fmt: [] for fmt in formats}
    for index, image in enumerate(images):
        picture = Image.fromarray(image)
        for fmt in formats:
            suffix, options = FORMATS[fmt]
            path = folder / f"{prefix}_{index:05d}{suffix}"
            picture.save(path, format=fmt.upper(), **options)
            written[fmt].append(path)
    return written


def generate_corpus(folder: Path, *, count: int, width: int, height: int, tiles: int, fmt: str,
                    tile_sources: Sequence[Path] = (), seed: int = 0) -> tuple[list[Path], dict]:
    """Write ``count`` synthetic scenes and ``tiles`` 64x64 tiles into ``folder``.

    Tiles are cut from ``tile_sources`` (the bundled real scenes), then from synthetic
    1024x1024 scenes when those run out. Returns the files and a description of the corpus.
    """
    rng = np.random.default_rng(seed)
    scenes = (synthetic_scene(rng, height, width) for _ in range(count))
    paths = write_images(scenes, folder, "scene", [fmt])[fmt]
    available = 0
    if tiles:
        real = [decode_image(path, DecodeOptions()) for path in tile_sources]
        available = sum((im.shape[0] // TILE_SIZE) * (im.shape[1] // TILE_SIZE) for im in real)
        synthetic = (synthetic_scene(rng, 1024, 1024) for _ in itertools.count())
        paths += write_images(cut_tiles(itertools.chain(real, synthetic), tiles), folder, "tile", [fmt])[fmt]
    details = {
        "source": "generated", "format": fmt, "seed": seed,
        "scenes": {"count": count, "width": width, "height": height},
        "tiles": {"count": tiles, "size": TILE_SIZE, "from_bundled_scenes": min(tiles, available),
                  "from_synthetic_scenes": max(0, tiles - available)},
    }
    return paths, details


@dataclass
class Corpus:
    """The files to benchmark and their decoded pixels (same order)."""

    paths: list[Path]
    images: list[np.ndarray]
    details: dict = field(default_factory=dict)
    #: Error records of the files that could not be decoded (left out).
    skipped: list[dict] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        return sum(image.shape[0] * image.shape[1] for image in self.images)

    def shapes(self) -> dict[str, int]:
        """How many images of each shape, e.g. ``{"512x512x3": 16}`` (width x height x bands)."""
        return dict(Counter("x".join(map(str, (im.shape[1], im.shape[0], *im.shape[2:]))) for im in self.images))

    def spread_subset(self, megapixels: float) -> Corpus:
        """Every k-th image, with the smallest k that stays within ``megapixels`` (at least one image)."""
        step = spread_step([im.shape[0] * im.shape[1] for im in self.images], megapixels)
        return Corpus(self.paths[::step], self.images[::step], self.details)


def spread_step(pixels: Sequence[int], megapixels: float) -> int:
    """The smallest k for which every k-th item of ``pixels`` (from the first) adds up to at most
    ``megapixels``; ``len(pixels)`` (the first item alone) when none does."""
    budget = megapixels * 1e6
    step = max(1, min(len(pixels), math.ceil(sum(pixels) / budget)))
    while step < len(pixels) and sum(pixels[::step]) > budget:
        step += 1
    return step


def load_corpus(paths: Sequence[Path], details: dict, options: DecodeOptions, workers: int,
                max_pixels: int = MAX_CORPUS_PIXELS) -> Corpus:
    """Decode ``paths`` (with the engine's decode pool) up to ``max_pixels`` in all."""
    corpus = Corpus([], [], dict(details))
    pixels = 0
    with contextlib.closing(decode_stream(paths, options, workers, prefetch=4 * workers)) as stream:
        for item in stream:
            if item.image is None:
                corpus.skipped.append(item.error)
                continue
            size = item.image.shape[0] * item.image.shape[1]
            if corpus.images and pixels + size > max_pixels:
                corpus.details["truncated"] = (f"the first {len(corpus.images)} of {len(paths)} files: the decoded "
                                               f"corpus is capped at {max_pixels / 1e6:.0f} MP")
                break
            corpus.paths.append(item.path)
            corpus.images.append(item.image)
            pixels += size
    return corpus


# --- statistics --------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> tuple[float, float]:
    """The range of ``values``: with a handful of repeats, min-max says more than quartiles."""
    return min(values), max(values)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; None when either is missing or the baseline is zero."""
    if value is None or not baseline:
        return None
    return value / baseline


@dataclass
class Timing:
    """Wall-clock seconds of each repeat over the same ``images`` (``pixels`` in all)."""

    seconds: list[float]
    images: int
    pixels: int

    def rate(self, amount: float) -> dict[str, float]:
        """``amount`` per second: at the median time, and at the slowest and fastest repeat."""
        fastest, slowest = spread(self.seconds)
        return {"median": amount / median(self.seconds), "min": amount / slowest, "max": amount / fastest}

    @property
    def megapixels_per_second(self) -> dict[str, float]:
        return self.rate(self.pixels / 1e6)

    @property
    def images_per_second(self) -> dict[str, float]:
        return self.rate(self.images)

    def to_json(self) -> dict:
        fastest, slowest = spread(self.seconds)
        return {"images": self.images, "megapixels": self.pixels / 1e6, "seconds": self.seconds,
                "median_s": median(self.seconds), "min_s": fastest, "max_s": slowest,
                "megapixels_per_s": self.megapixels_per_second, "images_per_s": self.images_per_second}


def time_repeats(repeats: int, run: Callable[[], object], clock: Callable[[], float] = time.perf_counter
                 ) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run`` (by ``clock``, e.g. CPU time)."""
    seconds = []
    for _ in range(repeats):
        start = clock()
        run()
        seconds.append(max(clock() - start, 1e-9))
    return seconds


# --- the contenders ----------------------------------------------------------------------------


class OpenCvThreads(OpenCvOracle):
    """The contract's cv2 calls, one image per thread on ``threads`` threads (cv2 releases the
    GIL); cv2's own threading off, so that the threads do not oversubscribe the cores."""

    def __init__(self, threads: int | None = None) -> None:
        import cv2

        super().__init__(threads or usable_cpus())
        cv2.setNumThreads(1)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="opencv")

    def process(self, images, config, keep_images=False):
        one = super().process
        return list(self._pool.map(lambda image: one([image], config, keep_images)[0], images))

    def close(self) -> None:
        self._pool.shutdown()


def read_with_opencv(path: Path) -> np.ndarray:
    """``cv2.imread`` (BGR or gray: the same work downstream as RGB), or ValueError when it cannot."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cv2.imread cannot read {path}")
    return image


def opencv_edge_count(image: np.ndarray) -> int:
    """The contract's cv2 calls with the default settings, on one image."""
    return OpenCvOracle().process([image], PipelineConfig())[0].edge_count


def skimage_unavailable_reason() -> str | None:
    """None when scikit-image imports, else why not and how to install it."""
    try:
        import skimage  # noqa: F401
    except Exception as exc:
        return f"scikit-image cannot be imported ({one_line(exc)}); install it with: pip install scikit-image"
    return None


def skimage_edge_count(image: np.ndarray) -> int:
    """What users run today: rgb2gray, a 256-bin histogram, equalize_hist, canny (sigma 1)."""
    from skimage import color, exposure, feature

    gray = color.rgb2gray(image) if image.ndim == 3 else image / 255.0
    exposure.histogram(gray, nbins=256)
    return int(feature.canny(exposure.equalize_hist(gray), sigma=1.0).sum())


# Process pools: each worker keeps its own copy of the images (compute mode: no pickling timed)
# and decodes files itself (end to end). ``kind`` picks the pipeline and the decoder.
_WORKER: dict[str, Any] = {}


def _worker_init(kind: str, paths: Sequence[Path], options: DecodeOptions) -> None:
    if kind == "opencv":
        import cv2

        cv2.setNumThreads(1)
        pipeline, read = opencv_edge_count, read_with_opencv
    else:
        pipeline, read = skimage_edge_count, (lambda path: decode_image(path, options))
    pipeline(np.zeros((8, 8, 3), np.uint8))  # imports happen now, not in a timed task
    _WORKER.update(pipeline=pipeline, read=read, images=[decode_image(path, options) for path in paths])


def _pipeline_on_image(index: int) -> int:
    return _WORKER["pipeline"](_WORKER["images"][index])


def _pipeline_on_file(path: Path) -> int:
    return _WORKER["pipeline"](_WORKER["read"](path))


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def start_pool(kind: str, processes: int, paths: Sequence[Path], options: DecodeOptions):
    """A started ``multiprocessing.Pool`` (spawn: forking after OpenMP started is unsafe), every
    worker ready. ``kind``: "skimage" or "opencv"; ``paths``: the images each worker holds."""
    pool = multiprocessing.get_context("spawn").Pool(processes, _worker_init, (kind, list(paths), options))
    pool.map(_pause, [0.05] * processes * 2, chunksize=1)  # tasks on every worker: all initialised
    return pool


def _chunksize(count: int, processes: int) -> int:
    return max(1, count // (processes * 8))


def pool_compute(pool, count: int, processes: int) -> None:
    """The pool's pipeline on the ``count`` images its workers hold."""
    pool.map(_pipeline_on_image, range(count), chunksize=_chunksize(count, processes))


def pool_files(pool, paths: Sequence[Path], processes: int) -> None:
    """The pool's decoder and pipeline on ``paths``."""
    pool.map(_pipeline_on_file, paths, chunksize=_chunksize(len(paths), processes))


# --- measuring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    repeats: int = 3
    threads: int = field(default_factory=usable_cpus)
    batch_size: int = Engine.batch_size
    batch_pixels: int = DEFAULT_BATCH_PIXELS
    config: PipelineConfig = field(default_factory=PipelineConfig)
    decode_options: DecodeOptions = field(default_factory=DecodeOptions)


@dataclass
class Contender:
    """One row of the results: a backend, a baseline or a decoder, measured or why not."""

    name: str
    kind: str  # "backend", "baseline" or "decode"
    description: str = ""
    status: str = "measured"  # or "unavailable", "not installed", "failed"
    reason: str | None = None
    #: What it ran on when not the whole corpus.
    subset: str | None = None
    startup_s: float | None = None  # construction and warm-up hook: JIT compile or cache load, pool start
    first_pass_s: float | None = None  # the first compute pass (first launches, allocations), not in the rates
    compute: Timing | None = None
    end_to_end: Timing | None = None
    decode: Timing | None = None
    #: GPU time per phase and repeat, from backends that measure it (``device_times``).
    device: dict | None = None

    @property
    def measured(self) -> bool:
        return self.status == "measured"


def run_compute(backend: Backend, images: Sequence[np.ndarray], settings: BenchSettings) -> None:
    """``process()`` over images in memory, grouped as the engine groups them."""
    items = (Decoded(Path(str(index)), image=image) for index, image in enumerate(images))
    for batch in batches(items, settings.batch_size, settings.batch_pixels):
        backend.process([item.image for item in batch], settings.config)


class _DropRecords:
    def write(self, records: Iterable[dict]) -> None:
        pass


def run_end_to_end(backend: Backend, paths: Sequence[Path], settings: BenchSettings) -> None:
    """``paths`` through the engine as ``gpu-pipeline run`` streams them, records dropped."""
    engine = Engine(backend=backend, config=settings.config, decode_options=settings.decode_options,
                    batch_size=settings.batch_size, batch_pixels=settings.batch_pixels, workers=settings.threads)
    summary = engine.run(list(paths), _DropRecords())
    if summary.failed:
        stages = ", ".join(f"{stage}: {n}" for stage, n in summary.failures_by_stage.items())
        raise RuntimeError(f"{summary.failed} of {summary.total} images failed end to end ({stages})")


def decode_with_io(paths: Sequence[Path], settings: BenchSettings) -> None:
    """The engine's decode pool alone (same workers and read-ahead)."""
    prefetch = settings.batch_size + 2 * settings.threads
    for item in decode_stream(paths, settings.decode_options, settings.threads, prefetch):
        if item.error is not None:
            raise RuntimeError(f"{item.error['path']}: {item.error['error']}")


def decode_with_opencv(paths: Sequence[Path], threads: int) -> None:
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(read_with_opencv, paths):
            pass


def _subset_for(name: str, corpus: Corpus) -> tuple[Corpus, str | None]:
    """The corpus, or for a slow contender an evenly spread subset and a note saying so."""
    budget = SUBSET_MEGAPIXELS.get(name)
    if budget is None or corpus.pixels <= budget * 1e6:
        return corpus, None
    subset = corpus.spread_subset(budget)
    return subset, (f"{len(subset.images)} of {len(corpus.images)} images ({subset.pixels / 1e6:.1f} MP), "
                    "evenly spread: too slow for the whole corpus")


def _device_phases(times: Any, repeats: int) -> dict:
    phases = asdict(times) if is_dataclass(times) else dict(vars(times))
    per_repeat = {f"{key}_per_repeat": value / repeats for key, value in phases.items()}
    kernels, pixels = phases.get("kernels"), phases.get("pixels")
    per_repeat["kernels_mp_per_s"] = pixels / 1e6 / kernels if kernels and pixels else None
    return per_repeat


def measure_backend(result: Contender, make: Callable[[], Backend], corpus: Corpus,
                    settings: BenchSettings) -> Contender:
    """Start and warm up a backend, then time its compute and end-to-end runs."""
    subset, result.subset = _subset_for(result.name, corpus)
    start = time.perf_counter()
    try:
        backend = make()
        if hasattr(backend, "warm_up"):
            backend.warm_up()
    except Exception as exc:
        result.status, result.reason = "failed", f"cannot start: {one_line(exc)}"
        return result
    result.startup_s = time.perf_counter() - start
    repeats, count, pixels = settings.repeats, len(subset.images), subset.pixels
    with backend:
        try:
            result.first_pass_s = time_repeats(1, lambda: run_compute(backend, subset.images, settings))[0]
            times = getattr(backend, "device_times", None)
            if times is not None:
                backend.device_times = type(times)()
            result.compute = Timing(time_repeats(repeats, lambda: run_compute(backend, subset.images, settings)),
                                    count, pixels)
            if times is not None:
                result.device = _device_phases(backend.device_times, repeats)
            result.end_to_end = Timing(
                time_repeats(repeats, lambda: run_end_to_end(backend, subset.paths, settings)), count, pixels)
        except Exception as exc:
            result.status, result.reason = "failed", f"failed while measured: {one_line(exc)}"
    return result


def measure_skimage_pool(corpus: Corpus, settings: BenchSettings) -> Contender:
    threads = settings.threads
    result = Contender(SKIMAGE_POOL, "baseline", f"scikit-image rgb2gray, histogram, equalize_hist, "
                       f"canny(sigma=1) in multiprocessing.Pool({threads}), decode with gpu_pipeline.io: "
                       "what users run today (similar, not byte-identical)")
    reason = skimage_unavailable_reason()
    if reason is not None:
        result.status, result.reason = "not installed", reason
        return result
    subset, result.subset = _subset_for(SKIMAGE_POOL, corpus)
    count, pixels = len(subset.images), subset.pixels
    start = time.perf_counter()
    try:
        pool = start_pool("skimage", threads, subset.paths, settings.decode_options)
    except Exception as exc:
        result.status, result.reason = "failed", f"cannot start the pool: {one_line(exc)}"
        return result
    result.startup_s = time.perf_counter() - start
    with pool:  # terminates the workers on the way out
        try:
            result.first_pass_s = time_repeats(1, lambda: pool_compute(pool, count, threads))[0]
            result.compute = Timing(time_repeats(settings.repeats, lambda: pool_compute(pool, count, threads)),
                                    count, pixels)
            result.end_to_end = Timing(
                time_repeats(settings.repeats, lambda: pool_files(pool, subset.paths, threads)), count, pixels)
        except Exception as exc:
            result.status, result.reason = "failed", f"failed while measured: {one_line(exc)}"
    return result


def measure_decoders(corpus: Corpus, settings: BenchSettings) -> list[Contender]:
    """Decode-only throughput: the engine's pool (gpu_pipeline.io), and cv2.imread when installed."""
    threads, count, pixels = settings.threads, len(corpus.images), corpus.pixels
    runs = {
        DECODE_IO: (f"the engine's decode pool: gpu_pipeline.io in {threads} threads", None,
                    lambda: decode_with_io(corpus.paths, settings)),
        DECODE_OPENCV: (f"cv2.imread in {threads} threads", OpenCvOracle.unavailable_reason(),
                        lambda: decode_with_opencv(corpus.paths, threads)),
    }
    results = []
    for name, (description, reason, run) in runs.items():
        result = Contender(name, "decode", description)
        if reason is not None:
            result.status, result.reason = "not installed", reason
        else:
            try:
                result.first_pass_s = time_repeats(1, run)[0]
                result.decode = Timing(time_repeats(settings.repeats, run), count, pixels)
            except Exception as exc:
                result.status, result.reason = "failed", one_line(exc)
        results.append(result)
    return results


def contender_names() -> list[str]:
    """Every registered backend, then the baselines."""
    return [*registry.backend_names(), *BASELINES]


def unavailable_reason(name: str) -> str | None:
    """None when contender ``name`` can run here, else why not."""
    if name == OPENCV:
        return OpenCvOracle.unavailable_reason()
    if name == SKIMAGE_POOL:
        return skimage_unavailable_reason()
    return registry.unavailable_reason(name)


def measure(name: str, corpus: Corpus, settings: BenchSettings) -> Contender:
    """One contender by name: a registered backend or one of :data:`BASELINES`."""
    threads = settings.threads
    if name == SKIMAGE_POOL:
        return measure_skimage_pool(corpus, settings)
    if name == OPENCV:
        result = Contender(OPENCV, "baseline", f"the contract's cv2 calls, one image per thread in {threads} "
                           "threads; end to end: decode with gpu_pipeline.io in the engine")
        make: Callable[[], Backend] = partial(OpenCvThreads, threads)
    else:
        result = Contender(name, "backend")
        make = partial(registry.create, name, threads=threads)
    reason = unavailable_reason(name)
    if reason is not None:
        result.status, result.reason = ("not installed" if result.kind == "baseline" else "unavailable"), reason
        return result
    return measure_backend(result, make, corpus, settings)


@dataclass
class BenchReport:
    corpus: Corpus
    settings: BenchSettings
    contenders: list[Contender]
    decoders: list[Contender]
    baseline: str | None

    def find(self, name: str) -> Contender | None:
        return next((c for c in [*self.contenders, *self.decoders] if c.name == name), None)

    def ratios(self, contender: Contender) -> dict[str, float | None]:
        """Median MP/s over the baseline's (compute, end to end) and end to end over decode only."""
        base = self.find(self.baseline) if self.baseline else None
        decode = self.find(DECODE_IO)

        def mp(timing: Timing | None) -> float | None:
            return timing.megapixels_per_second["median"] if timing is not None else None

        return {
            "compute_vs_baseline": ratio(mp(contender.compute), mp(base.compute) if base else None),
            "end_to_end_vs_baseline": ratio(mp(contender.end_to_end), mp(base.end_to_end) if base else None),
            "end_to_end_vs_decode_only": ratio(mp(contender.end_to_end), mp(decode.decode) if decode else None),
        }

    def to_json(self, machine: dict | None = None) -> dict:
        """The whole report (docs/benchmarks.md describes the schema)."""
        settings = self.settings
        corpus = self.corpus
        return {
            "schema": SCHEMA,
            "machine": machine,
            "settings": {"repeats": settings.repeats, "threads": settings.threads, "batch_size": settings.batch_size,
                         "batch_pixels": settings.batch_pixels, "config": asdict(settings.config)},
            "corpus": {**corpus.details, "images": len(corpus.images), "megapixels": corpus.pixels / 1e6,
                       "shapes": corpus.shapes(), "skipped": corpus.skipped},
            "baseline": self.baseline,
            "contenders": {c.name: self._contender_json(c) for c in self.contenders},
            "decode_only": {c.name: self._contender_json(c) for c in self.decoders},
        }

    def _contender_json(self, c: Contender) -> dict:
        def timing(t: Timing | None) -> dict | None:
            return t.to_json() if t is not None else None

        return {
            "kind": c.kind, "description": c.description, "status": c.status, "reason": c.reason,
            "subset": c.subset, "warmup": {"startup_s": c.startup_s, "first_pass_s": c.first_pass_s},
            "compute": timing(c.compute), "end_to_end": timing(c.end_to_end), "decode": timing(c.decode),
            "device": c.device, "ratios": self.ratios(c) if c.kind != "decode" else None,
        }


def choose_baseline(contenders: Sequence[Contender], order: Sequence[str] = BASELINE_ORDER) -> str | None:
    """The first name of ``order`` that was measured (compute and end to end)."""
    measured = {c.name for c in contenders if c.compute is not None and c.end_to_end is not None}
    return next((name for name in order if name in measured), None)


def run_benchmark(corpus: Corpus, names: Sequence[str], settings: BenchSettings,
                  baseline_order: Sequence[str] = BASELINE_ORDER,
                  progress: Callable[[str], None] | None = None) -> BenchReport:
    """Measure the decoders, then each contender of ``names`` in turn, on ``corpus``."""
    if progress is not None:
        progress("decode only")
    decoders = measure_decoders(corpus, settings)
    contenders = []
    for name in names:
        if progress is not None:
            progress(name)
        contenders.append(measure(name, corpus, settings))
    return BenchReport(corpus, settings, contenders, decoders, choose_baseline(contenders, baseline_order))


# --- printing and plotting ---------------------------------------------------------------------


def _number(value: float) -> str:
    """Three significant digits or so, thousands separated."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _rate_cell(timing: Timing | None, per_image: bool = False) -> str:
    """Median megapixels/s and, after it, half the min-max range in % of the median (or images/s)."""
    if timing is None:
        return ""
    if per_image:
        return _number(timing.images_per_second["median"])
    rate = timing.megapixels_per_second
    if len(timing.seconds) == 1:
        return _number(rate["median"])
    half_range = (rate["max"] - rate["min"]) / 2 / rate["median"] * 100
    return f"{_number(rate['median'])} [dim]±{half_range:.0f}%[/]"


def _times(value: float | None) -> str:
    """A ratio with two significant digits: 0.054x, 0.7x, 7.6x, 33x, 120x."""
    if value is None:
        return "-"
    return f"{value:.2g}x" if value < 100 else f"{value:.0f}x"


def describe_corpus(report: BenchReport) -> str:
    corpus, details = report.corpus, report.corpus.details
    shapes = ", ".join(f"{n} x {shape}" for shape, n in corpus.shapes().items())
    origin = (f"generated {details['format'].upper()}" if details.get("source") == "generated"
              else "given files")
    return f"{len(corpus.images)} images ({origin}: {shapes}), {corpus.pixels / 1e6:.1f} MP"


def results_table(report: BenchReport) -> Table:
    table = Table(title=describe_corpus(report), box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)
    for header in ("contender", "compute\nMP/s", "\nimg/s", "e2e\nMP/s", "\nimg/s",
                   "x baseline\ncomp / e2e", "e2e /\ndecode"):
        table.add_column(header, justify="left" if header == "contender" else "right", no_wrap=True)
    for c in report.contenders:
        name = c.name + ("*" if c.subset else "")
        if not c.measured:
            table.add_row(name, "[yellow]failed[/]" if c.status == "failed" else "[dim]n/a[/]", *[""] * 5)
            continue
        ratios = report.ratios(c)
        table.add_row(name, _rate_cell(c.compute), _rate_cell(c.compute, True), _rate_cell(c.end_to_end),
                      _rate_cell(c.end_to_end, True),
                      f"{_times(ratios['compute_vs_baseline'])} / {_times(ratios['end_to_end_vs_baseline'])}",
                      _times(ratios["end_to_end_vs_decode_only"]))
    table.add_section()
    for c in report.decoders:
        name = DECODE_LABELS.get(c.name, c.name)
        if not c.measured:
            table.add_row(name, "", "", "[yellow]failed[/]" if c.status == "failed" else "[dim]n/a[/]", "", "", "")
        else:
            table.add_row(name, "", "", _rate_cell(c.decode), _rate_cell(c.decode, True), "", "")
    return table


def notes(report: BenchReport) -> list[str]:
    """What the table cannot say: subsets, why a contender did not run, GPU kernel time, dropped files."""
    lines = []
    for c in [*report.contenders, *report.decoders]:
        if c.subset:
            lines.append(f"{c.name}*: on {c.subset}")
        if not c.measured:
            lines.append(f"{c.name}: {c.status}: {c.reason}")
        if c.device and c.device.get("kernels_mp_per_s"):
            lines.append(f"{c.name}: kernels alone {c.device['kernels_mp_per_s']:,.0f} MP/s (GPU time)")
    details = report.corpus.details
    if details.get("truncated"):
        lines.append(f"corpus: {details['truncated']}")
    if report.corpus.skipped:
        first = report.corpus.skipped[0]
        lines.append(f"corpus: {len(report.corpus.skipped)} files could not be decoded and are left out "
                     f"(first: {first['path']}: {first['error']})")
    return lines


def legend(report: BenchReport) -> list[str]:
    """How to read the table."""
    settings = report.settings
    spread_note = (f"median of {settings.repeats} repeats ± half their min-max range"
                   if settings.repeats > 1 else "one repeat")
    return [
        (f"{settings.threads} threads, batches of up to {settings.batch_size} images. MP/s: {spread_note}, "
         "after a warm-up; img/s at the median."),
        "comp: compute, on the decoded images in memory. e2e: end to end, the files through the engine "
        "(decode included).",
        ("x baseline: median MP/s over " + (f"{report.baseline}'s." if report.baseline else
                                            "the baseline's (none was measured).")
         + " e2e / decode: e2e MP/s over decode (io)'s."),
        ("warm-up, not in the rates: start (construction, JIT compile or cache load, pool start) + first pass "
         "(first launches, allocations), in s: "
         + (", ".join(f"{c.name} {c.startup_s:.2f} + {c.first_pass_s:.2f}" for c in report.contenders
                      if c.measured) or "none measured") + "."),
        (f"decode (io): the engine's decode pool alone (gpu_pipeline.io); decode (cv2): cv2.imread in "
         f"{settings.threads} threads."),
    ]


def print_report(console: Console, report: BenchReport) -> None:
    console.print(results_table(report))
    for line in legend(report):
        console.print(escape(line), soft_wrap=False)
    for line in notes(report):  # one line each, whatever the width: they name a contender, then say why
        console.print(escape(line), soft_wrap=True)


def plot_unavailable_reason() -> str | None:
    """None when matplotlib imports, else the message of ``--plot`` without it."""
    try:
        import matplotlib  # noqa: F401
    except Exception as exc:
        return f"--plot needs matplotlib ({one_line(exc)}); install it with: pip install 'gpu-pipeline[plot]'"
    return None


def plot_report(report: BenchReport, path: Path) -> None:
    """A bar chart of median MP/s per contender (compute, end to end; min-max as error bars),
    decode-only speed as a dashed line; log scale, since contenders differ by orders of magnitude."""
    from matplotlib.figure import Figure

    shown = [c for c in report.contenders if c.measured]
    figure = Figure(figsize=(max(6.0, 1.2 * len(shown) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(shown))
    width = 0.38
    for offset, mode, label in ((-width / 2, "compute", "compute (decoded, in memory)"),
                                (width / 2, "end_to_end", "end to end (decode included)")):
        rates = [getattr(c, mode).megapixels_per_second for c in shown]
        medians = np.array([r["median"] for r in rates])
        errors = np.array([[r["median"] - r["min"] for r in rates], [r["max"] - r["median"] for r in rates]])
        axes.bar(positions + offset, medians, width, yerr=errors, capsize=3, label=label)
    decode = report.find(DECODE_IO)
    if decode is not None and decode.decode is not None:
        axes.axhline(decode.decode.megapixels_per_second["median"], linestyle="--", color="gray",
                     label=f"decode only ({DECODE_IO})")
    axes.set_xticks(positions, [c.name + ("*" if c.subset else "") for c in shown])
    axes.set_yscale("log")
    axes.set_ylabel("megapixels per second (median; bars: min-max)")
    axes.set_title(f"{describe_corpus(report)}, {report.settings.threads} threads", fontsize=9)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)
