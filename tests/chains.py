"""Weak chains for hysteresis tests: paths that cross many tiles in every direction."""

from __future__ import annotations

import numpy as np


def spiral(side: int) -> np.ndarray:
    """A weak path spiralling inwards (every direction), a background ring between its turns, and the
    only strong pixel at its centre."""
    states = np.zeros((side, side), np.uint8)
    y, x, dy, dx = 0, 0, 0, 1
    visited = np.zeros((side + 2, side + 2), bool)  # a border that is never entered
    visited[0, :] = visited[-1, :] = visited[:, 0] = visited[:, -1] = True
    while True:
        states[y, x] = 1
        visited[y + 1, x + 1] = True
        ahead, beyond = (y + dy, x + dx), (y + 2 * dy, x + 2 * dx)
        if not visited[ahead[0] + 1, ahead[1] + 1] and not visited[beyond[0] + 1, beyond[1] + 1]:
            y, x = ahead
            continue
        dy, dx = dx, -dy  # turn right, keeping a ring of background from the path so far
        ahead, beyond = (y + dy, x + dx), (y + 2 * dy, x + 2 * dx)
        if visited[ahead[0] + 1, ahead[1] + 1] or visited[beyond[0] + 1, beyond[1] + 1]:
            break
        y, x = ahead
    states[y, x] = 2
    return states
