"""The one interface every backend implements.

A backend receives decoded uint8 images, gray (H, W) or RGB (H, W, 3), C-contiguous, any mix of
shapes, and returns one :class:`BatchResult` for the whole batch: the histograms as one (N, 256)
array and the edge counts as one (N,) array, so nothing downstream pays a Python object per
image. It knows nothing about files; the engine knows nothing about numba or CUDA.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence, overload

import numpy as np

from gpu_pipeline.config import PipelineConfig
from gpu_pipeline.errors import one_line
from gpu_pipeline.images import ImageBatch


#: Pixels per call of a CPU backend: 1 MP is 256 EuroSAT tiles, or a 12-MP scene alone.
CPU_BATCH_PIXELS = 1 << 20
#: Pixels per call of a GPU backend: 32 MP, 8,192 tiles of 64x64 (a launch must hide its fixed costs).
GPU_BATCH_PIXELS = 32 << 20


class BackendUnavailable(RuntimeError, ValueError):
    """The backend cannot run here; the message says why (no GPU, no driver, package missing).

    A RuntimeError, as it always was, and a ValueError: the Python API promises one ValueError for a
    bad argument, and a backend that cannot run here is one (the command line exits 2 on it)."""


class DeviceFailed(RuntimeError):
    """The backend's GPU failed for good during the run (a sticky CUDA error: an Xid, an uncorrectable
    ECC error, an illegal address, the GPU off the bus): every later call would fail alike, so the run
    stops, as on a full disk, instead of giving every later image an error record. The message names
    the backend and the GPU's error; the error itself is the ``__cause__``."""


def raise_if_device_failed(backend: "Backend", error: BaseException, where: str = "") -> None:
    """:class:`DeviceFailed` from ``error`` when ``backend`` says its device failed (``where``: what
    it was doing, added to the message)."""
    if backend.is_device_failure(error):
        raise DeviceFailed(f"the GPU of backend {backend.name} failed: {one_line(error)}{where}") from error


def checked_device_index(index: int | None, count: int) -> int:
    """The GPU a GPU backend binds: ``index`` (``--device``), 0 by default; BackendUnavailable when
    this machine has no such GPU."""
    if index is None:
        index = 0
    if not 0 <= index < count:
        choices = f"--device 0..{count - 1}" if count > 1 else "--device 0" if count else "none"
        raise BackendUnavailable(f"--device {index}: no such GPU here ({count} visible; {choices})")
    return index


@dataclass
class StageResult:
    """What a backend computes for one image.

    ``histogram`` is int64[256] of the gray image; ``edge_count`` the number of edge pixels.
    ``equalized`` and ``edges`` (uint8, 0/255) are filled only when the caller asks for them;
    ``label_features`` only by a backend that runs the label model (see :class:`BatchResult`).
    """

    histogram: np.ndarray
    edge_count: int
    equalized: np.ndarray | None = None
    edges: np.ndarray | None = None
    label_features: np.ndarray | None = None


@dataclass
class BatchResult(Sequence[StageResult]):
    """What a backend computes for a batch of N images, in input order.

    ``histograms`` is int64 (N, 256), ``edge_counts`` int64 (N,). ``equalized`` and ``edges`` are
    lists of N uint8 images when the caller asked for them (``keep_images``), else None. Indexing
    or iterating gives one :class:`StageResult` per image (views into the arrays) for callers
    that look at images one at a time; slicing gives a smaller BatchResult.

    ``label_features`` is int64 (N, F), the label model's features of each image, from a backend
    that took the model (:meth:`Backend.attach_label_model`) and computed them on its device; None
    otherwise (the labeller then computes them on the host, from the images).
    """

    histograms: np.ndarray
    edge_counts: np.ndarray
    equalized: list[np.ndarray] | None = None
    edges: list[np.ndarray] | None = None
    label_features: np.ndarray | None = None

    @classmethod
    def empty(cls, count: int, keep_images: bool) -> "BatchResult":
        """Room for ``count`` results, filled in by a backend (image lists hold None until then)."""
        kept = [None] * count if keep_images else None
        return cls(np.zeros((count, 256), np.int64), np.zeros(count, np.int64), kept,
                   list(kept) if keep_images else None)

    @classmethod
    def from_results(cls, results: Sequence[StageResult]) -> "BatchResult":
        """A batch from one result per image (backends that compute images one at a time)."""
        histograms = np.array([r.histogram for r in results], dtype=np.int64).reshape(len(results), 256)
        edge_counts = np.array([r.edge_count for r in results], dtype=np.int64)
        keep = len(results) > 0 and all(r.edges is not None for r in results)
        features = None
        if len(results) > 0 and all(r.label_features is not None for r in results):
            features = np.stack([r.label_features for r in results])
        return cls(histograms, edge_counts, [r.equalized for r in results] if keep else None,
                   [r.edges for r in results] if keep else None, features)

    def __len__(self) -> int:
        return len(self.edge_counts)

    @overload
    def __getitem__(self, index: int) -> StageResult: ...

    @overload
    def __getitem__(self, index: slice) -> "BatchResult": ...

    def __getitem__(self, index):
        features = None if self.label_features is None else self.label_features[index]
        if isinstance(index, slice):
            return BatchResult(self.histograms[index], self.edge_counts[index],
                               None if self.equalized is None else self.equalized[index],
                               None if self.edges is None else self.edges[index], features)
        return StageResult(self.histograms[index], int(self.edge_counts[index]),
                           None if self.equalized is None else self.equalized[index],
                           None if self.edges is None else self.edges[index], features)

    def __iter__(self) -> Iterator[StageResult]:
        return (self[i] for i in range(len(self)))


class Backend(ABC):
    """Base class of all backends. Subclasses set ``name`` and implement ``process``.

    ``registry.create`` makes one as ``cls(threads=...)`` (a GPU backend: ``device_index=`` too). The
    Python API keeps a process's backends across ``os.fork``: a backend with threads of its own makes
    them again in the child (``NumbaCpuBackend._run``), else the child's first call waits for ever."""

    name: ClassVar[str]
    #: True for backends that run on a GPU (``auto`` prefers them when one is present).
    uses_gpu: ClassVar[bool] = False

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def batch_pixels(self) -> int:
        """About how many pixels this backend wants per ``process`` call (the engine cuts batches
        by it): small for CPU backends (the batch stays in cache and memory is small), large for
        GPU backends (a launch must carry enough work to hide its fixed costs)."""
        return GPU_BATCH_PIXELS if self.uses_gpu else CPU_BATCH_PIXELS

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can run on this machine, else a one-line reason."""
        return None

    @abstractmethod
    def process(
        self, images: Sequence[np.ndarray], config: PipelineConfig, keep_images: bool = False
    ) -> BatchResult:
        """Run the whole contract on each image; ``keep_images`` also returns equalized and edges."""

    def is_device_failure(self, error: BaseException) -> bool:
        """True when ``error``, raised by this backend, says its device failed for good (a sticky CUDA
        error: every later call would fail alike), rather than this batch or image: the run then stops
        (:class:`DeviceFailed`). Out of memory is not one (it is per batch). CPU backends: never."""
        return False

    def attach_label_model(self, model: object) -> bool:
        """Offer the run's label model. A backend that can compute the model's features on its own
        device, on the images it already holds, keeps it and returns True: its results then carry
        ``label_features``. By default False: the labeller computes them on the host."""
        return False

    def compiles_on_warm_up(self) -> bool:
        """True when :meth:`warm_up` is going to compile kernels rather than load them, so that a
        caller can announce the wait before it starts (the numba backend on a fresh install)."""
        return False

    def warm_up(self, config: PipelineConfig | None = None) -> None:
        """Compile (or load from a cache) every kernel now, on a tiny gray and a tiny RGB image, so
        that later calls, and their timings, do only the work."""
        tiny = [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.uint8)]
        try:
            self.process(tiny, config or PipelineConfig(), keep_images=True)
        except Exception as error:
            raise_if_device_failed(self, error)
            raise

    def close(self) -> None:
        """Release buffers, pools and devices. The backend is not used afterwards."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except Exception as error:
            if not self.is_device_failure(error):
                raise  # (a failed device has nothing left to release: its error was said already)


def check_image(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is what backends accept."""
    if not isinstance(image, np.ndarray):  # (its dtype may be uint8: a dask array read "got uint8")
        hint = ": np.asarray(image) makes one" if hasattr(image, "__array__") else ""
        raise ValueError(f"expected a uint8 array, got {type(image)}{hint}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] != 3 or image.ndim not in (2, 3):
        raise ValueError(f"expected a gray (H, W) or RGB (H, W, 3) image, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")


def check_batch(images: ImageBatch) -> None:
    """:func:`check_image` for a whole :class:`ImageBatch` at once (its arrays say the shapes)."""
    if any(buffer.dtype != np.uint8 or not buffer.flags.c_contiguous for buffer in images.buffers):
        raise ValueError("expected uint8 images in C-contiguous buffers")
    if not np.isin(images.channels, (0, 3)).all():
        raise ValueError("expected gray (H, W) or RGB (H, W, 3) images, got other channel counts")
    if len(images) and (images.heights.min() < 1 or images.widths.min() < 1):
        index = int(np.flatnonzero((images.heights < 1) | (images.widths < 1))[0])
        raise ValueError(f"empty image of shape {images[index].shape}")


def check_images(images: Sequence[np.ndarray]) -> None:
    """:func:`check_batch` for an :class:`ImageBatch`, else :func:`check_image` of each image."""
    if isinstance(images, ImageBatch):
        check_batch(images)
    else:
        for image in images:
            check_image(image)


def group_by_shape(images: Sequence[np.ndarray], indices: Sequence[int] | None = None
                   ) -> dict[tuple[int, ...], list[int]]:
    """Indices of the images of each shape (of those at ``indices``, by default all), in first-seen
    order: batched kernels need one shape. An :class:`ImageBatch` is grouped from its shape arrays,
    with no Python per image."""
    if isinstance(images, ImageBatch):
        if indices is None:
            return {shape: positions.tolist() for shape, positions in images.shape_groups().items()}
        chosen = np.asarray(indices, np.int64)
        return {shape: chosen[positions].tolist() for shape, positions in images.take(chosen).shape_groups().items()}
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index in range(len(images)) if indices is None else indices:
        groups[images[index].shape].append(index)
    return dict(groups)
