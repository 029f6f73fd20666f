"""A small integer CNN label model (``--model eurosat-cnn``): land cover from the pixels themselves.

The network and its arithmetic are specified, in plain NumPy, by :mod:`cpu_reference.cnn`:
resample to ``size x size`` RGB by integer box means, then 3 x 3 convolution blocks with int8
weights, int32 sums, requantization by integer multiply and shift, 2 x 2 max pools, a global sum
pool and an int8 dense layer; the label is the first largest integer score. Integers all the way,
so the label is the same on every machine and backend: this module's numba kernels are held to the
reference byte for byte (tests/test_cnn.py).

The model file is JSON (never code, never a pickle): the classes, the input size, each block's
weights (nested lists, shape (3, 3, in, out)), biases, multipliers and shifts, the dense weights
(classes, channels) and biases, and how it was trained (``scripts/train_eurosat_cnn.py``). Loading
checks every shape, every integer range, and the bounds that keep every sum inside int32 and every
requantization product inside int64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numba
import numpy as np

from cpu_reference.cnn import ConvBlock, IntegerCnn
from gpu_pipeline.backends import _numba_setup
from gpu_pipeline.backends.base import group_by_shape
from gpu_pipeline.config import PipelineConfig
from gpu_pipeline.errors import UsageError, is_utf8, printable

FORMAT = "gpu-pipeline cnn label model"
FORMAT_VERSION = 1
METHOD = ("integer CNN: box-mean resample, 3x3 conv blocks (int8 weights, int32 sums, multiply-and-shift "
          "requantization, ReLU, 2x2 max pool), global sum pool, int8 dense layer, first largest score")
#: Images of at least this many pixels are resampled one by one, in place; smaller ones of one
#: shape are stacked into one kernel call (a stack of scenes would copy them all).
STACK_BELOW_PIXELS = 1 << 18
#: Largest accepted input size and channel count (a model file is data from anywhere).
MAX_SIZE = 256
MAX_CHANNELS = 512


class CnnModelError(UsageError):
    """A CNN model file is malformed (the CLI exits with status 2). :func:`gpu_pipeline.labels.model.load_model`
    reports it as a ModelError naming the file."""


# --------------------------------------------------------------------------------------------
# Kernels


@_numba_setup.helper
def _resample(image: np.ndarray, size: int, out: np.ndarray) -> None:
    """:func:`cpu_reference.cnn.resample` of one (H, W, C) image, C = 1 (gray) or 3, into ``out`` (size, size, 3)."""
    height, width, channels = image.shape
    sums = np.zeros(3, np.int64)
    for i in range(size):
        top = i * height // size
        bottom = max((i + 1) * height // size, top + 1)
        for j in range(size):
            left = j * width // size
            right = max((j + 1) * width // size, left + 1)
            sums[:] = 0
            for y in range(top, bottom):
                for x in range(left, right):
                    for c in range(3):
                        sums[c] += image[y, x, c if channels == 3 else 0]
            count = (bottom - top) * (right - left)
            for c in range(3):
                out[i, j, c] = (sums[c] + count // 2) // count


@_numba_setup.helper
def _conv_block(x: np.ndarray, weights: np.ndarray, bias: np.ndarray, multiplier: np.ndarray, shift: np.ndarray,
                acc: np.ndarray, out: np.ndarray) -> None:
    """One block (:func:`cpu_reference.cnn.conv_block`) of one image: ``x`` (H, W, in) uint8 into
    ``out`` (H // 2, W // 2, out) uint8; ``weights`` int32 (3, 3, in, out), ``acc`` int32 scratch (out,).

    The output channels are the innermost loop, so each input value is multiplied into all of them
    in one vector operation (int32: the model loader checks that no sum can leave int32, and AVX2
    has no int64 multiply); a zero input (half of them, after a ReLU) is skipped: it adds nothing.
    """
    height, width, inputs = x.shape
    outputs = bias.shape[0]
    for oy in range(height // 2):
        for ox in range(width // 2):
            for co in range(outputs):
                out[oy, ox, co] = 0
            for y in range(2 * oy, 2 * oy + 2):
                for xx in range(2 * ox, 2 * ox + 2):
                    for co in range(outputs):
                        acc[co] = bias[co]
                    for dy in range(3):
                        sy = y + dy - 1
                        if sy < 0 or sy >= height:
                            continue
                        for dx in range(3):
                            sx = xx + dx - 1
                            if sx < 0 or sx >= width:
                                continue
                            for ci in range(inputs):
                                value = np.int32(x[sy, sx, ci])
                                if value == 0:
                                    continue
                                row = weights[dy, dx, ci]
                                for co in range(outputs):
                                    acc[co] += np.int32(value * row[co])
                    for co in range(outputs):
                        level = (np.int64(acc[co]) * multiplier[co] + (np.int64(1) << (shift[co] - 1))) >> shift[co]
                        level = min(max(level, 0), 255)
                        if level > out[oy, ox, co]:
                            out[oy, ox, co] = level


@_numba_setup.helper
def _pooled_sums(x0: np.ndarray, w0, b0, m0, s0, w1, b1, m1, s1, w2, b2, m2, s2, w3, b3, m3, s3,
                 blocks: int, out: np.ndarray) -> None:
    """The global sum pool of one resampled image ``x0`` (size, size, 3) after ``blocks`` (1 to 4) blocks."""
    x = x0
    for b in range(blocks):
        if b == 0:
            w, bias, m, s = w0, b0, m0, s0
        elif b == 1:
            w, bias, m, s = w1, b1, m1, s1
        elif b == 2:
            w, bias, m, s = w2, b2, m2, s2
        else:
            w, bias, m, s = w3, b3, m3, s3
        y = np.empty((x.shape[0] // 2, x.shape[1] // 2, bias.shape[0]), np.uint8)
        _conv_block(x, w, bias, m, s, np.empty(bias.shape[0], np.int32), y)
        x = y
    out[:] = 0
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            for c in range(x.shape[2]):
                out[c] += x[i, j, c]


@_numba_setup.parallel
def _stack_sums(inputs, w0, b0, m0, s0, w1, b1, m1, s1, w2, b2, m2, s2, w3, b3, m3, s3, blocks, out):
    """:func:`_pooled_sums` of every image of ``inputs`` (N, size, size, 3), one image per task."""
    for n in numba.prange(inputs.shape[0]):
        _pooled_sums(inputs[n], w0, b0, m0, s0, w1, b1, m1, s1, w2, b2, m2, s2, w3, b3, m3, s3, blocks, out[n])


@_numba_setup.helper
def _stack_sums_serial(inputs, w0, b0, m0, s0, w1, b1, m1, s1, w2, b2, m2, s2, w3, b3, m3, s3, blocks, out):
    """:func:`_stack_sums` in the calling thread (threading layers that are not thread-safe)."""
    for n in range(inputs.shape[0]):
        _pooled_sums(inputs[n], w0, b0, m0, s0, w1, b1, m1, s1, w2, b2, m2, s2, w3, b3, m3, s3, blocks, out[n])


@_numba_setup.parallel
def _stack_resample(images: np.ndarray, size: int, out: np.ndarray) -> None:
    """:func:`_resample` of same-shape images (N, H, W, C) into ``out`` (N, size, size, 3)."""
    for n in numba.prange(images.shape[0]):
        _resample(images[n], size, out[n])


@_numba_setup.helper
def _stack_resample_serial(images: np.ndarray, size: int, out: np.ndarray) -> None:
    for n in range(images.shape[0]):
        _resample(images[n], size, out[n])


#: Blocks the kernel supports (it takes each block's arrays as separate arguments).
MAX_BLOCKS = 4


def resample(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: :func:`cpu_reference.cnn.resample` of each image, one kernel call
    per shape (scenes one by one, in place)."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    kernel = _numba_setup.parallel_or_serial(_stack_resample, _stack_resample_serial)
    for shape, members in group_by_shape(images).items():
        if shape[0] * shape[1] >= STACK_BELOW_PIXELS:
            runs = [(i, np.ascontiguousarray(images[i])[None]) for i in members]
        else:
            runs = [(np.array(members), np.concatenate([images[i] for i in members]).reshape(len(members), *shape))]
        for rows, stack in runs:
            part = np.empty((len(stack), size, size, 3), np.uint8)
            kernel(stack if stack.ndim == 4 else stack[..., None], size, part)
            out[rows] = part
    return out


# --------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True, eq=False)
class CnnModel:
    """A loaded CNN label model: its ``classes``, the integer ``network`` and how it was trained."""

    classes: tuple[str, ...]
    network: IntegerCnn
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The kernel's arguments: int32 weights (vector multiplies), int64 requantization, 4 blocks.
        arguments = []
        for index in range(MAX_BLOCKS):
            block = self.network.blocks[min(index, len(self.network.blocks) - 1)]
            arguments += [np.ascontiguousarray(block.weights, np.int32), np.ascontiguousarray(block.bias, np.int32),
                          np.ascontiguousarray(block.multiplier, np.int64), np.ascontiguousarray(block.shift, np.int64)]
        object.__setattr__(self, "_arguments", (*arguments, len(self.network.blocks)))

    @property
    def size(self) -> int:
        return self.network.size

    @property
    def config(self) -> PipelineConfig:
        """The pipeline settings ``evaluate`` runs with: any suit (the network never sees the edges)."""
        return PipelineConfig()

    def resample(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, size, size, 3) uint8: each image resampled by the model's rule (:func:`resample`)."""
        return resample(images, self.size)

    def pooled_sums(self, inputs: np.ndarray) -> np.ndarray:
        """int64 (N, channels): the global sum pool of resampled images (N, size, size, 3) uint8."""
        inputs = np.ascontiguousarray(inputs, np.uint8)
        if inputs.ndim != 4 or inputs.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"expected (N, {self.size}, {self.size}, 3) uint8 inputs, got {inputs.shape}")
        out = np.empty((len(inputs), self.network.weights.shape[1]), np.int64)
        kernel = _numba_setup.parallel_or_serial(_stack_sums, _stack_sums_serial)
        kernel(inputs, *self._arguments, out)
        return out

    def scores(self, sums: np.ndarray) -> np.ndarray:
        """int64 (N, classes): the dense layer on pooled sums (exact integers)."""
        sums = np.asarray(sums).astype(np.int64)
        return self.network.bias.astype(np.int64) + sums @ self.network.weights.astype(np.int64).T

    def predict(self, sums: np.ndarray) -> np.ndarray:
        """Class index of each row of pooled sums: the first largest score."""
        return np.argmax(self.scores(sums), axis=1).astype(np.int64)

    def predict_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """Class index of each resampled image (N, size, size, 3) uint8."""
        return self.predict(self.pooled_sums(inputs))

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Class index of each decoded image (gray or RGB uint8, any size)."""
        if len(images) == 0:
            return np.zeros(0, np.int64)
        return self.predict_inputs(self.resample(images))

    def compiles_on_warm_up(self) -> bool:
        """Whether its kernels are missing from numba's cache (a compile of seconds)."""
        parallel = _numba_setup.parallel_kernels_usable()  # the kernels resample and pooled_sums call
        return _numba_setup.compiles_on_first_call(
            (_stack_resample, _stack_sums) if parallel else (_stack_resample_serial, _stack_sums_serial))

    @property
    def feature_count(self) -> int:
        """Channels of the last block: the width of :meth:`features`."""
        return int(self.network.weights.shape[1])

    def features(self, images: Sequence[np.ndarray], histograms: np.ndarray, edge_counts: np.ndarray) -> np.ndarray:
        """float64 (N, channels): what :meth:`predict` needs of each image, its pooled sums (exact:
        they stay below 2**53). Only the pixels count; the histograms and edge counts are not used."""
        if len(images) == 0:
            return np.zeros((0, self.network.weights.shape[1]))
        return self.pooled_sums(self.resample(images)).astype(np.float64)

    def labels(self, images: Sequence[np.ndarray], histograms: np.ndarray, edge_counts: np.ndarray,
               label_features: np.ndarray | None = None) -> list[str]:
        """A :data:`gpu_pipeline.labels.labeller.Labeller`: the label of each image, from its pixels only,
        or from its pooled sums when a backend computed them on its device (``label_features``)."""
        if label_features is not None:
            return [self.classes[k] for k in self.predict(label_features)]
        return [self.classes[k] for k in self.predict_images(images)]

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of each block."""
        return tuple(int(b.bias.shape[0]) for b in self.network.blocks)

    @property
    def multiply_adds(self) -> int:
        """Integer multiply-adds per image (convolutions and the dense layer; resampling aside)."""
        total, side, channels = 0, self.size, 3
        for width in self.widths:
            total += side * side * 9 * channels * width
            side, channels = side // 2, width
        return total + channels * len(self.classes)

    def describe(self) -> str:
        return (f"{len(self.classes)} classes ({', '.join(self.classes)}), integer CNN on {self.size}x{self.size} "
                f"RGB, conv blocks of {', '.join(map(str, self.widths))} channels, "
                f"{self.multiply_adds / 1e6:.1f} M multiply-adds per image")

    def check_config(self, config: PipelineConfig, named=None, used: str = "this run uses") -> None:
        """Any pipeline settings suit: the network sees the decoded pixels, not the edges."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": METHOD,
            "classes": list(self.classes),
            "input_size": self.size,
            "blocks": [{"shape": list(b.weights.shape), "weights": b.weights.tolist(), "bias": b.bias.tolist(),
                        "multiplier": b.multiplier.tolist(), "shift": b.shift.tolist()} for b in self.network.blocks],
            "dense": {"shape": list(self.network.weights.shape), "weights": self.network.weights.tolist(),
                      "bias": self.network.bias.tolist()},
            "training": self.training,
        }


def model_json(model: CnnModel) -> str:
    """The model file's text: indented JSON, each innermost list of numbers on one line."""
    from gpu_pipeline.labels.model import _json_text

    return _json_text(model.to_dict()) + "\n"


# --------------------------------------------------------------------------------------------
# Loading


def check_utf8(classes: list[str], error: type[UsageError] = CnnModelError) -> None:
    """``error`` for a class name that no CSV, Parquet or JSON text can hold (a lone surrogate: a byte
    that is not UTF-8 in a folder name an older ``fit`` took)."""
    for name in classes:
        if not is_utf8(name):
            raise error(f"class \"{printable(name)}\" is not UTF-8 text")


def is_cnn_model(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def model_from_dict(data: dict) -> CnnModel:
    """The model of a parsed file, every field checked; CnnModelError names the first bad one."""
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CnnModelError(f"format version {version!r} is not supported (this gpu-pipeline reads {FORMAT_VERSION})")
    classes = data.get("classes")
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise CnnModelError("\"classes\" must be two or more distinct, non-empty names")
    check_utf8(classes)
    size = data.get("input_size")
    blocks = data.get("blocks")
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= MAX_BLOCKS:
        raise CnnModelError(f"\"blocks\" must be a list of 1 to {MAX_BLOCKS} conv blocks")
    if not _is_int(size) or not 1 << len(blocks) <= size <= MAX_SIZE:
        raise CnnModelError(f"\"input_size\" must be an integer from {1 << len(blocks)} to {MAX_SIZE}")
    parsed = []
    channels = 3
    for index, block in enumerate(blocks):
        where = f"blocks[{index}]"
        if not isinstance(block, dict):
            raise CnnModelError(f"\"{where}\" must be an object")
        bias = _integers(block.get("bias"), None, f"{where}.bias", -(2 ** 31), 2 ** 31 - 1)
        outputs = bias.shape[0]
        if not 1 <= outputs <= MAX_CHANNELS:
            raise CnnModelError(f"\"{where}\" must have 1 to {MAX_CHANNELS} output channels")
        _check_shape(block, (3, 3, channels, outputs), where)
        weights = _integers(block.get("weights"), (3, 3, channels, outputs), f"{where}.weights", -127, 127)
        multiplier = _integers(block.get("multiplier"), (outputs,), f"{where}.multiplier", 1, 2 ** 31)
        shift = _integers(block.get("shift"), (outputs,), f"{where}.shift", 1, 62)
        # |acc| < 2**31 and multiplier <= 2**31 keep acc * multiplier + rounding inside int64.
        if np.abs(bias).max() + 9 * channels * 255 * 127 >= 2 ** 31:
            raise CnnModelError(f"\"{where}.bias\" is too large: the sums could leave int32")
        parsed.append(ConvBlock(weights.astype(np.int8), bias.astype(np.int32), multiplier, shift))
        channels = outputs
    dense = data.get("dense")
    if not isinstance(dense, dict):
        raise CnnModelError("\"dense\" must be an object with \"weights\" and \"bias\"")
    _check_shape(dense, (len(classes), channels), "dense")
    weights = _integers(dense.get("weights"), (len(classes), channels), "dense.weights", -127, 127)
    bias = _integers(dense.get("bias"), (len(classes),), "dense.bias", -(2 ** 31), 2 ** 31 - 1)
    training = data.get("training", {})
    if not isinstance(training, dict):
        raise CnnModelError("\"training\" must be an object")
    network = IntegerCnn(int(size), tuple(parsed), weights.astype(np.int8), bias.astype(np.int32))
    return CnnModel(tuple(classes), network, training)


def _check_shape(layer: dict, shape: tuple[int, ...], where: str) -> None:
    """A layer's ``shape`` (the header a reader sees first) must be what its neighbours imply."""
    if layer.get("shape") != list(shape):
        raise CnnModelError(f"\"{where}.shape\" must be {list(shape)} (the channels of the layers around it), "
                            f"got {layer.get('shape')!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integers(value: Any, shape: tuple[int, ...] | None, name: str, low: int, high: int) -> np.ndarray:
    """An int64 array from (nested) JSON lists of integers in ``[low, high]`` of ``shape`` (any 1-D
    length for None), else CnnModelError."""
    def integers_only(v: Any) -> bool:
        return all(integers_only(i) for i in v) if isinstance(v, list) else _is_int(v)

    try:
        array = np.array(value, dtype=np.int64) if isinstance(value, list) and integers_only(value) else None
    except (ValueError, OverflowError):  # ragged lists, integers beyond int64
        array = None
    expected = "a list of integers" if shape is None else f"integers of shape {shape}"
    if array is None or (array.ndim != 1 if shape is None else array.shape != shape):
        raise CnnModelError(f"\"{name}\" must be {expected}")
    if array.size and (array.min() < low or array.max() > high):
        raise CnnModelError(f"\"{name}\" must lie in {low}..{high}")
    return array


