"""The streaming batch engine: decode pool -> batches -> backend -> labels -> sink.

The data plane is batch-native: a backend returns one :class:`BatchResult` (histograms as one
(N, 256) array, edge counts as one array), the labeller labels the batch in one call, and the sink
gets one :class:`~gpu_pipeline.outputs.records.RecordBatch` that it encodes in one go. What is left per
image in Python is the decode call and a line of text.

Memory is bounded by pixels whatever the number or size of the files (docs/benchmarks.md, "Memory"):
the decode pool holds at most ``prefetch_pixels`` decoded pixels waiting for the engine, plus, per
decode thread, one chunk being decoded (``DECODE_CHUNK_PIXELS`` and at most one image more); a batch
holds at most ``batch_pixels`` pixels or one image. Records come out in input order. Every path
yields exactly one record: a result or an error.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from gpu_pipeline.backends.base import Backend, BatchResult
from gpu_pipeline.labels.labeller import Labeller, default_labels
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.inputs.decode import DecodeError, decode_image
from gpu_pipeline.outputs.records import RecordBatch

#: The GIL switch interval during a run (Python's default is 5 ms). A thread coming back from GIL-free
#: work (a JPEG decode, a kernel, a read) waits for the GIL until the thread holding it yields, at
#: most this long; with 5 ms, decode threads stalled behind the record encoding and the process
#: used 1.4 of 2 cores. Measured in one process on the 26,500 EuroSAT tiles, 2 decode threads,
#: quiet machine: 5,400-9,000 img/s at 5 ms, 9,700-10,000 at 1 ms, 8,200-8,900 at 0.2 ms.
GIL_SWITCH_INTERVAL_S = 0.001
#: Decoded pixels the decode pool may hold ready ahead of the engine: enough to keep decoding while
#: a CPU batch computes, small enough that memory stays low (16 MP is 48 MB of RGB).
DEFAULT_PREFETCH_PIXELS = 16 * 1024 * 1024


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

    def add_batch(self, records: RecordBatch) -> None:
        """Count a batch of records at once (what :meth:`add` does for each)."""
        for record in records.errors.values():
            self.add(record)
        self.ok += len(records.labels)
        self.pixels += int(np.dot(records.widths, records.heights)) if records.labels else 0
        self.labels.update(records.labels)

    @property
    def total(self) -> int:
        return self.ok + self.failed

    @property
    def megapixels_per_second(self) -> float:
        return self.pixels / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
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


#: Pixels a decode thread decodes before it hands them over: 64 EuroSAT tiles, or one scene.
DECODE_CHUNK_PIXELS = 256 * 1024
#: Images in one chunk at most, and at first (one, so that big scenes never queue behind each other
#: on one thread before their size is known).
MOST_CHUNK_IMAGES = 256
FIRST_CHUNK_IMAGES = 1


class _DecodePool:
    """Decode threads that take chunks of paths and hand decoded chunks over in input order.

    A thread takes a chunk (as many paths as ``DECODE_CHUNK_PIXELS`` is worth at the average
    image size seen so far) and decodes it in parts: a part ends once it holds
    ``DECODE_CHUNK_PIXELS`` pixels, so a wrong guess (tiles, then scenes) costs at most one image
    more. A part waits until the pixels ready ahead of the consumer leave room for it, unless it
    is the very part the consumer waits for (so the pool cannot deadlock on a huge image).
    """

    def __init__(self, paths: Iterable[Path], options: DecodeOptions, threads: int,
                 prefetch_pixels: int, prefetch_images: int | None, chunk_pixels: int) -> None:
        self._paths = iter(paths)
        self._options = options
        self._prefetch_pixels = prefetch_pixels
        self._prefetch_images = prefetch_images
        self._chunk_pixels = chunk_pixels
        self._cond = threading.Condition()
        self._next_chunk = 0
        self._ready: dict[tuple[int, int], tuple[list[Decoded], int, bool]] = {}
        self._wanted = (0, 0)  # (chunk, part) the consumer takes next
        self._held_pixels = self._held_images = 0
        self._seen_pixels = self._seen_images = 0
        self._running = threads
        self._closed = False
        self._failure: BaseException | None = None
        self._threads = [threading.Thread(target=self._work, name=f"decode_{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _chunk_length(self) -> int:
        """Paths per chunk, from the average size seen so far (under the lock)."""
        if self._seen_images == 0:
            length = FIRST_CHUNK_IMAGES
        else:
            length = int(self._chunk_pixels * self._seen_images // max(1, self._seen_pixels))
        if self._prefetch_images is not None:
            length = min(length, self._prefetch_images)
        return max(1, min(length, MOST_CHUNK_IMAGES))

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._closed:
                        return
                    chunk = list(islice(self._paths, self._chunk_length()))
                    number = self._next_chunk
                    self._next_chunk += 1
                if not chunk:
                    return
                self._decode_chunk(number, chunk)
        except BaseException as exc:  # the path iterator failed: the consumer re-raises it
            with self._cond:
                self._failure = self._failure or exc
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _decode_chunk(self, number: int, chunk: list[Path]) -> None:
        part, items, pixels = 0, [], 0
        for index, path in enumerate(chunk):
            item = _decode(path, self._options)
            items.append(item)
            if item.image is not None:
                pixels += item.image.shape[0] * item.image.shape[1]
            last = index == len(chunk) - 1
            if last or pixels >= self._chunk_pixels:
                if not self._hand_over((number, part), items, pixels, last):
                    return
                part, items, pixels = part + 1, [], 0

    def _hand_over(self, key: tuple[int, int], items: list[Decoded], pixels: int, last: bool) -> bool:
        """Wait for room, then make ``items`` ready; False when the consumer has gone."""
        images = sum(item.image is not None for item in items)
        with self._cond:
            self._seen_images += images
            self._seen_pixels += pixels
            while not self._closed and key != self._wanted and not self._has_room(pixels, len(items)):
                self._cond.wait()
            if self._closed:
                return False
            self._ready[key] = (items, pixels, last)
            self._held_pixels += pixels
            self._held_images += len(items)
            self._cond.notify_all()
        return True

    def _has_room(self, pixels: int, images: int) -> bool:
        if self._held_pixels + pixels > self._prefetch_pixels:
            return False
        return self._prefetch_images is None or self._held_images + images <= self._prefetch_images

    def __iter__(self) -> Iterator[Decoded]:
        """Decoded images in input order; closing the iterator stops the threads."""
        try:
            while True:
                with self._cond:
                    while self._wanted not in self._ready and self._running and self._failure is None:
                        self._cond.wait()
                    if self._failure is not None:
                        raise self._failure
                    if self._wanted not in self._ready:
                        return
                    items, pixels, last = self._ready.pop(self._wanted)
                    self._held_pixels -= pixels
                    self._held_images -= len(items)
                    chunk, part = self._wanted
                    self._wanted = (chunk + 1, 0) if last else (chunk, part + 1)
                    self._cond.notify_all()
                yield from items
        finally:
            self.close()

    def close(self) -> None:
        """Stop taking paths; threads finish the image they decode and end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()


def decode_stream(paths: Iterable[Path], options: DecodeOptions, workers: int, prefetch: int | None = None,
                  prefetch_pixels: int = DEFAULT_PREFETCH_PIXELS,
                  chunk_pixels: int = DECODE_CHUNK_PIXELS) -> Iterator[Decoded]:
    """Decode on ``workers`` threads (Pillow, libjpeg-turbo and tifffile release the GIL), in order.

    At most ``prefetch_pixels`` decoded pixels (and, with ``prefetch``, that many images) wait
    ready ahead of the consumer; each thread also holds the part it is decoding (about
    ``chunk_pixels`` pixels, one image more at most). Tiles go to the threads in chunks of many
    images, big scenes one per thread, so every thread decodes whatever the image size.
    """
    return iter(_DecodePool(paths, options, max(1, workers), prefetch_pixels, prefetch, chunk_pixels))


def batches(decoded: Iterator[Decoded], batch_size: int | None, batch_pixels: int) -> Iterator[list[Decoded]]:
    """Group in input order (at most ``batch_size`` images, if given, and ``batch_pixels`` pixels,
    or one image alone); errors ride along so records keep the input order."""
    most_images = batch_size if batch_size is not None else 1 << 62
    batch: list[Decoded] = []
    images = pixels = 0
    for item in decoded:
        image = item.image
        size = image.shape[0] * image.shape[1] if image is not None else 0
        if images and pixels + size > batch_pixels:
            yield batch
            batch, images, pixels = [], 0, 0
        batch.append(item)
        if image is not None:
            images += 1
            pixels += size
            if images >= most_images:
                yield batch
                batch, images, pixels = [], 0, 0
    if batch:
        yield batch


def _checked(backend: Backend, images: Sequence[np.ndarray], config: PipelineConfig,
             keep_images: bool) -> BatchResult:
    result = backend.process(images, config, keep_images)
    if not isinstance(result, BatchResult):  # a backend that still returns one result per image
        result = BatchResult.from_results(list(result))
    if len(result) != len(images):
        raise RuntimeError(f"backend {backend.name} returned {len(result)} results for {len(images)} images")
    return result


@dataclass
class Outcome:
    """A computed batch: ``result`` for the images that succeeded (in order), the exception of
    each one that failed, by its index in the batch's images."""

    result: BatchResult
    failed: dict[int, BaseException] = field(default_factory=dict)


def _compute(backend: Backend, images: Sequence[np.ndarray], config: PipelineConfig,
             keep_images: bool) -> Outcome:
    """Run a batch; if it fails, run its images one by one so only the culprit gets an error."""
    try:
        return Outcome(_checked(backend, images, config, keep_images))
    except Exception as exc:
        if len(images) == 1:
            return Outcome(BatchResult.empty(0, keep_images), {0: exc})
    good, failed = [], {}
    for index, image in enumerate(images):
        try:
            good.append(_checked(backend, [image], config, keep_images)[0])
        except Exception as exc:
            failed[index] = exc
    return Outcome(BatchResult.from_results(good) if good else BatchResult.empty(0, keep_images), failed)


@dataclass
class Engine:
    """One configured run. ``run`` streams ``paths`` through the backend into ``sink``.

    ``batch_size`` (images) and ``batch_pixels`` cap a batch; None lets the backend choose
    (:meth:`Backend.batch_pixels`: small batches for CPU backends, large ones for GPUs).
    ``workers`` is the number of decode threads.
    """

    backend: Backend
    config: PipelineConfig = field(default_factory=PipelineConfig)
    decode_options: DecodeOptions = field(default_factory=DecodeOptions)
    batch_size: int | None = None
    batch_pixels: int | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 2)
    prefetch_pixels: int = DEFAULT_PREFETCH_PIXELS
    #: Labels each batch of computed images (:data:`gpu_pipeline.labels.labeller.Labeller`).
    labels_of: Labeller = default_labels
    #: Called with each image's edge map (uint8 0/255) when set, e.g. to save it.
    on_edges: Callable[[Path, np.ndarray], None] | None = None

    def pixels_per_batch(self) -> int:
        return self.batch_pixels if self.batch_pixels is not None else self.backend.batch_pixels()

    def run(self, paths: Sequence[Path], sink, progress: Callable[[int], None] | None = None,
            stop: threading.Event | None = None) -> RunSummary:
        """Process ``paths`` into ``sink``. Setting ``stop`` ends the run after the batches in flight.

        Three stages overlap: the decode pool fills batch n + 1 while the backend computes batch n
        in the engine's compute thread (kernels release the GIL) and this thread turns batch n - 1
        into records and writes them.
        """
        previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(previous_interval, GIL_SWITCH_INTERVAL_S))
        try:
            return self._run(paths, sink, progress, stop)
        finally:
            sys.setswitchinterval(previous_interval)

    def _run(self, paths: Sequence[Path], sink, progress: Callable[[int], None] | None,
             stop: threading.Event | None) -> RunSummary:
        summary = RunSummary()
        start = time.perf_counter()
        batch_pixels = self.pixels_per_batch()
        # room for a whole batch ahead, so the next batch is ready when the backend wants it
        prefetch_pixels = max(self.prefetch_pixels, batch_pixels)
        stream = batches(decode_stream(paths, self.decode_options, self.workers, prefetch_pixels=prefetch_pixels),
                         self.batch_size, batch_pixels)
        in_flight: tuple[list[Decoded], Future] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute") as compute:
            try:
                for batch in stream:
                    if stop is not None and stop.is_set():
                        summary.interrupted = True
                        break
                    computing = (batch, compute.submit(self._outcome, batch))
                    if in_flight is not None:
                        self._write(*in_flight, sink, summary, progress)
                    in_flight = computing
                if in_flight is not None:
                    self._write(*in_flight, sink, summary, progress)
            finally:  # stops the decode pool: running decodes finish, nothing new starts
                stream.close()
        summary.seconds = time.perf_counter() - start
        return summary

    def _outcome(self, batch: list[Decoded]) -> Outcome:
        """The backend's results for the decoded images of the batch, and its failures."""
        images = [item.image for item in batch if item.image is not None]
        keep = self.on_edges is not None
        if not images:
            return Outcome(BatchResult.empty(0, keep))
        return _compute(self.backend, images, self.config, keep_images=keep)

    def _write(self, batch: list[Decoded], outcome: Future, sink, summary: RunSummary,
               progress: Callable[[int], None] | None) -> None:
        records = self.records(batch, outcome.result())
        summary.add_batch(records)
        sink.write(records)
        if progress is not None:
            progress(len(records))

    def records(self, batch: list[Decoded], outcome: Outcome) -> RecordBatch:
        """The batch's records, in input order: one label call for the batch, no dict per image."""
        errors: dict[int, dict] = {}
        images = [item.image for item in batch]
        if not outcome.failed and all(image is not None for image in images):  # the usual batch
            return self._record_batch(batch, batch, images, outcome.result, errors)
        computed: list[Decoded] = []
        image_index = 0
        for position, item in enumerate(batch):
            if item.image is None:
                errors[position] = item.error
                continue
            exc = outcome.failed.get(image_index)
            image_index += 1
            if exc is not None:
                errors[position] = error_record(item.path, "compute", one_line(exc))
            else:
                computed.append(item)
        return self._record_batch(batch, computed, [item.image for item in computed], outcome.result, errors)

    def _record_batch(self, batch: list[Decoded], computed: list[Decoded], images: list[np.ndarray],
                      result: BatchResult, errors: dict[int, dict]) -> RecordBatch:
        """Label the ``computed`` images (in one call), save their edges if asked, and gather the records."""
        labels = list(self.labels_of(images, result.histograms, result.edge_counts)) if computed else []
        histograms, edge_counts = result.histograms, result.edge_counts
        if self.on_edges is not None:
            saved = self._save_edges(batch, computed, result, errors)
            if not saved.all():  # those images have an error record instead
                images = [image for image, ok in zip(images, saved) if ok]
                labels = [label for label, ok in zip(labels, saved) if ok]
                histograms, edge_counts = histograms[saved], edge_counts[saved]
        shapes = [image.shape for image in images]
        return RecordBatch(
            paths=[str(item.path) for item in batch], errors=errors, backend=self.backend.name,
            widths=[shape[1] for shape in shapes], heights=[shape[0] for shape in shapes],
            bands=[1 if len(shape) == 2 else shape[2] for shape in shapes], histograms=histograms,
            edge_counts=edge_counts.tolist(), labels=labels)

    def _save_edges(self, batch: list[Decoded], computed: list[Decoded], result: BatchResult,
                    errors: dict[int, dict]) -> np.ndarray:
        """Hand each edge map to ``on_edges``; a failure turns that image's record into an error.

        Returns which of the computed images were saved.
        """
        position_of = {id(item): position for position, item in enumerate(batch)}
        saved = np.ones(len(computed), bool)
        for k, item in enumerate(computed):
            try:
                self.on_edges(item.path, result.edges[k])
            except Exception as exc:
                errors[position_of[id(item)]] = error_record(item.path, "save-edges", one_line(exc))
                saved[k] = False
        return saved
