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


def threshold_text(value: float) -> str:
    """A threshold as short as it reads back exactly: ``100``, ``40.5``, ``79.99999999`` (``:g``
    printed that one as 80, while cv2.Canny compares with 79)."""
    text = f"{value:g}"
    return text if float(text) == value else repr(float(value))


#: The command line's option for each setting (a field of PipelineConfig or DecodeOptions): a refusal
#: names the option the user typed, not the field (a resume's "--low 100 -> 50", "--blur must be ...").
SETTING_OPTIONS = {"low_threshold": "--low", "high_threshold": "--high", "l2_gradient": "--l2",
                   "blur_ksize": "--blur", "bands": "--bands", "stretch": "--stretch", "max_pixels": "--max-pixels"}


def setting_name(field: str) -> str:
    """A setting as this module's refusals name it: its field in words (``low threshold``), but
    ``blur size`` for ``blur_ksize``."""
    return "blur size" if field == "blur_ksize" else field.replace("_", " ")


#: The most decode workers and compute threads: each is a thread (or a process) of its own, and a
#: typing slip of a few more digits made a run start threads until the machine ran out of memory.
MOST_THREADS = 1024


def whole_number(name: str, value, least: int | None = None, most: int | None = None) -> int:
    """``value`` as an int: any integer type (NumPy's too), but not a bool or a float such as
    ``1.5``; ValueError otherwise, or when it is below ``least`` or above ``most``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if least is not None and value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    if most is not None and value > most:
        raise ValueError(f"{name} must be at most {most}, got {value}")
    return int(value)


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
        blur = self.blur_ksize  # 5.0 is in BLUR_SIZES, and a kernel typed for integers raised on it
        if not isinstance(blur, numbers.Integral) or isinstance(blur, bool) or blur not in BLUR_SIZES:
            raise ValueError(f"{setting_name('blur_ksize')} must be one of {BLUR_SIZES}, got {blur!r}")
        object.__setattr__(self, "blur_ksize", int(blur))
        for name in ("low_threshold", "high_threshold"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"{setting_name(name)} must be a number, got {value!r}")
            # compared as a Python int or float: NumPy's float32 2**31 - 1 compared in float32, where
            # it equals the bound (2**31), and float16 inf as the bound's float16 inf
            try:
                number = int(value) if isinstance(value, numbers.Integral) else float(value)
            except OverflowError:  # a Fraction beyond float64
                number = float("inf")
            if not 0 <= number <= MAX_THRESHOLD:  # also rejects NaN
                raise ValueError(f"{setting_name(name)} must be between 0 and {MAX_THRESHOLD}, got {value}")
            # kept as that Python number, as cv2.Canny takes a double: squared for the L2 gradient in
            # NumPy's type, uint8 42 became 1764 % 256 = 228, float16 300 became inf (every edge strong)
            object.__setattr__(self, name, number)

    def computes_as(self, other: PipelineConfig) -> bool:
        """Whether ``other`` gives the same results: the same settings, with the thresholds compared as
        cv2.Canny uses them (swapped when low > high; a model fitted with --low 200 --high 100 was
        refused for a run with --low 100 --high 200)."""
        def used(config: PipelineConfig) -> tuple:
            return *canny_order(config.low_threshold, config.high_threshold), config.l2_gradient, config.blur_ksize

        return used(self) == used(other)


def canny_order(low, high) -> tuple:
    """The thresholds as cv2.Canny uses them: swapped when low > high."""
    return (high, low) if low > high else (low, high)


@dataclass(frozen=True)
class DecodeOptions:
    """How a file becomes the uint8 gray or RGB array that every backend sees."""

    bands: tuple[int, ...] | None = None  # 1-based, as in GDAL; None: all (at most 4)
    stretch: str = "percentile"  # for data wider than 8 bits, see gpu_pipeline.inputs.decode
    max_pixels: int = 1_000_000_000  # decompression-bomb guard

    def __post_init__(self) -> None:
        if self.stretch not in STRETCHES:
            raise ValueError(f"{setting_name('stretch')} must be one of {', '.join(STRETCHES)}, got {self.stretch!r}")
        if self.bands is not None:
            if len(self.bands) not in (1, 3):
                raise ValueError(f"--bands takes 1 or 3 band numbers, got {len(self.bands)}")
            bands = tuple(whole_number("a band number", b) for b in self.bands)
            if any(b < 1 for b in bands):
                raise ValueError("band numbers are 1-based and must be >= 1")
            object.__setattr__(self, "bands", bands)
        object.__setattr__(self, "max_pixels", whole_number(setting_name("max_pixels"), self.max_pixels, least=1))
