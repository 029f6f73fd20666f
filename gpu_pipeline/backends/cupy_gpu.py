"""The ``cupy`` backend: the pipeline contract as CUDA C++ kernels (``cupy_pipeline.cu``) run by CuPy.

How a call runs (docs/backends.md, section "cupy"):

* Images are grouped by shape and cut into sub-batches that fit the free device memory; every kernel
  launch covers a whole sub-batch (``blockIdx.z`` is the image).
* Two slots, each with its own stream, device arena and pinned host arena, take turns: while the GPU
  works on one sub-batch the host packs the next into the other slot's pinned memory and queues its
  copies and kernels on the other stream, so copies overlap compute. Arenas are kept across
  sub-batches and calls and only grow.
* Hysteresis runs as rounds of launches on the device with a changed flag per launch; the host reads
  the flags with the results, so a sub-batch costs one host synchronisation unless it needed more than
  one round.
* Out of device memory: everything is released and the sub-batches are halved; a single image that
  still does not fit raises :class:`GpuOutOfMemory`.

The host logic (thresholds, layouts, sub-batch plans, launch grids) is pure functions and every device
call goes through the small :class:`CupyDevice` interface, so tests run the whole backend, kernels
included, on the CPU with a fake device (tests/test_cupy_gpu.py).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpu_reference.stages import canny_thresholds
from gpu_pipeline.backends._cuda_errors import is_sticky
from gpu_pipeline.backends._numba_setup import private_temp_folder
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
from gpu_pipeline.errors import first_line, one_line
from gpu_pipeline.images import ImageBatch, pixel_counts

KERNEL_SOURCE = Path(__file__).with_name("cupy_pipeline.cu")
#: Side of the output tiles of the fused blur/Sobel/NMS kernel and of the hysteresis kernel.
TILE_SIDE = 32
#: NVRTC options. No fast-math: the equalize LUT must round exactly as OpenCV's float32 code.
NVRTC_OPTIONS = ("--std=c++17", f"-DTILE_SIDE={TILE_SIDE}")
KERNEL_NAMES = (
    "gray_histogram", "equalize_lut", "blur_sobel_nms_k3", "blur_sobel_nms_k5", "blur_sobel_nms_k7",
    "hysteresis", "finalize_edges", "cnn_resample", "cnn_block", "cnn_sums",
)

HYSTERESIS_LAUNCHES_PER_ROUND = 8
#: Most hysteresis rounds per sub-batch (one host synchronisation each); a sub-batch not at its fixed
#: point by then is finished on the host (``_host_hysteresis``): long weak chains that cross many tiles
#: would otherwise need about one launch per tile crossed.
HYSTERESIS_MAX_ROUNDS = 4
MAX_IMAGES_PER_LAUNCH = 65535  # gridDim.z
MAX_GRID_Y = 65535  # taller images: the blur kernel's blocks loop over tile rows
MAX_PIXELS = 2**30  # the kernels index the pixels of one image with int
SECTION_ALIGNMENT = 256
ARENA_GRANULE = 2 * 2**20  # arenas grow in steps of this, so nearby sizes reuse them
#: Large enough to fill the GPU, small enough that the 32 MP of one call (base.GPU_BATCH_PIXELS, about
#: 200 MiB of device arena for RGB) make several sub-batches: the two slots overlap copies and kernels.
SUB_BATCH_TARGET_BYTES = 64 * 2**20
MEMORY_FRACTION = 0.8  # of the free device memory, for both slots together
SLOTS = 2

FLAT_BLOCK = (256, 1, 1)
TILE_BLOCK = (32, 8, 1)
PIXELS_PER_THREAD = 16  # flat kernels: enough work per block to amortise its shared histogram
MAX_BLOCKS_PER_IMAGE = 1024
HYSTERESIS_BLOCKS_PER_SM = 8


#: cudaErrorMemoryAllocation: what cudaHostAlloc raises when pinned host memory runs out.
CUDA_ERROR_MEMORY_ALLOCATION = 2


class GpuOutOfMemory(MemoryError):
    """The GPU (or pinned host memory) cannot hold even the smallest possible sub-batch."""


# --- pure host logic --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSettings:
    """What the kernels need from a PipelineConfig."""

    blur_ksize: int
    low: int
    high: int
    l2_gradient: bool

    @classmethod
    def from_config(cls, config: PipelineConfig) -> KernelSettings:
        low, high = canny_thresholds(config.low_threshold, config.high_threshold, config.l2_gradient)
        return cls(config.blur_ksize, low, high, config.l2_gradient)


@dataclass(frozen=True)
class CnnShape:
    """The shape of an integer CNN label model (:mod:`gpu_pipeline.labels.cnn`): input side, channels of each block."""

    size: int
    widths: tuple[int, ...]

    @property
    def sides(self) -> list[int]:
        """Side of the input, then of each block's output (each block halves it)."""
        return [self.size >> k for k in range(len(self.widths) + 1)]

    @property
    def activation_bytes(self) -> int:
        """Bytes of one image's largest activation (the resampled input included)."""
        channels = (3, *self.widths)
        return max(side * side * c for side, c in zip(self.sides, channels))


@dataclass(frozen=True)
class Section:
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _pack(sizes: list[tuple[str, int]]) -> tuple[dict[str, Section], int]:
    """Sections laid out in order, each aligned; the total size."""
    sections, offset = {}, 0
    for name, nbytes in sizes:
        offset = -(-offset // SECTION_ALIGNMENT) * SECTION_ALIGNMENT
        sections[name] = Section(offset, nbytes)
        offset += nbytes
    return sections, offset


@dataclass(frozen=True)
class BatchLayout:
    """Where the arrays of a sub-batch of ``count`` same-shape images live.

    Device arena: input images, gray planes (RGB input only: a gray input is its own gray plane),
    Canny state planes, equalized and edge planes (only when images are kept), LUTs, two CNN
    activation buffers (only with a CNN label model: ``cnn``), then the results: histograms
    (uint32[count, 256]) directly followed by the counters (edge counts uint32[count], then one
    changed flag int32 per hysteresis launch) and the CNN's pooled sums (int64[count, channels], if
    any). Host (pinned) arena: input, results in the same order, equalized, edges. Results are one
    copy each way.
    """

    count: int
    height: int
    width: int
    channels: int
    keep_images: bool
    device: dict[str, Section]
    host: dict[str, Section]
    cnn: CnnShape | None = None

    @classmethod
    def plan(cls, count: int, shape: tuple[int, ...], keep_images: bool, cnn: CnnShape | None = None) -> BatchLayout:
        height, width = shape[:2]
        channels = shape[2] if len(shape) == 3 else 1
        plane = height * width
        kept = plane * count if keep_images else 0
        activations = cnn.activation_bytes * count if cnn is not None else 0
        results = [("histograms", 256 * 4 * count), ("counters", 4 * count + 4 * HYSTERESIS_LAUNCHES_PER_ROUND),
                   ("label_features", 8 * cnn.widths[-1] * count if cnn is not None else 0)]
        device, _ = _pack([
            ("input", plane * channels * count), ("gray", plane * count if channels == 3 else 0),
            ("states", plane * count), ("equalized", kept), ("edges", kept), ("luts", 256 * count),
            ("cnn_a", activations), ("cnn_b", activations), *results,
        ])
        host, _ = _pack([("input", plane * channels * count), *results, ("equalized", kept), ("edges", kept)])
        return cls(count, height, width, channels, keep_images, device, host, cnn)

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def device_bytes(self) -> int:
        return max(section.end for section in self.device.values())

    @property
    def host_bytes(self) -> int:
        return max(section.end for section in self.host.values())

    @staticmethod
    def results_span(sections: dict[str, Section]) -> Section:
        """Histograms, counters and label features, adjacent (but for alignment: histogram rows are a
        multiple of it; the few bytes after the counters are copied along)."""
        last = sections["label_features"] if sections["label_features"].nbytes else sections["counters"]
        return Section(sections["histograms"].offset, last.end - sections["histograms"].offset)

    def gray_section(self) -> Section:
        return self.device["gray" if self.channels == 3 else "input"]

    # Views of the pinned host arena.
    def host_view(self, arena: np.ndarray, name: str) -> np.ndarray:
        section = self.host[name]
        return arena[section.offset:section.end]

    def inputs(self, arena: np.ndarray) -> np.ndarray:
        shape = (self.count, self.height, self.width) + ((3,) if self.channels == 3 else ())
        return self.host_view(arena, "input").reshape(shape)

    def histograms(self, arena: np.ndarray) -> np.ndarray:
        return self.host_view(arena, "histograms").view(np.uint32).reshape(self.count, 256)

    def edge_counts(self, arena: np.ndarray) -> np.ndarray:
        return self.host_view(arena, "counters")[: 4 * self.count].view(np.uint32)

    def changed_flags(self, arena: np.ndarray) -> np.ndarray:
        return self.host_view(arena, "counters")[4 * self.count:].view(np.int32)

    def label_features(self, arena: np.ndarray) -> np.ndarray:
        return self.host_view(arena, "label_features").view(np.int64).reshape(self.count, -1)

    def planes(self, arena: np.ndarray, name: str) -> np.ndarray:
        return self.host_view(arena, name).reshape(self.count, self.height, self.width)


def device_bytes_per_image(shape: tuple[int, ...], keep_images: bool, cnn: CnnShape | None = None) -> int:
    """Device bytes one more image adds to a sub-batch of ``shape`` (alignment aside)."""
    layout = BatchLayout.plan(1, shape, keep_images, cnn)
    return sum(section.nbytes for section in layout.device.values()) - 4 * HYSTERESIS_LAUNCHES_PER_ROUND


#: Device bytes of a sub-batch beyond its per-image bytes: the flags and the alignment padding.
LAYOUT_OVERHEAD_BYTES = 4 * HYSTERESIS_LAUNCHES_PER_ROUND + 11 * SECTION_ALIGNMENT


def max_images_per_batch(shape: tuple[int, ...], keep_images: bool, budget_bytes: int,
                         cnn: CnnShape | None = None) -> int:
    """The most images of ``shape`` whose sub-batch fits ``budget_bytes``; at least 1 (try, then fail clearly)."""
    fitting = (budget_bytes - LAYOUT_OVERHEAD_BYTES) // device_bytes_per_image(shape, keep_images, cnn)
    return int(min(MAX_IMAGES_PER_LAUNCH, max(1, fitting)))


def split_evenly(indices: Sequence[int], max_size: int) -> list[list[int]]:
    """``indices`` cut into the fewest runs of at most ``max_size``, of sizes differing by at most one."""
    parts = -(-len(indices) // max_size)
    if parts == 0:
        return []
    bounds = [len(indices) * k // parts for k in range(parts + 1)]
    return [list(indices[a:b]) for a, b in itertools.pairwise(bounds)]


def plan_sub_batches(
    images: Sequence[np.ndarray], indices: Sequence[int], budget_bytes: int, keep_images: bool,
    cnn: CnnShape | None = None,
) -> list[list[int]]:
    """Sub-batches of the images at ``indices``: one shape each, shapes in first-seen order, each within budget."""
    plan = []
    for shape, members in group_by_shape(images, list(indices)).items():
        plan += split_evenly(members, max_images_per_batch(shape, keep_images, budget_bytes, cnn))
    return plan


def sub_batch_budget(free_bytes: int, held_bytes: int) -> int:
    """Device bytes for one slot's sub-batch: a share of the memory free or already held by the slots."""
    return min(SUB_BATCH_TARGET_BYTES, int((free_bytes + held_bytes) * MEMORY_FRACTION) // SLOTS)


def grown_capacity(current: int, needed: int) -> int:
    """Arena size for ``needed`` bytes: the current one when it fits, else ``needed`` rounded up."""
    if needed <= current:
        return current
    return -(-needed // ARENA_GRANULE) * ARENA_GRANULE


def staging_capacity(current: int, needed: int, limit: int) -> int:
    """Pinned staging size for ``needed`` bytes: the current one when it fits, else at least double it
    (up to ``limit``, the host bytes of the largest sub-batch the budget allows), in granules.

    Doubling bounds the number of regrowths to a few; each regrowth releases the old buffer to the
    system (CuPy's pinned pool only reuses blocks of the same size and never trims itself)."""
    if needed <= current:
        return current
    size = max(needed, min(2 * current, limit))
    return -(-size // ARENA_GRANULE) * ARENA_GRANULE


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``args`` are NumPy scalars (uint64 addresses, int32 / int64 values)."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple


def _address(base: int, section: Section) -> np.uint64:
    """The device address of ``section``; NULL for an absent (empty) one."""
    return np.uint64(base + section.offset if section.nbytes else 0)


def _flat_grid(layout: BatchLayout) -> tuple[int, int, int]:
    threads = FLAT_BLOCK[0]
    blocks = -(-layout.pixels // (threads * PIXELS_PER_THREAD))
    return (min(MAX_BLOCKS_PER_IMAGE, blocks), 1, layout.count)


def front_launches(layout: BatchLayout, base: int, settings: KernelSettings) -> list[Launch]:
    """Gray + histogram, equalize LUT, then blur + Sobel + NMS into the state planes."""
    device = layout.device
    plane, pixels = np.int64(layout.pixels), np.int32(layout.pixels)
    gray = _address(base, layout.gray_section())
    histograms, luts = _address(base, device["histograms"]), _address(base, device["luts"])
    tile_grid = (-(-layout.width // TILE_SIDE), min(-(-layout.height // TILE_SIDE), MAX_GRID_Y), layout.count)
    return [
        Launch("gray_histogram", _flat_grid(layout), FLAT_BLOCK, (
            _address(base, device["input"]), np.int64(layout.pixels * layout.channels), np.int32(layout.channels),
            pixels, _address(base, device["gray"]), plane, histograms)),
        Launch("equalize_lut", (1, 1, layout.count), FLAT_BLOCK, (histograms, pixels, luts)),
        Launch(f"blur_sobel_nms_k{settings.blur_ksize}", tile_grid, TILE_BLOCK, (
            gray, plane, luts, np.int32(layout.height), np.int32(layout.width), np.int32(settings.low),
            np.int32(settings.high), np.int32(settings.l2_gradient), _address(base, device["states"]),
            _address(base, device["equalized"]))),
    ]


def edge_launches(layout: BatchLayout, base: int, sm_count: int, hysteresis: bool = True) -> list[Launch]:
    """One round of hysteresis launches (unless ``hysteresis`` is False: the host finished it), then
    edges and edge counts from the state planes."""
    device = layout.device
    plane = np.int64(layout.pixels)
    states = _address(base, device["states"])
    counters = device["counters"]
    flags = np.uint64(base + counters.offset + 4 * layout.count)
    tiles = -(-layout.width // TILE_SIDE) * -(-layout.height // TILE_SIDE) * layout.count
    hysteresis_grid = (min(tiles, sm_count * HYSTERESIS_BLOCKS_PER_SM), 1, 1)
    launches = [
        Launch("hysteresis", hysteresis_grid, TILE_BLOCK, (
            states, plane, np.int32(layout.height), np.int32(layout.width), np.int32(layout.count), flags,
            np.int32(launch)))
        for launch in range(HYSTERESIS_LAUNCHES_PER_ROUND if hysteresis else 0)
    ]
    launches.append(Launch("finalize_edges", _flat_grid(layout), FLAT_BLOCK, (
        states, plane, np.int32(layout.pixels), _address(base, device["edges"]), _address(base, counters))))
    return launches


def cnn_launches(layout: BatchLayout, base: int, weights: list[tuple[np.uint64, ...]]) -> list[Launch]:
    """The CNN label model on the sub-batch's input images: resample into ``cnn_a``, the blocks back
    and forth between ``cnn_a`` and ``cnn_b``, the pooled sums into ``label_features``.
    ``weights``: the device addresses of each block's weights, bias, multiplier and shift."""
    cnn, device = layout.cnn, layout.device
    buffers = [_address(base, device["cnn_a"]), _address(base, device["cnn_b"])]
    channels = (3, *cnn.widths)

    def grid(items: int) -> tuple[int, int, int]:
        return (min(MAX_BLOCKS_PER_IMAGE, max(1, -(-items // FLAT_BLOCK[0]))), 1, layout.count)

    launches = [Launch("cnn_resample", grid(cnn.size * cnn.size), FLAT_BLOCK, (
        _address(base, device["input"]), np.int32(layout.height), np.int32(layout.width),
        np.int32(layout.channels), np.int32(cnn.size), buffers[0]))]
    for k, (side, addresses) in enumerate(zip(cnn.sides, weights)):
        half = side // 2
        launches.append(Launch("cnn_block", grid(half * half * channels[k + 1]), FLAT_BLOCK, (
            buffers[k % 2], np.int32(side), np.int32(channels[k]), *addresses, np.int32(channels[k + 1]),
            buffers[(k + 1) % 2])))
    last = cnn.sides[-1]
    launches.append(Launch("cnn_sums", grid(cnn.widths[-1]), FLAT_BLOCK, (
        buffers[len(cnn.widths) % 2], np.int32(last * last), np.int32(cnn.widths[-1]),
        _address(base, device["label_features"]))))
    return launches


def cnn_weight_arrays(model) -> list[tuple[np.ndarray, ...]]:
    """Each block's arrays as the kernel takes them: weights and bias int32, multiplier int64, shift int32."""
    return [(np.ascontiguousarray(b.weights, np.int32), np.ascontiguousarray(b.bias, np.int32),
             np.ascontiguousarray(b.multiplier, np.int64), np.ascontiguousarray(b.shift, np.int32))
            for b in model.network.blocks]


# --- the device -------------------------------------------------------------------------------------


def _import_cupy():
    """``import cupy``. CuPy makes its kernel cache (``~/.cupy/kernel_cache``) as it is imported, and
    cannot be imported where that fails (a GPU container with a read-only home): the cache then goes
    to a private folder in the temporary folder (``CUPY_CACHE_DIR``, unless the user set it)."""
    if "CUPY_CACHE_DIR" not in os.environ and "cupy" not in sys.modules:
        default = os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache")
        try:
            os.makedirs(default, exist_ok=True)  # (as CuPy would)
            usable = os.access(default, os.W_OK | os.X_OK)
        except OSError:
            usable = False
        chosen = None if usable else private_temp_folder("cupy")
        if chosen is not None:
            os.environ["CUPY_CACHE_DIR"] = chosen[0]
    import cupy

    return cupy


class CupyDevice:
    """Every GPU call of the backend: memory, copies, launches, streams. Tests substitute a fake."""

    def __init__(self, index: int = 0) -> None:
        cupy = _import_cupy()
        import cupyx

        self._cupy, self._cupyx = cupy, cupyx
        self._runtime = cupy.cuda.runtime
        self.index = index
        with self.bind():
            module = cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=NVRTC_OPTIONS)
            # Compile now, so that a compile error surfaces when the backend is created.
            self._kernels = {name: module.get_function(name) for name in KERNEL_NAMES}
            self.sm_count = int(cupy.cuda.Device(index).attributes["MultiProcessorCount"])

    def bind(self):
        """This GPU, current in the calling thread for the ``with`` block: CUDA's current device is
        per thread, and ``process()`` runs on the engine's compute thread (which starts on device 0)."""
        return self._cupy.cuda.Device(self.index)

    def free_bytes(self) -> int:
        free, _total = self._runtime.memGetInfo()
        return int(free) + int(self._cupy.get_default_memory_pool().free_bytes())

    def alloc(self, nbytes: int):
        try:
            return self._cupy.cuda.alloc(nbytes)
        except self._cupy.cuda.memory.OutOfMemoryError as exc:
            raise GpuOutOfMemory(str(exc)) from exc

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        try:
            return self._cupyx.empty_pinned((nbytes,), np.uint8)
        except self._runtime.CUDARuntimeError as exc:
            if exc.status != CUDA_ERROR_MEMORY_ALLOCATION:  # (a failed GPU is not out of memory)
                raise
            raise GpuOutOfMemory(f"pinned host memory: {exc}") from exc

    @staticmethod
    def address(arena) -> int:
        return int(arena.ptr)

    def new_stream(self):
        return self._cupy.cuda.Stream(non_blocking=True)

    def upload(self, address: int, host: np.ndarray, stream) -> None:
        self._runtime.memcpyAsync(address, host.ctypes.data, host.nbytes, self._runtime.memcpyHostToDevice, stream.ptr)

    def download(self, host: np.ndarray, address: int, stream) -> None:
        self._runtime.memcpyAsync(host.ctypes.data, address, host.nbytes, self._runtime.memcpyDeviceToHost, stream.ptr)

    def zero(self, address: int, nbytes: int, stream) -> None:
        self._runtime.memsetAsync(address, 0, nbytes, stream.ptr)

    def launch(self, launch: Launch, stream) -> None:
        with stream:
            self._kernels[launch.kernel](launch.grid, launch.block, launch.args)

    @staticmethod
    def synchronize(stream) -> None:
        stream.synchronize()

    def release_cached(self) -> None:
        self._cupy.get_default_memory_pool().free_all_blocks()
        self.release_pinned()

    def release_pinned(self) -> None:
        """Give the pinned blocks no array uses back to the system (CuPy's pool never trims itself)."""
        self._cupy.get_default_pinned_memory_pool().free_all_blocks()


# --- the backend ------------------------------------------------------------------------------------


@dataclass
class _Pending:
    indices: list[int]
    layout: BatchLayout


class _Slot:
    """A stream with its device and pinned arenas, and the sub-batch queued on it (if any)."""

    def __init__(self, device) -> None:
        self.stream = device.new_stream()
        self.arena = None
        self.arena_bytes = 0
        self.staging: np.ndarray | None = None
        self.pending: _Pending | None = None

    @property
    def staging_bytes(self) -> int:
        return 0 if self.staging is None else self.staging.nbytes

    def reserve(self, device, layout: BatchLayout, staging_limit: int) -> None:
        """Grow the arenas to hold ``layout``; the old ones are dropped first so their memory can be reused.

        ``staging_limit``: the pinned staging size the batch limits may need (see ``staging_capacity``).
        """
        if layout.device_bytes > self.arena_bytes:
            size = grown_capacity(self.arena_bytes, layout.device_bytes)
            self.arena, self.arena_bytes = None, 0
            self.arena, self.arena_bytes = device.alloc(size), size
        if layout.host_bytes > self.staging_bytes:
            size = staging_capacity(self.staging_bytes, layout.host_bytes, staging_limit)
            had_staging = self.staging is not None
            self.staging = None
            if had_staging:
                device.release_pinned()  # else the old block stays locked in CuPy's pool for good
            self.staging = device.alloc_pinned(size)

    def release(self) -> None:
        self.arena, self.arena_bytes, self.staging = None, 0, None


class CupyBackend(Backend):
    """The pipeline as CUDA C++ kernels run by CuPy, many same-shape images per launch."""

    name = "cupy"
    uses_gpu = True

    def __init__(self, threads: int | None = None, device=None, *, device_index: int | None = None) -> None:
        """``device``: the device interface (tests pass a fake); else a :class:`CupyDevice` on GPU
        ``device_index`` (``--device``, default 0)."""
        super().__init__(threads)
        if device is None:
            reason = self.unavailable_reason()
            if reason is not None:
                raise BackendUnavailable(reason)
            cupy = _import_cupy()

            device = CupyDevice(checked_device_index(device_index, cupy.cuda.runtime.getDeviceCount()))
        self._device = device
        #: One call at a time: calls share the slots, their arenas and the turn (the Python API hands
        #: one backend to every thread). The GPU runs one call's launches at a time anyway.
        self._lock = threading.Lock()
        with device.bind():
            self._slots = [_Slot(device) for _ in range(SLOTS)]
        self._turn = 0
        #: Sub-batches whose hysteresis reached the round bound and was finished on the host.
        self.host_finishes = 0
        #: The attached CNN label model: its shape, its device arena and each block's addresses.
        self._cnn: CnnShape | None = None
        self._cnn_arena = None
        self._cnn_weights: list[tuple[np.uint64, ...]] = []

    def attach_label_model(self, model) -> bool:
        """Run an integer CNN label model (:class:`gpu_pipeline.labels.cnn.CnnModel`) on the images
        already on the device, after the contract's kernels: each result then carries the pooled sums
        (``label_features``), from which the host takes the label. Other models: False."""
        from gpu_pipeline.labels.cnn import CnnModel

        if not isinstance(model, CnnModel):
            return False
        arrays = cnn_weight_arrays(model)
        sections, total = _pack([(f"{k}.{i}", array.nbytes) for k, block in enumerate(arrays)
                                 for i, array in enumerate(block)])
        with self._lock, self._device.bind():
            arena = self._device.alloc(total)
            base = self._device.address(arena)
            stream = self._slots[0].stream
            for k, block in enumerate(arrays):
                for i, array in enumerate(block):
                    self._device.upload(base + sections[f"{k}.{i}"].offset, array, stream)
            self._device.synchronize(stream)
            self._cnn_arena = arena
            self._cnn_weights = [tuple(_address(base, sections[f"{k}.{i}"]) for i in range(4))
                                 for k in range(len(arrays))]
            self._cnn = CnnShape(model.size, tuple(int(b.bias.shape[0]) for b in model.network.blocks))
        return True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            cupy = _import_cupy()
        except Exception as exc:  # not installed, or a broken CUDA wheel
            return f"CuPy cannot be imported ({one_line(exc)})"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # no driver, or one older than CuPy's CUDA runtime
            return f"no usable CUDA driver ({first_line(exc)})"
        if count == 0 or not cupy.is_available():
            return "CuPy finds no usable CUDA GPU"
        return None

    def is_device_failure(self, error: BaseException) -> bool:
        """CuPy's CUDARuntimeError or CUDADriverError with a sticky status (see ``_cuda_errors``): the
        GPU failed for good. (Not CuPy's OutOfMemoryError, nor our GpuOutOfMemory: per batch.)"""
        try:
            from cupy_backends.cuda.api import driver, runtime
        except Exception:  # no CuPy (a fake device): nothing it raises is CuPy's
            return False
        return (isinstance(error, (runtime.CUDARuntimeError, driver.CUDADriverError))
                and is_sticky(getattr(error, "status", None)))

    def process(
        self, images: Sequence[np.ndarray], config: PipelineConfig, keep_images: bool = False
    ) -> BatchResult:
        check_images(images)
        too_large = np.flatnonzero(pixel_counts(images) > MAX_PIXELS)
        if len(too_large):
            shape = images[int(too_large[0])].shape
            raise ValueError(f"the cupy backend takes images of at most {MAX_PIXELS} pixels, got {shape}")
        with self._lock, self._device.bind():
            return self._process_on_device(images, config, keep_images)

    def _process_on_device(self, images: Sequence[np.ndarray], config: PipelineConfig, keep_images: bool) -> BatchResult:
        settings = KernelSettings.from_config(config)
        results = BatchResult.empty(len(images), keep_images)
        if self._cnn is not None:
            results.label_features = np.zeros((len(images), self._cnn.widths[-1]), np.int64)
        held = sum(slot.arena_bytes for slot in self._slots)
        budget = sub_batch_budget(self._device.free_bytes(), held)
        queue = deque(plan_sub_batches(images, range(len(images)), budget, keep_images, self._cnn))
        try:
            while queue:
                indices = queue.popleft()
                layout = BatchLayout.plan(len(indices), images[indices[0]].shape, keep_images, self._cnn)
                slot = self._slots[self._turn]
                self._turn = (self._turn + 1) % SLOTS
                self._collect(slot, results)
                try:
                    slot.reserve(self._device, layout, budget)
                except GpuOutOfMemory:
                    self._drain(results)
                    self._release_buffers()
                    if len(indices) > 1:  # halve the sub-batches from here on
                        remaining = indices + [index for batch in queue for index in batch]
                        queue = deque(plan_sub_batches(images, remaining, layout.device_bytes // 2, keep_images,
                                                       self._cnn))
                        continue
                    self._reserve_single(slot, layout, budget)
                self._submit(slot, images, indices, layout, settings)
            self._drain(results)
        except BaseException:
            self._abandon()
            raise
        return results  # every index was filled by _collect

    def close(self) -> None:
        with self._lock, self._device.bind():
            self._abandon()
            self._release_buffers()
            self._cnn, self._cnn_arena, self._cnn_weights = None, None, []

    # --- internals ---

    def _reserve_single(self, slot: _Slot, layout: BatchLayout, staging_limit: int) -> None:
        """Last try for a one-image sub-batch, with everything else released."""
        try:
            slot.reserve(self._device, layout, staging_limit)
        except GpuOutOfMemory as exc:
            mib = 2**20
            raise GpuOutOfMemory(
                f"out of GPU memory: one {layout.height}x{layout.width}x{layout.channels} image needs "
                f"{layout.device_bytes / mib:.1f} MiB of device memory and {layout.host_bytes / mib:.1f} MiB of "
                f"pinned host memory; {self._device.free_bytes() / mib:.1f} MiB of device memory is free ({exc})"
            ) from exc

    def _submit(self, slot: _Slot, images, indices: list[int], layout: BatchLayout, settings: KernelSettings) -> None:
        """Pack the sub-batch into pinned memory and queue its copies and kernels on the slot's stream."""
        device, stream, staging = self._device, slot.stream, slot.staging
        inputs = layout.inputs(staging)
        if isinstance(images, ImageBatch):
            images.copy_into(np.asarray(indices, np.int64), inputs)  # one copy for images packed together
        else:
            for k, index in enumerate(indices):
                inputs[k] = images[index]
        base = device.address(slot.arena)
        histograms = layout.device["histograms"]
        device.zero(base + histograms.offset, histograms.nbytes, stream)
        device.upload(base + layout.device["input"].offset, layout.host_view(staging, "input"), stream)
        for launch in front_launches(layout, base, settings):
            device.launch(launch, stream)
        if layout.cnn is not None:
            for launch in cnn_launches(layout, base, self._cnn_weights):
                device.launch(launch, stream)
        if layout.keep_images:
            device.download(layout.host_view(staging, "equalized"), base + layout.device["equalized"].offset, stream)
        self._queue_edge_round(slot, layout)
        slot.pending = _Pending(indices, layout)

    def _queue_edge_round(self, slot: _Slot, layout: BatchLayout, hysteresis: bool = True) -> None:
        """Queue a hysteresis round (unless the host finished it), the edges and counts, and the copy
        of the results back."""
        device, stream, staging = self._device, slot.stream, slot.staging
        base = device.address(slot.arena)
        counters = layout.device["counters"]
        device.zero(base + counters.offset, counters.nbytes, stream)
        for launch in edge_launches(layout, base, device.sm_count, hysteresis):
            device.launch(launch, stream)
        span = BatchLayout.results_span(layout.host)
        device.download(staging[span.offset:span.end], base + BatchLayout.results_span(layout.device).offset, stream)
        if layout.keep_images:
            device.download(layout.host_view(staging, "edges"), base + layout.device["edges"].offset, stream)

    def _collect(self, slot: _Slot, results: BatchResult) -> None:
        """Wait for the slot's sub-batch, finish its hysteresis if a round was not enough, store its results."""
        pending = slot.pending
        if pending is None:
            return
        layout, staging = pending.layout, slot.staging
        self._device.synchronize(slot.stream)
        rounds = 1
        while layout.changed_flags(staging)[-1]:  # the round's last launch still changed something
            if rounds == HYSTERESIS_MAX_ROUNDS:
                self._finish_on_host(slot, layout)
                break
            self._queue_edge_round(slot, layout)
            self._device.synchronize(slot.stream)
            rounds += 1
        histograms, counts = layout.histograms(staging), layout.edge_counts(staging)
        equalized = layout.planes(staging, "equalized") if layout.keep_images else None
        edges = layout.planes(staging, "edges") if layout.keep_images else None
        indices = list(pending.indices)
        results.histograms[indices] = histograms
        results.edge_counts[indices] = counts
        if layout.cnn is not None:
            results.label_features[indices] = layout.label_features(staging)
        if layout.keep_images:
            for k, index in enumerate(indices):
                results.equalized[index] = equalized[k].copy()
                results.edges[index] = edges[k].copy()
        slot.pending = None

    def _finish_on_host(self, slot: _Slot, layout: BatchLayout) -> None:
        """Hysteresis past the round bound: the state planes into the (no longer needed) input part of
        the pinned staging, a flood there, back to the device; then edges and results again."""
        device, stream = self._device, slot.stream
        base = device.address(slot.arena)
        states = layout.device["states"]
        host = layout.host_view(slot.staging, "input")[: states.nbytes]
        device.download(host, base + states.offset, stream)
        device.synchronize(stream)
        finish_hysteresis(host.reshape(layout.count, layout.height, layout.width))
        device.upload(base + states.offset, host, stream)
        self._queue_edge_round(slot, layout, hysteresis=False)
        device.synchronize(stream)
        self.host_finishes += 1

    def _drain(self, results: BatchResult) -> None:
        for _ in range(SLOTS):  # oldest first
            self._collect(self._slots[self._turn], results)
            self._turn = (self._turn + 1) % SLOTS

    def _abandon(self) -> None:
        """After an error: wait for queued work (so no copy still targets the arenas) and forget it."""
        for slot in self._slots:
            if slot.pending is not None:
                slot.pending = None
                # The device may be the reason we are here; there is nothing left to save.
                with contextlib.suppress(Exception):
                    self._device.synchronize(slot.stream)

    def _release_buffers(self) -> None:
        for slot in self._slots:
            slot.release()
        self._device.release_cached()
