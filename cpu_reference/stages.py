"""Stages of the pipeline contract (DESIGN.md section 2, docs/contract.md), in plain NumPy.

Each function states the exact integer or float32 rule that makes it byte-equal to the OpenCV call
named in its docstring; tests/test_reference_opencv.py holds it to that, byte for byte.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PipelineStages(NamedTuple):
    """Every intermediate of one image, for tests and for the reference backend."""

    gray: np.ndarray        # uint8 (H, W)
    histogram: np.ndarray   # int64[256]
    equalized: np.ndarray   # uint8 (H, W)
    blurred: np.ndarray     # uint8 (H, W)
    edges: np.ndarray       # uint8 (H, W), 0 or 255
    edge_count: int


# --- gray -------------------------------------------------------------------------------------

#: BT.601 weights of R, G, B in 15-bit fixed point (they sum to 2**15), as OpenCV 5 uses them.
GRAY_WEIGHTS = (9798, 19235, 3735)
GRAY_SHIFT = 15


def gray(image: np.ndarray) -> np.ndarray:
    """``cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)``; a gray (H, W) image is returned as is.

    ``gray = (9798 R + 19235 G + 3735 B + 2**14) >> 15``, exact in integers. (OpenCV 4 used the
    14-bit weights 4899, 9617, 1868; OpenCV 5 rounds differently for about 0.26% of colours.)
    """
    if image.ndim == 2:
        return image
    red, green, blue = (image[..., c].astype(np.int32) for c in range(3))
    wr, wg, wb = GRAY_WEIGHTS
    weighted = wr * red + wg * green + wb * blue
    return ((weighted + (1 << (GRAY_SHIFT - 1))) >> GRAY_SHIFT).astype(np.uint8)


# --- histogram and equalization ---------------------------------------------------------------

def histogram(gray_image: np.ndarray) -> np.ndarray:
    """``cv2.calcHist([gray], [0], None, [256], [0, 256])`` as int64[256]: the count of each value."""
    return np.bincount(gray_image.ravel(), minlength=256).astype(np.int64)


def equalize(gray_image: np.ndarray) -> np.ndarray:
    """``cv2.equalizeHist``: a lookup table built in float32 from the cumulative histogram.

    With ``first`` the smallest value present and ``total`` the pixel count:

    * a constant image (``hist[first] == total``) comes back unchanged (every pixel ``first``);
    * otherwise ``scale = float32(255) / float32(total - hist[first])``, ``lut[first] = 0`` and for
      ``j > first``: ``lut[j] = rint(float32(cumsum[j] - hist[first]) * scale)`` with float32
      multiplication and round half to even, saturated to 0..255. Values below ``first`` are absent.
    """
    hist = histogram(gray_image)
    first = int(np.flatnonzero(hist)[0])
    total = gray_image.size
    if hist[first] == total:
        return gray_image.copy()
    scale = np.float32(255) / np.float32(total - hist[first])
    counted_after_first = np.cumsum(hist) - hist[first]  # OpenCV's running int sum from first + 1
    lut = np.rint(counted_after_first.astype(np.float32) * scale)
    lut[: first + 1] = 0
    return np.clip(lut, 0, 255).astype(np.uint8)[gray_image]


# --- Gaussian blur ----------------------------------------------------------------------------

#: OpenCV's fixed kernels for sigma 0 (getGaussianKernel's small-kernel table), as integers over
#: a power of two: (taps, log2 of their sum).
GAUSSIAN_TAPS = {
    3: (np.array([1, 2, 1]), 2),
    5: (np.array([1, 4, 6, 4, 1]), 4),
    7: (np.array([2, 7, 14, 18, 14, 7, 2]), 6),
}


def reflect101(index: np.ndarray, length: int) -> np.ndarray:
    """OpenCV's BORDER_REFLECT_101 (``gfedcb|abcdefgh|gfedcba``), repeated while out of range.

    Mirroring about both ends repeatedly is a triangle wave of period ``2 (length - 1)``, so the
    positions of a kernel wider than the image (e.g. 7 taps over 2 pixels) still land inside.
    A length of 1 maps everything to 0.
    """
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    folded = np.abs(index) % period
    return np.where(folded >= length, period - folded, folded)


def _filter_rows(image: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Integer correlation of every row with ``taps`` (centred), reflect-101 border."""
    radius = len(taps) // 2
    width = image.shape[1]
    columns = np.arange(width)
    values = image.astype(np.int64)  # uint8 products would wrap
    total = np.zeros(image.shape, np.int64)
    for offset, tap in zip(range(-radius, radius + 1), taps):
        total += tap * values[:, reflect101(columns + offset, width)]
    return total


def gaussian_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    """``cv2.GaussianBlur(image, (ksize, ksize), 0)`` for uint8, ksize in {3, 5, 7}, BORDER_REFLECT_101.

    Separable and exact in integers: with the taps ``t`` of :data:`GAUSSIAN_TAPS` (sum ``2**b``,
    radius ``k = ksize // 2``), ``S(r, c) = sum_a sum_b t[a] t[b] image[reflect(r + a - k),
    reflect(c + b - k)]`` and the result is ``(S + 2**(2b-1)) >> 2b``, i.e. ``S / 2**(2b)`` rounded
    half up. OpenCV's own fixed-point path
    (8 fractional bits per 1-D kernel, rounding once at the end) gives exactly this.

    Small images: reflect-101 repeats (:func:`reflect101`), and a 1-pixel dimension maps every tap
    onto that pixel; this equals cv2, which drops the kernel along a dimension of size 1.
    """
    taps, bits = GAUSSIAN_TAPS[ksize]
    rows_done = _filter_rows(image, taps)
    both_done = _filter_rows(rows_done.T, taps).T
    shift = 2 * bits
    return ((both_done + (1 << (shift - 1))) >> shift).astype(np.uint8)


# --- Canny ------------------------------------------------------------------------------------

def replicate_pad(image: np.ndarray) -> np.ndarray:
    """One pixel of BORDER_REPLICATE (``aaa|abc...xyz|zzz``) around ``image``, as int32."""
    return np.pad(image.astype(np.int32), 1, mode="edge")


def sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``dx, dy`` as inside ``cv2.Canny``: ``cv2.Sobel(image, CV_16S, 1, 0 / 0, 1, ksize=3,
    borderType=BORDER_REPLICATE)``, returned as int32 (|value| <= 1020, no saturation).

    ``dx = [1 2 1]^T (x) [-1 0 1]`` and ``dy = [-1 0 1]^T (x) [1 2 1]`` over the replicate-padded
    image (row index first, x grows to the right, y grows downwards).
    """
    p = replicate_pad(image)
    h, w = image.shape

    def at(dy: int, dx: int) -> np.ndarray:  # the neighbour at (row + dy, column + dx)
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    dx = (at(-1, 1) - at(-1, -1)) + 2 * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
    dy = (at(1, -1) - at(-1, -1)) + 2 * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
    return dx, dy


def canny_thresholds(low: float, high: float, l2_gradient: bool) -> tuple[int, int]:
    """The integer thresholds ``cv2.Canny`` compares magnitudes with (``m > low``, ``m > high``).

    Swap when ``low > high``; with ``l2_gradient`` clamp each to 32767 and square it when positive;
    then floor to a C int. Thresholds from 2**31 on are outside the contract (PipelineConfig refuses
    them; OpenCV's overflowing conversion is not consistent); a floor outside the int32 range is
    taken as -2**31, x86's truncating conversion.
    """
    if low > high:
        low, high = high, low

    def to_int(threshold: float) -> int:
        if l2_gradient:
            threshold = min(32767.0, threshold)
            if threshold > 0:
                threshold *= threshold
        floored = np.floor(threshold)
        return int(floored) if -(2**31) <= floored < 2**31 else -(2**31)

    return to_int(low), to_int(high)


#: tan(22.5 degrees) in Q15, the constant of OpenCV's direction test.
TAN_22_5_Q15 = 13573


def non_maximum_suppression(dx: np.ndarray, dy: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """Where ``magnitude`` is a local maximum across the edge, with OpenCV's quantisation and ties.

    ``magnitude`` outside the image counts as 0. With ``x = |dx|``, ``y = |dy| << 15``,
    ``t = 13573 x`` (tan 22.5 degrees in Q15):

    * ``y < t`` (near horizontal gradient): ``m > left and m >= right``;
    * ``y > t + (x << 16)`` (beyond tan 67.5, near vertical): ``m > up and m >= down``;
    * else diagonal: if dx and dy have the same sign compare with up-left and down-right,
      otherwise with up-right and down-left, ``>`` on both sides. (A zero dx or dy never lands
      here unless both are zero, and then ``m = 0`` cannot beat a neighbour.)
    """
    m = np.pad(magnitude, 1)  # zeros: out-of-image neighbours never suppress
    h, w = magnitude.shape

    def at(row: int, column: int) -> np.ndarray:  # the neighbour at (i + row, j + column)
        return m[1 + row : 1 + row + h, 1 + column : 1 + column + w]

    centre = at(0, 0)
    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << 15
    tan22x = TAN_22_5_Q15 * x
    horizontal = y < tan22x
    vertical = ~horizontal & (y > tan22x + (x << 16))
    diagonal = ~horizontal & ~vertical
    same_sign = (dx < 0) == (dy < 0)

    horizontal_peak = (centre > at(0, -1)) & (centre >= at(0, 1))
    vertical_peak = (centre > at(-1, 0)) & (centre >= at(1, 0))
    main_diagonal_peak = (centre > at(-1, -1)) & (centre > at(1, 1))
    anti_diagonal_peak = (centre > at(-1, 1)) & (centre > at(1, -1))
    diagonal_peak = np.where(same_sign, main_diagonal_peak, anti_diagonal_peak)

    return (horizontal & horizontal_peak) | (vertical & vertical_peak) | (diagonal & diagonal_peak)


def _neighbour_offsets(padded_width: int) -> np.ndarray:
    """Flat-index offsets of the 8 neighbours in a row-major array whose rows are ``padded_width`` long."""
    return np.array([dr * padded_width + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc])


def hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Pixels 8-connected to a ``strong`` pixel through ``weak`` pixels (the strong ones included).

    A breadth-first flood from all strong pixels at once; only weak pixels are ever entered, so the
    result is plain reachability and any traversal order (a CPU stack, a GPU fixed-point
    iteration) gives the same set. A padding ring that is never weak stops the flood at the border.
    """
    h, w = strong.shape
    enterable = np.pad(weak, 1).ravel()
    reached = np.pad(strong, 1).ravel()
    offsets = _neighbour_offsets(w + 2)
    frontier = np.flatnonzero(reached)
    while frontier.size:
        neighbours = np.unique((frontier[:, None] + offsets).ravel())
        frontier = neighbours[enterable[neighbours] & ~reached[neighbours]]
        reached[frontier] = True
    return reached.reshape(h + 2, w + 2)[1:-1, 1:-1]


def canny(image: np.ndarray, low_threshold: float, high_threshold: float, l2_gradient: bool = False) -> np.ndarray:
    """``cv2.Canny(image, low, high, apertureSize=3, L2gradient=l2_gradient)``: uint8 0/255.

    1. ``dx, dy`` = :func:`sobel` (replicate border).
    2. magnitude ``|dx| + |dy|``, or ``dx**2 + dy**2`` with ``l2_gradient`` (int, never a sqrt).
    3. integer thresholds from :func:`canny_thresholds`.
    4. candidates: ``m > low`` and :func:`non_maximum_suppression`; strong: candidates with
       ``m > high``; weak: the other candidates. Every image pixel can be one, border included.
    5. edges (255): :func:`hysteresis` of strong through weak; everything else 0.
    """
    dx, dy = sobel(image)
    if l2_gradient:
        magnitude = dx * dx + dy * dy
    else:
        magnitude = np.abs(dx) + np.abs(dy)
    low, high = canny_thresholds(low_threshold, high_threshold, l2_gradient)
    candidate = (magnitude > low) & non_maximum_suppression(dx, dy, magnitude)
    strong = candidate & (magnitude > high)
    edges = hysteresis(strong, candidate & ~strong)
    return np.where(edges, 255, 0).astype(np.uint8)


def edge_count(edges: np.ndarray) -> int:
    """``cv2.countNonZero(edges)``."""
    return int(np.count_nonzero(edges))


def process_image(image: np.ndarray, config) -> PipelineStages:
    """The whole contract. ``config`` has low_threshold, high_threshold, l2_gradient, blur_ksize.

    gray -> histogram of gray; equalize gray -> blur the equalized -> Canny of the blurred -> count.
    """
    gray_image = gray(image)
    equalized = equalize(gray_image)
    blurred = gaussian_blur(equalized, config.blur_ksize)
    edges = canny(blurred, config.low_threshold, config.high_threshold, config.l2_gradient)
    return PipelineStages(
        gray=gray_image,
        histogram=histogram(gray_image),
        equalized=equalized,
        blurred=blurred,
        edges=edges,
        edge_count=edge_count(edges),
    )
