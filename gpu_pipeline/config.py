"""Settings of one run: what the backends compute and how the images are read."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

BLUR_SIZES = (3, 5, 7)
#: cv2.Canny floors its thresholds to int; from 2**31 on that overflows and OpenCV's own results
#: vary (docs/contract.md), so the contract stops below it. The largest L1 gradient of an 8-bit image is 2040: any threshold above
#: that already means "no edges".
MAX_THRESHOLD = 2**31 - 1
STRETCHES = ("percentile", "minmax", "bitdepth")


@dataclass(frozen=True)
class PipelineConfig:
    """The compute stages of the contract (docs/contract.md).

    Thresholds follow ``cv2.Canny``: if ``low_threshold > high_threshold`` the two are swapped,
    and with ``l2_gradient`` they are compared with the squared magnitude.
    """

    low_threshold: float = 100.0
    high_threshold: float = 200.0
    l2_gradient: bool = False
    blur_ksize: int = 5

    def __post_init__(self) -> None:
        if self.blur_ksize not in BLUR_SIZES or isinstance(self.blur_ksize, bool):
            raise ValueError(f"blur size must be one of {BLUR_SIZES}, got {self.blur_ksize!r}")
        for name in ("low_threshold", "high_threshold"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"{name.replace('_', ' ')} must be a number, got {value!r}")
            if not 0 <= value <= MAX_THRESHOLD:  # also rejects NaN
                raise ValueError(f"{name.replace('_', ' ')} must be between 0 and {MAX_THRESHOLD}, got {value}")


@dataclass(frozen=True)
class DecodeOptions:
    """How a file becomes the uint8 gray or RGB array that every backend sees."""

    bands: tuple[int, ...] | None = None  # 1-based, as in GDAL; None: all (at most 4)
    stretch: str = "percentile"  # for data wider than 8 bits, see gpu_pipeline.inputs.decode
    max_pixels: int = 1_000_000_000  # decompression-bomb guard

    def __post_init__(self) -> None:
        if self.stretch not in STRETCHES:
            raise ValueError(f"stretch must be one of {', '.join(STRETCHES)}, got {self.stretch!r}")
        if self.bands is not None:
            if len(self.bands) not in (1, 3):
                raise ValueError(f"--bands takes 1 or 3 band numbers, got {len(self.bands)}")
            if any(b < 1 for b in self.bands):
                raise ValueError("band numbers are 1-based and must be >= 1")
        if self.max_pixels < 1:
            raise ValueError("max pixels must be >= 1")
