"""The ``cuda`` backend: the whole contract in numba.cuda kernels, many images per launch.

Per sub-batch (images of one shape, cut by ``_cuda_plan`` from free GPU memory): stage the
images in pinned host memory, copy them in asynchronously, then on the same stream
gray + histogram -> equalize LUT -> equalize + blur -> Sobel + NMS -> hysteresis (a few host
checks of a changed flag) -> edge count (+ edge map) -> one asynchronous copy of the per-image
statistics back (equalized and edges too when asked for). Two slots, each a stream with its own
device and pinned buffers kept across batches, alternate: the next sub-batch's copy and first
kernels run while the host drives the current one's hysteresis.

Kernels: ``_cuda_kernels``; host-side decisions: ``_cuda_plan``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cpu_reference.stages import canny_thresholds
from gpu_pipeline.backends import _cuda_kernels as kernels
from gpu_pipeline.backends._cuda_plan import (
    HYSTERESIS_MAX_CHUNK,
    HYSTERESIS_MAX_LAUNCHES,
    SLOTS,
    BufferPool,
    GpuOutOfMemory,
    SubBatch,
    device_bytes_per_image,
    hysteresis_schedule,
    is_out_of_memory,
    pixel_grid,
    plan_groups,
    tile_grid,
)
from gpu_pipeline.backends._cuda_errors import is_sticky
from gpu_pipeline.backends._host_hysteresis import finish_hysteresis
from gpu_pipeline.backends.base import (
    Backend,
    BackendUnavailable,
    BatchResult,
    check_images,
    checked_device_index,
    group_by_shape,
)
from gpu_pipeline.config import PipelineConfig
from gpu_pipeline.engine.cores import usable_cores
from gpu_pipeline.errors import one_line
from gpu_pipeline.images import ImageBatch

_TILE_BLOCK = (kernels.BLOCK_X, kernels.BLOCK_Y)
#: Staging copies above this size are split over threads (NumPy copies release the GIL).
_PARALLEL_STAGING_BYTES = 8 * 2**20


#: Why numba-cuda can fail to load although it is installed, and what to type then (issue #20).
NUMPY_TOO_NEW_FIX = "pip install 'numpy<2.5'"
# (numba-cuda itself: gpu-pipeline is on no package index, so reinstalling it by name fails)
REINSTALL_FIX = "pip install --force-reinstall 'numba-cuda[cu13]' 'numpy<2.5' (or [cu12])"


def _load_array_support() -> None:
    """Import numba-cuda's array support, which it otherwise imports at the first kernel compile: a
    stack that cannot load it (numba-cuda 0.30.4 on numpy 2.5, which removed ``np.row_stack``) is
    then reported as unavailable up front, not as a traceback from the first batch."""
    importlib.import_module("numba.cuda.np.arrayobj")


def broken_stack_reason(exc: BaseException) -> str:
    """One line: numba-cuda failed to load (``exc``), the versions involved, and the fix."""
    import numpy

    try:
        numba_cuda_version = importlib.metadata.version("numba-cuda")
    except importlib.metadata.PackageNotFoundError:
        numba_cuda_version = "?"
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, whatever the exception says
    # numpy removing a name numba-cuda still uses (row_stack in 2.5) is the known way this breaks.
    numpy_lacks_a_name = isinstance(exc, AttributeError) and "numpy" in str(exc)
    fix = NUMPY_TOO_NEW_FIX if numpy_lacks_a_name else REINSTALL_FIX
    return (f"numba-cuda {numba_cuda_version} cannot load with numpy {numpy.__version__} ({detail}); "
            f"fix: {fix}")


def quiet_low_occupancy_warnings() -> None:
    """Switch off numba-cuda's "Grid size N will likely result in GPU under-utilization" warning.

    numba-cuda warns at every launch of fewer than 128 blocks, and small batches launch small grids
    by design: a run printed it dozens of times (issue #20), where a user's stderr should carry the
    product's messages only. numba-cuda's own switch (``config.CUDA_LOW_OCCUPANCY_WARNINGS``, read at
    each launch) rather than a warning filter: a filter is process-wide, hides the warning from the
    user's own kernels too, and is dropped by any ``catch_warnings`` block that was entered before it
    was added (pytest's per-test capture is one: a GPU test run still showed 188). The user's
    ``NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS`` wins. Called at creation and at each ``process()``:
    numba reloads its config from the environment when a ``NUMBA_`` variable changes.
    """
    if "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" not in os.environ:
        import numba

        numba.config.CUDA_LOW_OCCUPANCY_WARNINGS = 0


def unavailable_reason(allow_simulator: bool = False) -> str | None:
    """None when the kernels can run here, else a one-line reason.

    The CUDA simulator counts only when ``allow_simulator`` (tests); ``auto`` never gets it.
    """
    if importlib.util.find_spec("numba_cuda") is None:  # numba's own, older CUDA target is not used
        return "numba-cuda is not installed (pip install 'gpu-pipeline[cuda13]' or '[cuda12]')"
    try:
        import numba
        from numba import cuda
    except Exception as exc:  # numba-cuda broken
        return broken_stack_reason(exc)
    if numba.config.ENABLE_CUDASIM:
        return None if allow_simulator else "NUMBA_ENABLE_CUDASIM=1: the CUDA simulator is not a GPU"
    try:
        _load_array_support()
    except Exception as exc:  # AttributeError (numpy too new), ImportError, OSError (a broken install) ...
        return broken_stack_reason(exc)
    try:
        if cuda.is_available():
            return None
        from numba.cuda.cudadrv.driver import driver

        detail = (driver.initialization_error or "").strip().splitlines()
        return f"no usable CUDA GPU ({detail[0] if detail else 'no device found'})"
    except Exception as exc:
        return f"CUDA probe failed ({one_line(exc)})"


@dataclass
class DeviceTimes:
    """GPU time per phase, summed over sub-batches (CUDA events; not measured in the simulator).

    ``kernels`` runs from the end of the copy in to the end of the edge count, so it includes
    the gaps while the host checks hysteresis. Sub-batches on the two streams may overlap, so
    the sums can exceed the wall time.
    """

    copy_in: float = 0.0
    kernels: float = 0.0
    copy_out: float = 0.0
    pixels: int = 0
    sub_batches: int = 0
    hysteresis_launches: int = 0
    #: Sub-batches whose hysteresis reached the launch bound and was finished on the host.
    host_finishes: int = 0


@dataclass
class _Job:
    """Device views of one submitted sub-batch, and where its results come back."""

    batch: SubBatch
    keep_images: bool
    stats: object  # device int32 (images * STATS_WIDTH,)
    equalized: object  # device uint8 (images, h, w), a 1x1x1 placeholder unless keep_images
    blurred: object  # device uint8 (images, h, w); becomes the 0/255 edge map
    state: object  # device uint8 (images, h, w), the Canny state map
    host_stats: np.ndarray | None = None
    host_equalized: np.ndarray | None = None
    host_edges: np.ndarray | None = None
    hysteresis_launches: int = 0


@dataclass
class _Slot:
    """A stream with its own reusable buffers; ``job`` is the sub-batch whose results it holds.

    ``flags`` (device) and ``host_flags`` (pinned) carry hysteresis' changed stamps; ``stamp``
    is the last one handed out on this slot. ``events`` (real GPU only) time the phases.
    """

    stream: object
    device: BufferPool
    pinned: BufferPool
    flags: object
    host_flags: np.ndarray
    events: list = field(default_factory=list)
    stamp: int = 0
    job: _Job | None = None


class NumbaCudaBackend(Backend):
    """numba.cuda kernels on one GPU (the current CUDA device).

    ``threads`` bounds the host threads that stage images into pinned memory.
    ``allow_simulator=True`` lets tests run it under NUMBA_ENABLE_CUDASIM=1.
    ``device_times`` accumulates GPU time per phase (the benchmark reads and resets it).
    """

    name = "cuda"
    uses_gpu = True

    def __init__(
        self, threads: int | None = None, *, device_index: int | None = None, allow_simulator: bool = False
    ) -> None:
        super().__init__(threads)
        reason = unavailable_reason(allow_simulator)
        if reason is not None:
            raise BackendUnavailable(f"backend 'cuda' is unavailable: {reason}")
        import numba
        from numba import cuda

        self._cuda = cuda
        quiet_low_occupancy_warnings()
        self.device_index = checked_device_index(device_index, len(cuda.gpus))
        self._timed = not numba.config.ENABLE_CUDASIM  # the simulator has no timing events
        #: One call at a time: calls share the slots and their buffers (the Python API hands one
        #: backend to every thread). The GPU runs one call's launches at a time anyway.
        self._lock = threading.Lock()
        with self._on_device():
            if self._timed:
                try:
                    compile_kernels()
                except (ImportError, AttributeError, OSError) as exc:  # numba-cuda's machinery, not our kernels
                    raise BackendUnavailable(f"backend 'cuda' is unavailable: {broken_stack_reason(exc)}") from None
            self.device_times = DeviceTimes()
            self._staging_threads = min(8, threads or usable_cores())
            self._stager = ThreadPoolExecutor(self._staging_threads, thread_name_prefix="cuda-staging")
            self._slots = self._new_slots()

    def _on_device(self):
        """This backend's GPU, current in the calling thread for the ``with`` block: CUDA's current
        context is per thread, and ``process()`` runs on the engine's compute thread, not the one
        that built the backend (which would otherwise find itself on device 0)."""
        return self._cuda.gpus[self.device_index]

    def _new_slots(self) -> list[_Slot]:
        cuda = self._cuda
        return [
            _Slot(
                stream=cuda.stream(),
                device=BufferPool(lambda count, dtype: self._device_array(count, dtype)),
                pinned=BufferPool(lambda count, dtype: self._pinned_array(count, dtype)),
                flags=cuda.to_device(np.zeros(HYSTERESIS_MAX_CHUNK, np.int32)),
                host_flags=cuda.pinned_array(HYSTERESIS_MAX_CHUNK, np.int32),
                events=[cuda.event(timing=True) for _ in range(4)] if self._timed else [],
            )
            for _ in range(SLOTS)
        ]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return unavailable_reason(allow_simulator=False)

    def is_device_failure(self, error: BaseException) -> bool:
        """numba-cuda's CudaAPIError with a sticky code (see ``_cuda_errors``): the GPU failed for good."""
        try:
            from numba.cuda.cudadrv.driver import CudaAPIError
        except Exception:  # (numba-cuda broken: nothing it raises reached us)
            return False
        return isinstance(error, CudaAPIError) and is_sticky(getattr(error, "code", None))

    # -- allocation (one place, looked up at each call, so that tests can make it fail) ---------

    def _device_array(self, count: int, dtype) -> object:
        return self._cuda.device_array(count, dtype)

    def _pinned_array(self, count: int, dtype) -> np.ndarray:
        return self._cuda.pinned_array(count, dtype)

    def _free_device_bytes(self) -> float:
        """Free GPU memory, counting the buffers this backend holds as free (it reuses them)."""
        free, _total = self._cuda.current_context().get_memory_info()
        return free + sum(slot.device.nbytes for slot in self._slots)

    def _release_buffers(self) -> None:
        for slot in self._slots:
            slot.job = None
            try:
                slot.stream.synchronize()
            finally:
                slot.device.release()
                slot.pinned.release()
        deallocations = getattr(self._cuda.current_context(), "deallocations", None)  # not simulated
        if deallocations is not None:
            deallocations.clear()  # free now, not at numba's next convenient moment

    def _abandon(self) -> None:
        """After an error: wait for queued work (so no copy still targets the buffers) and forget
        every sub-batch in flight, so that the next call starts clean (as the cupy backend does)."""
        for slot in self._slots:
            slot.job = None
            # The device may be the reason we are here; there is nothing left to save.
            with contextlib.suppress(Exception):
                slot.stream.synchronize()

    def close(self) -> None:
        with self._lock, self._on_device():
            self._abandon()
            self._release_buffers()
        self._stager.shutdown()

    # -- the interface ---------------------------------------------------------------------------

    def process(
        self, images: Sequence[np.ndarray], config: PipelineConfig, keep_images: bool = False
    ) -> BatchResult:
        check_images(images)
        quiet_low_occupancy_warnings()
        with self._lock, self._on_device():
            return self._process_on_device(images, config, keep_images)

    def _process_on_device(
        self, images: Sequence[np.ndarray], config: PipelineConfig, keep_images: bool
    ) -> BatchResult:
        results = BatchResult.empty(len(images), keep_images)
        done = np.zeros(len(images), bool)
        max_images = None
        while True:
            todo = np.flatnonzero(~done).tolist()
            if not todo:
                return results
            plan = plan_groups(group_by_shape(images, todo), keep_images, self._free_device_bytes(), max_images)
            try:
                self._run(plan, images, config, bool(keep_images), results, done)
            except BaseException as error:
                if not is_out_of_memory(error):
                    self._abandon()  # any other failure: the next call must start clean
                    raise
                self._release_buffers()
                unfinished = [b for b in plan if not done[list(b.indices)].all()]
                largest = max(unfinished, key=lambda b: len(b.indices))
                if max_images == 1:
                    need = device_bytes_per_image(largest.shape, keep_images) / 2**20
                    raise GpuOutOfMemory(
                        f"GPU out of memory: one image of shape {largest.shape} needs about "
                        f"{need:.0f} MiB of GPU memory (and pinned host memory to match); "
                        f"{self._free_device_bytes() / 2**20:.0f} MiB are free"
                    ) from error
                max_images = max(1, len(largest.indices) // 2)

    # -- the pipeline ----------------------------------------------------------------------------

    def _run(
        self,
        plan: list[SubBatch],
        images: Sequence[np.ndarray],
        config: PipelineConfig,
        keep_images: bool,
        results: BatchResult,
        done: np.ndarray,
    ) -> None:
        """Submit sub-batches alternately to the slots; drive each one's hysteresis while the
        next one is copied in and starts; collect a slot's results before reusing it."""
        low, high = canny_thresholds(config.low_threshold, config.high_threshold, config.l2_gradient)
        pending: _Slot | None = None
        for number, batch in enumerate(plan):
            slot = self._slots[number % SLOTS]
            self._collect(slot, results, done)
            self._submit(slot, batch, images, config, keep_images, low, high)
            if pending is not None:
                self._finish(pending)
            pending = slot
        if pending is not None:
            self._finish(pending)
        for slot in self._slots:
            self._collect(slot, results, done)

    def _stage(self, images: Sequence[np.ndarray], indices: tuple[int, ...], staged: np.ndarray) -> None:
        """Copy the sub-batch's images into the pinned buffer, over threads when it is large."""
        # an ImageBatch is copied a run of packed images at a time, not one by one
        positions = np.asarray(indices, np.int64) if isinstance(images, ImageBatch) else None
        if staged.nbytes < _PARALLEL_STAGING_BYTES:
            if positions is not None:
                images.copy_into(positions, staged)
            else:
                np.stack([images[i] for i in indices], out=staged)
            return
        parts = np.array_split(np.arange(len(indices)), self._staging_threads)

        def copy(part: np.ndarray) -> None:
            if positions is not None:  # ``part`` is a run of consecutive places in ``staged``
                images.copy_into(positions[part], staged[part[0]:part[-1] + 1])
                return
            for k in part:
                np.copyto(staged[k], images[indices[k]])

        list(self._stager.map(copy, [p for p in parts if p.size]))

    def _submit(
        self,
        slot: _Slot,
        batch: SubBatch,
        images: Sequence[np.ndarray],
        config: PipelineConfig,
        keep_images: bool,
        low: int,
        high: int,
    ) -> None:
        """Stage and copy the images in, and enqueue every stage up to non-maximum suppression."""
        stream = slot.stream
        count = len(batch.indices)
        height, width = batch.shape[:2]
        pixels = height * width
        rgb = len(batch.shape) == 3
        sample_bytes = count * pixels * (3 if rgb else 1)

        staged = slot.pinned.get("input", sample_bytes, np.uint8)
        self._stage(images, batch.indices, staged.reshape((count, *batch.shape)))
        source = slot.device.get("input", sample_bytes, np.uint8)
        self._record(slot, 0)
        source.copy_to_device(staged, stream=stream)
        self._record(slot, 1)

        stats = slot.device.get("stats", count * kernels.STATS_WIDTH, np.int32)
        kernels.zero_int32[-(-stats.shape[0] // kernels.BLOCK_THREADS), kernels.BLOCK_THREADS, stream](stats)
        per_image_stats = stats.reshape(count, kernels.STATS_WIDTH)
        grid = pixel_grid(pixels, count)
        if rgb:
            gray = slot.device.get("gray", count * pixels, np.uint8)
            kernels.rgb_to_gray_histogram[grid, kernels.BLOCK_THREADS, stream](
                source.reshape(count, pixels, 3), gray.reshape(count, pixels), per_image_stats
            )
        else:
            gray = source
            kernels.gray_histogram[grid, kernels.BLOCK_THREADS, stream](
                gray.reshape(count, pixels), per_image_stats
            )
        lut = slot.device.get("lut", count * 256, np.uint8).reshape(count, 256)
        kernels.equalize_lut[count, kernels.BLOCK_THREADS, stream](per_image_stats, pixels, lut)

        if keep_images:
            equalized = slot.device.get("equalized", count * pixels, np.uint8).reshape(count, height, width)
        else:
            equalized = slot.device.get("equalized", 1, np.uint8).reshape(1, 1, 1)
        blurred = slot.device.get("blurred", count * pixels, np.uint8).reshape(count, height, width)
        tiles = tile_grid(height, width, count)
        kernels.equalize_and_blur[tiles, _TILE_BLOCK, stream](
            gray.reshape(count, height, width), lut, config.blur_ksize, equalized, keep_images, blurred
        )
        state = slot.device.get("state", count * pixels, np.uint8).reshape(count, height, width)
        kernels.sobel_nms[tiles, _TILE_BLOCK, stream](blurred, low, high, config.l2_gradient, state)
        slot.job = _Job(batch, keep_images, stats, equalized, blurred, state)

    def _finish(self, slot: _Slot) -> None:
        """Run hysteresis to its fixed point, count edges, enqueue the copies back."""
        job, stream = slot.job, slot.stream
        count = len(job.batch.indices)
        pixels = job.batch.pixels
        job.hysteresis_launches = self._hysteresis(slot, job.state)
        edges = job.blurred.reshape(count, pixels)  # the blurred image is no longer needed
        kernels.finalize_edges[pixel_grid(pixels, count), kernels.BLOCK_THREADS, stream](
            job.state.reshape(count, pixels), edges, job.keep_images, job.stats.reshape(count, kernels.STATS_WIDTH)
        )
        self._record(slot, 2)
        job.host_stats = slot.pinned.get("stats", job.stats.shape[0], np.int32)
        job.stats.copy_to_host(job.host_stats, stream=stream)
        if job.keep_images:
            job.host_equalized = slot.pinned.get("equalized", count * pixels, np.uint8)
            job.equalized.reshape(count * pixels).copy_to_host(job.host_equalized, stream=stream)
            job.host_edges = slot.pinned.get("edges", count * pixels, np.uint8)
            edges.reshape(count * pixels).copy_to_host(job.host_edges, stream=stream)
        self._record(slot, 3)

    def _hysteresis(self, slot: _Slot, state) -> int:
        """Launch hysteresis steps on ``state`` (images, h, w) until one changes nothing, at most
        ``HYSTERESIS_MAX_LAUNCHES``; past that, finish on the host (one copy each way).

        Launches are queued in chunks, with one host synchronisation per chunk; those past the
        fixed point return at once. Returns the number of launches queued.
        """
        count, height, width = state.shape
        tiles = tile_grid(height, width, count)
        launched = 0
        for launches in hysteresis_schedule(HYSTERESIS_MAX_LAUNCHES):
            for flag in range(launches):
                previous, slot.stamp = slot.stamp, slot.stamp % (2**31 - 1) + 1  # int32, never 0
                kernels.hysteresis_step[tiles, _TILE_BLOCK, slot.stream](
                    self._halo_source(slot, state), state, slot.flags, flag, slot.stamp, previous
                )
            launched += launches
            slot.flags.copy_to_host(slot.host_flags, stream=slot.stream)
            slot.stream.synchronize()
            if slot.host_flags[launches - 1] != slot.stamp:
                return launched
        self._finish_on_host(slot, state)
        return launched

    def _halo_source(self, slot: _Slot, state):
        """What hysteresis blocks read: ``state`` itself. Tests override this with a copy taken at
        launch start, to see the launches a GPU needs whose blocks all read before any writes."""
        return state

    def _finish_on_host(self, slot: _Slot, state) -> None:
        """Hysteresis past the launch bound: the state planes to pinned memory, a flood there, back."""
        host = slot.pinned.get("state", state.size, np.uint8).reshape(state.shape)
        state.copy_to_host(host, stream=slot.stream)
        slot.stream.synchronize()
        finish_hysteresis(host)
        state.copy_to_device(host, stream=slot.stream)
        self.device_times.host_finishes += 1

    def _record(self, slot: _Slot, phase: int) -> None:
        if self._timed:
            slot.events[phase].record(slot.stream)

    def _collect(self, slot: _Slot, results: BatchResult, done: np.ndarray) -> None:
        """Wait for the slot's copies back and store them in ``results`` (copies: the pinned
        buffers are reused); mark its images ``done``."""
        job = slot.job
        if job is None:
            return
        slot.stream.synchronize()
        count = len(job.batch.indices)
        height, width = job.batch.shape[:2]
        stats = job.host_stats.reshape(count, kernels.STATS_WIDTH)
        indices = list(job.batch.indices)
        results.histograms[indices] = stats[:, : kernels.EDGE_COUNT]
        results.edge_counts[indices] = stats[:, kernels.EDGE_COUNT]
        if job.keep_images:
            for k, index in enumerate(indices):
                results.equalized[index] = job.host_equalized.reshape(count, height, width)[k].copy()
                results.edges[index] = job.host_edges.reshape(count, height, width)[k].copy()
        done[indices] = True
        self._account(slot, job)
        slot.job = None

    def _account(self, slot: _Slot, job: _Job) -> None:
        times = self.device_times
        times.pixels += job.batch.pixels * len(job.batch.indices)
        times.sub_batches += 1
        times.hysteresis_launches += job.hysteresis_launches
        if self._timed:
            start, copied_in, computed, copied_out = slot.events
            elapsed = self._cuda.event_elapsed_time
            times.copy_in += elapsed(start, copied_in) / 1e3
            times.kernels += elapsed(copied_in, computed) / 1e3
            times.copy_out += elapsed(computed, copied_out) / 1e3


_COMPILED = False


def compile_kernels() -> None:
    """Compile (or load from numba's cache) every kernel for the signatures the backend launches,
    once per process, so that the first batch is not a compile and timings exclude it."""
    global _COMPILED
    if _COMPILED:
        return
    for kernel, signatures in kernels.KERNEL_SIGNATURES.items():
        for signature in signatures:
            kernel.compile(signature)
    _COMPILED = True
