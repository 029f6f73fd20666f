"""The streaming batch engine: decode pool -> batches -> backend -> labels -> sink.

The data plane is batch-native: a backend returns one :class:`BatchResult` (histograms as one
(N, 256) array, edge counts as one array), the labeller labels the batch in one call, and the sink
gets one :class:`~gpu_pipeline.outputs.records.RecordBatch` that it encodes in one go. Decoded images
travel as :class:`~gpu_pipeline.images.ImageBatch` parts; what is left per image in Python is the
decode call (in a decode process of its own with ``processes``) and a line of text.

Memory is bounded by pixels whatever the number or size of the files (docs/benchmarks.md, "Memory"):
the decode pool holds at most ``prefetch_pixels`` decoded pixels waiting for the engine, plus, per
decoder, one part being decoded (``DECODE_CHUNK_PIXELS``, or ``PROCESS_CHUNK_PIXELS`` for a decode
process, and at most one image more); a batch holds at most ``batch_pixels`` pixels or one image.
Large images decoding or waiting are also bounded by the memory the run may use
(:func:`decoding_budget`): sixteen decoders of scenes no longer each hold one.
Records come out in input order. Every path yields exactly one record: a result or an error, until a
failed GPU (``DeviceFailed``) ends the run: the batches before it are whole, none after it has a record.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import queue
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from gpu_pipeline.backends.base import Backend, BatchResult, DeviceFailed, raise_if_device_failed
from gpu_pipeline.labels.labeller import Labeller, default_labels
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine.cores import usable_cores, usable_memory
from gpu_pipeline.errors import UsageError, one_line, printable
from gpu_pipeline.images import ImageBatch
from gpu_pipeline.inputs.decode import budgeted, decode_each
from gpu_pipeline.inputs.processes import (Decoder, ForkServer, available as processes_available, place_in, placed_at,
                                           room_for_descriptors, slot_bytes_for)
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

    path: str | Path  # as the run names it: the engine takes strings (no Path per file) or Paths
    image: np.ndarray | None = None
    error: dict | None = None


@dataclass(slots=True)
class DecodedPart:
    """Consecutive inputs after decoding: the images of those that decoded, in order, packed
    (:class:`ImageBatch`), and the error record of each of the others. What the decode pool hands
    over and a batch is: no Python object per image."""

    paths: list[str | Path]
    images: ImageBatch
    errors: dict[int, dict] = field(default_factory=dict)  # by position in ``paths``

    def image_positions(self) -> np.ndarray:
        """int64: the position in ``paths`` of each image."""
        positions = np.arange(len(self.paths), dtype=np.int64)
        return np.delete(positions, list(self.errors)) if self.errors else positions

    def split(self, images: int) -> tuple[DecodedPart, DecodedPart]:
        """The inputs before the image ``images`` (errors included) and the rest."""
        cut = int(self.image_positions()[images])
        head = {position: record for position, record in self.errors.items() if position < cut}
        tail = {position - cut: record for position, record in self.errors.items() if position >= cut}
        return (DecodedPart(self.paths[:cut], self.images.take(slice(0, images)), head),
                DecodedPart(self.paths[cut:], self.images.take(slice(images, None)), tail))

    @staticmethod
    def concatenate(parts: list[DecodedPart]) -> DecodedPart:
        if len(parts) == 1:
            return parts[0]
        paths, errors = [], {}
        for part in parts:
            errors.update((len(paths) + position, record) for position, record in part.errors.items())
            paths.extend(part.paths)
        return DecodedPart(paths, ImageBatch.concatenate([part.images for part in parts]), errors)

    def one_by_one(self) -> Iterator[Decoded]:
        images = iter(self.images)
        for position, path in enumerate(self.paths):
            error = self.errors.get(position)
            yield Decoded(path, error=error) if error is not None else Decoded(path, image=next(images))


def error_record(path: Path | str, stage: str, message: str) -> dict:
    return {"path": str(path), "stage": stage, "error": message}


#: Runs of at least this many files decode in worker processes by default: below it, starting the
#: processes costs more than they save.
PROCESS_DECODE_FROM_FILES = 2000
#: ... on machines of at least this many cores: one process's decode threads stop scaling near 8
#: (cv2.imread on the 16-core machine, issue #19), 16 processes decode 2.7x more.
PROCESS_DECODE_FROM_CORES = 8
#: ... and on 2 to 7 cores, runs of at least this many files: there the GIL is not what limits a
#: run, and processes win less than their start costs on short runs. 2-core VM, whole runs of
#: EuroSAT tiles, threads against processes (medians of 5-7, alternated), with the fork server
#: started while the backend loads (``Engine.fork_server``): 3,000 tiles 1.09 against 1.13 s,
#: 5,000 tiles 1.05 against 1.03 s, 10,000 tiles 1.82 against 1.47 s and 1.63 against 1.59 s.
PROCESS_DECODE_FROM_FILES_ON_FEW_CORES = 10_000


def decodes_in_processes(processes: bool | None, files: int, decoders: int,
                         asked_by: str = "--decode processes") -> bool:
    """Whether a run of ``files`` files with ``decoders`` decoders decodes in worker processes:
    ``processes`` when it is given (and they are available here), else the rule of the thresholds
    above, and only where this process may open the files they need (it raises its soft limit if it
    must: see :func:`room_for_descriptors`). Asked for processes without that room: UsageError,
    naming the option that asked (``asked_by``; a decode time limit cannot do with threads)."""
    if processes is not None:
        if processes and processes_available() and (reason := room_for_descriptors(decoders)) is not None:
            workers = "--workers" if asked_by.startswith("--") else "workers"
            ways = ("raise the limit, use fewer --workers, or use --decode threads" if asked_by == "--decode processes"
                    else f"raise the limit or use fewer {workers}")
            raise UsageError(f"{asked_by}: {reason}; {ways}")
        return processes and processes_available()
    cores = usable_cores()
    least = PROCESS_DECODE_FROM_FILES if cores >= PROCESS_DECODE_FROM_CORES else PROCESS_DECODE_FROM_FILES_ON_FEW_CORES
    return (cores >= 2 and files >= least and processes_available()
            and room_for_descriptors(decoders) is None)


#: The shortest and longest decode time limits: under a second, a busy machine's scheduling alone may
#: pass it (and every image would fail); over a day is a typo, as good as none.
LEAST_DECODE_TIMEOUT_S = 1.0
MOST_DECODE_TIMEOUT_S = 86400.0


def processes_for_time_limit(processes: bool | None, time_limit, option: str = "--decode-timeout") -> bool | None:
    """The engine's ``processes`` for a decode ``time_limit`` in seconds (None: no limit): True, since
    a decode process can be killed in the middle of an image and a decode thread cannot. UsageError,
    naming ``option``, for a limit that is not a number of seconds from 1 to a day, with threads
    asked for (``processes`` False), or where decode processes cannot run."""
    if time_limit is None:
        return processes
    if isinstance(time_limit, (bool, np.bool_)) or not isinstance(time_limit, numbers.Real) \
            or not LEAST_DECODE_TIMEOUT_S <= time_limit <= MOST_DECODE_TIMEOUT_S:  # (NaN fails both)
        raise UsageError(f"{option} takes a number of seconds from {LEAST_DECODE_TIMEOUT_S:g} to "
                         f"{MOST_DECODE_TIMEOUT_S:g}, got {time_limit!r}")
    if processes is False:
        modes = "--decode processes or auto" if option.startswith("--") else "decode='processes' or 'auto'"
        raise UsageError(f"{option} needs decode processes: a decode thread cannot be stopped in the middle of an "
                         f"image (use {modes})")
    if not processes_available():
        raise UsageError(f"{option} needs decode processes, which need Linux (memfd_create and descriptor passing)")
    return True


def processes_option(time_limit: float | None) -> str:
    """The option a refusal of decode processes names: a time limit asks for them too."""
    return "--decode processes" if time_limit is None else "--decode-timeout"


def early_fork_server(processes: bool | None, files: int, workers: int | None,
                      asked_by: str = "--decode processes") -> ForkServer | None:
    """For a run of ``files`` files with ``workers`` decoders (:func:`decoder_count`) that will decode
    in processes, their fork server, started now and not waited for: a caller starts it before it
    loads the backend, so that the server's imports (0.13 s on the 2-core VM) run on another core
    meanwhile. Hand it to :class:`Engine`; else None."""
    if not decodes_in_processes(processes, files, decoder_count(workers), asked_by):
        return None
    server = ForkServer()
    server.start()
    return server


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
                                        initializer=_mark_engine_thread)

    def run(self, save: Callable[[range], list], count: int) -> list:
        """``save`` of ``range(count)`` cut into one run a thread; what the calls returned, joined in order."""
        parts = max(1, min(self.threads, count))
        bounds = [count * i // parts for i in range(parts + 1)]
        return [item for items in self._pool.map(save, map(range, bounds, bounds[1:])) for item in items]

    def __enter__(self) -> _Savers:
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown()


def decoder_count(workers: int | None) -> int:
    """How many decoders a run starts: ``workers`` (``--workers``), else one per usable core."""
    return workers if workers is not None else usable_cores()


#: With decode processes, images of this many pixels or more (on average so far) are decoded in the
#: decode threads all the same: 256 K pixels take about 2.5 ms to decode, against 30-50 us of GIL,
#: and a scene would cost a copy into fresh shared memory (24 12-MP scenes on 2 cores: 132 MP/s in
#: processes, 220 in threads).
PROCESS_DECODE_BELOW_PIXELS = 256 * 1024
#: Pixels a decode thread decodes before it hands them over: 64 EuroSAT tiles, or one scene.
DECODE_CHUNK_PIXELS = 256 * 1024
#: ... for a decode process: 128 EuroSAT tiles. Each part is a round trip to the process (a request,
#: a reply, a wake-up on each side, about 200 us of the main process's CPU on the 2-core VM), so
#: larger parts leave the main process's threads more of the GIL (docs/benchmarks.md, "Fourth
#: round"). They cost memory (larger slots, more of them touched): peak PSS of the process tree
#: with 16 decoders, 304 MiB with parts of 64 tiles, 312 with 128, 347 with 256
#: (``scripts/engine_memory.py --batch-mp 1 --decode processes``).
PROCESS_CHUNK_PIXELS = 512 * 1024
#: How long closing the decode pool waits for its decoders to finish the image each is on (a
#: generator closed early, a write that failed). One stuck in a codec or in a read from a hung mount
#: is left behind after that: a daemon thread, or a decode process, which ends with the fork server
#: that closing stops. (It waited for ever.)
CLOSE_WAIT_S = 10.0
#: How often a consumer that was given ``stop`` looks at it while it waits for the next part, and
#: how long closing then waits for the decoders: the batch in flight is written after that, and
#: ``docker stop`` kills after 10 s.
STOP_POLL_S = 0.2
STOP_WAIT_S = 0.5

#: Of the memory a run may use (the machine's, capped by its control group's limit: a container's),
#: the share that large images being decoded, or decoded and waiting for the engine, may hold, each
#: charged what its decoding holds at its peak (``decode.budgeted``: a 12-MP JPEG scene about 80
#: MB, a 13-band 16-bit TIFF of 12 MP 970). Sixteen decoders of 12-MP scenes held 16 of them at
#: once (1 GB); in a 700 MB container the run was killed. A decoder of a large image waits for room
#: before it decodes it, unless its image is one the engine waits for.
DECODING_MEMORY_SHARE = 0.5


def decoding_budget(memory: int | None) -> int | None:
    """Bytes that the decoding of large images may hold, decoding or waiting, for a run that may
    use ``memory`` bytes (None: no bound)."""
    return None if memory is None else int(memory * DECODING_MEMORY_SHARE)


#: Images in one chunk at most, and at first (one, so that big scenes never queue behind each other
#: on one thread before their size is known).
MOST_CHUNK_IMAGES = 256
FIRST_CHUNK_IMAGES = 1


class Packer:
    """A decode thread's part, packed into one buffer as it is decoded: plain JPEGs (every tile) are
    decoded straight there (``decode_each``'s ``into``), each 8 bytes past a 16-byte boundary as in a
    decode process's slot; other images, and one that does not fit, keep their own array. The part
    is then one :class:`ImageBatch` over a few buffers, not an array per image: a backend takes
    the pixels' addresses, or stages them, a run of images at a time."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity  # bytes: the part's pixels, RGB, with their alignment
        self._buffer: np.ndarray | None = None  # allocated at the first plain JPEG
        self._used = 0
        self._placed: np.ndarray | None = None  # the place given for the image being decoded
        self._own: list[np.ndarray] = []  # buffers of the images that are not in ``_buffer``
        self._rows: list[tuple[int, int, int, int, int]] = []  # buffer, offset, height, width, channels

    def place(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """Where an image of ``shape`` is to be decoded, or None when it does not fit."""
        if self._buffer is None:  # (its pages are touched only where images go)
            whole = np.empty(self._capacity + 64, np.uint8)
            self._buffer = whole[-whole.ctypes.data % 64:][:self._capacity]  # from a 64-byte boundary
        self._placed = place_in(self._buffer, self._used, shape)
        return self._placed

    def add(self, image: np.ndarray) -> None:
        """The decoded ``image``: in its place, or (not a plain JPEG, or too large) in its own array."""
        channels = image.shape[2] if image.ndim == 3 else 0
        if image is self._placed:
            start = placed_at(self._used)
            self._rows.append((0, start, image.shape[0], image.shape[1], channels))
            self._used = start + image.size
        else:
            self._own.append(np.ascontiguousarray(image).reshape(-1))
            self._rows.append((len(self._own), 0, image.shape[0], image.shape[1], channels))
        self._placed = None

    def take(self) -> ImageBatch:
        """The images added so far, as a batch; the packer starts a new part."""
        rows = np.array(self._rows, np.int64).reshape(-1, 5)
        buffers = [self._buffer if self._buffer is not None else np.zeros(0, np.uint8), *self._own]
        batch = ImageBatch(buffers, rows[:, 0].copy(), rows[:, 1].copy(), rows[:, 2].copy(), rows[:, 3].copy(),
                           rows[:, 4].copy())
        self._buffer, self._used, self._placed, self._own, self._rows = None, 0, None, [], []
        return batch


class _PoolClosed(BaseException):
    """Raised in a decoder that waits for room in the decoding budget when the pool closes: its
    image is wanted no more. (Not an Exception: no reader may turn it into an error record.)"""


class _DecodePool:
    """Decode threads that take chunks of paths and hand decoded chunks over in input order.

    A thread takes a chunk (as many paths as ``DECODE_CHUNK_PIXELS`` is worth at the average
    image size seen so far) and decodes it in parts: a part ends once it holds
    ``DECODE_CHUNK_PIXELS`` pixels, so a wrong guess (tiles, then scenes) costs at most one image
    more. A part waits until the pixels ready ahead of the consumer leave room for it, unless it
    is the very part the consumer waits for (so the pool cannot deadlock on a huge image).

    Every waiter has a condition of its own on the pool's one lock, and each change wakes only
    those it may let go on (the consumer when its part is ready; the decoder of the part now wanted
    and the earliest parts that fit when room is freed): with one condition for all, every change
    woke all the decoders to find nothing to do, and the GIL that cost grew with their number
    (engine plumbing with decoding served from memory: 2.1 us an image with 2 decoders, 4.5-4.8 with
    16, 6.8-7.9 with 32; now 2.1, 2.5-2.9 and 2.9-3.2).
    """

    def __init__(self, paths: Iterable[Path], options: DecodeOptions, threads: int,
                 prefetch_pixels: int, prefetch_images: int | None, chunk_pixels: int,
                 processes: bool = False, consumer_pixels: int = 0, fork_server: ForkServer | None = None,
                 stop: threading.Event | None = None, time_limit: float | None = None,
                 budget_bytes: int | None = None) -> None:
        self._paths = iter(paths)
        self._stop = stop
        self._stopped = False  # the parts ended at the stop
        self._options = options
        self._processes = processes
        self._time_limit = time_limit  # of a decode process on one file; every image then goes to one
        # Slots of shared memory a decode process needs so that it never waits for one: the parts
        # ready ahead, and those the consumer still holds in its batches, shared by the processes.
        held = prefetch_pixels + consumer_pixels
        # (+ 3: the part a decoder hands over, the one its process decodes meanwhile, and a spare)
        self._slots = -(-held // (chunk_pixels * threads)) + 3
        # the decode processes share its imports; the pool closes it, given or its own
        self._fork_server = (fork_server or ForkServer()) if processes else None
        self._prefetch_pixels = prefetch_pixels
        self._prefetch_images = prefetch_images
        self._chunk_pixels = chunk_pixels
        self._lock = threading.Lock()
        self._consumer = threading.Condition(self._lock)  # waits for the part it wants next
        #: decoders waiting for room, by the key of their part: (their condition, pixels, images)
        self._waiting: dict[tuple[int, int], tuple[threading.Condition, int, int]] = {}
        self._next_chunk = 0
        self._ready: dict[tuple[int, int], tuple[DecodedPart, int, bool, int]] = {}
        self._wanted = (0, 0)  # (chunk, part) the consumer takes next
        self._held_pixels = self._held_images = 0
        self._seen_pixels = self._seen_images = 0
        # what large images being decoded or waiting for the consumer hold, in bytes (``decode.budgeted``)
        self._budget = budget_bytes
        self._budgeted = 0
        self._budget_room = threading.Condition(self._lock)
        self._budget_waiters = 0
        self._running = threads
        self._closed = False
        self._failure: BaseException | None = None
        self._threads: list[threading.Thread] = []
        try:
            for i in range(threads):
                thread = threading.Thread(target=self._work, name=f"decode_{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        except BaseException:  # (a Ctrl-C as they start: those started, and the fork server, stop)
            self.close()
            raise

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
        _mark_engine_thread()
        decoder = (Decoder(self._options, self._slots, slot_bytes_for(self._chunk_pixels, MOST_CHUNK_IMAGES),
                           self._fork_server, self._time_limit) if self._processes else None)
        try:
            taken = self._take_chunk()
            while taken is not None:
                number, chunk, small = taken
                if decoder is not None and small:
                    taken = self._decode_chunks_in_process(number, chunk, decoder)
                else:
                    self._decode_chunk(number, chunk)
                    taken = self._take_chunk()
        except _PoolClosed:  # closed while it waited for room in the decoding budget: nothing more to decode
            pass
        except BaseException as exc:  # the path iterator failed: the consumer re-raises it
            with self._lock:
                self._failure = self._failure or exc
        finally:
            try:
                if decoder is not None:
                    decoder.close()
            finally:  # (counted out even when its decode process's end cannot be learned)
                with self._lock:
                    self._running -= 1
                    self._consumer.notify()

    def _take_chunk(self) -> tuple[int, list[Path], bool] | None:
        """The next chunk of paths, its number, and whether it is for a decode process (small
        images); None when there is none left or the pool is closed."""
        with self._lock:
            if self._closed:
                return None
            chunk = list(islice(self._paths, self._chunk_length()))
            number = self._next_chunk
            self._next_chunk += 1
            # big images cost little Python for their decoding time: threads decode them
            # with no copy into shared memory; the first chunk (one image) too. Under a time
            # limit every image goes to a process, which can be stopped where a thread cannot.
            small = (self._time_limit is not None
                     or self._seen_pixels < PROCESS_DECODE_BELOW_PIXELS * self._seen_images)
        return (number, chunk, small) if chunk else None

    def _decode_chunks_in_process(self, number: int, chunk: list[Path], decoder: Decoder
                                  ) -> tuple[int, list[Path], bool] | None:
        """Chunks decoded by this thread's decode process, in parts of about ``chunk_pixels``, from
        this one on while the chunks this thread takes are for a decode process. The next part (of
        this chunk or the next) is asked for before this one is handed over, so the process decodes
        while this thread waits for the GIL, the lock or room (one decode process, a backend that
        does nothing: busy 77-90 % of its life before, 91-95 % since).
        Returns the chunk taken that this thread is to decode itself, or None when there is none
        left or the consumer has gone."""
        paths = list(map(os.fspath, chunk))
        charged = [0]  # the budget the part's large images took (as in _decode_chunk)
        if self._budget is not None:  # (``number``: the chunk of the image that asks)
            decoder.budget = lambda charge: self._take_budget(number, charge, charged)
        decoder.ask(paths, self._chunk_pixels)
        start = part = 0
        while True:
            taken, images, errors = decoder.answer()
            inputs = chunk[start:start + taken]
            decoded = DecodedPart(inputs, images, {position: error_record(inputs[position], *error)
                                                   for position, error in errors.items()})
            key, start, last = (number, part), start + taken, start + taken == len(chunk)
            following = None
            if not last:
                decoder.ask(paths[start:], self._chunk_pixels)
                part += 1
            else:
                following = self._take_chunk()
                if following is not None and following[2]:
                    number, chunk, _ = following
                    paths, start, part = list(map(os.fspath, chunk)), 0, 0
                    decoder.ask(paths, self._chunk_pixels)
            if not self._hand_over(key, decoded, int(images.pixels.sum()), last, charged[0]):
                return None
            # not held while the next part decodes: a thread held its last scene, 16 threads 16
            decoded = images = None
            charged[0] = 0
            if last and (following is None or not following[2]):
                return following

    def _decode_chunk(self, number: int, chunk: list[Path]) -> None:
        part, paths, errors, pixels = 0, [], {}, 0
        packer = Packer(slot_bytes_for(self._chunk_pixels, MOST_CHUNK_IMAGES))
        charged = [0]  # the budget the part's large images took: given back when the consumer takes it
        with (budgeted(lambda charge: self._take_budget(number, charge, charged)) if self._budget is not None
              else contextlib.nullcontext()):
            for index, (path, outcome) in enumerate(zip(chunk, decode_each(chunk, self._options,
                                                                           into=packer.place))):
                if isinstance(outcome, np.ndarray):
                    packer.add(outcome)
                    pixels += outcome.shape[0] * outcome.shape[1]
                else:
                    errors[len(paths)] = error_record(path, *outcome)
                paths.append(path)
                last = index == len(chunk) - 1
                if last or pixels >= self._chunk_pixels:
                    decoded = DecodedPart(paths, packer.take(), errors)
                    if not self._hand_over((number, part), decoded, pixels, last, charged[0]):
                        return
                    part, paths, errors, pixels, charged[0] = part + 1, [], {}, 0, 0

    def _take_budget(self, number: int, charge: int, charged: list[int]) -> None:
        """Wait until a large image's ``charge`` (bytes) fits the decoding budget, then count it
        against it (and in ``charged``, the part's). The chunk the consumer waits for never waits:
        the images that fill the budget may be those it must take first. Once the pool is closed,
        _PoolClosed: the image is not to be decoded."""
        with self._lock:
            while not (self._closed or number == self._wanted[0] or self._budgeted + charge <= self._budget):
                self._budget_waiters += 1
                try:
                    self._budget_room.wait()
                finally:
                    self._budget_waiters -= 1
            if self._closed:  # decoded now, all the waiting images would make the peak the budget spares
                raise _PoolClosed
            self._budgeted += charge
        charged[0] += charge

    def _hand_over(self, key: tuple[int, int], decoded: DecodedPart, pixels: int, last: bool,
                   budgeted: int = 0) -> bool:
        """Wait for room, then make ``decoded`` ready (with the decoding budget its images took);
        False when the consumer has gone."""
        images = len(decoded.paths)
        with self._lock:
            self._seen_images += len(decoded.images)
            self._seen_pixels += pixels
            if not self._may_go_on(key, pixels, images):
                waiting = threading.Condition(self._lock)
                self._waiting[key] = (waiting, pixels, images)
                try:
                    while not self._may_go_on(key, pixels, images):
                        waiting.wait()
                finally:
                    del self._waiting[key]
            if self._closed:
                return False
            self._ready[key] = (decoded, pixels, last, budgeted)
            self._held_pixels += pixels
            self._held_images += images
            if key == self._wanted:
                self._consumer.notify()
        return True

    def _may_go_on(self, key: tuple[int, int], pixels: int, images: int) -> bool:
        return self._closed or key == self._wanted or self._has_room(pixels, images)

    def _wake_decoders(self) -> None:
        """After the consumer took a part (under the lock): wake the decoder of the part now wanted,
        and the earliest waiting parts that fit in the room there is."""
        pixels, images = self._held_pixels, self._held_images
        for key in sorted(self._waiting):
            waiting, part_pixels, part_images = self._waiting[key]
            if key == self._wanted:
                waiting.notify()
            elif self._fits(pixels + part_pixels, images + part_images):
                waiting.notify()
                pixels, images = pixels + part_pixels, images + part_images

    def _has_room(self, pixels: int, images: int) -> bool:
        return self._fits(self._held_pixels + pixels, self._held_images + images)

    def _fits(self, pixels: int, images: int) -> bool:
        """Whether ``pixels`` and ``images`` held ready stay within the prefetch limits."""
        if pixels > self._prefetch_pixels:
            return False
        return self._prefetch_images is None or images <= self._prefetch_images

    def __iter__(self) -> Iterator[DecodedPart]:
        """Decoded parts in input order; closing the iterator stops the threads."""
        try:
            # (no local holds a part here: one held while the consumer waited for the next kept a
            # scene the consumer had done with)
            yield from iter(self._next_part, None)
        finally:
            self.close()

    def _next_part(self) -> DecodedPart | None:
        """The part the consumer wants next, once it is ready; None when there is none."""
        with self._lock:
            while (self._wanted not in self._ready and self._running and self._failure is None
                   and not self._closed):  # (closed by the engine while its batch thread waits here)
                if self._stop is not None and self._stop.is_set():
                    self._stopped = True
                    return None  # (a decoder may never hand its part over: stuck in a codec or a read)
                self._consumer.wait(STOP_POLL_S if self._stop is not None else None)
            if self._closed or self._wanted not in self._ready:  # (parts ready before a failure go first)
                if self._failure is not None:
                    raise self._failure
                return None
            decoded, pixels, last, budgeted = self._ready.pop(self._wanted)
            self._held_pixels -= pixels
            self._held_images -= len(decoded.paths)
            self._budgeted -= budgeted
            chunk, part = self._wanted
            self._wanted = (chunk + 1, 0) if last else (chunk, part + 1)
            self._wake_decoders()
            if self._budget_waiters:  # (room given back, or their chunk is now the one wanted)
                self._budget_room.notify_all()
            return decoded

    def close(self) -> None:
        """Stop taking paths. The fork server is stopped first, which ends the decode processes
        (``PR_SET_PDEATHSIG``) and so the waits of their threads, a stuck one's too: nothing they
        would hand over is wanted now. Decode threads finish the image they decode and end; one still
        decoding after :data:`CLOSE_WAIT_S` (:data:`STOP_WAIT_S` at a stop) is left behind. Closed
        again (its parts, then itself), it returns at once: each close waited that long again."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._consumer.notify_all()
            self._budget_room.notify_all()
            for waiting, _, _ in self._waiting.values():
                waiting.notify()
        if self._fork_server is not None:
            self._fork_server.close()
            self._fork_server = None
        # (a stop the engine saw between batches, the next one ready, is a stop too: the parts did
        # not end at it, and closing waited CLOSE_WAIT_S for a decoder stuck further on)
        stopping = self._stopped or (self._stop is not None and self._stop.is_set())
        deadline = time.monotonic() + (STOP_WAIT_S if stopping else CLOSE_WAIT_S)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


def decode_parts(paths: Iterable[Path], options: DecodeOptions, workers: int, prefetch: int | None = None,
                 prefetch_pixels: int = DEFAULT_PREFETCH_PIXELS, chunk_pixels: int | None = None,
                 processes: bool = False, consumer_pixels: int = 0,
                 fork_server: ForkServer | None = None, stop: threading.Event | None = None,
                 time_limit: float | None = None, budget_bytes: int | None = None) -> Iterator[DecodedPart]:
    """Decode on ``workers`` threads, or in ``workers`` processes with ``processes`` (see
    :mod:`gpu_pipeline.inputs.processes`), in input order, a part at a time.

    At most ``prefetch_pixels`` decoded pixels (and, with ``prefetch``, that many images) wait
    ready ahead of the consumer; each decoder also holds the part it is decoding (about
    ``chunk_pixels`` pixels, one image more at most; by default :data:`DECODE_CHUNK_PIXELS`, or
    :data:`PROCESS_CHUNK_PIXELS` with ``processes``). Tiles go to the decoders in chunks of many
    images, big scenes one per decoder, so every decoder works whatever the image size.
    ``consumer_pixels`` is what the consumer holds on to after taking parts (its batches in flight):
    decode processes size their shared memory by it. Once ``stop`` (when given) is set, the parts end
    where the consumer is, even when the part it waits for never comes (a decoder stuck for good).
    ``time_limit`` (seconds, with ``processes`` only) sends every image to a decode process, and one
    that takes longer than that on its own gets an error record instead (see :class:`Decoder`).
    Large images, from their decoding (in a thread or a decode process) to the consumer's taking
    them, hold at most ``budget_bytes`` bytes (what each one's decoding holds at its peak), and one
    image more: by default :func:`decoding_budget` of the memory this process may use (a decoder
    of one waits for room before it decodes it).
    """
    if time_limit is not None and not processes:
        raise ValueError("a decode time limit needs decode processes")
    if chunk_pixels is None:
        chunk_pixels = PROCESS_CHUNK_PIXELS if processes else DECODE_CHUNK_PIXELS
    if budget_bytes is None:
        budget_bytes = decoding_budget(usable_memory())
    return _Parts(_DecodePool(paths, options, max(1, workers), prefetch_pixels, prefetch, chunk_pixels, processes,
                              consumer_pixels, fork_server, stop, time_limit, budget_bytes))


class _Parts:
    """A decode pool's parts, whose ``close()`` stops the pool even before the first part is taken:
    closing a generator that has not started runs none of its code, and a notebook's interrupt
    there left the decode threads (and the fork server) running for the life of the process."""

    def __init__(self, pool: _DecodePool) -> None:
        self._pool = pool
        self._parts = iter(pool)

    def __iter__(self) -> _Parts:
        return self

    def __next__(self) -> DecodedPart:
        return next(self._parts)

    def stop_decoding(self) -> None:
        """Stop the pool; a thread waiting in ``next`` for a part returns (the parts end)."""
        self._pool.close()

    def close(self) -> None:
        if not self._parts.gi_running:  # (running in a batch taker stopped for good as Python exits)
            self._parts.close()
        self._pool.close()


def decode_stream(paths: Iterable[Path], options: DecodeOptions, workers: int, prefetch: int | None = None,
                  prefetch_pixels: int = DEFAULT_PREFETCH_PIXELS,
                  chunk_pixels: int | None = None, processes: bool = False) -> Iterator[Decoded]:
    """:func:`decode_parts` an image at a time (verify, bench: code that wants the images one by one)."""
    parts = decode_parts(paths, options, workers, prefetch, prefetch_pixels, chunk_pixels, processes)
    try:
        for part in parts:
            yield from part.one_by_one()
    finally:
        parts.close()


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
                if images >= most_images or errors >= MOST_BATCH_ERRORS:
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


#: ``marked`` in the threads of runs (decoders, the batch taker, compute, edge savers).
_engine_thread = threading.local()


def _mark_engine_thread() -> None:
    _engine_thread.marked = True


def _finish_run(parts: _Parts, taker: _Taker, rest: contextlib.ExitStack | None = None) -> None:
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
        self._thread.start()

    def _serve(self) -> None:
        _mark_engine_thread()
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
                                                             initializer=_mark_engine_thread))
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
                if getattr(_engine_thread, "marked", False):
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
