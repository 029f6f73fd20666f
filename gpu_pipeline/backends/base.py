"""The one interface every backend implements.

A backend receives decoded uint8 images, gray (H, W) or RGB (H, W, 3), C-contiguous, any mix of
shapes, and returns one :class:`StageResult` per image, in order. It knows nothing about files;
the engine knows nothing about numba or CUDA.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from gpu_pipeline.config import PipelineConfig


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says why (no GPU, no driver, package missing)."""


@dataclass
class StageResult:
    """What a backend computes for one image.

    ``histogram`` is int64[256] of the gray image; ``edge_count`` the number of edge pixels.
    ``equalized`` and ``edges`` (uint8, 0/255) are filled only when the caller asks for them.
    """

    histogram: np.ndarray
    edge_count: int
    equalized: np.ndarray | None = None
    edges: np.ndarray | None = None


class Backend(ABC):
    """Base class of all backends. Subclasses set ``name`` and implement ``process``."""

    name: ClassVar[str]
    #: True for backends that run on a GPU (``auto`` prefers them when one is present).
    uses_gpu: ClassVar[bool] = False

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can run on this machine, else a one-line reason."""
        return None

    @abstractmethod
    def process(
        self, images: Sequence[np.ndarray], config: PipelineConfig, keep_images: bool = False
    ) -> list[StageResult]:
        """Run the whole contract on each image; ``keep_images`` also returns equalized and edges."""

    def warm_up(self, config: PipelineConfig | None = None) -> None:
        """Compile (or load from a cache) every kernel now, on a tiny gray and a tiny RGB image, so
        that later calls, and their timings, do only the work."""
        tiny = [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.uint8)]
        self.process(tiny, config or PipelineConfig(), keep_images=True)

    def close(self) -> None:
        """Release buffers, pools and devices. The backend is not used afterwards."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_image(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is what backends accept."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array, got {getattr(image, 'dtype', type(image))}")
    if image.ndim == 3 and image.shape[2] != 3 or image.ndim not in (2, 3):
        raise ValueError(f"expected a gray (H, W) or RGB (H, W, 3) image, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")


def group_by_shape(images: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Indices of the images of each shape, in first-seen order: batched kernels need one shape."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        groups[image.shape].append(index)
    return dict(groups)
