"""The images a benchmark runs on: synthetic farmland scenes and 64x64 tiles written as files,
then decoded into a :class:`Corpus` (or the user's own files, decoded the same way)."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import shutil
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.errors import UsageError, one_line
from gpu_pipeline.engine.decoding import decode_stream
from gpu_pipeline.inputs.decode import decode_image
from gpu_pipeline.outputs.files import STALE_AFTER_S, is_running

#: The compute runs keep the decoded corpus in memory: it holds at most this many pixels.
MAX_CORPUS_PIXELS = 256 * 1024 * 1024
TILE_SIZE = 64
FORMATS = {"jpeg": (".jpg", {"quality": 90}), "png": (".png", {"compress_level": 6})}

#: Land-cover colours (RGB in [0, 1]) of the parcels: crops, forest, bare soil, dry grass, water, built-up.
LAND_COVER = np.array([[0.30, 0.42, 0.20], [0.16, 0.28, 0.16], [0.50, 0.40, 0.30], [0.62, 0.56, 0.38],
                       [0.14, 0.20, 0.28], [0.55, 0.54, 0.52]], np.float32)
#: Typical parcel side in pixels (fields at a fixed ground resolution).
PARCEL = 40


def synthetic_scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB image that looks like farmland from above, not the speckle of pure noise.

    Parcels of land-cover colours in irregular strips (sharp boundaries), lit by smooth fields
    at three scales, crossed by a few roads, with fine noise: Canny then finds chains of edges
    as in real imagery (about 3% of the pixels of a 512x512 scene with the default settings).
    """
    image = _parcels(rng, height, width)
    light = sum(weight * _smooth_field(rng, cells, height, width, 1)
                for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)))
    image *= 0.6 + 0.8 * light
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    for _ in range(max(1, (height + width) // 400)):  # straight roads, at any angle
        angle = rng.uniform(0, np.pi)
        centre = rng.uniform(0, height), rng.uniform(0, width)
        distance = np.abs((rows - centre[0]) * np.cos(angle) - (cols - centre[1]) * np.sin(angle))
        image[distance < rng.uniform(1, 2.5)] = 0.75
    image += 0.02 * rng.standard_normal((height, width, 1), dtype=np.float32)  # sensor noise, same in each band
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def _parcels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Strips of random height, each cut into fields of random width and land cover."""
    image = np.empty((height, width, 3), np.float32)
    top = 0
    while top < height:
        bottom = top + int(rng.integers(PARCEL // 2, 2 * PARCEL))
        left = 0
        while left < width:
            right = left + int(rng.integers(PARCEL // 2, 3 * PARCEL))
            image[top:bottom, left:right] = LAND_COVER[rng.integers(len(LAND_COVER))] * rng.uniform(0.8, 1.2)
            left = right
        top = bottom
    return image


def _smooth_field(rng: np.random.Generator, cells: int, height: int, width: int, bands: int) -> np.ndarray:
    """A random ``cells`` x ``cells`` grid in [0, 1), upsampled bicubically: (height, width, bands)."""
    grid = rng.random((cells, cells, bands), dtype=np.float32)
    down, down_weights = _cubic_taps(cells, height)
    across, across_weights = _cubic_taps(cells, width)
    rows = np.einsum("yk,ykxb->yxb", down_weights, grid[down])  # (height, cells, bands)
    return np.einsum("xk,yxkb->yxb", across_weights, rows[:, across])


def _cubic_taps(cells: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``size`` output pixels, its 4 grid neighbours (clamped) and Catmull-Rom weights."""
    centre = (np.arange(size) + 0.5) * cells / size - 0.5
    base = np.floor(centre).astype(np.int64)
    offsets = np.arange(-1, 3)
    distance = np.abs(offsets - (centre - base)[:, None])
    a = -0.5
    weights = np.where(distance <= 1, ((a + 2) * distance - (a + 3)) * distance ** 2 + 1,
                       np.where(distance < 2, a * (((distance - 5) * distance + 8) * distance - 4), 0.0))
    return np.clip(base[:, None] + offsets, 0, cells - 1), weights.astype(np.float32)


def cut_tiles(scenes: Iterable[np.ndarray], count: int, size: int = TILE_SIZE) -> list[np.ndarray]:
    """``count`` tiles of ``size`` x ``size``, cut row by row from ``scenes`` in turn."""
    tiles: list[np.ndarray] = []
    source = iter(scenes)
    while len(tiles) < count:
        scene = next(source)
        height, width = scene.shape[:2]
        tiles += [np.ascontiguousarray(scene[top:top + size, left:left + size])
                  for top in range(0, height - size + 1, size) for left in range(0, width - size + 1, size)]
    return tiles[:count]


def write_images(images: Iterable[np.ndarray], folder: Path, prefix: str,
                 formats: Sequence[str] = ("jpeg",)) -> dict[str, list[Path]]:
    """Write each image once per format (JPEG quality 90, PNG level 6), one at a time."""
    from PIL import Image

    written: dict[str, list[Path]] = {fmt: [] for fmt in formats}
    for index, image in enumerate(images):
        picture = Image.fromarray(image)
        for fmt in formats:
            suffix, options = FORMATS[fmt]
            path = folder / f"{prefix}_{index:05d}{suffix}"
            picture.save(path, format=fmt.upper(), **options)
            written[fmt].append(path)
    return written


def generate_corpus(folder: Path, *, count: int, width: int, height: int, tiles: int, fmt: str,
                    tile_sources: Sequence[Path] = (), seed: int = 0) -> tuple[list[Path], dict]:
    """Write ``count`` synthetic scenes and ``tiles`` 64x64 tiles into ``folder``.

    Tiles are cut from ``tile_sources`` (the bundled real scenes), then from synthetic
    1024x1024 scenes when those run out. Returns the files and a description of the corpus.
    """
    rng = np.random.default_rng(seed)
    scenes = (synthetic_scene(rng, height, width) for _ in range(count))
    paths = write_images(scenes, folder, "scene", [fmt])[fmt]
    available = 0
    if tiles:
        real = [decode_image(path, DecodeOptions()) for path in tile_sources]
        available = sum((im.shape[0] // TILE_SIZE) * (im.shape[1] // TILE_SIZE) for im in real)
        synthetic = (synthetic_scene(rng, 1024, 1024) for _ in itertools.count())
        paths += write_images(cut_tiles(itertools.chain(real, synthetic), tiles), folder, "tile", [fmt])[fmt]
    details = {
        "source": "generated", "format": fmt, "seed": seed,
        "scenes": {"count": count, "width": width, "height": height},
        "tiles": {"count": tiles, "size": TILE_SIZE, "from_bundled_scenes": min(tiles, available),
                  "from_synthetic_scenes": max(0, tiles - available)},
    }
    return paths, details


@dataclass
class Corpus:
    """The files to benchmark and their decoded pixels (same order)."""

    paths: list[Path]
    images: list[np.ndarray]
    details: dict = field(default_factory=dict)
    #: Error records of the files that could not be decoded (left out).
    skipped: list[dict] = field(default_factory=list)
    #: The files cv2.imread cannot read (a float TIFF, more than 4 bands): left out of the rows
    #: that decode with it (:func:`gpu_pipeline.bench.measuring.readable_by_opencv`).
    opencv_unreadable: list[str] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        return sum(image.shape[0] * image.shape[1] for image in self.images)

    def shapes(self) -> dict[str, int]:
        """How many images of each shape, e.g. ``{"512x512x3": 16}`` (width x height x bands)."""
        return dict(Counter("x".join(map(str, (im.shape[1], im.shape[0], *im.shape[2:]))) for im in self.images))

    def spread_subset(self, megapixels: float) -> Corpus:
        """Every k-th image, with the smallest k that stays within ``megapixels`` (at least one image)."""
        step = spread_step([im.shape[0] * im.shape[1] for im in self.images], megapixels)
        return Corpus(self.paths[::step], self.images[::step], self.details)


def spread_step(pixels: Sequence[int], megapixels: float) -> int:
    """The smallest k for which every k-th item of ``pixels`` (from the first) adds up to at most
    ``megapixels``; ``len(pixels)`` (the first item alone) when none does."""
    budget = megapixels * 1e6
    step = max(1, min(len(pixels), math.ceil(sum(pixels) / budget)))
    while step < len(pixels) and sum(pixels[::step]) > budget:
        step += 1
    return step


def load_corpus(paths: Sequence[Path], details: dict, options: DecodeOptions, workers: int,
                max_pixels: int = MAX_CORPUS_PIXELS) -> Corpus:
    """Decode ``paths`` (with the engine's decode pool) up to ``max_pixels`` in all."""
    corpus = Corpus([], [], dict(details))
    pixels = 0
    with contextlib.closing(decode_stream(paths, options, workers, prefetch=4 * workers)) as stream:
        for item in stream:
            if item.image is None:
                corpus.skipped.append(item.error)
                continue
            size = item.image.shape[0] * item.image.shape[1]
            if corpus.images and pixels + size > max_pixels:
                corpus.details["truncated"] = (f"the first {len(corpus.images)} of {len(paths)} files: the decoded "
                                               f"corpus is capped at {max_pixels / 1e6:.0f} MP")
                break
            corpus.paths.append(item.path)
            corpus.images.append(item.image)
            pixels += size
    return corpus


#: ``gpu-pipeline-bench-PID-XXXXXXXX``: the temporary folder of a bench's generated corpus, in process PID.
_CORPUS_FOLDER = re.compile(r"\Agpu-pipeline-bench-(?P<pid>[0-9]+)-[^/]+\Z")
#: The file a bench writes first into its corpus folder: only a folder holding it is ever removed.
CORPUS_MARK = ".gpu-pipeline-bench-corpus"


@contextlib.contextmanager
def corpus_folder():
    """A temporary folder for the generated corpus, removed after the bench. One that a SIGKILL left
    (no clean-up runs then) is removed by a later bench: this user's, marked as a corpus, its process
    gone, the mark untouched for :data:`~gpu_pipeline.outputs.files.STALE_AFTER_S`."""
    try:
        parent = tempfile.gettempdir()
        remove_abandoned_corpora(parent)
        made = tempfile.TemporaryDirectory(prefix=f"gpu-pipeline-bench-{os.getpid()}-")
        (Path(made.name) / CORPUS_MARK).write_text(f"{os.getpid()}\n")
    except OSError as exc:  # (gettempdir: FileNotFoundError when no candidate is writable)
        raise UsageError(f"bench writes the corpus it generates into a temporary folder, and none is usable "
                         f"({exc.strerror or one_line(exc)}): set TMPDIR to a writable folder, or give PATHS") from None
    with made as folder:
        yield Path(folder)


def remove_abandoned_corpora(parent: str) -> None:
    """Remove the corpus folders of killed benches in ``parent``. Only a folder whose name, owner and
    mark say so: a folder of the user's that happens to be named alike (``gpu-pipeline-bench-2024-06``)
    is never touched."""
    found: list[tuple[str, int]] = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        found = [(entry.path, int(match["pid"])) for entry in entries if (match := _CORPUS_FOLDER.match(entry.name))]
    for path, pid in found:
        with contextlib.suppress(OSError):
            folder, mark = os.lstat(path), os.lstat(os.path.join(path, CORPUS_MARK))
            if (stat.S_ISDIR(folder.st_mode) and folder.st_uid == os.getuid() and stat.S_ISREG(mark.st_mode)
                    and mark.st_uid == os.getuid() and not is_running(pid)
                    and time.time() - mark.st_mtime > STALE_AFTER_S
                    and Path(path, CORPUS_MARK).read_text().strip() == str(pid)):
                shutil.rmtree(path)
