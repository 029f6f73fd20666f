"""numba kernels of the CPU backend: the pipeline contract (docs/contract.md) on every core.

Images arrive as the addresses and byte sizes of their pixels (no copy; :func:`_image_at` views
them), so one parallel loop covers a ragged batch (any mix of shapes, gray and RGB); outputs are
flat buffers with per-image offsets. Addresses, not a ``numba.typed.List``: a typed list's own
methods are compiled again in every process (about 1.1 s of each start), cached kernels are not. The
unit of work is an *item*: a band of rows ``[r0, r1)`` of one image. Many small images give one
item each (each image is processed serially by one thread); a few large images are cut into
row bands. Each thread claims items one at a time, largest first (:func:`_claim`), so a mixed
batch keeps every thread busy.

The entry points are serial ``nogil`` functions that do one worker's share: the backend calls
each from its own Python threads at once, all claiming from one shared counter. This is numba
without ``parallel=True``: no threading layer (nothing to abort when several Python threads call
in, no OpenMP threads spinning on the cores the decoders need), and a cold compile of about a
third (parfor lowering was two thirds of the ~25 s first start).

Passes over memory, per item:

1. :func:`gray_histograms` reads RGB once, writes gray, and counts a private histogram per item
   (merged serially afterwards: no shared counters inside ``prange``).
2. :func:`edge_maps` streams the band row by row through equalize LUT -> Gaussian blur ->
   Sobel -> magnitude -> non-maximum suppression, keeping only a few rows of each intermediate
   in small ring buffers, then floods the strong pixels through weak ones inside the band.
3. :func:`join_bands` (images cut into several bands only) continues the flood across band
   seams, so hysteresis is exact reachability over the whole image.

The Canny map follows OpenCV's canny.cpp: a (H+2) x (W+2) byte map with a border of 1, values
0 = weak candidate, 1 = not an edge, 2 = edge.
"""

from __future__ import annotations

import numpy as np
from numba import carray, types
from numba.core import cgutils
from numba.extending import intrinsic

from gpu_pipeline.backends._numba_rows import (
    EDGE,
    NOT_EDGE,
    WEAK,
    blur_column_sums,
    count_row,
    equalized_row_sums,
    flag_seeds,
    flood,
    rgb_row_to_gray,
    sobel_magnitude_row,
    suppress_row,
)
from gpu_pipeline.backends._numba_setup import helper

# --------------------------------------------------------------------------- work plan

@intrinsic
def _claim(typingctx, counter):
    """Atomically take the next value of ``counter[0]`` (an int64 array): dynamic scheduling.

    numba's ``prange`` hands each thread a fixed share; threads that claim items one at a time
    instead keep balanced when items differ in cost or a core is busy with something else.
    """
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        first = cgutils.get_item_pointer(context, builder, array_type, array, [context.get_constant(types.intp, 0)])
        return builder.atomic_rmw("add", first, context.get_constant(types.int64, 1), "monotonic")

    return types.int64(counter), codegen


@intrinsic
def _uint8_pointer(typingctx, address):
    """The int64 ``address`` as a pointer to uint8 (an array's ``ctypes.data``)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.uint8)))

    return types.CPointer(types.uint8)(types.int64), codegen


@intrinsic
def _borrowed(typingctx, array):
    """``array`` without its reference count: the same data, shape and strides, no meminfo.

    Every slice numba takes of a counted array increments and decrements that count with an
    atomic instruction (one cache line, shared by every thread of the call); a tile's rows take
    a few dozen slices each, about 220 ns a row. Views of a borrowed array are not counted.
    The caller keeps ``array`` alive while the view is in use (the kernels' arguments are).
    """
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        source = context.make_array(array_type)(context, builder, args[0])
        view = context.make_array(array_type)(context, builder)
        for field in ("data", "shape", "strides", "itemsize", "nitems"):
            setattr(view, field, getattr(source, field))
        view.meminfo = context.get_constant_null(types.MemInfoPointer(array_type.dtype))
        view.parent = context.get_constant_null(types.pyobject)
        return view._getvalue()

    return array(array), codegen


@intrinsic
def _keep_alive(typingctx, array):
    """A use of ``array`` that does nothing: numba frees a local after its last use, and the
    :func:`_borrowed` views of a local array need it until this call."""
    def codegen(context, builder, signature, args):
        return context.get_dummy_value()

    return types.none(array), codegen


@helper
def _image_at(addresses, sizes, i):
    """Image ``i`` of the batch as a flat uint8 array over its own memory (the caller keeps the
    images alive during the call)."""
    return carray(_uint8_pointer(addresses[i]), (sizes[i],))


# --------------------------------------------------------------------------- gray + histogram

@helper
def _band_histogram(image, rgb, gray, width, r0, r1, hist, counts):
    """Histogram of rows [r0, r1) of one flat image into ``hist``, converting RGB rows into ``gray``;
    ``counts`` (4, 256) is scratch for :func:`count_row`."""
    counts[:] = 0
    for y in range(r0, r1):
        if rgb:
            row = gray[y * width:(y + 1) * width]
            rgb_row_to_gray(image[3 * y * width:3 * (y + 1) * width], row)
        else:
            row = image[y * width:(y + 1) * width]
        count_row(row, counts)
    for v in range(256):
        hist[v] = counts[0, v] + counts[1, v] + counts[2, v] + counts[3, v]


@helper
def gray_histograms(addresses, sizes, channels, gray, gray_off, heights, widths, item_image, item_r0, item_r1, order,
                    claimed, hist_parts):
    """One worker's share: gray (RGB images only, into ``gray``) and one private histogram per item
    it claims from ``claimed`` (shared by all workers of the call).

    ``cv2.cvtColor(COLOR_RGB2GRAY)`` in OpenCV 5 is ``(9798 R + 19235 G + 3735 B + 16384) >> 15``
    (checked on all 2^24 colours; OpenCV 4 used Q14 weights). Gray images are only counted:
    the backend reads them in place.
    """
    gray, hist_parts = _borrowed(gray), _borrowed(hist_parts)
    counts_owner = np.empty((4, 256), np.int64)
    counts = _borrowed(counts_owner)
    k = _claim(claimed)
    while k < order.shape[0]:
        it = order[k]
        i = item_image[it]
        rgb = channels[i] == 3
        pixels = heights[i] * widths[i] if rgb else 0
        _band_histogram(_image_at(addresses, sizes, i), rgb, gray[gray_off[i]:gray_off[i] + pixels], widths[i],
                        item_r0[it], item_r1[it], hist_parts[it], counts)
        k = _claim(claimed)
    _keep_alive(counts_owner)


# --------------------------------------------------------------------------- equalize LUT

@helper
def equalize_lut(hist, total, lut):
    """The ``cv2.equalizeHist`` LUT of one image of ``total`` pixels into ``lut`` (uint8[256]),
    with its float32 arithmetic.

    ``scale = 255f / float(total - h[first])``, ``lut[j] = rint(float(cumsum_j) * scale)`` above
    the first non-empty bin, 0 at it and below; a constant image keeps its value.
    """
    lut[:] = 0
    first = 0
    while hist[first] == 0:
        first += 1
    if hist[first] == total:
        lut[first] = first
        return
    scale = np.float32(255.0) / np.float32(total - hist[first])
    running = 0
    for j in range(first + 1, 256):
        running += hist[j]
        value = np.rint(np.float32(running) * scale)
        lut[j] = min(value, np.float32(255.0))


# --------------------------------------------------------------------------- blur, Sobel, Canny

@helper
def _scratch_sizes(width, ksize):
    """int32 and uint8 scratch one band of an image ``width`` wide needs (see _band_edges)."""
    return (width + ksize) + ksize * width + 6 * (width + 2) + 4 * width, 8 * (width // 8 + 2)


@helper
def _band_edges(gray, height, lut, r0, r1, ksize, l2, low, high, edge_map, equalized, keep,
                scratch, seeds, stack):
    """Canny map of rows [r0, r1) of one image, flooded inside the band; returns its EDGE count.

    ``gray`` and ``equalized`` are the image's flat pixels, ``edge_map`` its flat padded map.
    Streams rows through rings: horizontal blur sums (ksize rows), blurred rows (3), magnitude
    (3), Sobel dx/dy (2). Row ``t`` of the magnitude needs blurred rows t-1..t+1, which need
    sums of rows t-1-r..t+1+r; a band recomputes those few rows past its ends instead of
    sharing them, so bands are independent. The rings are carved from ``scratch`` (int32) and
    ``seeds`` (uint8), sized by :func:`_scratch_sizes`; ``stack`` holds at least the band's
    pixels (each is pushed at most once). Allocating them once per thread, not per image,
    matters for small tiles.
    """
    width = gray.shape[0] // height
    radius = ksize // 2
    map_width = width + 2
    used = 0
    padded = scratch[used:used + width + 2 * radius]
    used += width + ksize
    sums = scratch[used:used + ksize * width].reshape(ksize, width)
    used += ksize * width
    blurred = scratch[used:used + 3 * map_width].reshape(3, map_width)
    used += 3 * map_width
    mag = scratch[used:used + 3 * map_width].reshape(3, map_width)
    used += 3 * map_width
    dx = scratch[used:used + 2 * width].reshape(2, width)
    used += 2 * width
    dy = scratch[used:used + 2 * width].reshape(2, width)
    seeds = seeds[:8 * (map_width // 8 + 1)]
    seeds[:] = 0  # only [1, width] are ever set
    seed_words = seeds.view(np.uint64)
    size = 0

    next_blurred = max(0, r0 - 2)
    next_sum = max(0, next_blurred - radius)
    if r0 == 0:
        edge_map[:map_width] = NOT_EDGE
    if r1 == height:
        edge_map[(height + 1) * map_width:] = NOT_EDGE

    # magnitude rows r0-1 .. r1 (rows -1 and H stay zero), suppression of row t-1 after row t,
    # flood seeds of row t-2 once its neighbours in the band are final
    strong = 0
    for t in range(r0 - 1, r1 + 2):
        slot = (t + 3) % 3
        if t <= r1 and (t < 0 or t >= height):
            mag[slot, :] = 0
        elif t <= r1:
            need = min(t + 1, height - 1)
            while next_blurred <= need:
                last_sum = min(next_blurred + radius, height - 1)
                while next_sum <= last_sum:
                    row = gray[next_sum * width:(next_sum + 1) * width]
                    equalized_row_sums(row, lut, padded, ksize, sums[next_sum % ksize])
                    if keep and r0 <= next_sum < r1:
                        eq_row = equalized[next_sum * width:(next_sum + 1) * width]
                        for x in range(width):
                            eq_row[x] = padded[radius + x]
                    next_sum += 1
                blur_column_sums(sums, next_blurred, height, ksize, blurred[next_blurred % 3])
                next_blurred += 1
            sobel_magnitude_row(blurred[max(t - 1, 0) % 3], blurred[t % 3],
                                 blurred[min(t + 1, height - 1) % 3], l2, dx[t % 2], dy[t % 2], mag[slot])
        y = t - 1
        if r0 <= y < r1:
            start = (y + 1) * map_width
            strong += suppress_row(mag[(y + 2) % 3], mag[(y + 3) % 3], mag[(y + 4) % 3], dx[y % 2],
                                    dy[y % 2], low, high, edge_map[start:start + map_width])
        y = t - 2
        if r0 <= y < r1:
            start = (y + 1) * map_width
            here = edge_map[start:start + map_width]
            above = edge_map[start - map_width:start] if y > r0 else here
            below = edge_map[start + map_width:start + 2 * map_width] if y < r1 - 1 else here
            if flag_seeds(above, here, below, seeds):  # seeds are rare: skip 8 empty flags at once
                for word in range(seed_words.shape[0]):
                    if seed_words[word]:
                        for x in range(8 * word, 8 * word + 8):
                            if seeds[x]:
                                stack[size] = start + x
                                size += 1
    return strong + flood(edge_map, map_width, r0 + 1, r1, stack, size)


@helper
def edge_maps(addresses, sizes, channels, gray, gray_off, heights, widths, hists, item_image, item_r0, item_r1,
              order, claimed, ksize, l2, low, high, maps, map_off, equalized, eq_off, keep, counts):
    """One worker's share: Canny map and EDGE count of the items it claims (see :func:`_band_edges`).

    Each item's equalization LUT is made here from its image's histogram (``hists``), by the worker
    that needs it, not by the caller for all images first (a serial step of every call: a tenth
    of a call's time on 16 threads). Scratch buffers are allocated once per call, for the widest
    image and the largest item.
    """
    widest = 0
    largest = 0
    for it in range(order.shape[0]):
        widest = max(widest, widths[item_image[it]])
        largest = max(largest, (item_r1[it] - item_r0[it]) * widths[item_image[it]])
    ints, bytes_ = _scratch_sizes(widest, ksize)
    scratch_owner = np.empty(ints, np.int32)
    seeds_owner = np.empty(bytes_, np.uint8)
    stack_owner = np.empty(largest, np.int64)
    lut_owner = np.empty(256, np.uint8)
    scratch, seeds, stack = _borrowed(scratch_owner), _borrowed(seeds_owner), _borrowed(stack_owner)
    lut = _borrowed(lut_owner)
    gray, maps, equalized, hists = _borrowed(gray), _borrowed(maps), _borrowed(equalized), _borrowed(hists)
    k = _claim(claimed)
    while k < order.shape[0]:
        it = order[k]
        i = item_image[it]
        pixels = heights[i] * widths[i]
        image = gray[gray_off[i]:gray_off[i] + pixels] if channels[i] == 3 else _image_at(addresses, sizes, i)
        edge_map = maps[map_off[i]:map_off[i] + (heights[i] + 2) * (widths[i] + 2)]
        eq = equalized[eq_off[i]:eq_off[i] + pixels] if keep else equalized
        equalize_lut(hists[i], pixels, lut)
        counts[it] = _band_edges(image, heights[i], lut, item_r0[it], item_r1[it], ksize, l2, low,
                                 high, edge_map, eq, keep, scratch, seeds, stack)
        k = _claim(claimed)
    _keep_alive(scratch_owner)  # numba frees a local after its last use: the views need it until here
    _keep_alive(seeds_owner)
    _keep_alive(stack_owner)
    _keep_alive(lut_owner)


@helper
def _join_image_bands(edge_map, height, width, band_starts):
    """Continue the flood of one image across the seams above each row of ``band_starts``.

    Returns how many pixels it marked.
    """
    map_width = width + 2
    stack = np.empty(height * width, np.int64)  # each pixel is pushed at most once
    size = 0
    for r0 in band_starts:
        upper = r0 * map_width  # map row of image row r0 - 1
        for a, b in ((upper, upper + map_width), (upper + map_width, upper)):
            for x in range(1, map_width - 1):
                if edge_map[a + x] == EDGE:
                    for q in (b + x - 1, b + x, b + x + 1):
                        if edge_map[q] == WEAK:
                            edge_map[q] = EDGE
                            stack[size] = q
                            size += 1
    return size + flood(edge_map, map_width, 1, height, stack, size)


@helper
def join_bands(maps, map_off, heights, widths, item_r0, first_item, item_count, claimed, marked):
    """One worker's share: continue the flood across the seams of the images cut into several
    bands that it claims.

    After :func:`edge_maps` every band is closed under the flood; what is missing can only
    enter through an EDGE pixel next to a WEAK one across a seam. Those are pushed and flooded
    over the whole image, which completes the reachability exactly.
    """
    i = _claim(claimed)
    while i < first_item.shape[0]:
        if item_count[i] > 1:
            size = (heights[i] + 2) * (widths[i] + 2)
            marked[i] = _join_image_bands(maps[map_off[i]:map_off[i] + size], heights[i], widths[i],
                                          item_r0[first_item[i] + 1:first_item[i] + item_count[i]])
        i = _claim(claimed)
