"""The ``numba`` backend: the pipeline contract on every CPU core, byte-identical to the reference.

The kernels live in :mod:`gpu_pipeline.backends._numba_kernels`; this module hands them a batch
(the addresses of the images' pixels: no copy), decides how to cut the work (whole images or row bands),
and returns their outputs as one :class:`BatchResult`. See docs/backends.md, "numba (CPU)".
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from cpu_reference.stages import canny_thresholds
from gpu_pipeline.backends.base import Backend, BatchResult, check_images
from gpu_pipeline.config import PipelineConfig
from gpu_pipeline.errors import one_line
from gpu_pipeline.images import ImageBatch

#: Bands shorter than this waste too much on recomputed rows at their ends.
MIN_BAND_ROWS = 64
#: Work items per thread a batch is cut into, when its images are too few to go whole.
ITEMS_PER_THREAD = 4
#: Pixels per thread in a call at least: 64 EuroSAT tiles. With 1 MP a call, 16 threads would get
#: 16 tiles each, too little to hide a call's fixed cost (plan, hand-over, the joins).
THREAD_BATCH_PIXELS = 256 * 1024



def _exclusive_cumsum(sizes: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(sizes), np.int64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    return offsets


def plan_bands(heights: np.ndarray, widths: np.ndarray, threads: int) -> np.ndarray:
    """How many row bands each image of a batch is cut into.

    Bands of about ``1 / (ITEMS_PER_THREAD * threads)`` of the batch's pixels: a batch of many
    images goes whole (one thread per image, no seams); a few large images are cut so that
    every thread gets work. No band is shorter than ``MIN_BAND_ROWS`` rows.
    """
    pixels = heights * widths
    target = max(1, int(pixels.sum()) // (ITEMS_PER_THREAD * threads))
    wanted = -(-pixels // target)
    return np.clip(wanted, 1, np.maximum(1, heights // MIN_BAND_ROWS)).astype(np.int64)


class WorkItems(NamedTuple):
    """Bands of rows ``[r0, r1)`` of images, the unit of parallel work."""

    bands: np.ndarray  # per image: how many items it was cut into
    first: np.ndarray  # per image: its first item (items of one image are consecutive)
    image: np.ndarray  # per item
    r0: np.ndarray
    r1: np.ndarray
    order: np.ndarray  # items, largest first: the order threads claim them in


def plan_items(heights: np.ndarray, widths: np.ndarray, threads: int) -> WorkItems:
    """Cut a batch into work items (see :func:`plan_bands`), rows shared out evenly per image."""
    bands = plan_bands(heights, widths, threads)
    first = _exclusive_cumsum(bands)
    image = np.repeat(np.arange(len(heights), dtype=np.int64), bands)
    index = np.arange(len(image), dtype=np.int64) - first[image]
    r0 = index * heights[image] // bands[image]
    r1 = (index + 1) * heights[image] // bands[image]
    order = np.argsort(-(r1 - r0) * widths[image], kind="stable")
    return WorkItems(bands, first, image, r0, r1, order)


class Scratch:
    """Arrays a call uses and does not return (the gray images, the Canny maps), kept for the next
    call: fresh pages cost a page fault each when first written, about 2.5 a tile and 4-5 us of
    its 25 on the 2-core VM, and on many cores the faults of all threads queue on one lock."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, size: int, dtype) -> np.ndarray:
        """A 1-D array of ``size`` elements, its contents undefined (the same memory as the last
        call's when it is large enough)."""
        kept = self._arrays.get(name)
        if kept is None or kept.size < size:
            kept = self._arrays[name] = np.empty(size, dtype)
        return kept[:size]


def _wait_for_all(helpers: list[Future], raising: bool = True) -> None:
    """Wait for every helper, through a Ctrl-C too (raised once they are done): a helper still at work
    would write into scratch buffers that go back to the spare pool, for the next call to share.
    A helper's own failure is raised after (``raising``)."""
    interrupted = None
    for helper in helpers:
        while True:
            try:
                helper.exception()  # waits (as cheaply as result()), without raising its failure
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
    if interrupted is not None:
        raise interrupted
    for helper in helpers if raising else ():
        helper.result()


class NumbaCpuBackend(Backend):
    """numba ``nogil`` kernels on ``threads`` Python threads (default: one per usable core, see
    :mod:`gpu_pipeline.engine.cores`, at most numba's ``NUMBA_NUM_THREADS``): the calling thread and ``threads - 1`` helpers of the backend, each
    running one worker's share of every kernel (see :mod:`._numba_kernels`).

    Safe to call from several Python threads at once: a call's workers share only that call's
    buffers and counters.
    """

    name = "numba"

    def __init__(self, threads: int | None = None) -> None:
        import numba

        from gpu_pipeline.backends import _numba_kernels
        from gpu_pipeline.engine.cores import usable_cores

        self._kernels = _numba_kernels
        available = numba.config.NUMBA_NUM_THREADS
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        # numba cannot start more threads than NUMBA_NUM_THREADS, fixed when it was imported
        super().__init__(threads=min(usable_cores() if threads is None else threads, available))
        self._helpers = self._new_helpers()
        self._spare: list[Scratch] = []  # the scratch of finished calls, for the next ones
        self._spare_lock = threading.Lock()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import numba
        except (ImportError, OSError) as exc:  # numba missing, or a broken llvmlite
            return f"numba cannot be imported ({one_line(exc)})"
        if numba.config.DISABLE_JIT:  # its kernels would run as Python, and their intrinsics cannot
            return "NUMBA_DISABLE_JIT is set: the numba kernels cannot run without compiling (unset it)"
        return None

    def process(
        self, images: Sequence[np.ndarray], config: PipelineConfig, keep_images: bool = False
    ) -> BatchResult:
        check_images(images)
        images = ImageBatch.of(images)  # the same batch when it is one
        if not len(images):
            return BatchResult.empty(0, keep_images)
        return self._run(images, config, keep_images)

    def batch_pixels(self) -> int:
        """1 MP a call (the batch stays in cache), or ``THREAD_BATCH_PIXELS`` a thread when that is more."""
        return max(super().batch_pixels(), self.threads * THREAD_BATCH_PIXELS)

    def compiles_on_warm_up(self) -> bool:
        """True unless numba's cache holds a current entry for every kernel (a missing, stale or
        disabled cache means a compile of about 12-15 s on two cores)."""
        from gpu_pipeline.backends._numba_setup import compiles_on_first_call

        k = self._kernels
        return compiles_on_first_call((k.gray_histograms, k.edge_maps, k.join_bands))

    def warm_up(self, config: PipelineConfig | None = None) -> None:
        """Load (or compile) every kernel, the seam join too: the base class's tiny images are
        never cut into row bands, and a kernel first compiled in the middle of a run stalls it."""
        super().warm_up(config)
        self.process([np.zeros((2 * MIN_BAND_ROWS, 8), np.uint8)], config or PipelineConfig())

    def _new_helpers(self) -> ThreadPoolExecutor | None:
        self._helpers_pid = os.getpid()
        return ThreadPoolExecutor(self.threads - 1, thread_name_prefix="numba") if self.threads > 1 else None

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown()

    def _on_workers(self, kernel, workers: int, before: tuple, after: tuple) -> None:
        """``kernel(*before, claimed, *after)`` on ``workers`` threads at once (this one included),
        all claiming their work from ``claimed``, one fresh counter."""
        args = (*before, np.zeros(1, np.int64), *after)
        helpers = [self._helpers.submit(kernel, *args) for _ in range(workers - 1)] if self._helpers else []
        try:
            kernel(*args)
        except BaseException:  # the buffers must outlive every worker, even when one failed
            # this call's own failure is the one told: a signal that struck here as numba imported its
            # modules left one half done, and a helper's failure importing it hid the signal's
            _wait_for_all(helpers, raising=False)
            raise
        _wait_for_all(helpers)

    def _run(self, images: ImageBatch, config: PipelineConfig, keep: bool) -> BatchResult:
        if self._helpers_pid != os.getpid():  # a fork: the pool's threads stayed in the parent, and its
            self._helpers = self._new_helpers()  # copy here would wait for them for ever; a lock
            self._spare_lock = threading.Lock()  # another thread held at the fork stays held
        with self._spare_lock:
            scratch = self._spare.pop() if self._spare else Scratch()
        try:
            return self._run_with(scratch, images, config, keep)
        finally:
            with self._spare_lock:
                self._spare.append(scratch)

    def _run_with(self, scratch: Scratch, images: ImageBatch, config: PipelineConfig, keep: bool) -> BatchResult:
        """One pass of the kernels over a batch of any shapes."""
        k = self._kernels
        # the kernels read raw memory; ``images`` keeps its buffers referenced for the whole call,
        # so the addresses stay valid
        addresses = images.addresses()
        heights, widths, channels = images.heights, images.widths, images.bands
        pixels = heights * widths
        sizes = pixels * channels
        gray_sizes = np.where(channels == 3, pixels, 0)
        gray_off = _exclusive_cumsum(gray_sizes)
        gray = scratch.array("gray", int(gray_sizes.sum()), np.uint8)

        items = plan_items(heights, widths, self.threads)
        workers = min(self.threads, len(items.image))
        hist_parts = np.empty((len(items.image), 256), np.int64)
        self._on_workers(k.gray_histograms, workers, (addresses, sizes, channels, gray, gray_off, heights, widths,
                                                      items.image, items.r0, items.r1, items.order), (hist_parts,))
        whole = len(items.image) == len(images)  # no image cut into bands: an item is an image
        hists = hist_parts if whole else np.add.reduceat(hist_parts, items.first, axis=0)

        map_sizes = (heights + 2) * (widths + 2)
        map_off = _exclusive_cumsum(map_sizes)
        maps = scratch.array("maps", int(map_sizes.sum()), np.uint8)
        eq_off = _exclusive_cumsum(pixels) if keep else np.zeros(len(images), np.int64)
        equalized = np.empty(int(pixels.sum()) if keep else 1, np.uint8)
        low, high = canny_thresholds(config.low_threshold, config.high_threshold, config.l2_gradient)
        counts = np.empty(len(items.image), np.int64)
        self._on_workers(k.edge_maps, workers,
                         (addresses, sizes, channels, gray, gray_off, heights, widths, hists, items.image, items.r0,
                          items.r1, items.order),
                         (config.blur_ksize, config.l2_gradient, low, high, maps, map_off, equalized, eq_off, keep,
                          counts))
        edge_counts = counts if whole else np.add.reduceat(counts, items.first)
        if (items.bands > 1).any():
            marked = np.zeros(len(images), np.int64)
            cut = int((items.bands > 1).sum())
            self._on_workers(k.join_bands, min(self.threads, cut),
                             (maps, map_off, heights, widths, items.r0, items.first, items.bands), (marked,))
            edge_counts += marked

        if not keep:
            return BatchResult(hists, edge_counts)
        kept_equalized, kept_edges = [], []
        for i in range(len(images)):
            h, w = int(heights[i]), int(widths[i])
            kept_equalized.append(equalized[eq_off[i]:eq_off[i] + h * w].reshape(h, w))
            edge_map = maps[map_off[i]:map_off[i] + map_sizes[i]].reshape(h + 2, w + 2)[1:-1, 1:-1]
            kept_edges.append((edge_map == k.EDGE).view(np.uint8) * np.uint8(255))
        return BatchResult(hists, edge_counts, kept_equalized, kept_edges)
