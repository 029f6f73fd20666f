"""The integer CNN label model, in plain NumPy: the specification every kernel is held to.

Every step is integer arithmetic, so a label is the same bytes on every machine and backend:

1. **Resample** the decoded image to ``size x size`` RGB (a gray image counts as three equal
   bands). Output pixel ``(i, j)`` is the rounded mean of the box of rows
   ``[i*H//size, max((i+1)*H//size, i*H//size + 1))`` and the same for columns: for a 64 x 64
   EuroSAT tile and ``size`` 32, the mean of each 2 x 2 block; for an image smaller than ``size``,
   the nearest pixel. Rounding: ``(sum + count // 2) // count``.
2. **Blocks**, each: a 3 x 3 convolution (zero padding, stride 1) with int8 weights and an int32
   bias, summed in int64; requantization by an integer multiply and a rounding right shift,
   ``(acc * multiplier + 2**(shift-1)) >> shift`` per output channel, clipped to 0..255 (the ReLU
   and the uint8 range in one step); then a 2 x 2 max pool (an odd last row or column is dropped).
3. **Global sum pool** over the positions, then a **dense** layer: ``bias + weights @ sums`` with
   int8 weights and int32 biases, one scale for all classes.
4. The label is the class with the largest score, the first listed on a tie.

This is the usual integer-only inference of quantized networks (Jacob et al., "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018), with
symmetric per-channel weights and unsigned activations whose zero point is 0, so zero padding is
exact. All sums fit int64 with room to spare (the model loader checks the bounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True, eq=False)
class ConvBlock:
    """One block: ``weights`` int8 (3, 3, in, out), ``bias`` int32 (out,), ``multiplier`` and
    ``shift`` int64 (out,) of the requantization."""

    weights: np.ndarray
    bias: np.ndarray
    multiplier: np.ndarray
    shift: np.ndarray


@dataclass(frozen=True, eq=False)
class IntegerCnn:
    """The network: input ``size``, the conv ``blocks``, the dense ``weights`` int8 (classes, channels)
    and ``bias`` int32 (classes,)."""

    size: int
    blocks: tuple[ConvBlock, ...]
    weights: np.ndarray
    bias: np.ndarray


def box_bounds(length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each of the ``size`` boxes along an axis of ``length`` pixels."""
    starts = np.arange(size) * length // size
    ends = np.maximum(np.arange(1, size + 1) * length // size, starts + 1)
    return starts, ends


def resample(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` (gray (H, W) or RGB (H, W, 3) uint8) as a (size, size, 3) uint8 box mean."""
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=2)
    rows, row_ends = box_bounds(image.shape[0], size)
    cols, col_ends = box_bounds(image.shape[1], size)
    out = np.empty((size, size, 3), np.uint8)
    for i in range(size):
        for j in range(size):
            box = image[rows[i]:row_ends[i], cols[j]:col_ends[j]].astype(np.int64)
            count = box.shape[0] * box.shape[1]
            out[i, j] = (box.sum(axis=(0, 1)) + count // 2) // count
    return out


def conv_block(activations: np.ndarray, block: ConvBlock) -> np.ndarray:
    """One block on (N, H, W, in) uint8 activations: (N, H // 2, W // 2, out) uint8."""
    n, height, width, _ = activations.shape
    padded = np.zeros((n, height + 2, width + 2, activations.shape[3]), np.int64)
    padded[:, 1:-1, 1:-1] = activations
    acc = np.broadcast_to(block.bias.astype(np.int64), (n, height, width, block.bias.shape[0])).copy()
    for dy in range(3):
        for dx in range(3):
            acc += padded[:, dy:dy + height, dx:dx + width] @ block.weights[dy, dx].astype(np.int64)
    rounding = np.int64(1) << (block.shift - 1)
    requantized = np.clip((acc * block.multiplier + rounding) >> block.shift, 0, 255).astype(np.uint8)
    even = requantized[:, :height // 2 * 2, :width // 2 * 2]
    return np.maximum.reduce([even[:, 0::2, 0::2], even[:, 0::2, 1::2], even[:, 1::2, 0::2], even[:, 1::2, 1::2]])


def scores(network: IntegerCnn, inputs: np.ndarray) -> np.ndarray:
    """int64 (N, classes) class scores of (N, size, size, 3) uint8 resampled images."""
    activations = inputs
    for block in network.blocks:
        activations = conv_block(activations, block)
    sums = activations.astype(np.int64).sum(axis=(1, 2))
    return network.bias.astype(np.int64) + sums @ network.weights.astype(np.int64).T


def predict(network: IntegerCnn, images: Sequence[np.ndarray]) -> np.ndarray:
    """Class index of each image (gray or RGB uint8, any size): the first largest score."""
    if len(images) == 0:
        return np.zeros(0, np.int64)
    inputs = np.stack([resample(image, network.size) for image in images])
    return np.argmax(scores(network, inputs), axis=1)
