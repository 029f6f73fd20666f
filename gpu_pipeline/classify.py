"""From a backend's integer outputs to a label, on the host, so labels are identical on every backend.

The default rule is honest about what it measures: how much edge structure a tile has (edge density,
the fraction of edge pixels) and, for smooth tiles, whether they are dark or bright
(mean gray level of the histogram, before equalization). It is not land cover; trainable land-cover labels come from
``gpu-pipeline fit``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Edge-density bands of the default rule (fraction of pixels that are edges). Equalization
#: stretches every tile to full contrast, so even calm water shows some edges: on the EuroSAT tiles
#: with the default thresholds (100, 200) the median density runs from 0.12 (AnnualCrop) to 0.30
#: (Residential).
SMOOTH_BELOW = 0.10
BUSY_FROM = 0.22
#: Mean gray levels (0-255) under / over which a flat tile is called dark / bright.
DARK_BELOW = 48
BRIGHT_FROM = 208

DEFAULT_LABELS = ("dark-smooth", "bright-smooth", "smooth", "textured", "busy")


@dataclass(frozen=True)
class Features:
    """Integer outputs of the pipeline, the same bytes on every backend."""

    histogram: np.ndarray  # int64[256] of the gray image
    edge_count: int
    pixels: int

    @classmethod
    def from_result(cls, result, image: np.ndarray) -> "Features":
        """Features of one image from its backend result (a StageResult) and its decoded pixels."""
        return cls(result.histogram, int(result.edge_count), image.shape[0] * image.shape[1])

    @property
    def edge_density(self) -> float:
        return self.edge_count / self.pixels

    @property
    def mean_gray(self) -> float:
        return float(np.dot(self.histogram, np.arange(256))) / self.pixels


def default_label(features: Features) -> str:
    """The documented rule (README, "Labels")."""
    density = features.edge_density
    if density >= BUSY_FROM:
        return "busy"
    if density >= SMOOTH_BELOW:
        return "textured"
    mean = features.mean_gray
    if mean < DARK_BELOW:
        return "dark-smooth"
    if mean >= BRIGHT_FROM:
        return "bright-smooth"
    return "smooth"
