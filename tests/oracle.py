"""What a backend must return for a batch: the reference's stages.

For images above a megapixel the numba backend stands in for the reference: CI holds it byte-equal
to the reference on every kind of input, and the plain-NumPy reference takes ~10 s for one 4096x4096
image, which would not fit the GPU check's few minutes on a lent GPU machine.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

import cpu_reference
from gpu_pipeline.backends import registry

#: Largest image (pixels) checked against the reference itself.
REFERENCE_PIXELS = 1 << 20


@functools.lru_cache(maxsize=1)
def _numba_backend():
    return registry.create("numba") if registry.unavailable_reason("numba") is None else None


def expected_results(batch: Sequence[np.ndarray], config) -> list:
    """One result per image with ``histogram``, ``equalized``, ``edges`` and ``edge_count``."""
    expected: list = [None] * len(batch)
    big = [i for i, image in enumerate(batch) if image.shape[0] * image.shape[1] > REFERENCE_PIXELS]
    stand_in = _numba_backend() if big else None
    if stand_in is not None:
        for i, result in zip(big, stand_in.process([batch[i] for i in big], config, keep_images=True)):
            expected[i] = result
    for i, image in enumerate(batch):
        if expected[i] is None:
            expected[i] = cpu_reference.process_image(image, config)
    return expected
