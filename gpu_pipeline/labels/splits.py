"""Held-out splits of labelled images: one stratified test draw, or stratified k folds."""

from __future__ import annotations

import numpy as np


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: ``round(fraction * n)`` images of each class (never all of them), by ``seed``."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(targets), dtype=bool)
    for target in np.unique(targets):
        members = np.flatnonzero(targets == target)
        count = min(len(members) - 1, int(fraction * len(members) + 0.5))
        test[rng.permutation(members)[:count]] = True
    return test


def stratified_folds(targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number (0 to ``folds - 1``) of each image: each class dealt round-robin, in an order drawn by ``seed``.

    Every fold gets ``n // folds`` or one more of the ``n`` images of each class.
    """
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(targets), dtype=np.int64)
    for target in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == target))
        fold[members] = np.arange(len(members)) % folds
    return fold
