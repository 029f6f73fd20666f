"""Measuring: each contender warmed up, then timed on the corpus (compute, end to end, decode
only), gathered into a :class:`BenchReport` with its ratios and JSON."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gpu_pipeline.backends import registry
from gpu_pipeline.backends.base import Backend
from gpu_pipeline.bench.baselines import (BASELINES, OPENCV, OPENCV_POOL, SKIMAGE_POOL, OpenCvThreads, pool_compute, pool_files,
                                          read_with_opencv, skimage_unavailable_reason, start_pool, usable_cores)
from gpu_pipeline.bench.corpus import Corpus
from gpu_pipeline.bench.stats import Timing, ratio, time_repeats
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine.decoding import PROCESS_DECODE_BELOW_PIXELS, DecodedPart, Packer, decode_stream
from gpu_pipeline.engine.stream import Engine, part_batches
from gpu_pipeline.images import ImageBatch
from gpu_pipeline.errors import counted, one_line, printable
from gpu_pipeline.diagnostics.verify import OpenCvOracle
from gpu_pipeline.outputs.sink import NullSink

SCHEMA = "gpu-pipeline-bench/1"
#: Ratios are taken against the first of these that was measured.
BASELINE_ORDER = (OPENCV_POOL, SKIMAGE_POOL, "reference")
#: Slow contenders run on an evenly spread subset of at most this many megapixels.
SUBSET_MEGAPIXELS = {"reference": 2.0, SKIMAGE_POOL: 8.0}
DECODE_IO = "gpu_pipeline.inputs.decode"
DECODE_OPENCV = "cv2.imread"


@dataclass(frozen=True)
class BenchSettings:
    repeats: int = 3
    threads: int = field(default_factory=usable_cores)
    batch_size: int | None = None  # images per batch at most; None: the backend's pixel budget only
    batch_pixels: int | None = None  # None: what the backend asks for (Backend.batch_pixels)
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


def packed(images: Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    """``images`` as the engine hands decoded images over: small ones (tiles) copied into one buffer
    by a decode thread's :class:`~gpu_pipeline.engine.decoding.Packer` (a decode process packs its
    part the same way into a slot of shared memory), not an array per image whose address each
    backend call would take one at a time; large ones (scenes) as they are, each decoded in a
    thread into an array of its own (:data:`~gpu_pipeline.engine.decoding.PROCESS_DECODE_BELOW_PIXELS`)."""
    small = [image.shape[0] * image.shape[1] < PROCESS_DECODE_BELOW_PIXELS for image in images]
    if not any(small):
        return images
    packer = Packer(sum(image.size + 16 for image, is_small in zip(images, small) if is_small))  # (+ alignment)
    for image, is_small in zip(images, small):
        place = packer.place(image.shape) if is_small else None
        if place is not None:
            place[...] = image
        packer.add(image if place is None else place)
    return packer.take()


def run_compute(backend: Backend, images: Sequence[np.ndarray], settings: BenchSettings) -> None:
    """``process()`` over images in memory, grouped and packed as the engine hands them over (pass
    :func:`packed` images: packing them is not the backend's work)."""
    whole = DecodedPart([str(index) for index in range(len(images))], ImageBatch.of(images))
    for batch in part_batches(iter([whole]), settings.batch_size, settings.batch_pixels or backend.batch_pixels()):
        backend.process(batch.images, settings.config)


def run_end_to_end(backend: Backend, paths: Sequence[Path], settings: BenchSettings) -> None:
    """``paths`` through the engine as ``gpu-pipeline run`` streams them, records dropped."""
    engine = Engine(backend=backend, config=settings.config, decode_options=settings.decode_options,
                    batch_size=settings.batch_size, batch_pixels=settings.batch_pixels, workers=settings.threads)
    summary = engine.run(list(paths), NullSink())
    if summary.failed:
        stages = ", ".join(f"{stage}: {n}" for stage, n in summary.failures_by_stage.items())
        raise RuntimeError(f"{summary.failed} of {summary.total} images failed end to end ({stages})")


def decode_with_io(paths: Sequence[Path], settings: BenchSettings) -> None:
    """The engine's decode pool alone, as ``gpu-pipeline run`` uses it (same threads, chunks and
    read-ahead in pixels)."""
    for item in decode_stream(paths, settings.decode_options, settings.threads):
        if item.error is not None:
            raise RuntimeError(f"{item.error['path']}: {item.error['error']}")


def readable_by_opencv(corpus: Corpus, threads: int) -> Corpus:
    """The corpus less the files ``cv2.imread`` cannot read (a float TIFF, more than 4 bands), which
    go to ``corpus.opencv_unreadable``: the rows that decode with it (``opencv-pool``, ``cv2.imread``)
    are timed on the others rather than failing on the first such file. One read of every file."""
    def reads(path: Path) -> bool:
        try:
            read_with_opencv(path)
        except Exception:  # None (ValueError), or a cv2.error
            return False
        return True

    with ThreadPoolExecutor(threads) as pool:
        readable = list(pool.map(reads, corpus.paths))
    corpus.opencv_unreadable = [str(path) for path, ok in zip(corpus.paths, readable) if not ok]
    if not corpus.opencv_unreadable:
        return corpus
    return Corpus([p for p, ok in zip(corpus.paths, readable) if ok],
                  [image for image, ok in zip(corpus.images, readable) if ok], corpus.details)


def _left_out_by_opencv(contender: Contender, corpus: Corpus, readable: Corpus) -> None:
    """Say on which files a row that decodes with cv2.imread was timed (or why it was not)."""
    if not corpus.opencv_unreadable or contender.status != "measured" and contender.reason is not None:
        return
    if not readable.images:
        contender.status, contender.reason = "unavailable", (
            f"cv2.imread cannot read any of the {len(corpus.images)} files (first: {printable(corpus.opencv_unreadable[0])})")
        contender.compute = contender.end_to_end = contender.decode = None
        return
    note = (f"{len(readable.images)} of {len(corpus.images)} images ({readable.pixels / 1e6:.1f} MP): cv2.imread "
            f"cannot read the other {len(corpus.opencv_unreadable)} (first: {printable(corpus.opencv_unreadable[0])})")
    contender.subset = note + (f"; then {contender.subset}" if contender.subset else "")


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
        backend.warm_up()
    except Exception as exc:
        result.status, result.reason = "failed", f"cannot start: {one_line(exc)}"
        return result
    result.startup_s = time.perf_counter() - start
    repeats, count, pixels = settings.repeats, len(subset.images), subset.pixels
    images = packed(subset.images)
    with backend:
        try:
            result.first_pass_s = time_repeats(1, lambda: run_compute(backend, images, settings))[0]
            times = getattr(backend, "device_times", None)
            if times is not None:
                backend.device_times = type(times)()
            result.compute = Timing(time_repeats(repeats, lambda: run_compute(backend, images, settings)),
                                    count, pixels)
            if times is not None:
                result.device = _device_phases(backend.device_times, repeats)
            result.end_to_end = Timing(
                time_repeats(repeats, lambda: run_end_to_end(backend, subset.paths, settings)), count, pixels)
        except Exception as exc:
            result.status, result.reason = "failed", f"failed while measured: {one_line(exc)}"
    return result


def measure_pool(name: str, corpus: Corpus, settings: BenchSettings) -> Contender:
    """A baseline in ``multiprocessing.Pool(threads)``: the contract's cv2 calls (``opencv-pool``,
    decoding with ``cv2.imread``), or the scikit-image pipeline (``skimage-pool``)."""
    threads = settings.threads
    if name == OPENCV_POOL:
        kind, reason = "opencv", OpenCvOracle.unavailable_reason()
        description = (f"the contract's cv2 calls in multiprocessing.Pool({threads}), one process per core, "
                       "decode with cv2.imread: what a user replaces (byte-identical to the backends)")
    else:
        kind, reason = "skimage", skimage_unavailable_reason()
        description = (f"scikit-image rgb2gray, histogram, equalize_hist, canny(sigma=1) in "
                       f"multiprocessing.Pool({threads}), decode with gpu_pipeline.inputs.decode: what users run "
                       "today (similar, not byte-identical)")
    result = Contender(name, "baseline", description)
    if reason is not None:
        result.status, result.reason = "not installed", reason
        return result
    subset, result.subset = _subset_for(name, corpus)
    count, pixels = len(subset.images), subset.pixels
    start = time.perf_counter()
    try:
        pool = start_pool(kind, threads, subset.paths, settings.decode_options)
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


def measure_decoders(corpus: Corpus, settings: BenchSettings, readable: Corpus | None = None) -> list[Contender]:
    """Decode-only throughput: the engine's pool (gpu_pipeline.inputs.decode), and cv2.imread when
    installed, on ``readable``, the files it can read (:func:`readable_by_opencv`)."""
    threads = settings.threads
    readable = corpus if readable is None else readable
    runs = {
        DECODE_IO: (f"the engine's decode pool: gpu_pipeline.inputs.decode in {counted(threads, 'thread')}", None,
                    corpus, lambda: decode_with_io(corpus.paths, settings)),
        DECODE_OPENCV: (f"cv2.imread in {counted(threads, 'thread')}", OpenCvOracle.unavailable_reason(),
                        readable, lambda: decode_with_opencv(readable.paths, threads)),
    }
    results = []
    for name, (description, reason, files, run) in runs.items():
        count, pixels = len(files.images), files.pixels
        result = Contender(name, "decode", description)
        if not files.images:
            _left_out_by_opencv(result, corpus, files)
        elif reason is not None:
            result.status, result.reason = "not installed", reason
        else:
            try:
                result.first_pass_s = time_repeats(1, run)[0]
                result.decode = Timing(time_repeats(settings.repeats, run), count, pixels)
            except Exception as exc:
                result.status, result.reason = "failed", one_line(exc)
            if name == DECODE_OPENCV:
                _left_out_by_opencv(result, corpus, files)
        results.append(result)
    return results


def contender_names() -> list[str]:
    """Every registered backend, then the baselines."""
    return [*registry.backend_names(), *BASELINES]


def unavailable_reason(name: str) -> str | None:
    """None when contender ``name`` can run here, else why not."""
    if name in (OPENCV, OPENCV_POOL):
        return OpenCvOracle.unavailable_reason()
    if name == SKIMAGE_POOL:
        return skimage_unavailable_reason()
    return registry.unavailable_reason(name)


def measure(name: str, corpus: Corpus, settings: BenchSettings) -> Contender:
    """One contender by name: a registered backend or one of :data:`BASELINES`."""
    threads = settings.threads
    if name in (OPENCV_POOL, SKIMAGE_POOL):
        return measure_pool(name, corpus, settings)
    if name == OPENCV:
        result = Contender(OPENCV, "baseline", f"the contract's cv2 calls, one image per thread in "
                           f"{counted(threads, 'thread')} of one process (cv2 releases the GIL); end to end: decode with "
                           "gpu_pipeline.inputs.decode in the engine")
        make: Callable[[], Backend] = partial(OpenCvThreads, threads)
    else:
        result = Contender(name, "backend")
        make = partial(registry.create, name, threads=threads)
    reason = unavailable_reason(name)
    if reason is not None:
        result.status, result.reason = ("not installed" if result.kind == "baseline" else "unavailable"), reason
        return result
    return measure_backend(result, make, corpus, settings)


def thread_counts(most: int) -> list[int]:
    """1, 2, 4, ... up to ``most``, and ``most`` itself: the rows of a scaling table."""
    counts = [1]
    while counts[-1] * 2 < most:
        counts.append(counts[-1] * 2)
    return counts if most == 1 else [*counts, most]


#: Backends whose scaling is measured: the reference runs on one thread whatever it is given.
NOT_SCALED = ("reference",)


def measure_scaling(contenders: Sequence[Contender], corpus: Corpus, settings: BenchSettings) -> dict[str, list[dict]]:
    """Each measured backend again with 1, 2, 4, ... ``settings.threads`` threads (compute threads
    and decoders alike), measured as :func:`measure_backend` measures it: median MP/s of compute
    and end to end per thread count (None, with the reason, where a run failed)."""
    scaling = {}
    for contender in contenders:
        if contender.kind != "backend" or not contender.measured or contender.name in NOT_SCALED:
            continue
        rows = []
        for threads in thread_counts(settings.threads):
            run = measure_backend(Contender(contender.name, "backend"),
                                  partial(registry.create, contender.name, threads=threads), corpus,
                                  replace(settings, threads=threads))
            rows.append({"threads": threads, "reason": run.reason,
                         **{mode: timing.to_json() if timing is not None else None
                            for mode, timing in (("compute", run.compute), ("end_to_end", run.end_to_end))}})
        scaling[contender.name] = rows
    return scaling


@dataclass
class BenchReport:
    corpus: Corpus
    settings: BenchSettings
    contenders: list[Contender]
    decoders: list[Contender]
    baseline: str | None
    #: Per backend, its rates by thread count (:func:`measure_scaling`); empty unless asked for.
    scaling: dict[str, list[dict]] = field(default_factory=dict)

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
                       "shapes": corpus.shapes(), "skipped": corpus.skipped,
                       "opencv_unreadable": corpus.opencv_unreadable},
            "baseline": self.baseline,
            "contenders": {c.name: self._contender_json(c) for c in self.contenders},
            "decode_only": {c.name: self._contender_json(c) for c in self.decoders},
            "scaling": self.scaling,
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
                  progress: Callable[[str], None] | None = None, scaling: bool = False) -> BenchReport:
    """Measure the decoders, then each contender of ``names`` in turn, on ``corpus``; with
    ``scaling``, then each measured backend by thread count."""
    readable = corpus
    if OpenCvOracle.unavailable_reason() is None:  # (cv2 itself missing: those rows say so)
        if progress is not None:
            progress("reading the files with cv2.imread")
        readable = readable_by_opencv(corpus, settings.threads)
    if progress is not None:
        progress("decode only")
    decoders = measure_decoders(corpus, settings, readable)
    contenders = []
    for name in names:
        if progress is not None:
            progress(name)
        if name == OPENCV_POOL:  # it decodes with cv2.imread
            contenders.append(measure(name, readable, settings) if readable.images else Contender(
                name, "baseline", "the contract's cv2 calls in a process pool, decode with cv2.imread"))
            _left_out_by_opencv(contenders[-1], corpus, readable)
        else:
            contenders.append(measure(name, corpus, settings))
    report = BenchReport(corpus, settings, contenders, decoders, choose_baseline(contenders, baseline_order))
    if scaling:
        if progress is not None:
            progress("scaling by threads")
        report.scaling = measure_scaling(contenders, corpus, settings)
    return report
