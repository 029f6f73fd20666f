"""The decode pool: files to decoded parts (:class:`DecodedPart`), in input order, on decode threads
or in decode processes (:mod:`gpu_pipeline.inputs.processes`), what the engine
(:mod:`gpu_pipeline.engine.stream`) makes batches of.

Memory is bounded by pixels whatever the number or size of the files (docs/benchmarks.md, "Memory"):
the pool holds at most ``prefetch_pixels`` decoded pixels waiting for the engine, plus, per decoder,
one part being decoded, or decoded and waiting for room (``DECODE_CHUNK_PIXELS``, or
``PROCESS_CHUNK_PIXELS`` for a decode process, and at most one image more). Large images decoding
or waiting are also bounded by the memory the run may use (:func:`decoding_budget`): sixteen
decoders of scenes no longer each hold one. Every path gives exactly one image or one error record.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import threading
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.engine.cores import usable_cores, usable_memory
from gpu_pipeline.errors import UsageError
from gpu_pipeline.images import ImageBatch
from gpu_pipeline.inputs.decode import budgeted, decode_each
from gpu_pipeline.inputs.processes import (Decoder, ForkServer, available as processes_available, place_in, placed_at,
                                           room_for_descriptors, slot_bytes_for)

#: ``marked`` in the threads of runs (decoders, the batch taker, compute, edge savers).
_engine_thread = threading.local()


def mark_engine_thread() -> None:
    _engine_thread.marked = True


def is_engine_thread() -> bool:
    """Whether this thread is one of a run's (:func:`mark_engine_thread`)."""
    return getattr(_engine_thread, "marked", False)


#: Decoded pixels the decode pool may hold ready ahead of the engine: enough to keep decoding while
#: a CPU batch computes, small enough that memory stays low (16 MP is 48 MB of RGB).
DEFAULT_PREFETCH_PIXELS = 16 * 1024 * 1024


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
#: ... for a decode process: 256 EuroSAT tiles, a CPU backend's batch. Each part is a round trip to
#: the process (a request, a reply, a wake-up on each side, about 110 us of the decode thread's CPU
#: on the 2-core VM) and a hand-over to the engine, and each takes the GIL at wake-ups that wait for
#: it: the GIL a tile (``../shared/tools/gil_per_tile.py``, medians of 10 runs, two sets) went from
#: 13.3 and 14.6 us with parts of 128 tiles to 9.2 and 12.9 with 256 (docs/benchmarks.md,
#: "Twenty-ninth round"). Larger parts cost memory (larger slots, more of them touched): peak PSS of
#: the process tree with 16 decoders and 1-MP batches, 301-311 MiB with parts of 128 tiles, 338-351
#: with 256 (``scripts/engine_memory.py --batch-mp 1 --decode processes``).
PROCESS_CHUNK_PIXELS = 1024 * 1024
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
        mark_engine_thread()
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
                if not self._closed:  # (closed, no one will: kept, its traceback held this pool in a
                    self._failure = self._failure or exc  # cycle, decode processes' arenas and parts too)
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
        while this thread waits for the GIL or the lock (one decode process, a backend that does
        nothing: busy 77-90 % of its life before, 91-95 % since), unless this one must wait for
        room: the consumer is then the slower, and the next part would only wait too, in a slot.
        Returns the chunk taken that this thread is to decode itself, or None when there is none
        left or the consumer has gone."""
        paths = list(map(os.fspath, chunk))
        charged = [0]  # the budget the part's large images took (as in _decode_chunk)
        if self._budget is not None:  # (``number``: the chunk of the image that asks)
            decoder.budget = lambda charge: self._take_budget(number, charge, charged)
        decoder.ask(paths, self._chunk_pixels)
        start = part = 0

        def ask_next() -> tuple[int, list[Path], bool] | None:
            """Ask the process for the next part of this chunk, or else of the next chunk taken
            (returned, once this one is done)."""
            nonlocal number, chunk, paths, start, part
            if start < len(chunk):
                decoder.ask(paths[start:], self._chunk_pixels)
                part += 1
                return None
            following = self._take_chunk()
            if following is not None and following[2]:
                number, chunk, _ = following
                paths, start, part = list(map(os.fspath, chunk)), 0, 0
                decoder.ask(paths, self._chunk_pixels)
            return following

        while True:
            taken, images, errors = decoder.answer()
            inputs = chunk[start:start + taken]
            decoded = DecodedPart(inputs, images, {position: error_record(inputs[position], *error)
                                                   for position, error in errors.items()})
            key, start, last = (number, part), start + taken, start + taken == len(chunk)
            pixels = int(images.pixels.sum())
            # asked for first only where the part goes through at once: a thread that waits for
            # room holds one part, not that one and the next (16 decoders, 1-MP parts: 48 MB)
            ahead = self._goes_on_at_once(key, pixels, len(inputs))
            following = ask_next() if ahead else None
            if not self._hand_over(key, decoded, pixels, last, charged[0]):
                return None
            # not held while the next part decodes: a thread held its last scene, 16 threads 16
            decoded = images = None
            charged[0] = 0
            if not ahead:
                following = ask_next()
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

    def _goes_on_at_once(self, key: tuple[int, int], pixels: int, images: int) -> bool:
        """Whether a part handed over now would be made ready without waiting for room."""
        with self._lock:
            return self._may_go_on(key, pixels, images)

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
    return Parts(_DecodePool(paths, options, max(1, workers), prefetch_pixels, prefetch, chunk_pixels, processes,
                              consumer_pixels, fork_server, stop, time_limit, budget_bytes))


class Parts:
    """A decode pool's parts, whose ``close()`` stops the pool even before the first part is taken:
    closing a generator that has not started runs none of its code, and a notebook's interrupt
    there left the decode threads (and the fork server) running for the life of the process."""

    def __init__(self, pool: _DecodePool) -> None:
        self._pool = pool
        self._parts = iter(pool)

    def __iter__(self) -> Parts:
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
