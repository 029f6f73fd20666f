"""The Python API: the same data plane as ``gpu-pipeline run``, for notebooks and other programs.

* :func:`process` runs the pipeline on images already in memory and returns the batch arrays;
* :func:`run` streams files through the engine (decode pool, batches, labels) and yields one
  record per file, the same dicts ``gpu-pipeline run`` writes as JSON lines.

Backends are created once per backend name and thread count and kept for the life of the process,
so kernels are loaded (or compiled) once, whatever calls them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gpu_pipeline.backends import Backend, registry
from gpu_pipeline.backends.base import check_image
from gpu_pipeline.config import MOST_THREADS, DecodeOptions, PipelineConfig, whole_number
from gpu_pipeline.images import ImageBatch, pixel_counts
from gpu_pipeline.errors import printable


@dataclass
class Results:
    """What :func:`process` returns for N images, in order.

    ``histograms`` int64 (N, 256), ``edge_counts`` int64 (N,), ``labels`` one string per image;
    ``equalized`` and ``edges`` lists of uint8 images when asked for (``keep_images=True``).
    """

    histograms: np.ndarray
    edge_counts: np.ndarray
    labels: list[str]
    equalized: list[np.ndarray] | None = None
    edges: list[np.ndarray] | None = None


def shared_backend(name: str = "auto", threads: int | None = None) -> Backend:
    """The backend ``name`` (or the best available for ``auto``), created once per process.

    ValueError for an unknown name or a thread count below 1 (as the command line's exit 2)."""
    if threads is not None:
        threads = whole_number("threads", threads, least=1, most=MOST_THREADS)
    try:
        with _creating:  # lru_cache alone lets threads that miss at once each create one
            return _created(name, threads)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


_creating = threading.Lock()


def _unlock_after_fork() -> None:
    global _creating
    _creating = threading.Lock()  # a fork while another thread held it would leave it held for ever


os.register_at_fork(after_in_child=_unlock_after_fork)


@functools.lru_cache(maxsize=None)
def _created(name: str, threads: int | None) -> Backend:
    return registry.create(name, threads=threads)


def _checked_images(images) -> Sequence[np.ndarray]:
    """``images`` as the backends take them: one ImageBatch over a stack, or a list of checked images.

    ValueError, saying what to pass, for anything else: a single image is not a stack (an (H, W, 3)
    RGB image would read as H gray images 3 pixels wide), nor is a list of lists.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 2:
            raise ValueError(f"an array of shape {images.shape} is one image: pass [image], a stack "
                             "(N, H, W) or (N, H, W, 3), or a list of images")
        if images.ndim == 3 and images.shape[-1] == 3:
            raise ValueError(f"an array of shape {images.shape} is one RGB image, or a stack of gray images 3 "
                             "pixels wide: pass [image] for one image, a stack (N, H, W, 3), or a list of images")
        if images.ndim not in (3, 4):
            raise ValueError(f"expected a stack (N, H, W) or (N, H, W, 3) or a list of images, got shape {images.shape}")
        check_image(np.empty(images.shape[1:], images.dtype) if images.shape[0] == 0 else images[0])  # all share it
        return ImageBatch.stacked(images)
    images = list(images)
    for index, image in enumerate(images):
        try:
            check_image(image)
        except ValueError as exc:
            raise ValueError(f"image {index}: {exc}") from None
    return images


def process(images: Sequence[np.ndarray], *, backend: str = "auto", threads: int | None = None,
            low: float = 100.0, high: float = 200.0, l2: bool = False, blur: int = 5,
            keep_images: bool = False, model: str | None = None) -> Results:
    """Run the pipeline on uint8 gray (H, W) or RGB (H, W, 3) images in memory.

    Images of any mix of shapes go to the backend in its own batch sizes; the results are the
    same bytes as ``gpu-pipeline run`` on the same pixels. ``model`` labels with a model file or
    a shipped model (``eurosat``, ``eurosat-cnn``) instead of the default rule.

    A stack of same-shape images as one array, ``(N, H, W)`` gray or ``(N, H, W, 3)`` RGB, goes to
    the backend as it lies in memory, with no Python object per image (a list of the same tiles
    costs about 2 us an image more on the numba backend, on one thread or two).
    """
    from gpu_pipeline.labels.labeller import label_function

    config = PipelineConfig(low_threshold=low, high_threshold=high, l2_gradient=l2, blur_ksize=blur)
    images = _checked_images(images)
    chosen = shared_backend(backend, threads)
    parts = [chosen.process(images[start:end], config, keep_images)
             for start, end in _slices(pixel_counts(images), chosen.batch_pixels())]
    histograms = np.concatenate([p.histograms for p in parts]) if parts else np.zeros((0, 256), np.int64)
    edge_counts = np.concatenate([p.edge_counts for p in parts]) if parts else np.zeros(0, np.int64)
    labels = list(label_function(model, config)(images, histograms, edge_counts)) if images else []
    kept = (lambda name: [im for p in parts for im in getattr(p, name)]) if keep_images else (lambda name: None)
    return Results(histograms, edge_counts, labels, kept("equalized"), kept("edges"))


def _slices(pixels: np.ndarray, batch_pixels: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, end) runs of images of ``pixels`` pixels each, at most ``batch_pixels``
    pixels a run (or one image): one search a run, none an image."""
    ends = np.cumsum(pixels)
    start = before = 0
    while start < len(pixels):
        end = max(start + 1, int(np.searchsorted(ends, before + batch_pixels, side="right")))
        yield start, end
        start, before = end, int(ends[end - 1])


def run(paths: Iterable[str | os.PathLike[str]], *, backend: str = "auto", threads: int | None = None,
        workers: int | None = None, low: float = 100.0, high: float = 200.0, l2: bool = False, blur: int = 5,
        bands: tuple[int, ...] | None = None, stretch: str = "percentile", model: str | None = None,
        glob: str | None = None, decode: str = "auto") -> Iterator[dict]:
    """Yield one record per image file under ``paths`` (files and folders, searched recursively):
    the dicts ``gpu-pipeline run`` writes, results and errors, in input order. A file name that is
    not valid UTF-8 is as the command line writes it: ``path`` shows its bytes as ``\\xNN`` and
    ``path_bytes`` holds them exactly, in base64.

    The records are made in the caller's thread, a batch at a time, while the engine's own threads
    compute the next batch and decode ahead; closing the generator early stops them after the
    batches in flight.
    """
    from gpu_pipeline.labels.labeller import label_function
    from gpu_pipeline.engine.stream import Engine, early_fork_server
    from gpu_pipeline.inputs.discover import find_files
    from gpu_pipeline.inputs.processes import processes_wanted
    from gpu_pipeline.outputs.sink import as_written

    config = PipelineConfig(low_threshold=low, high_threshold=high, l2_gradient=l2, blur_ksize=blur)
    if workers is not None:
        workers = whole_number("workers", workers, least=1, most=MOST_THREADS)
    if isinstance(paths, (str, bytes, os.PathLike)):  # one path, not its characters
        paths = [paths]
    unlisted: list[tuple[str, str]] = []
    files = find_files(paths, glob=glob, unlisted=unlisted)
    for folder, reason in unlisted:  # (its images get no record: say so, as the command line does)
        warnings.warn(f"cannot list {printable(folder)} ({reason}); its images are not processed", RuntimeWarning,
                      stacklevel=2)
    processes = processes_wanted(decode)
    fork_server = early_fork_server(processes, len(files), workers)  # imports while the backend loads
    try:
        engine = Engine(backend=shared_backend(backend, threads), config=config,
                        decode_options=DecodeOptions(bands=bands, stretch=stretch),
                        workers=workers, processes=processes, labels_of=label_function(model, config),
                        fork_server=fork_server)
    except BaseException:
        if fork_server is not None:
            fork_server.close()
        raise
    with contextlib.closing(engine.record_batches(files)) as batches:  # closed with this generator
        for batch in batches:
            yield from as_written(batch)  # a name that is not UTF-8 as the command line writes it
