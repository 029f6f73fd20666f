"""Hypothesis strategies for images: odd shapes, constant images, noise, extreme values."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

#: Multiplies the example count of every hypothesis test: ``GPU_PIPELINE_EXAMPLES=20 python -m pytest
#: tests/test_numba_cpu.py`` is a soak (the counts in the decorators are what CI runs).
EXAMPLES_SCALE = float(os.environ.get("GPU_PIPELINE_EXAMPLES", "1"))


def examples(count: int) -> int:
    """``count`` hypothesis examples, times :data:`EXAMPLES_SCALE`."""
    return max(1, round(count * EXAMPLES_SCALE))


#: Shapes the contract must handle; the issues name them explicitly.
ODD_SHAPES = [(1, 1), (1, 7), (9, 1), (2, 2), (3, 3), (5, 7), (17, 1000), (1, 64), (64, 1)]


@st.composite
def image_shapes(draw, max_side: int = 96) -> tuple[int, int]:
    if draw(st.booleans()):
        return draw(st.sampled_from(ODD_SHAPES))
    return draw(st.integers(1, max_side)), draw(st.integers(1, max_side))


@st.composite
def images(draw, max_side: int = 96, rgb: bool | None = None) -> np.ndarray:
    """uint8 gray or RGB images: constant, two-valued, smooth gradients, or noise."""
    h, w = draw(image_shapes(max_side))
    is_rgb = draw(st.booleans()) if rgb is None else rgb
    shape = (h, w, 3) if is_rgb else (h, w)
    kind = draw(st.sampled_from(["noise", "constant", "two-level", "gradient", "elements"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "constant":
        return np.full(shape, draw(st.sampled_from([0, 1, 127, 254, 255])), np.uint8)
    if kind == "two-level":
        low, high = sorted(draw(st.lists(st.integers(0, 255), min_size=2, max_size=2)))
        return np.where(rng.random(shape) < 0.5, low, high).astype(np.uint8)
    if kind == "gradient":
        ramp = np.add.outer(np.arange(h) * rng.integers(0, 9), np.arange(w) * rng.integers(0, 9))
        ramp = (ramp % 256).astype(np.uint8)
        return np.repeat(ramp[:, :, None], 3, axis=2) if is_rgb else ramp
    return draw(hnp.arrays(np.uint8, shape))


def packed_batch(images: list[np.ndarray], gaps: list[int]):
    """``images`` packed in one buffer as a decode process packs a part: each after the last, ``gaps[i]``
    bytes on (alignment padding), so that some runs of them lie back to back and some do not."""
    from gpu_pipeline.images import ImageBatch

    layout, offset = [], 0
    for image, gap in zip(images, gaps, strict=True):
        offset += gap
        layout.append((image.shape[0], image.shape[1], image.shape[2] if image.ndim == 3 else 0, offset))
        offset += image.size
    buffer = np.full(offset + 7, 0xA5, np.uint8)  # a canary in the gaps and past the end
    for image, (_, _, _, start) in zip(images, layout):
        buffer[start:start + image.size] = image.reshape(-1)
    return ImageBatch.packed(buffer, np.array(layout, np.int64).reshape(-1, 4))
