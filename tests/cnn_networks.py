"""Random integer CNNs for the tests (tests/test_cnn.py, tests/test_cupy_gpu.py)."""

from __future__ import annotations

import numpy as np

from cpu_reference import cnn as reference
from gpu_pipeline.labels.cnn import CnnModel


def random_network(rng: np.random.Generator, size: int, widths: tuple[int, ...], classes: int = 4
                   ) -> reference.IntegerCnn:
    """Random int8 weights; shifts drawn so that outputs spread over 0..255, some saturating."""
    blocks = []
    channels = 3
    for width in widths:
        blocks.append(reference.ConvBlock(
            rng.integers(-127, 128, (3, 3, channels, width)).astype(np.int8),
            rng.integers(-60_000, 60_000, width).astype(np.int32),
            rng.integers(2 ** 30, 2 ** 31, width).astype(np.int64),
            rng.integers(35, 42, width).astype(np.int64)))
        channels = width
    return reference.IntegerCnn(size, tuple(blocks), rng.integers(-127, 128, (classes, channels)).astype(np.int8),
                                rng.integers(-5_000, 5_000, classes).astype(np.int32))


def model_of(network: reference.IntegerCnn) -> CnnModel:
    return CnnModel(tuple(f"class{k}" for k in range(network.bias.shape[0])), network)
