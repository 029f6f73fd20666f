"""The streaming batch engine: decode pool -> batches -> backend -> classify -> sink.

Memory is bounded whatever the number of files: at most ``batch_size + 2 * workers`` decoded
images, and about ``batch_pixels`` pixels, wait in the decode queue, and a batch holds at most
``batch_size`` images and ``batch_pixels`` pixels. Records come out in input order. Every path
yields exactly one record: a result or an error.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from gpu_pipeline.backends.base import Backend, StageResult
from gpu_pipeline.classify import Labeller, default_labels
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.io import DecodeError, decode_image

#: A batch never holds more pixels than this (about 200 MB of RGB), so huge scenes go alone.
DEFAULT_BATCH_PIXELS = 64 * 1024 * 1024


@dataclass
class RunSummary:
    ok: int = 0
    failed: int = 0
    pixels: int = 0
    seconds: float = 0.0
    labels: Counter = field(default_factory=Counter)
    failures_by_stage: Counter = field(default_factory=Counter)
    interrupted: bool = False

    def add(self, record: dict) -> None:
        """Count one record, a result or an error."""
        if "error" in record:
            self.failed += 1
            self.failures_by_stage[record["stage"]] += 1
        else:
            self.ok += 1
            self.pixels += record["width"] * record["height"]
            self.labels[record["label"]] += 1

    @property
    def total(self) -> int:
        return self.ok + self.failed

    @property
    def megapixels_per_second(self) -> float:
        return self.pixels / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Decoded:
    """One input after decoding: its pixels, or the error record that replaces its result."""

    path: Path
    image: np.ndarray | None = None
    error: dict | None = None


def error_record(path: Path | str, stage: str, message: str) -> dict:
    return {"path": str(path), "stage": stage, "error": message}


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _decode(path: Path, options: DecodeOptions) -> Decoded:
    try:
        return Decoded(path, image=decode_image(path, options))
    except DecodeError as exc:
        return Decoded(path, error=error_record(path, exc.stage, str(exc)))
    except Exception as exc:  # a decoder bug must not end the run
        return Decoded(path, error=error_record(path, "decode", one_line(exc)))


#: Paths per decode task: one task per image costs more in the thread pool than decoding a tile.
DECODE_CHUNK = 16


def _decode_all(paths: list[Path], options: DecodeOptions) -> list[Decoded]:
    return [_decode(path, options) for path in paths]


def decode_stream(paths: Iterable[Path], options: DecodeOptions, workers: int, prefetch: int,
                  prefetch_pixels: int | None = None) -> Iterator[Decoded]:
    """Decode in a thread pool (Pillow, libjpeg-turbo and tifffile release the GIL), in order.

    Paths go to the pool in chunks. At most ``prefetch`` images are decoded ahead of the consumer
    and, with ``prefetch_pixels``, about that many pixels (judged from the images seen so far, one
    chunk per worker until then): tiles run far ahead, big scenes only a few.
    """
    chunk = max(1, min(DECODE_CHUNK, prefetch))
    most_chunks = max(1, prefetch // chunk)
    seen_images = seen_pixels = 0

    def chunks_allowed() -> int:
        if prefetch_pixels is None:
            return most_chunks
        if seen_pixels == 0:
            return max(1, min(most_chunks, workers))
        chunk_pixels = chunk * seen_pixels / seen_images
        return max(1, min(most_chunks, int(prefetch_pixels // chunk_pixels)))

    path_iter = iter(paths)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future] = deque()
        try:
            while chunk_paths := list(islice(path_iter, chunk)):
                pending.append(pool.submit(_decode_all, chunk_paths, options))
                while len(pending) >= chunks_allowed():
                    items = pending.popleft().result()
                    for item in items:
                        if item.image is not None:
                            seen_images += 1
                            seen_pixels += item.image.shape[0] * item.image.shape[1]
                    yield from items
            while pending:
                yield from pending.popleft().result()
        finally:  # the consumer stopped early: drop what is queued
            for future in pending:
                future.cancel()


def batches(decoded: Iterator[Decoded], batch_size: int, batch_pixels: int) -> Iterator[list[Decoded]]:
    """Group in input order; errors ride along so records keep the input order."""
    batch: list[Decoded] = []
    images = pixels = 0
    for item in decoded:
        size = item.image.shape[0] * item.image.shape[1] if item.image is not None else 0
        if images and pixels + size > batch_pixels:
            yield batch
            batch, images, pixels = [], 0, 0
        batch.append(item)
        images += item.image is not None
        pixels += size
        if images >= batch_size:
            yield batch
            batch, images, pixels = [], 0, 0
    if batch:
        yield batch


def _checked(backend: Backend, images: Sequence[np.ndarray], config: PipelineConfig,
             keep_images: bool) -> list[StageResult]:
    results = list(backend.process(images, config, keep_images))
    if len(results) != len(images):
        raise RuntimeError(f"backend {backend.name} returned {len(results)} results for {len(images)} images")
    return results


def _compute(backend: Backend, images: Sequence[np.ndarray], config: PipelineConfig,
             keep_images: bool) -> list[StageResult | BaseException]:
    """Run a batch; if it fails, run its images one by one so only the culprit gets an error."""
    try:
        return _checked(backend, images, config, keep_images)
    except Exception as exc:
        if len(images) == 1:
            return [exc]
    results: list[StageResult | BaseException] = []
    for image in images:
        try:
            results.append(_checked(backend, [image], config, keep_images)[0])
        except Exception as exc:
            results.append(exc)
    return results


def result_record(path: Path, image: np.ndarray, result: StageResult, backend_name: str, label: str) -> dict:
    height, width = image.shape[:2]
    edge_count = int(result.edge_count)
    return {
        "path": str(path),
        "width": width,
        "height": height,
        "bands": 1 if image.ndim == 2 else image.shape[2],
        "backend": backend_name,
        "histogram": result.histogram.tolist(),
        "edge_count": edge_count,
        "edge_density": round(edge_count / (width * height), 6),
        "label": label,
    }


@dataclass
class Engine:
    """One configured run. ``run`` streams ``paths`` through the backend into ``sink``."""

    backend: Backend
    config: PipelineConfig = field(default_factory=PipelineConfig)
    decode_options: DecodeOptions = field(default_factory=DecodeOptions)
    batch_size: int = 256
    batch_pixels: int = DEFAULT_BATCH_PIXELS
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    #: Labels each batch of computed images (:data:`gpu_pipeline.classify.Labeller`).
    labels_of: Labeller = default_labels
    #: Called with each image's edge map (uint8 0/255) when set, e.g. to save it.
    on_edges: Callable[[Path, np.ndarray], None] | None = None

    def run(self, paths: Sequence[Path], sink, progress: Callable[[int], None] | None = None,
            stop: threading.Event | None = None) -> RunSummary:
        """Process ``paths`` into ``sink``. Setting ``stop`` ends the run after the batches in flight.

        Three stages overlap: the decode pool fills batch n + 1 while the backend computes batch n
        in the engine's compute thread (kernels release the GIL) and this thread turns batch n - 1
        into records and writes them.
        """
        summary = RunSummary()
        start = time.perf_counter()
        prefetch = self.batch_size + 2 * self.workers
        stream = batches(decode_stream(paths, self.decode_options, self.workers, prefetch, self.batch_pixels),
                         self.batch_size, self.batch_pixels)
        in_flight: tuple[list[Decoded], Future] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute") as compute:
            try:
                for batch in stream:
                    if stop is not None and stop.is_set():
                        summary.interrupted = True
                        break
                    computing = (batch, compute.submit(self._outcomes, batch))
                    if in_flight is not None:
                        self._write(*in_flight, sink, summary, progress)
                    in_flight = computing
                if in_flight is not None:
                    self._write(*in_flight, sink, summary, progress)
            finally:  # stops the decode pool: queued decodes are cancelled, running ones finish
                stream.close()
        summary.seconds = time.perf_counter() - start
        return summary

    def _outcomes(self, batch: list[Decoded]) -> list[StageResult | BaseException]:
        """The backend's result, or the exception, for each decoded image of the batch."""
        images = [item.image for item in batch if item.image is not None]
        if not images:
            return []
        return _compute(self.backend, images, self.config, keep_images=self.on_edges is not None)

    def _write(self, batch: list[Decoded], outcomes: Future, sink, summary: RunSummary,
               progress: Callable[[int], None] | None) -> None:
        results = outcomes.result()
        labels = self._labels([item.image for item in batch if item.image is not None], results)
        computed = iter(zip(results, labels))
        records = []
        for item in batch:
            record = item.error if item.image is None else self._record_for(item, *next(computed))
            summary.add(record)
            records.append(record)
        sink.write(records)
        if progress is not None:
            progress(len(records))

    def _labels(self, images: list[np.ndarray], outcomes: list[StageResult | BaseException]) -> list[str | None]:
        """The label of each computed image, in one call of the labeller; None where computing failed."""
        done = [i for i, outcome in enumerate(outcomes) if not isinstance(outcome, BaseException)]
        histograms = np.array([outcomes[i].histogram for i in done], dtype=np.int64).reshape(len(done), 256)
        edge_counts = np.array([outcomes[i].edge_count for i in done], dtype=np.int64)
        labels: list[str | None] = [None] * len(outcomes)
        for i, label in zip(done, self.labels_of([images[i] for i in done], histograms, edge_counts)):
            labels[i] = label
        return labels

    def _record_for(self, item: Decoded, outcome: StageResult | BaseException, label: str | None) -> dict:
        if isinstance(outcome, BaseException):
            return error_record(item.path, "compute", one_line(outcome))
        if self.on_edges is not None:
            try:
                self.on_edges(item.path, outcome.edges)
            except Exception as exc:
                return error_record(item.path, "save-edges", one_line(exc))
        return result_record(item.path, item.image, outcome, self.backend.name, label)
