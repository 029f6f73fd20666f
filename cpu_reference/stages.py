"""Stages of the contract (DESIGN.md section 2). TO BE IMPLEMENTED (helper A)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PipelineStages(NamedTuple):
    """Every intermediate of one image, for tests and for the reference backend."""

    gray: np.ndarray        # uint8 (H, W)
    histogram: np.ndarray   # int64[256]
    equalized: np.ndarray   # uint8 (H, W)
    blurred: np.ndarray     # uint8 (H, W)
    edges: np.ndarray       # uint8 (H, W), 0 or 255
    edge_count: int


def gray(image: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(rgb, COLOR_RGB2GRAY); a gray (H, W) image is returned as is."""
    raise NotImplementedError


def histogram(gray_image: np.ndarray) -> np.ndarray:
    """cv2.calcHist, 256 bins, as int64[256]."""
    raise NotImplementedError


def equalize(gray_image: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist."""
    raise NotImplementedError


def gaussian_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    """cv2.GaussianBlur(image, (ksize, ksize), 0), ksize in {3, 5, 7}, BORDER_REFLECT_101."""
    raise NotImplementedError


def sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dx, dy as inside cv2.Canny: 3x3 Sobel, BORDER_REPLICATE, int32."""
    raise NotImplementedError


def canny(image: np.ndarray, low_threshold: float, high_threshold: float, l2_gradient: bool = False) -> np.ndarray:
    """cv2.Canny(image, low, high, apertureSize=3, L2gradient=l2_gradient): uint8 0/255."""
    raise NotImplementedError


def edge_count(edges: np.ndarray) -> int:
    """cv2.countNonZero."""
    raise NotImplementedError


def process_image(image: np.ndarray, config) -> PipelineStages:
    """The whole contract. ``config`` has low_threshold, high_threshold, l2_gradient, blur_ksize."""
    raise NotImplementedError
