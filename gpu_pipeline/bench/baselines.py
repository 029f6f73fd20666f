"""The baselines beside the backends: OpenCV in a process pool (one process per core: what users
replace) and in threads, ``cv2.imread``, and the scikit-image pipeline in a process pool (whose workers are the module-level functions below, found by this
module's path in the spawned processes).

cv2 and skimage are optional: imported only inside the functions that use them.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine.cores import usable_cores
from gpu_pipeline.errors import first_line, is_utf8, one_line
from gpu_pipeline.inputs.decode import decode_image
from gpu_pipeline.diagnostics.verify import OpenCvOracle

OPENCV = "opencv"
OPENCV_POOL = "opencv-pool"
SKIMAGE_POOL = "skimage-pool"
#: Contenders besides the registered backends; ``--backends`` may name them too.
BASELINES = (OPENCV_POOL, OPENCV, SKIMAGE_POOL)


class OpenCvThreads(OpenCvOracle):
    """The contract's cv2 calls, one image per thread on ``threads`` threads (cv2 releases the
    GIL); cv2's own threading off, so that the threads do not oversubscribe the cores."""

    def __init__(self, threads: int | None = None) -> None:
        import cv2

        super().__init__(threads or usable_cores())
        cv2.setNumThreads(1)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="opencv")

    def process(self, images, config, keep_images=False):
        one = super().process
        return list(self._pool.map(lambda image: one([image], config, keep_images)[0], images))

    def close(self) -> None:
        self._pool.shutdown()


def read_with_opencv(path: Path) -> np.ndarray:
    """``cv2.imread`` (BGR or gray: the same work downstream as RGB), or ValueError when it cannot.

    A name that is not UTF-8 (its bytes as surrogate escapes) crashed cv2.imread (a segmentation
    fault, bench gone without a word): such a file's bytes are read here and decoded by
    ``cv2.imdecode``, the same decoder."""
    import cv2

    # OpenCV logs a file it cannot read ("[ WARN:0@0.18] ... OpenCV TIFF: Sorry, can not handle
    # images with 32-bit samples") on stderr, which carries only our messages: the caller names it.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    name = str(path)
    if is_utf8(name):
        image = cv2.imread(name, cv2.IMREAD_COLOR)
    else:
        image = cv2.imdecode(np.fromfile(name, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cv2.imread cannot read {path}")
    return image


def opencv_edge_count(image: np.ndarray) -> int:
    """The contract's cv2 calls with the default settings, on one image."""
    return OpenCvOracle().process([image], PipelineConfig())[0].edge_count


def skimage_unavailable_reason() -> str | None:
    """None when scikit-image imports, else why not and how to install it."""
    try:
        import skimage  # noqa: F401
    except Exception as exc:
        return f"scikit-image cannot be imported ({one_line(exc)}); install it with: pip install scikit-image"
    return None


def skimage_edge_count(image: np.ndarray) -> int:
    """What users run today: rgb2gray, a 256-bin histogram, equalize_hist, canny (sigma 1)."""
    from skimage import color, exposure, feature

    gray = color.rgb2gray(image) if image.ndim == 3 else image / 255.0
    exposure.histogram(gray, nbins=256)
    return int(feature.canny(exposure.equalize_hist(gray), sigma=1.0).sum())


# Process pools: each worker keeps its own copy of the images (compute mode: no pickling timed)
# and decodes files itself (end to end). ``kind`` picks the pipeline and the decoder.
_WORKER: dict[str, Any] = {}


def _worker_init(kind: str, paths: Sequence[Path], options: DecodeOptions) -> None:
    # A Ctrl-C reaches the terminal's whole process group: the bench ends the pool; its workers
    # printed a KeyboardInterrupt traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if kind == "opencv":
        import cv2

        cv2.setNumThreads(1)
        pipeline, read = opencv_edge_count, read_with_opencv
    else:
        pipeline, read = skimage_edge_count, (lambda path: decode_image(path, options))
    pipeline(np.zeros((8, 8, 3), np.uint8))  # imports happen now, not in a timed task
    _WORKER.update(pipeline=pipeline, read=read, images=[])
    for path in paths:
        try:
            _WORKER["images"].append(decode_image(path, options))
        except Exception as exc:  # raised here, the pool started a new worker, which raised again, forever
            _WORKER["error"] = f"{path}: {first_line(exc)}"  # (a file removed since bench read it): see _pause
            return


def _pipeline_on_image(index: int) -> int:
    return _WORKER["pipeline"](_WORKER["images"][index])


def _pipeline_on_file(path: Path) -> int:
    return _WORKER["pipeline"](_WORKER["read"](path))


def _pause(seconds: float) -> None:
    if "error" in _WORKER:  # start_pool's tasks: the worker could not read its images
        raise RuntimeError(_WORKER["error"])
    time.sleep(seconds)


def start_pool(kind: str, processes: int, paths: Sequence[Path], options: DecodeOptions):
    """A started ``multiprocessing.Pool`` (spawn: forking after OpenMP started is unsafe), every
    worker ready. ``kind``: "skimage" or "opencv"; ``paths``: the images each worker holds."""
    pool = multiprocessing.get_context("spawn").Pool(processes, _worker_init, (kind, list(paths), options))
    try:
        pool.map(_pause, [0.05] * processes * 2, chunksize=1)  # tasks on every worker: all initialised
    except BaseException:
        pool.terminate()  # (its workers would live on until this process ends)
        raise
    return pool


def _chunksize(count: int, processes: int) -> int:
    return max(1, count // (processes * 8))


def pool_compute(pool, count: int, processes: int) -> None:
    """The pool's pipeline on the ``count`` images its workers hold."""
    pool.map(_pipeline_on_image, range(count), chunksize=_chunksize(count, processes))


def pool_files(pool, paths: Sequence[Path], processes: int) -> None:
    """The pool's decoder and pipeline on ``paths``."""
    pool.map(_pipeline_on_file, paths, chunksize=_chunksize(len(paths), processes))
