"""Label features of a batch of images, computed by one numba function on the host.

Every feature is a function of what every backend hands the labeller byte-identically: the decoded
uint8 image (the same bytes on every backend), its gray histogram and its edge count. So the
features, and the labels computed from them, are identical on every backend by construction.

Each image is first reduced to exact integer counts and sums (:data:`_COUNTS`); one float step
then turns them into the features of :data:`FEATURE_NAMES`. The float step uses only
correctly-rounded operations (``+ - * / sqrt``) and ``log2`` (for the entropy), in a fixed order,
so a feature does not depend on the batch it was computed in.

The texture features follow well-known recipes, kept small (a 64 x 64 tile costs about 11 us of one
core; docs/labels.md, "Cost"): gradient magnitude histograms and a magnitude-weighted orientation histogram
(Dalal & Triggs 2005, HOG, with the simplest ``[-1, 0, 1]``-like forward differences and four
orientation bins, sorted so that the feature does not depend on the direction of a road or a
river), and a coarse-scale contrast (differences four pixels apart), which separates large
homogeneous fields from fine texture. Colour: per-band mean and standard deviation, chroma
(``max - min`` of R, G, B, the "C" of HSV/HSL) and a chroma-weighted histogram of the six hue
sectors of 60 degrees (which band is largest, which smallest: the sectors of the HSV hue hexagon,
ties as in Python's ``colorsys.rgb_to_hsv``).
A gray image counts as three equal bands (no chroma).
"""

from __future__ import annotations

import math
from typing import Sequence

import numba
import numpy as np

from gpu_pipeline.backends import _numba_setup  # the cache folder and threading layer every kernel needs
from gpu_pipeline.backends.base import group_by_shape

#: The label features, in the order of a feature vector.
FEATURE_NAMES = (
    "edge_density", "gray_entropy", "gray_p10", "gray_p50", "gray_p90",
    "red_mean", "green_mean", "blue_mean", "red_std", "green_std", "blue_std",
    "chroma_mean", "chroma_std",
    "hue_red_yellow", "hue_yellow_green", "hue_green_cyan", "hue_cyan_blue", "hue_blue_magenta", "hue_magenta_red",
    "gradient_0_1", "gradient_2_3", "gradient_4_7", "gradient_8_15", "gradient_16_31", "gradient_32_up",
    "orientation_1st", "orientation_2nd", "orientation_3rd", "orientation_4th",
    "gradient_mean", "coarse_contrast",
)

#: No feature of any image is outside 0..FEATURE_BOUND (the largest, gradient_mean, is at most 255 + 255):
#: a model's scores are bounded with it when it is loaded.
FEATURE_BOUND = 510.0

#: Fixed-point BT.601 gray of the pipeline contract (OpenCV 5): (9798 R + 19235 G + 3735 B + 16384) >> 15.
_GRAY_WEIGHTS = (9798, 19235, 3735)
#: Distance, in pixels, of the coarse-scale differences.
COARSE_STEP = 4

# Integer counts per image, in this order.
_BAND_SUMS = 0  # 3: sum of R, G, B
_BAND_SQUARES = 3  # 3: sum of squares of R, G, B
_CHROMA_SUM = 6
_CHROMA_SQUARES = 7
_HUE = 8  # 6: chroma summed per hue sector
_MAGNITUDE = 14  # 6: pixel counts per gradient magnitude bin
_ORIENTATION = 20  # 4: gradient magnitude summed per orientation bin
_GRADIENT_POSITIONS = 24  # pixels that have a right and a lower neighbour
_COARSE_SUM = 25  # sum of |differences| COARSE_STEP apart, both directions
_COARSE_PAIRS = 26  # how many such differences
_COUNTS = 27


#: Pixels per strip of whole rows that the kernel reads at a time (its scratch memory: about 28 bytes a pixel).
STRIP_PIXELS = 1 << 16
#: Pixels per stretch summed in int32 (255^2 * 16384 < 2^31), so that sums vectorise.
_STRETCH = 16384


# numba widens int32 arithmetic to int64; wrapping each update in _i32 lets LLVM keep the loops in
# int32 lanes (twice as many per SIMD register). Exact: every stretch sum fits in int32.
_i32 = np.int32


@_numba_setup.helper
def _colour_counts(red: np.ndarray, green: np.ndarray, blue: np.ndarray, out: np.ndarray) -> None:
    """Add the colour counts of one stretch of a strip (uint8 bands) to ``out``.

    Branch-free sums (the hue sector is chosen by multiplying with 0/1 comparisons, not by
    indexing a histogram), so the compiler turns the loop into SIMD code.
    """
    sum_r = sum_g = sum_b = square_r = square_g = square_b = chroma_sum = chroma_squares = _i32(0)
    hue0 = hue1 = hue2 = hue3 = hue4 = hue5 = _i32(0)
    for x in range(red.shape[0]):
        r = _i32(red[x])
        g = _i32(green[x])
        b = _i32(blue[x])
        sum_r = _i32(sum_r + r)
        sum_g = _i32(sum_g + g)
        sum_b = _i32(sum_b + b)
        square_r = _i32(square_r + _i32(r * r))
        square_g = _i32(square_g + _i32(g * g))
        square_b = _i32(square_b + _i32(b * b))
        chroma = _i32(max(r, g, b) - min(r, g, b))
        chroma_sum = _i32(chroma_sum + chroma)
        chroma_squares = _i32(chroma_squares + _i32(chroma * chroma))
        # HSV hue sector from which band is largest and which smallest, ties as in Python's colorsys
        hue0 = _i32(hue0 + chroma * _i32((r > g) & (g >= b)))  # red > green >= blue: red to yellow
        hue1 = _i32(hue1 + chroma * _i32((g >= r) & (r > b)))  # green >= red > blue: yellow to green
        hue2 = _i32(hue2 + chroma * _i32((g > b) & (b >= r)))  # green > blue >= red: green to cyan
        hue3 = _i32(hue3 + chroma * _i32((b >= g) & (g > r)))  # blue >= green > red: cyan to blue
        hue4 = _i32(hue4 + chroma * _i32((b > r) & (r >= g)))  # blue > red >= green: blue to magenta
        hue5 = _i32(hue5 + chroma * _i32((r >= b) & (b > g)))  # red >= blue > green: magenta to red
    out[_BAND_SUMS] += sum_r
    out[_BAND_SUMS + 1] += sum_g
    out[_BAND_SUMS + 2] += sum_b
    out[_BAND_SQUARES] += square_r
    out[_BAND_SQUARES + 1] += square_g
    out[_BAND_SQUARES + 2] += square_b
    out[_CHROMA_SUM] += chroma_sum
    out[_CHROMA_SQUARES] += chroma_squares
    out[_HUE] += hue0
    out[_HUE + 1] += hue1
    out[_HUE + 2] += hue2
    out[_HUE + 3] += hue3
    out[_HUE + 4] += hue4
    out[_HUE + 5] += hue5


@_numba_setup.helper
def _gradient_counts(here: np.ndarray, right: np.ndarray, below: np.ndarray, inside: np.ndarray,
                     out: np.ndarray) -> None:
    """Add the gradient counts of a stretch of a flat gray image to ``out``.

    ``here``, ``right`` and ``below`` are the stretch, the same shifted by one pixel and by one
    row: ``dx`` is the difference to the right neighbour, ``dy`` to the one below. Pixels of the
    last column have no right neighbour and count for nothing (``inside`` is 0 there, -1 (all bits)
    elsewhere; the caller stops before the last row). Indexed from 0, so the compiler sees no
    negative index and turns the loop into SIMD code; magnitude bins are counted as
    ``magnitude >= 2, 4, ...`` and differenced, so the loop is branch-free.
    """
    at_least2 = at_least4 = at_least8 = at_least16 = at_least32 = _i32(0)
    horizontal = vertical = rising = falling = _i32(0)
    for p in range(here.shape[0]):
        dx = _i32(right[p] - here[p]) & inside[p]
        dy = _i32(below[p] - here[p]) & inside[p]
        ax = abs(dx)
        ay = abs(dy)
        magnitude = _i32(ax + ay)
        at_least2 = _i32(at_least2 + _i32(magnitude >= 2))
        at_least4 = _i32(at_least4 + _i32(magnitude >= 4))
        at_least8 = _i32(at_least8 + _i32(magnitude >= 8))
        at_least16 = _i32(at_least16 + _i32(magnitude >= 16))
        at_least32 = _i32(at_least32 + _i32(magnitude >= 32))
        is_horizontal = ax > _i32(2 * ay)  # mostly horizontal change: a vertical structure
        is_vertical = ay > _i32(2 * ax)
        diagonal = ~(is_horizontal | is_vertical)  # never both
        same_sign = (dx > 0) == (dy > 0)
        horizontal = _i32(horizontal + magnitude * _i32(is_horizontal))
        vertical = _i32(vertical + magnitude * _i32(is_vertical))
        rising = _i32(rising + magnitude * _i32(diagonal & same_sign))
        falling = _i32(falling + magnitude * _i32(diagonal & ~same_sign))
    out[_MAGNITUDE + 1] += at_least2 - at_least4
    out[_MAGNITUDE + 2] += at_least4 - at_least8
    out[_MAGNITUDE + 3] += at_least8 - at_least16
    out[_MAGNITUDE + 4] += at_least16 - at_least32
    out[_MAGNITUDE + 5] += at_least32
    out[_ORIENTATION] += horizontal
    out[_ORIENTATION + 1] += vertical
    out[_ORIENTATION + 2] += rising
    out[_ORIENTATION + 3] += falling


@_numba_setup.helper
def _coarse_sum(here: np.ndarray, right: np.ndarray, below: np.ndarray, inside: np.ndarray) -> int:
    """Sum of |differences| to ``right`` (where ``inside`` is -1) and to ``below`` (shifted stretches, as above)."""
    total = _i32(0)
    for p in range(here.shape[0]):
        across = abs(_i32(right[p] - here[p])) & inside[p]
        total = _i32(total + across + abs(_i32(below[p] - here[p])))
    return total


@_numba_setup.helper
def _scratch(width: int, strip_rows: int):
    """Scratch arrays of :func:`_image_counts` for images ``width`` wide read ``strip_rows`` rows at a time.

    Made once per batch (or task), not per image. ``next_inside`` / ``far_inside`` are -1 (all
    bits) where a pixel has a right neighbour / one :data:`COARSE_STEP` to the right, else 0.
    """
    step = COARSE_STEP
    # uint8 bands and int32 gray of the strip and the `step` rows below it (which its differences reach)
    bands = np.empty((3, (strip_rows + step) * width), np.uint8)
    # padded: reads past a row end are masked out
    gray = np.zeros((strip_rows + step) * width + step + 1, np.int32)
    next_inside = np.empty(strip_rows * width, np.int32)
    far_inside = np.empty(strip_rows * width, np.int32)
    for row in range(strip_rows):
        for x in range(width):
            next_inside[row * width + x] = -1 if x < width - 1 else 0
            far_inside[row * width + x] = -1 if x < width - step else 0
    return bands, gray, next_inside, far_inside


@_numba_setup.helper
def _strip_rows(height: int, strip_rows: int) -> int:
    return max(min(strip_rows, height), 1)


@_numba_setup.helper
def _split(flat: np.ndarray, channels: int, first: int, read: int, bands: np.ndarray, gray: np.ndarray) -> None:
    """Bands and gray levels of pixels ``first:first + read`` of a flat image into ``bands[:, :read]``, ``gray[:read]``.

    RGB is read with a constant stride of 3 from a slice (indices from 0), which the compiler
    de-interleaves with SIMD shuffles; a gray image is its three bands.
    """
    if channels == 3:
        source = flat[3 * first:3 * (first + read)]
        for p in range(read):
            bands[0, p] = source[3 * p]
            bands[1, p] = source[3 * p + 1]
            bands[2, p] = source[3 * p + 2]
    else:
        source = flat[first:first + read]
        for p in range(read):
            bands[0, p] = bands[1, p] = bands[2, p] = source[p]
    red, green, blue, levels = bands[0, :read], bands[1, :read], bands[2, :read], gray[:read]
    for p in range(read):
        levels[p] = _i32(_i32(9798 * _i32(red[p])) + _i32(19235 * _i32(green[p]))
                         + _i32(3735 * _i32(blue[p])) + 16384) >> 15


@_numba_setup.helper
def _image_counts(image: np.ndarray, strip_rows: int, bands: np.ndarray, gray: np.ndarray, next_inside: np.ndarray,
                  far_inside: np.ndarray, out: np.ndarray) -> None:
    """Exact integer counts of one image (H, W, C) with C 1 or 3 into ``out`` (int64[_COUNTS]).

    The image is read in strips of ``strip_rows`` rows (:func:`_strip_rows`), so the scratch memory
    (:func:`_scratch`) is bounded whatever the image size. Each strip (with the :data:`COARSE_STEP`
    rows below it, which its differences reach) is split into flat uint8 bands and its gray levels
    computed, and every sum runs over stretches of at most :data:`_STRETCH` pixels in int32 before
    it is added to the int64 totals: long SIMD-friendly loops, and exact.
    """
    height, width, channels = image.shape
    step = COARSE_STEP
    flat = image.reshape(height * width * channels)
    for top in range(0, height, strip_rows):
        bottom = min(top + strip_rows, height)
        pixels = (bottom - top) * width
        _split(flat, channels, top * width, (min(bottom + step, height) - top) * width, bands, gray)
        for start in range(0, pixels, _STRETCH):
            stop = min(start + _STRETCH, pixels)
            _colour_counts(bands[0, start:stop], bands[1, start:stop], bands[2, start:stop], out)
        # gradients: rows that have a row below
        with_below = (min(bottom, height - 1) - top) * width
        for start in range(0, with_below, _STRETCH):
            stop = min(start + _STRETCH, with_below)
            _gradient_counts(gray[start:stop], gray[start + 1:stop + 1], gray[start + width:stop + width],
                             next_inside[start:stop], out)
        # coarse differences: both directions where a row `step` below exists, else across only
        # (there `below` is the pixel itself: a difference of 0)
        with_far_below = max(min(bottom, height - step) - top, 0) * width
        for start in range(0, pixels, _STRETCH):
            stop = min(start + _STRETCH, pixels)
            both = min(max(with_far_below, start), stop)
            out[_COARSE_SUM] += _coarse_sum(gray[start:both], gray[start + step:both + step],
                                            gray[start + step * width:both + step * width], far_inside[start:both])
            out[_COARSE_SUM] += _coarse_sum(gray[both:stop], gray[both + step:stop + step], gray[both:stop],
                                            far_inside[both:stop])
    positions = max(height - 1, 0) * max(width - 1, 0)
    out[_MAGNITUDE] = positions - (out[_MAGNITUDE + 1] + out[_MAGNITUDE + 2] + out[_MAGNITUDE + 3]
                                   + out[_MAGNITUDE + 4] + out[_MAGNITUDE + 5])
    out[_GRADIENT_POSITIONS] = positions
    out[_COARSE_PAIRS] = height * max(width - step, 0) + width * max(height - step, 0)


@_numba_setup.helper
def _quantile_level(histogram: np.ndarray, pixels: int, numerator: int, denominator: int) -> int:
    """The smallest gray level whose cumulative count reaches numerator / denominator of the pixels."""
    total = 0
    for level in range(256):
        total += histogram[level]
        if total * denominator >= pixels * numerator:
            return level
    return 255


#: Bin counts below this have ``c * log2(c)`` looked up (:func:`entropy_table`): a tile's 100 or
#: so non-empty bins then cost no log2 calls (about 1 us a tile).
ENTROPY_TABLE_SIZE = 1 << 13


@_numba_setup.helper
def _c_log2_c(c: int) -> float:
    return c * math.log2(c)


@_numba_setup.helper
def _entropy_table_of(size: int) -> np.ndarray:
    table = np.zeros(size)
    for c in range(1, size):
        table[c] = _c_log2_c(c)  # the very function the features call past the table
    return table


_ENTROPY_TABLE: list[np.ndarray] = []


def entropy_table() -> np.ndarray:
    """``c * log2(c)`` for ``c`` below :data:`ENTROPY_TABLE_SIZE` (0 for 0), made once per process."""
    if not _ENTROPY_TABLE:
        _ENTROPY_TABLE.append(_entropy_table_of(ENTROPY_TABLE_SIZE))
    return _ENTROPY_TABLE[0]


@_numba_setup.helper
def _image_features(counts: np.ndarray, histogram: np.ndarray, edge_count: int, pixels: int,
                    c_log2_c: np.ndarray, out: np.ndarray) -> None:
    """The float features of one image (:data:`FEATURE_NAMES`) from its integer counts."""
    n = float(pixels)
    out[0] = edge_count / n
    weighted = 0.0  # sum of c * log2(c) over the histogram, in bin order
    for level in range(256):
        c = histogram[level]
        if c > 0:
            weighted += c_log2_c[c] if c < c_log2_c.shape[0] else _c_log2_c(c)
    out[1] = max(math.log2(n) - weighted / n, 0.0)
    out[2] = _quantile_level(histogram, pixels, 1, 10)
    out[3] = _quantile_level(histogram, pixels, 1, 2)
    out[4] = _quantile_level(histogram, pixels, 9, 10)
    for band in range(3):
        s = counts[_BAND_SUMS + band]
        q = counts[_BAND_SQUARES + band]
        out[5 + band] = s / n
        # pixels * sum(x^2) - sum(x)^2 = pixels^2 * variance, exact in int64 below 2^31 pixels of 8 bits
        out[8 + band] = math.sqrt(float(pixels * q - s * s)) / n
    s = counts[_CHROMA_SUM]
    out[11] = s / n
    out[12] = math.sqrt(float(pixels * counts[_CHROMA_SQUARES] - s * s)) / n
    for sector in range(6):
        out[13 + sector] = counts[_HUE + sector] / s if s > 0 else 0.0
    positions = counts[_GRADIENT_POSITIONS]
    for k in range(6):
        out[19 + k] = counts[_MAGNITUDE + k] / positions if positions > 0 else 0.0
    orientation = counts[_ORIENTATION:_ORIENTATION + 4].copy()
    orientation.sort()
    total = orientation.sum()
    for k in range(4):
        out[25 + k] = orientation[3 - k] / total if total > 0 else 0.0
    out[29] = total / positions if positions > 0 else 0.0
    pairs = counts[_COARSE_PAIRS]
    out[30] = counts[_COARSE_SUM] / pairs if pairs > 0 else 0.0


#: Images per parallel task: each task makes its scratch arrays once.
_RUN = 16


@_numba_setup.helper
def _range_features(images: np.ndarray, histograms: np.ndarray, edge_counts: np.ndarray, strip_rows: int,
                    c_log2_c: np.ndarray, begin: int, end: int, out: np.ndarray) -> None:
    """Features of images ``begin:end`` of a same-shape stack into ``out``, with one set of scratch arrays."""
    _, height, width, _ = images.shape
    strip_rows = _strip_rows(height, strip_rows)
    bands, gray, next_inside, far_inside = _scratch(width, strip_rows)
    counts = np.empty(_COUNTS, np.int64)
    for i in range(begin, end):
        counts[:] = 0
        _image_counts(images[i], strip_rows, bands, gray, next_inside, far_inside, counts)
        _image_features(counts, histograms[i], edge_counts[i], height * width, c_log2_c, out[i])


@_numba_setup.parallel
def _stack_features(images: np.ndarray, histograms: np.ndarray, edge_counts: np.ndarray, strip_rows: int,
                    c_log2_c: np.ndarray, out: np.ndarray) -> None:
    """Features of same-shape images (N, H, W, C) into ``out`` (N, features), runs of :data:`_RUN` images per task."""
    count = images.shape[0]
    for part in numba.prange((count + _RUN - 1) // _RUN):
        _range_features(images, histograms, edge_counts, strip_rows, c_log2_c, part * _RUN,
                        min((part + 1) * _RUN, count), out)


@_numba_setup.helper
def _stack_features_serial(images: np.ndarray, histograms: np.ndarray, edge_counts: np.ndarray, strip_rows: int,
                           c_log2_c: np.ndarray, out: np.ndarray) -> None:
    """:func:`_stack_features` in the calling thread, for threading layers that must not be entered
    from several Python threads at once (the engine may label while a backend computes)."""
    _range_features(images, histograms, edge_counts, strip_rows, c_log2_c, 0, images.shape[0], out)


def _stacked(images: list[np.ndarray]) -> np.ndarray:
    """Same-shape images as one uint8 (N, H, W, C) array; one image alone is not copied (a large
    scene would double its memory)."""
    first = images[0]
    if len(images) == 1:
        stack = first[None]
    else:  # one concatenate: no per-image expand_dims as in np.stack
        stack = np.concatenate(images).reshape(len(images), *first.shape)
    if stack.ndim == 3:
        stack = stack[..., None]
    return np.ascontiguousarray(stack, dtype=np.uint8)


def feature_kernel():
    """The kernel :func:`batch_features` calls here: the parallel one where several Python threads may
    call it at once, else its serial twin."""
    return _stack_features if _numba_setup.parallel_kernels_usable() else _stack_features_serial


def batch_features(images: Sequence[np.ndarray], histograms: np.ndarray, edge_counts: np.ndarray,
                   strip_pixels: int = STRIP_PIXELS) -> np.ndarray:
    """float64 (N, len(FEATURE_NAMES)): the features of each image of a batch.

    ``images`` are uint8 gray (H, W) or RGB (H, W, 3) images, ``histograms`` int64 (N, 256) their
    gray histograms and ``edge_counts`` (N,) their edge counts. Images of one shape go to the
    numba kernel together (one call per shape); each is read in strips of about ``strip_pixels``
    pixels (whole rows), which bounds the scratch memory and changes no result.
    """
    histograms = np.ascontiguousarray(histograms, dtype=np.int64).reshape(len(images), 256)
    edge_counts = np.ascontiguousarray(edge_counts, dtype=np.int64).reshape(len(images))
    out = np.empty((len(images), len(FEATURE_NAMES)), dtype=np.float64)
    # the kernel feature_kernel() names, its numba threads set for this thread (the usable cores)
    kernel = _numba_setup.parallel_or_serial(_stack_features, _stack_features_serial)
    for shape, members in group_by_shape(images).items():
        rows = np.array(members)
        part = np.empty((len(members), len(FEATURE_NAMES)), dtype=np.float64)
        kernel(_stacked([images[i] for i in members]), histograms[rows], edge_counts[rows],
               max(1, strip_pixels // max(shape[1], 1)), entropy_table(), part)
        out[rows] = part
    return out
