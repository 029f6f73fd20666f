"""The statistics of the benchmark: median and min-max of repeated timings, rates, ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> tuple[float, float]:
    """The range of ``values``: with a handful of repeats, min-max says more than quartiles."""
    return min(values), max(values)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; None when either is missing or the baseline is zero."""
    if value is None or not baseline:
        return None
    return value / baseline


@dataclass
class Timing:
    """Wall-clock seconds of each repeat over the same ``images`` (``pixels`` in all)."""

    seconds: list[float]
    images: int
    pixels: int

    def rate(self, amount: float) -> dict[str, float]:
        """``amount`` per second: at the median time, and at the slowest and fastest repeat."""
        fastest, slowest = spread(self.seconds)
        return {"median": amount / median(self.seconds), "min": amount / slowest, "max": amount / fastest}

    @property
    def megapixels_per_second(self) -> dict[str, float]:
        return self.rate(self.pixels / 1e6)

    @property
    def images_per_second(self) -> dict[str, float]:
        return self.rate(self.images)

    def to_json(self) -> dict:
        fastest, slowest = spread(self.seconds)
        return {"images": self.images, "megapixels": self.pixels / 1e6, "seconds": self.seconds,
                "median_s": median(self.seconds), "min_s": fastest, "max_s": slowest,
                "megapixels_per_s": self.megapixels_per_second, "images_per_s": self.images_per_second}


def time_repeats(repeats: int, run: Callable[[], object], clock: Callable[[], float] = time.perf_counter
                 ) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run`` (by ``clock``, e.g. CPU time)."""
    seconds = []
    for _ in range(repeats):
        start = clock()
        run()
        seconds.append(max(clock() - start, 1e-9))
    return seconds
