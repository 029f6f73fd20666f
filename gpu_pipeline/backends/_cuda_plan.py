"""Host-side decisions of the numba.cuda backend, as small pure functions (tested without a GPU).

How a batch is cut into sub-batches from shapes and free GPU memory, how reusable buffers grow,
which integer thresholds Canny compares with, launch geometry, and the hysteresis launch schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gpu_pipeline.backends._cuda_kernels import BLOCK_THREADS, STATS_WIDTH, TILE_X, TILE_Y

#: CUDA's limit on gridDim.z, the image index of every launch.
MAX_IMAGES_PER_LAUNCH = 65535
#: Per-image histogram bins are int32 on the device.
MAX_PIXELS_PER_IMAGE = 2**31 - 1
#: Pixels per sub-batch: enough to fill an H100 for about a millisecond, and a quarter of the 32 MP
#: the engine hands a GPU backend per call (base.GPU_BATCH_PIXELS), so that every call has several
#: sub-batches and the two slots overlap one's copies with the other's kernels.
TARGET_PIXELS_PER_SUB_BATCH = 8 * 2**20
#: Share of the free device memory the two buffer sets may take (the rest: context, other users).
MEMORY_FRACTION = 0.7
#: Buffer sets in flight: one computing while the next one is copied in.
SLOTS = 2
#: Pixels each thread of a pixel kernel handles (amortises the private histogram flush).
PIXELS_PER_THREAD = 16
#: Most hysteresis launches between two host checks (the length of the changed-flag array).
HYSTERESIS_MAX_CHUNK = 16
#: Most hysteresis launches per sub-batch (chunks of 4, 8, 16, 16); a sub-batch not at its fixed
#: point by then is finished on the host (``_host_hysteresis``), so long weak chains that cross
#: many tiles cost one copy each way instead of thousands of launches.
HYSTERESIS_MAX_LAUNCHES = 44
CUDA_ERROR_OUT_OF_MEMORY = 2


@dataclass(frozen=True)
class SubBatch:
    """Images of one shape processed by one set of launches; ``indices`` index the caller's list."""

    shape: tuple[int, ...]
    indices: tuple[int, ...]

    @property
    def pixels(self) -> int:
        return self.shape[0] * self.shape[1]


class GpuOutOfMemory(MemoryError):
    """Even a single image does not fit in the GPU memory that is free."""


def device_bytes_per_image(shape: tuple[int, ...], keep_images: bool) -> int:
    """Device memory one image takes in a sub-batch: input, gray, blurred/edges, state, LUT, stats."""
    pixels = shape[0] * shape[1]
    channels = shape[2] if len(shape) == 3 else 1
    gray = pixels if channels == 3 else 0  # a gray input is its own gray buffer
    equalized = pixels if keep_images else 0
    return pixels * channels + gray + equalized + 2 * pixels + 256 + 4 * STATS_WIDTH


def pinned_bytes_per_image(shape: tuple[int, ...], keep_images: bool) -> int:
    """Pinned host memory one image takes: staged input, stats, and the images asked for."""
    pixels = shape[0] * shape[1]
    channels = shape[2] if len(shape) == 3 else 1
    return pixels * channels + 4 * STATS_WIDTH + (2 * pixels if keep_images else 0)


def images_per_sub_batch(shape: tuple[int, ...], keep_images: bool, free_bytes: float) -> int:
    """How many images of ``shape`` one sub-batch takes, from free device memory and targets.

    At least 1 (an image that does not fit is found out by the allocation and reported then).
    """
    if shape[0] * shape[1] > MAX_PIXELS_PER_IMAGE:
        raise ValueError(f"image of shape {shape} has more than {MAX_PIXELS_PER_IMAGE} pixels")
    by_memory = MEMORY_FRACTION * free_bytes / SLOTS / device_bytes_per_image(shape, keep_images)
    by_target = TARGET_PIXELS_PER_SUB_BATCH / (shape[0] * shape[1])
    limit = min(by_memory, by_target, MAX_IMAGES_PER_LAUNCH)
    return max(1, int(limit))


def plan_sub_batches(
    shapes: Sequence[tuple[int, ...]],
    keep_images: bool,
    free_bytes: float,
    max_images: int | None = None,
) -> list[SubBatch]:
    """Cut a batch into same-shape sub-batches of balanced sizes, shapes in first-seen order.

    ``max_images`` caps the sub-batch size further (the out-of-memory retry halves it).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return plan_groups(groups, keep_images, free_bytes, max_images)


def plan_groups(
    groups: dict[tuple[int, ...], Sequence[int]],
    keep_images: bool,
    free_bytes: float,
    max_images: int | None = None,
) -> list[SubBatch]:
    """:func:`plan_sub_batches` of images already grouped by shape (the indices of each shape, in order)."""
    plan = []
    for shape, indices in groups.items():
        limit = images_per_sub_batch(shape, keep_images, free_bytes)
        if max_images is not None:
            limit = max(1, min(limit, max_images))
        parts = -(-len(indices) // limit)
        # even cuts (sizes differ by at most one): 10 images by 3 give 3, 3, 2, 2, not 3, 3, 3, 1
        cuts = [len(indices) * part // parts for part in range(parts + 1)]
        plan.extend(SubBatch(shape, tuple(indices[cuts[k]:cuts[k + 1]])) for k in range(parts))
    return plan


def grown_capacity(current: int, required: int) -> int:
    """Capacity of a reusable buffer that must hold ``required`` elements: grow by half at least,
    so that slowly rising sizes do not reallocate every batch."""
    if required <= current:
        return current
    return max(required, current + current // 2)


class BufferPool:
    """Named 1-D buffers reused across batches; ``allocate(count, dtype)`` makes a new one.

    ``get`` returns a view of exactly ``count`` elements of the named buffer, replacing the
    buffer by a larger one when needed. The allocator is injected: device arrays, pinned host
    arrays, or NumPy arrays in tests.
    """

    def __init__(self, allocate: Callable[[int, np.dtype], object]) -> None:
        self._allocate = allocate
        self._buffers: dict[str, object] = {}

    def get(self, name: str, count: int, dtype) -> object:
        dtype = np.dtype(dtype)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.shape[0] < count:
            current = 0 if buffer is None or buffer.dtype != dtype else buffer.shape[0]
            self._buffers.pop(name, None)  # let the old one go before allocating the new one
            buffer = self._allocate(grown_capacity(current, count), dtype)
            self._buffers[name] = buffer
        return buffer[:count]

    @property
    def nbytes(self) -> int:
        return sum(b.shape[0] * b.dtype.itemsize for b in self._buffers.values())

    def release(self) -> None:
        self._buffers.clear()


def pixel_grid(pixels: int, images: int) -> tuple[int, int, int]:
    """Grid of the pixel kernels (1-D blocks of BLOCK_THREADS): x strides the pixels, z the images."""
    blocks = -(-pixels // (BLOCK_THREADS * PIXELS_PER_THREAD))
    return max(1, blocks), 1, images


def tile_grid(height: int, width: int, images: int) -> tuple[int, int, int]:
    """Grid of the tile kernels: every TILE_Y x TILE_X tile in x (any height fits), images in z."""
    return -(-height // TILE_Y) * -(-width // TILE_X), 1, images


def hysteresis_schedule(max_launches: int) -> Iterator[int]:
    """Launches queued between host checks of the changed flags: 4, 8, 16, 16, ... in total at
    most ``max_launches``. Launches past the fixed point exit at once, so a chunk may overshoot
    cheaply: small images converge within the first chunk, long chains crossing many tiles in a
    few more, with one host synchronisation per chunk."""
    chunk, done = 4, 0
    while done < max_launches:
        step = min(chunk, max_launches - done)
        yield step
        done += step
        chunk = min(2 * chunk, HYSTERESIS_MAX_CHUNK)


def is_out_of_memory(error: BaseException) -> bool:
    """True for numba's CudaAPIError with CUDA_ERROR_OUT_OF_MEMORY (device or pinned memory)."""
    from numba.cuda.cudadrv.driver import CudaAPIError

    if not isinstance(error, CudaAPIError):
        return False
    try:
        return int(getattr(error, "code", -1)) == CUDA_ERROR_OUT_OF_MEMORY  # CUresult is an IntEnum
    except (TypeError, ValueError):
        return False
