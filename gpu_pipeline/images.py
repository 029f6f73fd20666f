"""Decoded images as the engine hands them to a backend: packed in a few buffers, described by arrays.

A batch of 8,192 tiles is one :class:`ImageBatch`, not 8,192 arrays: where each image lies
(``buffer_of``, ``offsets``) and its shape (``heights``, ``widths``, ``channels``) are int64
arrays, so the engine and a backend that reads them (the numba backend: the pixels' addresses in
one vector operation) spend no Python per image. It is also a ``Sequence`` of the images (each a
uint8 view, ``(H, W)`` or ``(H, W, 3)``), for the code that wants them one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ImageBatch(Sequence[np.ndarray]):
    """Images ``i`` is ``buffers[buffer_of[i]][offsets[i]:][:heights[i] * widths[i] * bands[i]]``,
    shaped ``(H, W)`` when ``channels[i]`` is 0, else ``(H, W, channels[i])``."""

    __slots__ = ("buffers", "buffer_of", "offsets", "heights", "widths", "channels")

    def __init__(self, buffers: list[np.ndarray], buffer_of: np.ndarray, offsets: np.ndarray,
                 heights: np.ndarray, widths: np.ndarray, channels: np.ndarray) -> None:
        self.buffers = buffers  # 1-D uint8, C-contiguous
        self.buffer_of = buffer_of
        self.offsets = offsets
        self.heights = heights
        self.widths = widths
        self.channels = channels

    @classmethod
    def of(cls, images: Sequence[np.ndarray]) -> ImageBatch:
        """``images`` as a batch: each image its own buffer (a copy only for a non-contiguous view)."""
        if isinstance(images, ImageBatch):
            return images
        images = [image if image.flags.c_contiguous else np.ascontiguousarray(image) for image in images]
        count = len(images)
        return cls([image.reshape(-1) for image in images], np.arange(count, dtype=np.int64),
                   np.zeros(count, np.int64), np.array([image.shape[0] for image in images], np.int64),
                   np.array([image.shape[1] for image in images], np.int64),
                   np.array([image.shape[2] if image.ndim == 3 else 0 for image in images], np.int64))

    @classmethod
    def stacked(cls, images: np.ndarray) -> ImageBatch:
        """A stack of same-shape images, ``(N, H, W)`` gray or ``(N, H, W, 3)`` RGB, as a batch over
        its memory (no copy when it is C-contiguous, else one): no Python object per image."""
        images = np.ascontiguousarray(images)
        count, height, width = images.shape[:3]
        channels = images.shape[3] if images.ndim == 4 else 0
        size = height * width * max(channels, 1)
        return cls([images.reshape(-1)], np.zeros(count, np.int64), np.arange(count, dtype=np.int64) * size,
                   np.full(count, height, np.int64), np.full(count, width, np.int64),
                   np.full(count, channels, np.int64))

    @classmethod
    def packed(cls, buffer: np.ndarray, layout: np.ndarray) -> ImageBatch:
        """Images in one ``buffer``; ``layout`` is int64 (N, 4): height, width, channels, offset."""
        layout = layout.reshape(-1, 4)
        return cls([buffer], np.zeros(len(layout), np.int64), layout[:, 3].copy(), layout[:, 0].copy(),
                   layout[:, 1].copy(), layout[:, 2].copy())

    @classmethod
    def empty(cls) -> ImageBatch:
        nothing = np.zeros(0, np.int64)
        return cls([], nothing, nothing, nothing, nothing, nothing)

    @classmethod
    def concatenate(cls, batches: Sequence[ImageBatch]) -> ImageBatch:
        if len(batches) == 1:
            return batches[0]
        if not batches:
            return cls.empty()
        first_buffer = np.cumsum([0] + [len(batch.buffers) for batch in batches[:-1]])
        return cls([buffer for batch in batches for buffer in batch.buffers],
                   np.concatenate([batch.buffer_of + first for batch, first in zip(batches, first_buffer)]),
                   *(np.concatenate([getattr(batch, name) for batch in batches])
                     for name in ("offsets", "heights", "widths", "channels")))

    def take(self, chosen: np.ndarray | slice) -> ImageBatch:
        """The images at ``chosen`` (indices, a mask or a slice), their buffers shared: only those
        they lie in. (A batch cut from a part of images in buffers of their own kept every buffer of
        the part, and each backend call took the address of each: 4 ms a call for a batch cut from
        4,096 tiles, half the numba backend's compute time on them. It also held the rest in memory.)"""
        buffer_of = self.buffer_of[chosen]
        buffers = self.buffers
        if len(buffers) > 1 and len(buffer_of):
            used, buffer_of = np.unique(buffer_of, return_inverse=True)
            buffer_of = buffer_of.reshape(-1).astype(np.int64, copy=False)
            if len(used) < len(buffers):
                buffers = [buffers[index] for index in used.tolist()]
            # (else every buffer is used, in order: unique's renumbering is the identity)
        elif not len(buffer_of):
            buffers = []
        return ImageBatch(buffers, buffer_of, self.offsets[chosen], self.heights[chosen], self.widths[chosen],
                          self.channels[chosen])

    def without_pixels(self) -> ImageBatch:
        """The same images' shapes, with no buffer: what records need once the pixels are computed."""
        nothing = np.zeros(len(self), np.int64)
        return ImageBatch([], nothing, nothing, self.heights, self.widths, self.channels)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(index)
        height, width, channels = int(self.heights[index]), int(self.widths[index]), int(self.channels[index])
        start = int(self.offsets[index])
        pixels = self.buffers[self.buffer_of[index]][start:start + height * width * max(channels, 1)]
        return pixels.reshape((height, width, channels) if channels else (height, width))

    def __iter__(self):
        return (self[index] for index in range(len(self)))

    @property
    def pixels(self) -> np.ndarray:
        """int64 (N,): height * width of each image."""
        return self.heights * self.widths

    @property
    def bands(self) -> np.ndarray:
        """int64 (N,): 1 for gray, 3 for RGB."""
        return np.maximum(self.channels, 1)

    def shape_groups(self) -> dict[tuple[int, ...], np.ndarray]:
        """The positions (int64, ascending) of the images of each shape, ``(H, W)`` or ``(H, W, 3)``,
        shapes in first-seen order: what batched GPU kernels, one shape a launch, are given."""
        if not len(self):
            return {}
        keys = np.stack([self.heights, self.widths, self.channels], axis=1)
        if (keys == keys[0]).all():  # the common case, a batch of tiles: no sort
            return {self._shape_of(keys[0]): np.arange(len(self), dtype=np.int64)}
        unique, first, inverse, counts = np.unique(keys, axis=0, return_index=True, return_inverse=True,
                                                   return_counts=True)
        members = np.split(np.argsort(inverse.reshape(-1), kind="stable"), np.cumsum(counts)[:-1])
        return {self._shape_of(unique[group]): members[group] for group in np.argsort(first).tolist()}

    @staticmethod
    def _shape_of(key: np.ndarray) -> tuple[int, ...]:
        height, width, channels = key.tolist()
        return (height, width, channels) if channels else (height, width)

    def copy_into(self, positions: np.ndarray, out: np.ndarray) -> None:
        """Copy the images at ``positions``, all of one shape, into ``out`` (``(len(positions), *shape)``,
        C-contiguous): one copy per run of them that lie one after the other in one buffer (a whole
        stack, or the tiles a decode process packed), not one per image."""
        if not out.flags.c_contiguous:  # a reshaped copy would take the pixels, not ``out``
            raise ValueError("copy_into needs a C-contiguous output")
        if not len(positions):
            return
        flat = out.reshape(len(positions), -1)
        size = flat.shape[1]
        buffer_of, offsets = self.buffer_of[positions], self.offsets[positions]
        breaks = np.flatnonzero((np.diff(buffer_of) != 0) | (np.diff(offsets) != size)) + 1
        starts = [0, *breaks.tolist()]
        for start, end in zip(starts, [*starts[1:], len(positions)]):
            first = int(offsets[start])
            flat[start:end] = self.buffers[buffer_of[start]][first:first + (end - start) * size].reshape(-1, size)

    def addresses(self) -> np.ndarray:
        """int64 (N,): the address of each image's first pixel (valid while the buffers live)."""
        bases = np.array([buffer.ctypes.data for buffer in self.buffers], np.int64)
        return bases[self.buffer_of] + self.offsets if len(self) else np.zeros(0, np.int64)


def pixel_counts(images: Sequence[np.ndarray]) -> np.ndarray:
    """int64 (N,): height * width of each image of a batch or a list (a list costs Python per image)."""
    if isinstance(images, ImageBatch):
        return images.pixels
    return np.array([image.shape[0] * image.shape[1] for image in images], dtype=np.int64)
