"""One row (or one pixel list) of each stage, for the numba CPU kernels (_numba_kernels).

Every function runs inside one thread on row views (1-D slices): LLVM vectorises plain loops
over a row, while flat offsets into a whole buffer defeat it. Arithmetic is integer and exact,
as docs/contract.md defines each stage.
"""

from __future__ import annotations

import numba
import numpy as np

from gpu_pipeline.backends._numba_setup import CACHE_DIR, helper

#: For the functions called once or more per row: inlined into their callers, where a call cost
#: more than a tile row's work (a call passes each array as seven values). The index helpers
#: (``reflect101``, ``ring_slot``), measured on one thread: 64x64 tiles 24.8 -> 16.9 ns/px,
#: 1024x1024 13.6 -> 9.6 ns/px, a cold compile 11.2 -> 10.4 s. The five row functions of the band
#: driver (``_numba_kernels._band_edges``), the CPU time of 4,096 EuroSAT tiles on one thread:
#: 23.6-24.8 -> 21.0-22.3 us a tile, 12-MP images the same, a cold compile 0.4 s longer.
#: ``count_row`` and ``rgb_row_to_gray`` gained nothing more.
inlined = numba.njit(cache=CACHE_DIR is not None, nogil=True, inline="always")

#: tan(22.5 deg) in Q15, as canny.cpp rounds it.
TG22 = np.int32(13573)
CANNY_SHIFT = np.int32(15)

#: numba computes int32 arithmetic in int64; wrapping a result in int32 lets LLVM narrow the
#: whole expression back to int32, which doubles the SIMD lanes. Every value here fits.
i32 = np.int32

#: States of the Canny map, as in canny.cpp.
WEAK = 0
NOT_EDGE = 1
EDGE = 2


# --------------------------------------------------------------------------- gray + histogram

@helper
def count_row(values, counts):
    """Add ``values`` to the 4 interleaved sub-histograms ``counts`` (4, 256).

    Four independent counters keep runs of equal pixels from serialising on one memory slot.
    """
    x = 0
    stop = values.shape[0]
    while x + 4 <= stop:
        counts[0, values[x]] += 1
        counts[1, values[x + 1]] += 1
        counts[2, values[x + 2]] += 1
        counts[3, values[x + 3]] += 1
        x += 4
    while x < stop:
        counts[0, values[x]] += 1
        x += 1


@helper
def rgb_row_to_gray(rgb, gray):
    """``cv2.cvtColor(COLOR_RGB2GRAY)`` of one row (OpenCV 5 weights, see _numba_kernels.gray_histograms)."""
    for x in range(gray.shape[0]):
        gray[x] = (9798 * np.int32(rgb[3 * x]) + 19235 * np.int32(rgb[3 * x + 1])
                   + 3735 * np.int32(rgb[3 * x + 2]) + 16384) >> 15


# --------------------------------------------------------------------------- blur

@inlined
def reflect101(p, n):
    """cv2.borderInterpolate(p, n, BORDER_REFLECT_101), folding again for tiny images."""
    if n == 1:
        return 0
    while p < 0 or p >= n:
        p = -p if p < 0 else 2 * (n - 1) - p
    return p


@inlined
def ring_slot(row, height, ksize):
    """Slot of the ring of horizontal sums holding source row ``row`` (reflected into the image)."""
    if row < 0 or row >= height:
        row = reflect101(row, height)
    return row % ksize


@inlined
def equalized_row_sums(gray_row, lut, padded, ksize, out):
    """Equalize one gray row and blur it horizontally: integer sums ``out[x]`` of the 1-D taps.

    ``padded`` receives the equalized row with ``ksize // 2`` reflect-101 pixels on each side.
    Taps (sigma 0, cv2's fixed tables): 3: 1 2 1, 5: 1 4 6 4 1, 7: 2 7 14 18 14 7 2.
    """
    width = gray_row.shape[0]
    radius = ksize // 2
    for x in range(width):
        padded[radius + x] = lut[gray_row[x]]
    for d in range(1, radius + 1):
        padded[radius - d] = padded[radius + reflect101(-d, width)]
        padded[radius + width - 1 + d] = padded[radius + reflect101(width - 1 + d, width)]
    if ksize == 3:
        for x in range(width):
            out[x] = padded[x] + 2 * padded[x + 1] + padded[x + 2]
    elif ksize == 5:
        for x in range(width):
            out[x] = (padded[x] + padded[x + 4]) + 4 * (padded[x + 1] + padded[x + 3]) + 6 * padded[x + 2]
    else:
        for x in range(width):
            out[x] = (2 * (padded[x] + padded[x + 6]) + 7 * (padded[x + 1] + padded[x + 5])
                      + 14 * (padded[x + 2] + padded[x + 4]) + 18 * padded[x + 3])


@inlined
def blur_column_sums(sums, y, height, ksize, out):
    """Blurred row ``y`` from the ring ``sums`` of horizontal sums (slot = source row % ksize).

    Result ``(S + 2^(n-1)) >> n`` with 2^n the 2-D weight total, into ``out[1:width+1]`` with
    replicated ends: the Sobel inside cv2.Canny uses BORDER_REPLICATE.
    """
    width = sums.shape[1]
    radius = ksize // 2
    s0 = sums[ring_slot(y - radius, height, ksize)]
    s1 = sums[ring_slot(y - radius + 1, height, ksize)]
    s2 = sums[ring_slot(y - radius + 2, height, ksize)]
    if ksize == 3:
        for x in range(width):
            out[x + 1] = i32(s0[x] + 2 * s1[x] + s2[x] + 8) >> 4
    else:
        s3 = sums[ring_slot(y - radius + 3, height, ksize)]
        s4 = sums[ring_slot(y - radius + 4, height, ksize)]
        if ksize == 5:
            for x in range(width):
                out[x + 1] = i32((s0[x] + s4[x]) + 4 * (s1[x] + s3[x]) + 6 * s2[x] + 128) >> 8
        else:
            s5 = sums[ring_slot(y - radius + 5, height, ksize)]
            s6 = sums[ring_slot(y - radius + 6, height, ksize)]
            for x in range(width):
                out[x + 1] = i32(2 * (s0[x] + s6[x]) + 7 * (s1[x] + s5[x]) + 14 * (s2[x] + s4[x])
                                  + 18 * s3[x] + 2048) >> 12
    out[0] = out[1]
    out[width + 1] = out[width]


# --------------------------------------------------------------------------- Sobel, Canny

@inlined
def sobel_magnitude_row(above, here, below, l2, dx, dy, mag):
    """3x3 Sobel of one blurred row (padded rows, BORDER_REPLICATE) and its gradient magnitude.

    ``mag`` is padded with zeros at both ends, as canny.cpp pads its magnitude buffer.
    """
    width = dx.shape[0]
    for x in range(width):
        gx = i32((above[x + 2] - above[x]) + 2 * (here[x + 2] - here[x]) + (below[x + 2] - below[x]))
        gy = i32((below[x] + 2 * below[x + 1] + below[x + 2]) - (above[x] + 2 * above[x + 1] + above[x + 2]))
        dx[x] = gx
        dy[x] = gy
        if l2:
            mag[x + 1] = i32(gx * gx + gy * gy)
        else:
            mag[x + 1] = i32(abs(gx) + abs(gy))
    mag[0] = 0
    mag[width + 1] = 0


@inlined
def suppress_row(above, here, below, dx, dy, low, high, map_row):
    """Non-maximum suppression of one row into its Canny map row; returns how many are EDGE.

    As canny.cpp decides it: the gradient direction is binned with tan(22.5) and tan(67.5)
    in Q15; along the horizontal and vertical bins the neighbour before must be strictly
    smaller and the one after not larger, along diagonals both strictly smaller. Survivors
    above ``high`` are EDGE, other survivors WEAK. The neighbours are picked with bit masks
    (all ones or zero), not branches, so the loop vectorises whatever the directions.
    """
    width = dx.shape[0]
    low = i32(low)  # thresholds fit int32 (docs/contract.md)
    high = i32(high)
    strong = i32(0)
    for x in range(width):
        m = here[x + 1]
        gx = dx[x]
        gy = dy[x]
        ax = i32(abs(gx))
        ay = i32(i32(abs(gy)) << CANNY_SHIFT)
        tg22x = i32(ax * TG22)
        tg67x = i32(tg22x + i32(ax << (CANNY_SHIFT + 1)))
        horizontal = i32(-i32(ay < tg22x))
        vertical = i32(-i32(ay > tg67x) & ~horizontal)
        diagonal = i32(~(horizontal | vertical))
        same_sign = i32(-i32(i32(gx ^ gy) >= 0))  # up-left / down-right, else up-right / down-left
        diagonal_before = i32((above[x] & same_sign) | (above[x + 2] & ~same_sign))
        diagonal_after = i32((below[x + 2] & same_sign) | (below[x] & ~same_sign))
        before = i32((here[x] & horizontal) | (above[x + 1] & vertical) | (diagonal_before & diagonal))
        after = i32((here[x + 2] & horizontal) | (below[x + 1] & vertical) | (diagonal_after & diagonal))
        # diagonal is -1 on diagonals: there "m >= after + 1", i.e. strictly larger
        survives = i32(m > low) & i32(m > before) & i32(m >= i32(after - diagonal))
        edge = survives & i32(m > high)
        map_row[x + 1] = NOT_EDGE - survives + 2 * edge
        strong = i32(strong + edge)
    map_row[0] = NOT_EDGE
    map_row[width + 1] = NOT_EDGE
    return strong


@inlined
def flag_seeds(above, here, below, seeds):
    """Flag in ``seeds`` the EDGE pixels of map row ``here`` that touch a WEAK pixel; any?

    Only those can grow the edge set, so the flood starts from them rather than from every
    strong pixel. ``above`` / ``below`` may be ``here`` itself where the band ends.
    """
    found = np.uint8(0)  # byte-wide, so that the loop vectorises on bytes
    for x in range(1, here.shape[0] - 1):
        # WEAK is 0, the smallest state: a WEAK neighbour makes the minimum 0
        nearest = min(min(min(here[x - 1], here[x + 1]), min(above[x - 1], above[x])),
                      min(min(above[x + 1], below[x - 1]), min(below[x], below[x + 1])))
        seed = np.uint8((here[x] == EDGE) & (nearest == WEAK))
        seeds[x] = seed
        found |= seed
    return found


@helper
def flood(edge_map, map_width, first_row, last_row, stack, size):
    """Mark EDGE every WEAK pixel 8-connected to a stacked pixel, within map rows [first, last].

    Indices are into ``edge_map`` (one image's map, flat). Returns how many pixels it marked.
    The map's border of NOT_EDGE keeps columns in range. A pixel is pushed only when it turns
    EDGE, so a stack as long as the pixels it may reach never overflows.
    """
    marked = 0
    # a pixel may look up (down) when it lies below (above) the first (last) allowed row
    look_up_from = (first_row + 1) * map_width
    look_down_before = last_row * map_width
    while size > 0:
        size -= 1
        p = stack[size]
        for q in (p - 1, p + 1):
            if edge_map[q] == WEAK:
                edge_map[q] = EDGE
                marked += 1
                stack[size] = q
                size += 1
        if p >= look_up_from:
            for q in (p - map_width - 1, p - map_width, p - map_width + 1):
                if edge_map[q] == WEAK:
                    edge_map[q] = EDGE
                    marked += 1
                    stack[size] = q
                    size += 1
        if p < look_down_before:
            for q in (p + map_width - 1, p + map_width, p + map_width + 1):
                if edge_map[q] == WEAK:
                    edge_map[q] = EDGE
                    marked += 1
                    stack[size] = q
                    size += 1
    return marked
