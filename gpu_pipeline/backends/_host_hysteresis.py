"""Hysteresis finished on the host, for the GPU backends past their bound on device launches.

Both GPU backends propagate hysteresis across tiles by relaunching a tile-local kernel; a weak
chain that snakes against the order the blocks read their halos needs about one launch per tile it
crosses (hundreds at 256x256, thousands beyond). The backends stop after a fixed number of
launches and finish here: a stack flood from every strong pixel, exact reachability, linear in the
pixels. States use the GPU kernels' codes (0 not an edge, 1 weak, 2 strong); only numba's CPU
target is needed (no GPU stack).
"""

from __future__ import annotations

import numpy as np

from gpu_pipeline.backends._numba_setup import helper  # the cache folder keyed by every kernel source

WEAK, STRONG = 1, 2


@helper
def finish_hysteresis(states: np.ndarray) -> None:
    """Promote, in place, every WEAK pixel of ``states`` (images, height, width) 8-connected to a
    STRONG one through WEAK pixels: the fixed point the device launches were converging to."""
    count, height, width = states.shape
    stack = np.empty(height * width, np.int64)
    for image in range(count):
        plane = states[image]
        size = 0
        for y in range(height):
            for x in range(width):
                if plane[y, x] == STRONG:
                    stack[size] = y * width + x
                    size += 1
        while size > 0:
            size -= 1
            y, x = divmod(stack[size], width)
            for ny in range(max(0, y - 1), min(height, y + 2)):
                for nx in range(max(0, x - 1), min(width, x + 2)):
                    if plane[ny, nx] == WEAK:
                        plane[ny, nx] = STRONG  # marked when pushed: each pixel enters the stack once
                        stack[size] = ny * width + nx
                        size += 1
