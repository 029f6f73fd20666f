"""The streaming batch engine: decode pool -> batches -> backend -> labels -> sink.

The data plane is batch-native: a backend returns one :class:`BatchResult` (histograms as one
(N, 256) array, edge counts as one array), the labeller labels the batch in one call, and the sink
gets one :class:`~gpu_pipeline.outputs.records.RecordBatch` that it encodes in one go. Decoded images
travel as :class:`~gpu_pipeline.images.ImageBatch` parts; what is left per image in Python is the
decode call (in a decode process of its own with ``processes``) and a line of text.

Memory is bounded by pixels whatever the number or size of the files (docs/benchmarks.md, "Memory"):
the decode pool (:mod:`gpu_pipeline.engine.decoding`) holds at most ``prefetch_pixels`` decoded
pixels waiting for the engine and a part being decoded per decoder, large images within the memory
the run may use; a batch holds at most ``batch_pixels`` pixels or one image.
Records come out in input order. Every path yields exactly one record: a result or an error, until a
failed GPU (``DeviceFailed``) ends the run: the batches before it are whole, none after it has a record.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from gpu_pipeline.backends.base import Backend, BatchResult, DeviceFailed, raise_if_device_failed
from gpu_pipeline.labels.labeller import Labeller, default_labels
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine.decoding import (DEFAULT_PREFETCH_PIXELS, DecodedPart, Parts, decode_parts, decoder_count,
                                          decodes_in_processes, error_record, is_engine_thread, mark_engine_thread,
                                          processes_for_time_limit, processes_option)
from gpu_pipeline.engine.cores import usable_cores
from gpu_pipeline.errors import one_line, printable
from gpu_pipeline.images import ImageBatch
from gpu_pipeline.inputs.processes import ForkServer
from gpu_pipeline.outputs.records import RecordBatch
from gpu_pipeline.outputs.sink import SinkWriteError

#: The GIL switch interval during a run (Python's default is 5 ms). A thread coming back from GIL-free
#: work (a JPEG decode, a kernel, a read) waits for the GIL until the thread holding it yields, at
#: most this long; with 5 ms, decode threads stalled behind the record encoding and the process
#: used 1.4 of 2 cores. Measured in one process on the 26,500 EuroSAT tiles, 2 decode threads,
#: quiet machine: 5,400-9,000 img/s at 5 ms, 9,700-10,000 at 1 ms, 8,200-8,900 at 0.2 ms.
GIL_SWITCH_INTERVAL_S = 0.001
_open_runs = 0  # runs between short_gil_switches' entry and exit, in this process
_interval_lock = threading.Lock()
_interval_before = 0.005


def _forget_runs_after_fork() -> None:
    global _open_runs, _interval_lock
    _open_runs, _interval_lock = 0, threading.Lock()  # the parent's runs are not the child's


os.register_at_fork(after_in_child=_forget_runs_after_fork)


@contextlib.contextmanager
def short_gil_switches() -> Iterator[None]:
    """:data:`GIL_SWITCH_INTERVAL_S` while any run is open, the caller's interval again after the
    last one: runs that overlap (the API's generators) would each restore the interval they found,
    and the last to close could leave the whole process at the short one."""
    global _open_runs, _interval_before
    with _interval_lock:
        if _open_runs == 0:
            _interval_before = sys.getswitchinterval()
            sys.setswitchinterval(min(_interval_before, GIL_SWITCH_INTERVAL_S))
        _open_runs += 1
    try:
        yield
    finally:
        with _interval_lock:
            _open_runs -= 1
            if _open_runs == 0:
                sys.setswitchinterval(_interval_before)


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


#: Threads that save a batch's edge maps (``--save-edges``) at most: one per usable core, and two at
#: least, each given one run of the batch's maps (a task a map cost more in GIL hand-offs than
#: saving the map of a tile). On a network file system a map waits for round trips (create, write,
#: rename) with the GIL free, which threads overlap: the records thread alone took twice as long as
#: two threads with 2 ms of latency a map. On tmpfs and a local ext4 (2-core VM, 26,500 tiles) the
#: records thread alone was at most 10 % faster than two threads, within the noise.
EDGE_SAVERS = 8


class _Savers:
    """The threads that save a batch's edge maps, each given one run of them: a task a map cost more
    in hand-offs than saving the map of a tile (see :data:`EDGE_SAVERS`)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="save-edges",
                                        initializer=mark_engine_thread)

    def run(self, save: Callable[[range], list], count: int) -> list:
        """``save`` of ``range(count)`` cut into one run a thread; what the calls returned, joined in order."""
        parts = max(1, min(self.threads, count))
        bounds = [count * i // parts for i in range(parts + 1)]
        return [item for items in self._pool.map(save, map(range, bounds, bounds[1:])) for item in items]

    def __enter__(self) -> _Savers:
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown()


#: A batch ends after this many error records too: a long run of files that do not decode (empty
#: placeholders) held no pixels, so it grew until an image came, its records unwritten, the progress
#: bar still, and a SIGTERM lost them all (100,000 such files: 385 MB, every record at the end).
MOST_BATCH_ERRORS = 1024


def part_batches(parts: Iterator[DecodedPart], batch_size: int | None, batch_pixels: int) -> Iterator[DecodedPart]:
    """Group parts into batches in input order: at most ``batch_size`` images (if given) and
    ``batch_pixels`` pixels, or one image alone, and about :data:`MOST_BATCH_ERRORS` error records;
    a part is cut where an image limit falls inside it, and error records ride along where they
    are, so records keep the input order. When ``parts`` fails (decoders that cannot go on), the
    parts it gave before still make a last batch, then the failure is raised."""
    most_images = batch_size if batch_size is not None else 1 << 62
    pending: list[DecodedPart] = []
    images = pixels = errors = 0
    parts = iter(parts)
    while True:
        try:
            part = next(parts)
        except StopIteration:
            break
        except Exception:
            if pending:
                yield DecodedPart.concatenate(pending)
            raise
        while True:
            sizes = np.cumsum(part.images.pixels)
            fit = int(np.searchsorted(sizes, batch_pixels - pixels, side="right"))
            fit = min(max(fit, 1 if images == 0 else 0), most_images - images)
            if fit >= len(part.images):
                pending.append(part)
                images, pixels = images + len(part.images), pixels + (int(sizes[-1]) if len(sizes) else 0)
                errors += len(part.errors)
                # full: handed on now, not when the next part comes (a part is a batch of tiles)
                if images >= most_images or errors >= MOST_BATCH_ERRORS or pixels >= batch_pixels:
                    yield DecodedPart.concatenate(pending)
                    pending, images, pixels, errors = [], 0, 0, 0
                break
            head, part = part.split(fit)
            pending.append(head)
            yield DecodedPart.concatenate(pending)
            pending, images, pixels, errors = [], 0, 0, 0
    if pending:
        yield DecodedPart.concatenate(pending)


def _checked(backend: Backend, images: Sequence[np.ndarray], config: PipelineConfig,
             keep_images: bool) -> BatchResult:
    result = backend.process(images, config, keep_images)
    if not isinstance(result, BatchResult):  # a backend that still returns one result per image
        result = BatchResult.from_results(list(result))
    if len(result) != len(images):
        raise RuntimeError(f"backend {backend.name} returned {len(result)} results for {len(images)} images")
    return result


def _finish_run(parts: Parts, taker: _Taker, rest: contextlib.ExitStack | None = None) -> None:
    """Stop the decode pool, end the batch taker (its thread is in the parts' generator until the
    pool's end: whatever it was asked, an interrupted ``take`` included), close the parts, then
    ``rest`` (the run's other threads)."""
    try:
        parts.stop_decoding()
        taker.close()
        parts.close()
    finally:
        if rest is not None:
            rest.close()


class _Taker:
    """Takes the next of ``batches`` on a thread of its own (:meth:`take` gives a future of it, None
    at the end). A daemon thread, not a thread pool's: Python waits at exit for those, and this one
    may wait for ever for a decoder that never returns (a hung mount) where a program left its run
    unfinished."""

    def __init__(self, batches: Iterator[DecodedPart]) -> None:
        self._batches = batches
        self._asked: queue.SimpleQueue[Future | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="batches", daemon=True)
        try:
            self._thread.start()
        except BaseException:  # (a Ctrl-C in start()'s wait for it to run: no caller will close it)
            self._asked.put(None)
            raise

    def _serve(self) -> None:
        mark_engine_thread()
        while (future := self._asked.get()) is not None:
            try:
                future.set_result(next(self._batches, None))
            except BaseException as exc:  # (raised to whoever waits on the future)
                future.set_exception(exc)

    def take(self) -> Future:
        future: Future = Future()
        self._asked.put(future)
        return future

    def close(self) -> None:
        """End the thread once it has taken what it was asked (a stopped pool ends its parts). Not
        waited for as Python exits: a daemon thread then stops where it is, for good."""
        self._asked.put(None)
        if self._thread is not threading.current_thread() and not sys.is_finalizing():
            self._thread.join()


@dataclass
class Outcome:
    """A computed batch: ``result`` for the images that succeeded (in order), the exception of
    each one that failed, by its index in the batch's images."""

    result: BatchResult
    failed: dict[int, BaseException] = field(default_factory=dict)
    #: The labels of the images that succeeded, when the compute thread made them (``Engine.run``).
    labels: list[str] | None = None


def _compute(backend: Backend, images: Sequence[np.ndarray], config: PipelineConfig,
             keep_images: bool) -> Outcome:
    """Run a batch; if it fails, run its images one by one so only the culprit gets an error. A
    failed device (:class:`~gpu_pipeline.backends.base.DeviceFailed`) is no image's fault: every
    later image would fail alike, so it stops the run instead."""
    try:
        return Outcome(_checked(backend, images, config, keep_images))
    except Exception as exc:
        raise_if_device_failed(backend, exc)
        if len(images) == 1:
            return Outcome(BatchResult.empty(0, keep_images), {0: exc})
    good, failed = [], {}
    for index, image in enumerate(images):
        try:
            good.append(_checked(backend, [image], config, keep_images)[0])
        except Exception as exc:
            raise_if_device_failed(backend, exc)
            failed[index] = exc.with_traceback(None)  # its frames would keep the batch's pixels alive
    return Outcome(BatchResult.from_results(good) if good else BatchResult.empty(0, keep_images), failed)


@dataclass
class Engine:
    """One configured run. ``run`` streams ``paths`` through the backend into ``sink``.

    ``batch_size`` (images) and ``batch_pixels`` cap a batch; None lets the backend choose
    (:meth:`Backend.batch_pixels`: small batches for CPU backends, large ones for GPUs).
    ``workers`` is the number of decoders (threads or, with ``processes``, processes).
    """

    backend: Backend
    config: PipelineConfig = field(default_factory=PipelineConfig)
    decode_options: DecodeOptions = field(default_factory=DecodeOptions)
    batch_size: int | None = None
    batch_pixels: int | None = None
    #: Decoders (threads, each with its decode process with ``processes``); None: one per core.
    workers: int | None = None
    #: Decode in worker processes (True), in threads of this process (False), or choose (None:
    #: processes for runs of at least ``PROCESS_DECODE_FROM_FILES`` files on ``PROCESS_DECODE_FROM_CORES``
    #: cores or more, or ``PROCESS_DECODE_FROM_FILES_ON_FEW_CORES`` files on 2 cores or more, where
    #: they are available).
    processes: bool | None = None
    prefetch_pixels: int = DEFAULT_PREFETCH_PIXELS
    #: Labels each batch of computed images (:data:`gpu_pipeline.labels.labeller.Labeller`).
    labels_of: Labeller = default_labels
    #: Called with each image's edge map (uint8 0/255) when set, e.g. to save it; what it raises
    #: becomes that image's error record, but a SinkWriteError (a full disk) stops the run.
    on_edges: Callable[[Path, np.ndarray], None] | None = None
    #: The decode processes' fork server, started by the caller while it loads the backend (its
    #: interpreter's imports take 0.13 s on the 2-core VM, on another core); the next run that
    #: decodes in processes takes it over, :meth:`close` stops it if none does.
    fork_server: ForkServer | None = None
    #: Seconds a decode process may spend on one file (reading it, or decoding it) before it is
    #: killed: the file it was on gets an error record, and the files of its part before that one
    #: are decoded again in a fresh process (:class:`~gpu_pipeline.inputs.processes.Decoder`).
    #: None: no limit. Set, every image is decoded in a process (:func:`processes_for_time_limit`).
    decode_timeout: float | None = None
    #: Bytes that the decoding of large images may hold, decoding or waiting for the engine
    #: (:func:`decoding_budget`); None: from the memory this process may use.
    decoding_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        self.processes = processes_for_time_limit(self.processes, self.decode_timeout, "decode_timeout")
        if self.decode_timeout is not None:
            self.decode_timeout = float(self.decode_timeout)

    def decodes_in_processes(self, files: int) -> bool:
        """Whether a run of ``files`` files decodes in worker processes (see :attr:`processes`)."""
        return decodes_in_processes(self.processes, files, self.decoders(), processes_option(self.decode_timeout))

    def decoders(self) -> int:
        """How many decoders a run starts (see :attr:`workers`)."""
        return decoder_count(self.workers)

    @property
    def edge_savers(self) -> int:
        """Threads that save a batch's edge maps (see :data:`EDGE_SAVERS`)."""
        return max(2, min(EDGE_SAVERS, usable_cores()))

    def pixels_per_batch(self) -> int:
        return self.batch_pixels if self.batch_pixels is not None else self.backend.batch_pixels()

    def run(self, paths: Sequence[Path], sink, progress: Callable[[int], None] | None = None,
            stop: threading.Event | None = None) -> RunSummary:
        """Process ``paths`` into ``sink``. Setting ``stop`` ends the run after the batches in flight.

        Three stages overlap: the decode pool fills batch n + 1 while the backend computes and
        labels batch n in the engine's compute thread (kernels release the GIL) and this thread
        turns batch n - 1 into records and writes them.
        """
        summary = RunSummary()
        start = time.perf_counter()
        with contextlib.closing(self.record_batches(paths, stop, summary)) as batches:  # a sink's error stops it
            for records in batches:
                summary.add_batch(records)
                sink.write(records)
                if progress is not None:
                    progress(len(records))
        summary.seconds = time.perf_counter() - start
        return summary

    def record_batches(self, paths: Sequence[Path], stop: threading.Event | None = None,
                       summary: RunSummary | None = None) -> Iterator[RecordBatch]:
        """The records of ``paths``, a batch at a time, in input order, made in the caller's thread
        (:meth:`run` writes them; the Python API yields them with no thread of its own). The next
        batch computes and the pool decodes ahead while the caller handles one. Closing the iterator,
        or setting ``stop`` (``summary.interrupted`` then says so), ends the run after the batches in
        flight."""
        with short_gil_switches():
            yield from self._record_batches(paths, stop, summary if summary is not None else RunSummary())

    def _record_batches(self, paths: Sequence[Path], stop: threading.Event | None,
                        summary: RunSummary) -> Iterator[RecordBatch]:
        batch_pixels = self.pixels_per_batch()
        # room for a whole batch ahead, so the next batch is ready when the backend wants it
        prefetch_pixels = max(self.prefetch_pixels, batch_pixels)
        processes = self.decodes_in_processes(len(paths))
        fork_server, self.fork_server = self.fork_server, None
        if fork_server is not None and not processes:
            fork_server.close()
            fork_server = None
        in_flight: tuple[DecodedPart, Future] | None = None
        taken = 0
        # the consumer holds a batch being filled and one computing (a batch frees its pixels
        # once computed, before its records are written)
        with contextlib.ExitStack() as stack:  # (handed to another thread whole: see the finally)
            parts = stack.enter_context(contextlib.closing(decode_parts(
                paths, self.decode_options, self.decoders(), prefetch_pixels=prefetch_pixels, processes=processes,
                consumer_pixels=2 * batch_pixels, fork_server=fork_server, stop=stop, time_limit=self.decode_timeout,
                budget_bytes=self.decoding_budget_bytes)))
            compute = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute",
                                                             initializer=mark_engine_thread))
            batching = stack.enter_context(contextlib.closing(_Taker(part_batches(parts, self.batch_size,
                                                                                 batch_pixels))))
            savers = stack.enter_context(_Savers(self.edge_savers)) if self.on_edges is not None else None
            try:
                # The next batch is taken on a thread of its own: while it is still decoding (a slow
                # read, a stuck decoder), the batch computed meanwhile is handed on, not held for it.
                upcoming = batching.take()
                while True:
                    if in_flight is not None and not upcoming.done():
                        wait((upcoming, in_flight[1]), return_when=FIRST_COMPLETED)
                        if not upcoming.done():
                            done, in_flight = in_flight, None  # (not yielded again below, whatever happens)
                            yield self.records(done[0], done[1].result(), savers)
                    batch = upcoming.result()
                    if batch is None:  # the parts may have ended at the stop
                        summary.interrupted = stop is not None and stop.is_set() and taken < len(paths)
                        break
                    if stop is not None and stop.is_set():
                        summary.interrupted = True
                        break
                    taken += len(batch.paths)
                    computing = (batch, compute.submit(self._outcome, batch))
                    if in_flight is not None:
                        done, in_flight = in_flight, None
                        outcome = done[1].result()  # its pixels freed before the next batch is taken
                        upcoming = batching.take()
                        yield self.records(done[0], outcome, savers)
                    else:
                        upcoming = batching.take()
                    in_flight = computing
            except Exception:  # the decoders failed for good (a fork server that kept dying)
                if in_flight is not None and in_flight[1].exception() is None:
                    yield self.records(in_flight[0], in_flight[1].result(), savers)  # computed: kept
                raise
            else:
                if in_flight is not None:
                    yield self.records(in_flight[0], in_flight[1].result(), savers)
            finally:  # stops the decode pool: running decodes finish, nothing new starts
                if is_engine_thread():
                    # The garbage collector closes a run left unfinished in a reference cycle in whichever
                    # thread allocates: here one of a run's own, maybe this run's, whose clean-up waits for
                    # it (the batch this thread is taking, its join) or for a lock it holds. A thread of
                    # its own cleans up.
                    threading.Thread(target=_finish_run, args=(parts, batching, stack.pop_all()),
                                     name="close-run", daemon=True).start()
                else:
                    _finish_run(parts, batching)

    def close(self) -> None:
        """Stop a fork server that no run took over (a run refused after it was started)."""
        if self.fork_server is not None:
            self.fork_server.close()
            self.fork_server = None

    def _outcome(self, batch: DecodedPart) -> Outcome:
        """The backend's results for the decoded images of the batch, and its failures."""
        keep = self.on_edges is not None
        if not len(batch.images):
            return Outcome(BatchResult.empty(0, keep), labels=[])
        try:
            outcome = _compute(self.backend, batch.images, self.config, keep_images=keep)
            computed = self._computed(batch.images, outcome)
            outcome.labels = list(self._labels(computed, outcome.result)) if len(computed) else []
        except Exception as exc:  # (the label model may run on the device too)
            # the batch named: a kernel fault that one image sets off stops every resume there
            first = batch.paths[int(batch.image_positions()[0])]
            raise_if_device_failed(self.backend, exc.__cause__ if isinstance(exc, DeviceFailed) else exc,
                                   f" (in the batch of {len(batch.images)} images that starts with "
                                   f"{printable(str(first))})")
            raise
        # Records need only the shapes: the pixels (or their decode process's shared memory) are
        # freed now, not after the batch is written. With GPU-sized batches that is a quarter of
        # the decoded pixels a run held.
        batch.images = batch.images.without_pixels()
        return outcome

    def records(self, batch: DecodedPart, outcome: Outcome, savers: _Savers | None = None) -> RecordBatch:
        """The batch's records, in input order: one label call for the batch, no dict per image;
        ``savers`` save its edge maps (``on_edges``), else this thread does."""
        errors = dict(batch.errors)
        images, positions = batch.images, None
        if outcome.failed:
            positions = batch.image_positions()
            for index, exc in outcome.failed.items():
                position = int(positions[index])
                errors[position] = error_record(batch.paths[position], "compute", one_line(exc))
            positions = np.delete(positions, list(outcome.failed))
        images = self._computed(images, outcome)
        result = outcome.result
        labels = outcome.labels
        if labels is None:
            labels = list(self._labels(images, result)) if len(images) else []
        histograms, edge_counts = result.histograms, result.edge_counts
        if self.on_edges is not None:
            positions = batch.image_positions() if positions is None else positions
            saved = self._save_edges(batch, positions, result, errors, savers)
            if not saved.all():  # those images have an error record instead
                images = images.take(saved)
                labels = [label for label, ok in zip(labels, saved) if ok]
                histograms, edge_counts = histograms[saved], edge_counts[saved]
        return RecordBatch(
            paths=list(map(str, batch.paths)), errors=errors, backend=self.backend.name,
            widths=images.widths.tolist(), heights=images.heights.tolist(), bands=images.bands.tolist(),
            histograms=histograms, edge_counts=edge_counts.tolist(), labels=labels)

    @staticmethod
    def _computed(images: ImageBatch, outcome: Outcome) -> ImageBatch:
        """The images of the batch that the backend computed (all but the failed ones)."""
        if not outcome.failed:
            return images
        computed = np.ones(len(images), bool)
        computed[list(outcome.failed)] = False
        return images.take(computed)

    def _labels(self, images, result: BatchResult) -> list[str]:
        """One labeller call for the batch, with the label features when the backend computed them."""
        if result.label_features is None:
            return self.labels_of(images, result.histograms, result.edge_counts)
        return self.labels_of(images, result.histograms, result.edge_counts, result.label_features)

    def _save_edges(self, batch: DecodedPart, positions: np.ndarray, result: BatchResult,
                    errors: dict[int, dict], savers: _Savers | None) -> np.ndarray:
        """Hand each edge map to ``on_edges``, in this thread or, given ``savers``, on its threads (each
        one run of the maps); a failure turns that image's record into an error, but a
        :class:`SinkWriteError` (a full disk: every later map would fail alike) stops the run.

        ``positions`` are the computed images' positions in the batch. Returns which were saved.
        """
        def save(maps: range) -> list[tuple[int, Exception]]:
            failures = []
            for k in maps:
                try:
                    self.on_edges(batch.paths[positions[k]], result.edges[k])
                except Exception as exc:
                    failures.append((k, exc))
            return failures

        count = len(positions)
        failed = save(range(count)) if savers is None else savers.run(save, count)
        for _, exc in failed:
            if isinstance(exc, SinkWriteError):
                raise exc
        saved = np.ones(count, bool)
        for k, exc in failed:
            position = int(positions[k])
            errors[position] = error_record(batch.paths[position], "save-edges", one_line(exc))
            saved[k] = False
        return saved
