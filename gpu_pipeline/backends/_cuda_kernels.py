"""numba.cuda kernels of the pipeline contract (docs/contract.md, DESIGN.md section 2).

One kernel per stage or fused pair of stages; every launch covers a whole sub-batch of
same-shape images, the image index being ``blockIdx.z``. Integer arithmetic everywhere except
the equalize LUT, which repeats cv2.equalizeHist's float32 steps (no fast-math).

Launch geometry (see ``_cuda_plan``):

* pixel kernels: 1-D blocks of ``BLOCK_THREADS``, grid ``(blocks_per_image, 1, images)``,
  each thread striding over the image's pixels;
* tile kernels: blocks of ``(BLOCK_X, BLOCK_Y)`` threads producing a ``TILE_Y x TILE_X`` tile
  (each thread owns ``ROWS_PER_THREAD`` rows), grid ``(tiles_per_image, 1, images)``; the tile
  index is decoded in the kernel so that any image height fits the grid limits.

``GPU_PIPELINE_CUDA_SMALL_TILES=1`` (read at import) shrinks the geometry to 8x8 tiles and
32-thread pixel blocks. The simulator tests use it: it runs each thread as a Python thread, and
small tiles make their tiny images span several tiles, so halos and hysteresis across tile edges
are exercised too. The kernels are the same code for both geometries.

Per-image statistics live in one int32 row of ``STATS_WIDTH``: 256 histogram bins, then the edge
count, so that one copy brings a sub-batch's results back.

Values in arrays are converted to int32 before any arithmetic: numba types uint8 - uint8 as an
unsigned 64-bit integer, and the simulator's NumPy scalars would wrap.
"""

from __future__ import annotations

import os

import numpy as np
from numba import cuda, float32, int32, uint8

from gpu_pipeline.backends import _numba_setup  # before any kernel: the cache folder keyed by every kernel source

SMALL_TILES = os.environ.get("GPU_PIPELINE_CUDA_SMALL_TILES") == "1"
#: Threads of the pixel kernels and of the equalize-LUT kernel.
BLOCK_THREADS = 32 if SMALL_TILES else 256
#: Threads of the tile kernels, and the output tile of one block (ROWS_PER_THREAD rows a thread).
BLOCK_X, BLOCK_Y = (8, 2) if SMALL_TILES else (32, 8)
TILE_X, TILE_Y = (8, 8) if SMALL_TILES else (32, 32)
ROWS_PER_THREAD = TILE_Y // BLOCK_Y
#: numba's disk cache keys on the source, not on these constants: never cache the small geometry.
_CACHE = not SMALL_TILES and _numba_setup.CACHE_DIR is not None
#: The kernels' decorator: a cache that cannot keep them (its disk full) does not stop the run.
cached_kernel = _numba_setup.keeps_going_uncached(cuda.jit(cache=_CACHE))
MAX_BLUR_RADIUS = 3
#: One private sub-histogram per warp: flat regions (nodata, sea) hammer a single bin.
HISTOGRAM_COPIES = max(1, BLOCK_THREADS // 32)

EDGE_COUNT = 256
STATS_WIDTH = 257

#: Canny state map: NOT_EDGE, WEAK (non-maximum-suppressed candidate above the low threshold),
#: STRONG (above the high threshold, or connected to such a pixel by hysteresis).
NOT_EDGE, WEAK, STRONG = 0, 1, 2

#: cv2.GaussianBlur's fixed-point tables for sigma 0, rows for ksize 3, 5, 7; 2-D weight totals
#: 2**4, 2**8, 2**12, i.e. a shift of 2 * ksize - 2.
BLUR_TAPS = np.array(
    [[1, 2, 1, 0, 0, 0, 0], [1, 4, 6, 4, 1, 0, 0], [2, 7, 14, 18, 14, 7, 2]], dtype=np.int32
)
#: tan(22.5 degrees) in Q15, as in OpenCV's Canny.
TG22_Q15 = 13573

# Gray weights of cv2.cvtColor(COLOR_RGB2GRAY) in OpenCV 5: BT.601 in Q15 (docs/contract.md).
GRAY_R, GRAY_G, GRAY_B, GRAY_SHIFT = 9798, 19235, 3735, 15

_TILE_THREADS = BLOCK_X * BLOCK_Y
# Shared-memory shapes must be compile-time constants (numba does not fold the expressions).
_BLUR_TILE = (TILE_Y + 2 * MAX_BLUR_RADIUS, TILE_X + 2 * MAX_BLUR_RADIUS)
_BLUR_COLUMN_SUMS = (TILE_Y, TILE_X + 2 * MAX_BLUR_RADIUS)
_SOBEL_TILE = (TILE_Y + 4, TILE_X + 4)
_HALO_1_TILE = (TILE_Y + 2, TILE_X + 2)
_HISTOGRAM_COPIES_SHAPE = (HISTOGRAM_COPIES, 256)


# ----------------------------------------------------------------------------- device helpers

@cuda.jit(device=True)
def reflect_101(p, n):
    """OpenCV's BORDER_REFLECT_101 index, iterated so that images smaller than the kernel work."""
    if n == 1:
        return 0
    while p < 0 or p >= n:
        if p < 0:
            p = -p
        else:
            p = 2 * n - 2 - p
    return p


@cuda.jit(device=True)
def clamp_index(p, n):
    """BORDER_REPLICATE index."""
    return min(max(p, 0), n - 1)


@cuda.jit(device=True)
def round_half_even_u8(value):
    """cvRound of a non-negative float32, saturated to 255 (saturate_cast<uchar>).

    Python's round() is round-half-to-even and lowers to a single cvt.rni; computing a fraction
    with a subtraction instead would let ptxas contract it with the preceding multiply into an
    FMA and skip the float32 rounding of the product.
    """
    return min(round(value), 255)


@cuda.jit(device=True)
def tile_origin(width):
    """(y0, x0) of this block's output tile, decoded from blockIdx.x."""
    tiles_x = (width + TILE_X - 1) // TILE_X
    tile = cuda.blockIdx.x
    tile_row = tile // tiles_x
    return tile_row * TILE_Y, (tile - tile_row * tiles_x) * TILE_X


@cuda.jit(device=True)
def flush_histogram(copies, stats, image):
    """Add the block's private sub-histograms into the image's global bins (one atomic per bin)."""
    for b in range(cuda.threadIdx.x, 256, cuda.blockDim.x):
        total = 0
        for c in range(HISTOGRAM_COPIES):
            total += copies[c, b]
        if total != 0:
            cuda.atomic.add(stats, (image, b), total)


@cuda.jit(device=True)
def zero_histogram(copies):
    for b in range(cuda.threadIdx.x, 256, cuda.blockDim.x):
        for c in range(HISTOGRAM_COPIES):
            copies[c, b] = 0


@cuda.jit(device=True)
def sobel_at(tile, cy, cx):
    """(dx, dy) of the 3x3 Sobel pair at tile[cy, cx], cv2.Sobel(ksize=3) sign conventions."""
    top_left = int32(tile[cy - 1, cx - 1])
    top = int32(tile[cy - 1, cx])
    top_right = int32(tile[cy - 1, cx + 1])
    left = int32(tile[cy, cx - 1])
    right = int32(tile[cy, cx + 1])
    bottom_left = int32(tile[cy + 1, cx - 1])
    bottom = int32(tile[cy + 1, cx])
    bottom_right = int32(tile[cy + 1, cx + 1])
    dx = (top_right - top_left) + 2 * (right - left) + (bottom_right - bottom_left)
    dy = (bottom_left - top_left) + 2 * (bottom - top) + (bottom_right - top_right)
    return dx, dy


@cuda.jit(device=True)
def nms_state(tile, mag, ty, tx, low, high):
    """Canny state of one pixel: mag[ty, tx] is it, tile[ty + 1, tx + 1] its blurred value.

    Follows OpenCV's canny.cpp: sector from the Q15 tangent test, strict ``>`` towards the
    previous neighbour and ``>=`` towards the next one (horizontal, vertical), strict both ways
    on diagonals.
    """
    m = mag[ty, tx]
    if m <= low:
        return NOT_EDGE
    dx, dy = sobel_at(tile, ty + 1, tx + 1)
    ax = abs(dx)
    ay_q15 = abs(dy) << 15
    tg22x = ax * TG22_Q15
    if ay_q15 < tg22x:
        keep = m > mag[ty, tx - 1] and m >= mag[ty, tx + 1]
    elif ay_q15 > tg22x + (ax << 16):
        keep = m > mag[ty - 1, tx] and m >= mag[ty + 1, tx]
    else:
        s = -1 if (dx ^ dy) < 0 else 1
        keep = m > mag[ty - 1, tx - s] and m > mag[ty + 1, tx + s]
    if not keep:
        return NOT_EDGE
    return STRONG if m > high else WEAK


@cuda.jit(device=True)
def touches_strong(tile, y, x):
    """True when one of the 8 neighbours of tile[y, x] is STRONG."""
    for dy in range(-1, 2):
        for dx in range(-1, 2):
            if tile[y + dy, x + dx] == STRONG:
                return True
    return False


# ----------------------------------------------------------------------------- kernels

@cached_kernel
def zero_int32(values):
    """values[:] = 0: the per-image statistics are accumulated with atomics."""
    i = cuda.grid(1)
    if i < values.shape[0]:
        values[i] = 0


@cached_kernel
def rgb_to_gray_histogram(rgb, gray, stats):
    """gray = cv2.cvtColor(RGB2GRAY), and its histogram into stats[:, :256].

    rgb: (images, pixels, 3); gray: (images, pixels); stats zeroed beforehand.
    """
    copies = cuda.shared.array(_HISTOGRAM_COPIES_SHAPE, int32)
    zero_histogram(copies)
    cuda.syncthreads()
    image = cuda.blockIdx.z
    warp = cuda.threadIdx.x // 32 % HISTOGRAM_COPIES
    for p in range(cuda.grid(1), gray.shape[1], cuda.gridsize(1)):
        value = (GRAY_R * int32(rgb[image, p, 0]) + GRAY_G * int32(rgb[image, p, 1])
                 + GRAY_B * int32(rgb[image, p, 2]) + (1 << (GRAY_SHIFT - 1))) >> GRAY_SHIFT
        gray[image, p] = value
        cuda.atomic.add(copies, (warp, value), 1)
    cuda.syncthreads()
    flush_histogram(copies, stats, image)


@cached_kernel
def gray_histogram(gray, stats):
    """Histogram of gray (images, pixels) into stats[:, :256]; stats zeroed beforehand."""
    copies = cuda.shared.array(_HISTOGRAM_COPIES_SHAPE, int32)
    zero_histogram(copies)
    cuda.syncthreads()
    image = cuda.blockIdx.z
    warp = cuda.threadIdx.x // 32 % HISTOGRAM_COPIES
    for p in range(cuda.grid(1), gray.shape[1], cuda.gridsize(1)):
        cuda.atomic.add(copies, (warp, int32(gray[image, p])), 1)
    cuda.syncthreads()
    flush_histogram(copies, stats, image)


@cached_kernel
def equalize_lut(stats, pixels, lut):
    """cv2.equalizeHist's lookup table, one block per image (grid x = image).

    Each thread sums the bins up to its own ones: broadcast reads from shared memory and a
    single barrier, cheaper at 256 bins than a log-step scan. Then, as OpenCV does,
    ``scale = 255f / (pixels - count[first])`` and
    ``lut[b] = rint(f32(sum of bins first+1..b) * scale)``; a constant image maps to itself.
    """
    counts = cuda.shared.array(256, int32)
    image = cuda.blockIdx.x
    for b in range(cuda.threadIdx.x, 256, cuda.blockDim.x):
        counts[b] = stats[image, b]
    cuda.syncthreads()
    first = 0
    while counts[first] == 0:
        first += 1  # pixels >= 1: some bin is non-empty
    first_count = counts[first]
    # (unused for a constant image; the max only keeps that case away from 0 / 0)
    scale = float32(255.0) / float32(max(pixels - first_count, 1))
    running = 0
    k = 0
    for b in range(cuda.threadIdx.x, 256, cuda.blockDim.x):
        while k <= b:
            running += counts[k]
            k += 1
        if first_count == pixels:
            lut[image, b] = first
        elif b <= first:
            lut[image, b] = 0
        else:
            lut[image, b] = round_half_even_u8(float32(running - first_count) * scale)


@cached_kernel
def equalize_and_blur(gray, lut, ksize, equalized, write_equalized, blurred):
    """blurred = cv2.GaussianBlur(lut[gray], (ksize, ksize), 0), BORDER_REFLECT_101.

    The LUT is applied while loading the tile, so equalized pixels are written only when asked
    for. Separable integer sums: vertical into shared ``column_sums``, then horizontal,
    ``(S + 2**(shift-1)) >> shift``, exactly cv2's fixed-point result.
    """
    table = cuda.shared.array(256, uint8)
    tile = cuda.shared.array(_BLUR_TILE, uint8)
    column_sums = cuda.shared.array(_BLUR_COLUMN_SUMS, int32)
    image = cuda.blockIdx.z
    height, width = gray.shape[1], gray.shape[2]
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid = ty * BLOCK_X + tx
    y0, x0 = tile_origin(width)
    radius = ksize // 2
    tile_h = TILE_Y + 2 * radius
    tile_w = TILE_X + 2 * radius
    row_taps = (ksize - 3) // 2
    for b in range(tid, 256, _TILE_THREADS):
        table[b] = lut[image, b]
    cuda.syncthreads()
    for i in range(tid, tile_h * tile_w, _TILE_THREADS):
        ly = i // tile_w
        lx = i - ly * tile_w
        sy = reflect_101(y0 + ly - radius, height)
        sx = reflect_101(x0 + lx - radius, width)
        tile[ly, lx] = table[gray[image, sy, sx]]
    cuda.syncthreads()
    for r in range(ROWS_PER_THREAD):
        ly = ty + r * BLOCK_Y
        for lx in range(tx, tile_w, BLOCK_X):
            s = 0
            for k in range(ksize):
                s += BLUR_TAPS[row_taps, k] * int32(tile[ly + k, lx])
            column_sums[ly, lx] = s
    cuda.syncthreads()
    shift = 2 * ksize - 2
    x = x0 + tx
    for r in range(ROWS_PER_THREAD):
        ly = ty + r * BLOCK_Y
        y = y0 + ly
        if y < height and x < width:
            s = 0
            for k in range(ksize):
                s += BLUR_TAPS[row_taps, k] * column_sums[ly, tx + k]
            blurred[image, y, x] = (s + (1 << (shift - 1))) >> shift
            if write_equalized:
                equalized[image, y, x] = tile[ly + radius, tx + radius]


@cached_kernel
def sobel_nms(blurred, low, high, l2_gradient, state):
    """Canny up to hysteresis: Sobel (BORDER_REPLICATE), magnitude, non-maximum suppression.

    The tile holds blurred pixels with a 2-pixel halo (Sobel of the neighbours), ``mag`` the
    magnitudes with a 1-pixel halo, 0 outside the image as in OpenCV's padded magnitude rows.
    ``low`` and ``high`` are cv2's integer thresholds (squared for L2, see _cuda_plan).
    """
    tile = cuda.shared.array(_SOBEL_TILE, uint8)
    mag = cuda.shared.array(_HALO_1_TILE, int32)
    image = cuda.blockIdx.z
    height, width = blurred.shape[1], blurred.shape[2]
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid = ty * BLOCK_X + tx
    y0, x0 = tile_origin(width)
    for i in range(tid, (TILE_Y + 4) * (TILE_X + 4), _TILE_THREADS):
        ly = i // (TILE_X + 4)
        lx = i - ly * (TILE_X + 4)
        tile[ly, lx] = blurred[image, clamp_index(y0 + ly - 2, height), clamp_index(x0 + lx - 2, width)]
    cuda.syncthreads()
    for i in range(tid, (TILE_Y + 2) * (TILE_X + 2), _TILE_THREADS):
        my = i // (TILE_X + 2)
        mx = i - my * (TILE_X + 2)
        y = y0 + my - 1
        x = x0 + mx - 1
        m = 0
        if 0 <= y < height and 0 <= x < width:
            dx, dy = sobel_at(tile, my + 1, mx + 1)
            if l2_gradient:
                m = dx * dx + dy * dy
            else:
                m = abs(dx) + abs(dy)
        mag[my, mx] = m
    cuda.syncthreads()
    x = x0 + tx
    for r in range(ROWS_PER_THREAD):
        ly = ty + r * BLOCK_Y
        y = y0 + ly
        if y < height and x < width:
            state[image, y, x] = nms_state(tile, mag, ly + 1, tx + 1, low, high)


@cached_kernel
def hysteresis_step(source, state, changed, flag, stamp, previous_stamp):
    """One global step of hysteresis: WEAK pixels 8-connected to STRONG ones become STRONG.

    Inside the block the tile (1-pixel halo) is iterated to its own fixed point; the halo is
    read once, so a change that crosses a tile edge is picked up by the next launch. A block
    that promoted a pixel writes ``changed[flag] = stamp``, a number unique to this launch (so
    the flags never need clearing). The host queues several launches at once: launch ``flag``
    returns at once unless launch ``flag - 1`` (stamp ``previous_stamp``) changed something,
    so launches queued past the fixed point cost almost nothing. The host stops after a launch
    that changed nothing, which is then the global fixed point (reachability from strong pixels).

    The tile is read from ``source`` and promotions written to ``state``: the backend passes the
    same array twice; the tests pass a copy taken at launch start as ``source``, which emulates a
    GPU where every block reads its halo before any block writes (the worst case for launches).
    """
    if flag > 0 and changed[flag - 1] != previous_stamp:
        return  # the previous launch changed nothing: the fixed point is reached
    tile = cuda.shared.array(_HALO_1_TILE, uint8)
    image = cuda.blockIdx.z
    height, width = state.shape[1], state.shape[2]
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid = ty * BLOCK_X + tx
    y0, x0 = tile_origin(width)
    for i in range(tid, (TILE_Y + 2) * (TILE_X + 2), _TILE_THREADS):
        ly = i // (TILE_X + 2)
        lx = i - ly * (TILE_X + 2)
        y = y0 + ly - 1
        x = x0 + lx - 1
        value = NOT_EDGE
        if 0 <= y < height and 0 <= x < width:
            value = source[image, y, x]
        tile[ly, lx] = value
    cuda.syncthreads()
    weak_rows = 0
    for r in range(ROWS_PER_THREAD):
        if tile[ty + r * BLOCK_Y + 1, tx + 1] == WEAK:
            weak_rows |= 1 << r
    if cuda.syncthreads_or(weak_rows) == 0:
        return  # the whole block agrees: nothing to promote here
    promoted_rows = 0
    while True:
        grew = 0
        for r in range(ROWS_PER_THREAD):
            bit = 1 << r
            waiting = weak_rows & bit and not promoted_rows & bit
            if waiting and touches_strong(tile, ty + r * BLOCK_Y + 1, tx + 1):
                tile[ty + r * BLOCK_Y + 1, tx + 1] = STRONG
                promoted_rows |= bit
                grew = 1
        if cuda.syncthreads_or(grew) == 0:
            break
    if promoted_rows != 0:
        for r in range(ROWS_PER_THREAD):
            if promoted_rows & (1 << r):
                state[image, y0 + ty + r * BLOCK_Y, x0 + tx] = STRONG
        changed[flag] = stamp


@cached_kernel
def finalize_edges(state, edges, write_edges, stats):
    """Edge count (block reduction, one global atomic per block) and, if asked, the 0/255 map.

    state, edges: (images, pixels) views.
    """
    block_count = cuda.shared.array(1, int32)
    if cuda.threadIdx.x == 0:
        block_count[0] = 0
    cuda.syncthreads()
    image = cuda.blockIdx.z
    count = 0
    for p in range(cuda.grid(1), state.shape[1], cuda.gridsize(1)):
        if state[image, p] == STRONG:
            count += 1
            if write_edges:
                edges[image, p] = 255
        elif write_edges:
            edges[image, p] = 0
    if count != 0:
        cuda.atomic.add(block_count, 0, count)
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and block_count[0] != 0:
        cuda.atomic.add(stats, (image, EDGE_COUNT), block_count[0])


#: The exact argument types the backend launches each kernel with (Python ints are int64,
#: bools boolean). CI compiles each of them to PTX for sm_90 without a GPU.
KERNEL_SIGNATURES = {
    zero_int32: ["void(int32[::1])"],
    rgb_to_gray_histogram: ["void(uint8[:, :, ::1], uint8[:, ::1], int32[:, ::1])"],
    gray_histogram: ["void(uint8[:, ::1], int32[:, ::1])"],
    equalize_lut: ["void(int32[:, ::1], int64, uint8[:, ::1])"],
    equalize_and_blur: [
        "void(uint8[:, :, ::1], uint8[:, ::1], int64, uint8[:, :, ::1], boolean, uint8[:, :, ::1])"
    ],
    sobel_nms: ["void(uint8[:, :, ::1], int64, int64, boolean, uint8[:, :, ::1])"],
    hysteresis_step: ["void(uint8[:, :, ::1], uint8[:, :, ::1], int32[::1], int64, int64, int64)"],
    finalize_edges: ["void(uint8[:, ::1], uint8[:, ::1], boolean, int32[:, ::1])"],
}
