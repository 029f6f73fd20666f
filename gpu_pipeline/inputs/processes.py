"""Decode processes: files decoded by worker processes, pixels handed over in shared memory.

A process has its own GIL, so the Python that decoding a file costs (open, read, header, the codec
call: 30-50 us a tile) no longer stalls the threads of the main process, and decoding scales with
the cores where decode threads in one process stop near 8 (docs/benchmarks.md). PyTorch's
DataLoader does the same. What crosses over:

* to the worker: the paths of a chunk of files (once, as one string), then a request per part of
  it with where to put the pixels (one message a part of 256 tiles, never one an image; the next
  part is asked for before the last one is handed on, so the worker seldom waits, unless the last
  one must wait for room in the decode pool);
* back: where each image lies (raw bytes) and the error of each file that failed. **Pixels are
  never pickled or copied** on this side: the main process hands out views of the shared memory,
  and the worker decodes plain JPEGs straight into it;
* for a large image, before it is decoded, what its decoding will hold (``decode.budgeted``): the
  worker waits for the main side's go, given once the run's decoding budget has room for it
  (under ``--decode-timeout`` scenes are decoded in processes too). Tiles never ask.

The shared memory is an *arena* per worker (an anonymous ``memfd``, mapped once by both sides),
cut into slots of ``slot_bytes``. A request carries a free slot; the slot is free again when the
last view of its pixels is gone (a ``weakref.finalize`` on the slot's array), so its pages are
faulted in once and reused, as ``malloc`` reuses the memory of decode threads. (Fresh shared pages
cost 7-13 us a tile on the 2-core VM: more than the GIL a tile this saves.) When no slot is free,
or an image is larger than a slot (a scene), the worker puts the part in a ``memfd`` of its own and
passes its descriptor over the socket: slower, never blocking.

Workers are forked by a :class:`ForkServer`, a plain ``python -m gpu_pipeline.inputs.processes``
interpreter that imported the decoders once (so each worker holds about 5 MB of its own), not
``multiprocessing`` children: a user's script without an ``if __name__ == "__main__"`` guard is
never imported again in them. They run in a session of their own and ignore SIGINT, so a Ctrl-C
is the main process's to handle (it flushes, then ends them), and each ends when its socket
closes, so none outlives the run, even one killed with SIGKILL; one stuck in a codec or a read,
which never looks at its socket, is killed by the kernel when the fork server ends, with the run
or when its decode pool is closed (``PR_SET_PDEATHSIG``). Under a time limit (``--decode-timeout``)
one that spends longer than that on a file is killed, and the file gets an error record
(:class:`Decoder`); a fork server that dies is replaced (:class:`ForkServer`). Linux only
(``memfd``); elsewhere :func:`available` is False and the engine decodes in threads.
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.images import ImageBatch
from gpu_pipeline.inputs.decode import OFF_BOUNDARY

#: ``(stage, message)`` of each file that could not be decoded, by its index in the request.
Errors = dict[int, tuple[str, str]]


def available() -> bool:
    """Whether decode processes can run here (anonymous shared memory and descriptor passing)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


#: ``--decode``: where files are decoded.
DECODE_MODES = ("auto", "threads", "processes")

#: Open files a run needs besides its decode processes (output, lock, settings, files being read,
#: the fork server's socket), and for each decode process (its socket and the connection's copy of
#: it; while one starts, its arena and the other end; a part handed over in a memfd), with room to
#: spare: 1, 4 and 8 decode processes ran with at most 12, 24 and 40 on the 2-core VM.
DESCRIPTORS_BESIDES = 32
DESCRIPTORS_PER_PROCESS = 8


def descriptors_needed(processes: int) -> int:
    """The open files a run with ``processes`` decode processes may need at once."""
    return DESCRIPTORS_BESIDES + DESCRIPTORS_PER_PROCESS * processes


def room_for_descriptors(processes: int) -> str | None:
    """None when this process may open the files ``processes`` decode processes need, raising its
    soft limit (``ulimit -n``) to the hard one's if that is what it takes; else why not."""
    try:
        import resource
    except ImportError:  # not on a Unix
        return None
    need = descriptors_needed(processes)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    limit = soft
    if hard == resource.RLIM_INFINITY or hard >= need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
            return None
        except (ValueError, OSError):
            pass
    else:
        limit = hard
    needs = "1 decode process needs" if processes == 1 else f"{processes} decode processes need"
    return f"{needs} about {need} open files; this process may open {limit} (ulimit -n)"


def processes_wanted(mode: str) -> bool | None:
    """``--decode MODE`` as the engine's ``processes``: None (auto), False (threads), True (processes)."""
    from gpu_pipeline.errors import UsageError

    if mode not in DECODE_MODES:
        raise UsageError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    if mode == "processes" and not available():
        raise UsageError("--decode processes needs Linux (memfd_create and descriptor passing); use --decode threads")
    return None if mode == "auto" else mode == "processes"


#: Bytes after an arena's slots, where its decode process under a time limit notes its progress: two
#: float64, since when (``time.monotonic``) and on which file of the request (its position; -1
#: between files) it has been working. See :meth:`DecodeProcess.stuck_on`.
PROGRESS_BYTES = 16
#: Slots of an arena and their size, unless the decode pool says (it sizes them by what it holds,
#: a slot three bytes a pixel of its part): here 256 K RGB pixels, 64 EuroSAT tiles.
SLOTS = 8
SLOT_BYTES = 3 << 18


class DecoderDied(RuntimeError):
    """The worker process ended while it decoded (a crash in a codec, or it was killed)."""


class DecodeProcessesFailed(RuntimeError):
    """No decode process can be started: the run cannot go on decoding in processes."""


class ForkServerDied(DecodeProcessesFailed):
    """The decode processes' fork server died again and again (it is restarted :data:`FORK_SERVER_RESTARTS` times)."""


class DecodeTimedOut(DecoderDied):
    """The worker process spent longer than its time limit on one file, and was killed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"reading and decoding took longer than the time limit of {seconds:g} s; "
                         "its decode process was killed")


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent.parent)


class _Slots:
    """The free slots of an arena; a slot comes back when its pixels are no longer referenced."""

    def __init__(self, count: int, slot_bytes: int) -> None:
        self._free = [index * slot_bytes for index in reversed(range(count))]
        self._lock = threading.RLock()  # a finalizer may run inside this very thread

    def take(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def give_back(self, offset: int) -> None:
        with self._lock:
            self._free.append(offset)  # last in, first out: the pages in use stay few and warm


def _interpreter(*arguments: str, pass_fds: tuple[int, ...]) -> subprocess.Popen:
    """``python -m gpu_pipeline.inputs.processes ARGUMENTS`` in a session of its own (a Ctrl-C at the
    terminal is the main process's to handle), importing this very package wherever it came from,
    in this process's UTF-8 mode: the paths go over as text, and under a Latin-1 locale a worker in
    the other mode (``-X utf8`` here, or ``-X utf8=0`` beside the PYTHONUTF8=1 the command line sets)
    opened another name, or none."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), env.get("PYTHONPATH")]))
    env["PYTHONUTF8"] = "1" if sys.flags.utf8_mode else "0"
    return subprocess.Popen([sys.executable, "-m", "gpu_pipeline.inputs.processes", *arguments],
                            pass_fds=pass_fds, env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def _number(sock: socket.socket) -> int:
    data = b""
    while len(data) < 8:
        more = sock.recv(8 - len(data))
        if not more:
            raise EOFError
        data += more
    return int.from_bytes(data, "little", signed=True)


#: Fresh fork servers a :class:`ForkServer` starts when its interpreter has died (a kill, the OOM
#: killer) before it gives up with :class:`ForkServerDied`.
FORK_SERVER_RESTARTS = 3


class ForkServer:
    """An interpreter that imports the decoders once and forks a decode process on request.

    The decode processes share its pages: about 5 MB of memory of their own each (PSS), where a
    fresh interpreter with numpy, Pillow, tifffile and imagecodecs holds 25-33 MB. It is
    single-threaded, so forking it is safe, and it ends when the main process closes it or dies.
    When it dies first, its decode processes die with it (``PR_SET_PDEATHSIG``), and the next fork
    starts a fresh one (:data:`FORK_SERVER_RESTARTS` times at most).
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None  # started by the first fork
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()  # one request at a time, from any decode thread
        self._closed = False
        self._forked: set[int] = set()  # the decode processes of the interpreter running now, not yet waited for
        self.restarts = 0

    def start(self) -> None:
        """Start the interpreter now, if it is not running yet, without waiting for its imports (the
        first fork waits for them): a caller starts it while it has other work to do."""
        with self._lock:
            if self._process is None:
                with contextlib.suppress(DecodeProcessesFailed):  # (said by the first fork, to the run)
                    self._start()

    def _start(self) -> None:
        """Start the interpreter; :class:`DecodeProcessesFailed` when it cannot be (a limit on processes)."""
        try:
            self._started()
        except OSError as exc:
            raise DecodeProcessesFailed(f"cannot start the decode processes' fork server: {exc.strerror or exc}") \
                from exc

    def _started(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = _interpreter("--fork-server", str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        except BaseException:  # (no process: a limit on processes, a Ctrl-C) ours too, not left to the collector
            ours.close()
            raise
        finally:
            theirs.close()
        self._socket = ours

    def fork(self, connection: int, arena: int) -> int:
        """A decode process serving ``connection`` with ``arena`` (descriptors); returns its pid.
        OSError once closed; :class:`ForkServerDied` when it died more often than it may be restarted."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the fork server was closed")
            if self._process is None:
                self._start()
            while True:
                try:
                    pid = self._fork(connection, arena)
                    break
                except (OSError, EOFError):
                    if self._closed:
                        raise
                    self._restart()  # it died (the fresh one too, maybe): what it forked died with it
            if pid < 0:  # its fork failed: -errno (a limit on processes, no memory)
                raise DecodeProcessesFailed(f"cannot start a decode process: {os.strerror(-pid)}")
            self._forked.add(pid)
            return pid

    def _fork(self, connection: int, arena: int) -> int:
        socket.send_fds(self._socket, [b"f"], [connection, arena])
        return _number(self._socket)

    def _restart(self) -> None:
        self._socket.close()
        self._process.kill()  # (it no longer answers: dead, or about to be)
        self._process.wait()
        self._forked.clear()
        if self.restarts == FORK_SERVER_RESTARTS:
            times = "once" if self.restarts == 0 else f"{self.restarts + 1} times"
            raise ForkServerDied(f"the decode processes' fork server ended {times} during the run "
                                 f"(it {_ended(self._process.returncode)} the last time)")
        self.restarts += 1
        self._start()
        if self._closed:  # closed meanwhile (a close does not wait for a fork): what it had to stop, this stops
            self._socket.close()
            self._process.wait()
            raise OSError(errno.EBADF, "the fork server was closed")

    def exit_status(self, pid: int) -> int | None:
        """How decode process ``pid`` ended, as ``Popen.returncode`` says it (-N: signal N); one
        still running after 5 s is killed first. None for one forked by an interpreter that has
        died since (the kernel killed it then); OSError or EOFError when this one has died or was closed."""
        with self._lock:
            if pid not in self._forked:
                return None
            self._socket.sendall(b"s" + pid.to_bytes(8, "little", signed=True))
            code = _number(self._socket)
            self._forked.discard(pid)
            return code

    def close(self) -> None:
        self._closed = True
        if self._process is None:
            return
        self._socket.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _ended(code: int) -> str:
    """How a process ended, from its ``Popen.returncode``: ``died of SIGKILL``, ``ended with status 1``."""
    if code < 0:
        try:
            return f"died of {signal.Signals(-code).name}"
        except ValueError:
            return f"died of signal {-code}"
    return f"ended with status {code}"


def _serve_forks(descriptor: int) -> None:
    """The fork server's loop: fork a decode process, or report how one ended."""
    import gc

    import gpu_pipeline.inputs.decode  # noqa: F401  (what every decode process shares)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()  # the imported objects are never collected: their pages stay shared
    sock = socket.socket(fileno=descriptor)
    children: set[int] = set()  # forked, not yet reaped
    try:
        _serve_fork_requests(sock, children)
    finally:  # ended with this server (closed, or the run died): reaped here, not left to whoever inherits them
        _kill_and_reap(children)


def _kill_and_reap(children: set[int], wait_s: float = 1.0) -> None:
    """SIGKILL ``children`` and reap those that end within ``wait_s`` (one stuck in a read from a hung
    mount ends only when the read does: it is left, to the kernel and whoever inherits it)."""
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while children and time.monotonic() < deadline:
        for pid in list(children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                children.discard(pid)
        time.sleep(0.005)


def _answer(sock: socket.socket, value: int) -> bool:
    """Send ``value``; False when the main process has closed its end (its decode processes closed
    as one asked: an early stop) or died: a BrokenPipeError's traceback went to the run's stderr."""
    try:
        sock.sendall(value.to_bytes(8, "little", signed=True))
    except ConnectionError:
        return False
    return True


def _serve_fork_requests(sock: socket.socket, children: set[int]) -> None:
    while True:
        try:
            message, descriptors, _, _ = socket.recv_fds(sock, 9, 2)
        except ConnectionError:
            return
        if not message:
            return  # the main process closed its end, or died
        if message[:1] == b"f":
            server = os.getpid()
            try:
                pid = os.fork()
            except OSError as exc:  # (a limit on processes, no memory): said, not a traceback and a dead server
                for fd in descriptors:
                    os.close(fd)
                if not _answer(sock, -(exc.errno or errno.EAGAIN)):
                    return
                continue
            if pid == 0:
                sock.close()
                try:
                    _end_with(server)
                    _serve(*descriptors)
                finally:
                    os._exit(0)
            children.add(pid)
            for fd in descriptors:
                os.close(fd)
            if not _answer(sock, pid):
                return
        else:
            while len(message) < 9:
                more = sock.recv(9 - len(message))
                if not more:
                    return  # the main process died in the middle of a request
                message += more
            pid = int.from_bytes(message[1:9], "little", signed=True)
            code = _reaped(pid)
            children.discard(pid)
            if not _answer(sock, code):
                return


def _end_with(server: int) -> None:
    """Have the kernel SIGKILL this decode process when the fork server ``server`` ends, which it does
    when its run ends or dies: a decode process stuck in a codec or in a read from a hung mount
    never looks at its socket again, and outlived its run."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the fork server is single-threaded
    except (OSError, AttributeError):  # (not Linux: no decode processes there)
        return
    if os.getppid() != server:  # it ended before the call
        os._exit(0)


def _reaped(pid: int, wait_s: float = 5.0) -> int:
    """How child ``pid`` ended, once reaped; one still running after ``wait_s`` is killed, and said
    killed (-SIGKILL) without waiting for ever: a process in an uninterruptible read from a dead
    mount ends only when the read does (it is reaped later, or by whoever inherits it)."""
    deadline, killed = time.monotonic() + wait_s, False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            if killed:
                return -signal.SIGKILL
            os.kill(pid, signal.SIGKILL)
            deadline, killed = time.monotonic() + wait_s, True
        time.sleep(0.01)


class DecodeProcess:
    """One worker process and its arena, used by one decode thread at a time: forked by ``server``
    when given, else a fresh interpreter."""

    def __init__(self, options: DecodeOptions, slots: int = SLOTS, slot_bytes: int = SLOT_BYTES,
                 server: ForkServer | None = None, time_limit: float | None = None, budgeted: bool = False) -> None:
        self.slot_bytes = slot_bytes
        self.time_limit = time_limit  # seconds it may spend on one file of a request; None: no limit
        self.returncode: int | None = None  # how the process ended, once it has
        self.died_with_server = False  # it ended because its fork server did (killed, or closed)
        arena = os.memfd_create("gpu-pipeline-arena", os.MFD_CLOEXEC)
        ours, theirs = socket.socketpair()
        try:
            os.ftruncate(arena, slots * slot_bytes + PROGRESS_BYTES)
            self._arena = mmap.mmap(arena, slots * slot_bytes + PROGRESS_BYTES, prot=mmap.PROT_READ)
            # since when, and on which file, the process has been working, under a time limit
            self._progress = np.frombuffer(self._arena, np.float64, 2, slots * slot_bytes)
            self._server = server
            if server is not None:
                self.pid = server.fork(theirs.fileno(), arena)
            else:
                self._process = _interpreter(str(theirs.fileno()), str(arena), pass_fds=(theirs.fileno(), arena))
                self.pid = self._process.pid
        except BaseException:  # (a fork refused by a server closed with its run: left to the garbage
            self._progress = None  # collector, the socket and the map stayed open, held by the traceback)
            if getattr(self, "_arena", None) is not None:
                self._arena.close()  # (its view dropped first: a map with views cannot close)
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(arena)
        self._slots = _Slots(slots, slot_bytes)
        self._socket = ours
        self._connection = Connection(os.dup(ours.fileno()))
        # what the process is to decode and how, sent with the first request: a process that died
        # before it (its fork server killed as it forked) is then a request that failed, like any other;
        # ``budgeted``: it asks before it decodes a large image (see answer)
        self._greeting: tuple | None = (options, slot_bytes, time_limit is not None, budgeted)
        self._queued: list[str] = []  # paths the worker holds and has not taken yet
        self._asked: tuple[list[str], int | None, OSError | None] = ([], None, None)  # paths, slot, failure
        self._asked_at = 0.0  # when (time.monotonic)
        self._given_up_at: float | None = None  # the progress note it was killed at (_answered_in_time)

    def decode(self, paths: list[str], most_pixels: int) -> tuple[int, ImageBatch, Errors]:
        """Decode ``paths`` in order until ``most_pixels`` pixels are decoded or a slot is full (at
        least one file is taken). Returns how many paths were taken, the images of those that
        decoded (in order) and the errors of the others. Raises :class:`DecoderDied`."""
        self.ask(paths, most_pixels)
        return self.answer()

    def ask(self, paths: list[str], most_pixels: int) -> None:
        """:meth:`decode` in two halves: send the request, so that the process decodes while the
        caller does something else, then :meth:`answer`. One request at a time."""
        slot = self._slots.take()
        self._asked = (paths, slot, None)
        self._asked_at = time.monotonic()
        try:
            if self._greeting is not None:
                _send(self._connection, self._greeting)
                self._greeting = None
            # the paths go over once: a request for the rest of the last ones sends None
            _send(self._connection, (None if paths == self._queued else "\0".join(paths), most_pixels, slot))
        except OSError as exc:  # the process has died: answer() says so
            self._asked = (paths, slot, exc)

    def answer(self, budget: Callable[[int], None] | None = None) -> tuple[int, ImageBatch, Errors]:
        """The part :meth:`ask` asked for (what :meth:`decode` returns). Raises :class:`DecoderDied`,
        and :class:`DecodeTimedOut` after killing the process when it spent ``time_limit`` seconds on
        one file (see :meth:`_answered_in_time`; its slot is not reused: the arena goes with it).
        A process made ``budgeted`` asks, before it decodes a large image, for what its decoding
        will hold: ``budget(bytes)`` is called, and returns once there is room (what it raises, this
        raises), then the process goes on. Its time limit starts again after the wait."""
        paths, slot, failure = self._asked
        try:
            while True:
                if failure is None and self.time_limit is not None and not self._answered_in_time():
                    with contextlib.suppress(ProcessLookupError):  # (not reaped before it is waited for)
                        os.kill(self.pid, signal.SIGKILL)
                    raise DecodeTimedOut(self.time_limit)
                if failure is not None:
                    raise failure
                message = self._connection.recv()
                if not isinstance(message, int):
                    break
                if budget is not None:  # (a large image: the process waits for the go)
                    budget(message)
                self._asked_at = time.monotonic()
                _send(self._connection, True)
            taken, layout, errors, used, own_bytes = message
            self._queued = paths[taken:]
            pixels = None
            if own_bytes:  # the part came in a memfd of its own
                _, descriptors, _, _ = socket.recv_fds(self._socket, 1, 1)
                if not descriptors:
                    raise EOFError
                with open(descriptors[0], "rb", closefd=True) as shared:
                    pixels = np.frombuffer(mmap.mmap(shared.fileno(), own_bytes, prot=mmap.PROT_READ), np.uint8)
            elif used:
                pixels = np.frombuffer(memoryview(self._arena)[slot:slot + used], np.uint8)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            raise DecoderDied(self._death()) from exc
        if slot is not None:
            if pixels is not None and not own_bytes:
                weakref.finalize(pixels, self._slots.give_back, slot)  # views of ``pixels`` keep it alive
            else:
                self._slots.give_back(slot)
        layout = np.frombuffer(layout, np.int64).reshape(-1, 4)
        images = ImageBatch.packed(pixels, layout) if pixels is not None else ImageBatch.empty()
        return taken, images, errors

    def _answered_in_time(self) -> bool:
        """Whether the answer came before the process had spent ``time_limit`` seconds on one file:
        since the request, or since it began reading or decoding the file it is on (it writes down
        when, from the system-wide monotonic clock, in the arena's last bytes). When not, the note
        it was given up on is kept for :meth:`stuck_on`."""
        while True:
            deadline = max(self._asked_at, float(self._progress[0])) + self.time_limit
            if self._connection.poll(max(0.0, deadline - time.monotonic())):
                return True
            noted = float(self._progress[0])
            if max(self._asked_at, noted) + self.time_limit <= time.monotonic():
                self._given_up_at = noted
                return False

    def stuck_on(self) -> int | None:
        """After :meth:`answer` killed the process at its time limit, and it has ended (:meth:`close`):
        the position in the request of the file it was stuck on, reading or decoding it. None when
        it was between files (sending its reply), had not begun the request's first file (a note
        older than the request: the last reply's, or none yet), or had moved on after all when it
        was killed."""
        if self._given_up_at is None or self._given_up_at < self._asked_at \
                or float(self._progress[0]) != self._given_up_at:
            return None
        position = int(self._progress[1])
        return position if 0 <= position < len(self._asked[0]) else None

    def _wait(self) -> int:
        """The process's exit status, once it has ended (killed after 5 s)."""
        if self.returncode is None:
            if self._server is not None:
                try:
                    self.returncode = self._server.exit_status(self.pid)
                except (OSError, EOFError):  # the fork server has died, or was closed (a closed pool)
                    self.returncode = None
                if self.returncode is None:  # the kernel killed this process with its server
                    self.returncode, self.died_with_server = -signal.SIGKILL, True
                    with contextlib.suppress(ChildProcessError):  # reaped here where it became this process's
                        _reaped(self.pid)                          # child (PID 1 in a container, a subreaper)
            else:
                try:
                    self.returncode = self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self.returncode = self._process.wait()
        return self.returncode

    def _death(self) -> str:
        return f"the decode process {_ended(self._wait())}"

    def close(self) -> None:
        """End the worker: it sees its socket close and exits. Views handed out stay valid."""
        self._connection.close()
        self._socket.close()
        self._wait()


class Decoder:
    """A decode process that is started on first use and comes back after a crash.

    A process killed at its ``time_limit`` (seconds on one file) has noted which file it was on: that
    one gets an error record (``decode`` stage), and the files before it in the request are decoded
    again in a fresh process. When the process dies in the middle of a request, or was killed
    between files, the request's files are decoded again one at a time in a fresh process, so that
    only the file that kills its decoder, or takes longer than the limit on its own, gets an error;
    the others decode as usual. A process that died with its fork server (a kill, the OOM killer)
    is no file's doing: the request is asked again of a fresh server's.

    ``budget``, when given, is called with what the decoding of each large image will hold before
    the process decodes it, and returns once there is room (see :meth:`DecodeProcess.answer`).
    """

    def __init__(self, options: DecodeOptions, slots: int = SLOTS, slot_bytes: int = SLOT_BYTES,
                 server: ForkServer | None = None, time_limit: float | None = None,
                 budget: Callable[[int], None] | None = None) -> None:
        self._options = options
        self._slots, self._slot_bytes = slots, slot_bytes
        self._server = server
        self._time_limit = time_limit
        self.budget = budget
        self._process: DecodeProcess | None = None
        self._asked: tuple[list[str], int] = ([], 0)  # the paths and pixels of the request in flight

    def decode(self, paths: list[str], most_pixels: int) -> tuple[int, ImageBatch, Errors]:
        """What :meth:`DecodeProcess.decode` returns, crashes included as errors."""
        self.ask(paths, most_pixels)
        return self.answer()

    def ask(self, paths: list[str], most_pixels: int) -> None:
        """:meth:`decode` in two halves, as :meth:`DecodeProcess.ask`."""
        if self._process is None:
            self._process = DecodeProcess(self._options, self._slots, self._slot_bytes, self._server,
                                          self._time_limit, self.budget is not None)
        self._asked = (paths, most_pixels)
        self._process.ask(paths, most_pixels)

    def answer(self) -> tuple[int, ImageBatch, Errors]:
        """The part :meth:`ask` asked for, crashes included as errors."""
        paths, most_pixels = self._asked
        try:
            return self._process.answer(self.budget)
        except DecoderDied as death:
            dead, self._process = self._process, None
            dead.close()  # its sockets and arena; it has been waited for
            if dead.died_with_server and not isinstance(death, DecodeTimedOut):
                # not the files' doing: all of them again, in a process of a fresh fork server (one that
                # keeps dying ends in ForkServerDied; a closed one in OSError)
                return self.decode(paths, most_pixels)
            stuck = dead.stuck_on() if isinstance(death, DecodeTimedOut) else None
            if stuck is not None:
                return self._up_to(paths[:stuck], most_pixels, (stuck, ("decode", str(death))))
            if len(paths) == 1:
                said = str(death) if isinstance(death, DecodeTimedOut) else f"{death} while decoding this file"
                return 1, ImageBatch.empty(), {0: ("decode", said)}
        return self._one_at_a_time(paths, most_pixels)

    def _up_to(self, paths: list[str], most_pixels: int, stuck: tuple[int, tuple[str, str]]
               ) -> tuple[int, ImageBatch, Errors]:
        """Every one of ``paths`` (the files before the ``stuck`` one: its position and error) decoded,
        in as many requests as that takes, then the stuck file's error: the part ends there. (A file
        read ahead may have been stuck past the part the request would have taken: the part is larger.)"""
        position, error = stuck
        taken, parts, errors = 0, [], {}
        while taken < len(paths):
            part_taken, images, part_errors = self.decode(paths[taken:], most_pixels)
            parts.append(images)
            errors.update((taken + k, e) for k, e in part_errors.items())
            taken += part_taken
        errors[position] = error
        return position + 1, ImageBatch.concatenate(parts), errors

    def _one_at_a_time(self, paths: list[str], most_pixels: int) -> tuple[int, ImageBatch, Errors]:
        taken, images, errors, pixels = 0, [], {}, 0
        for index, path in enumerate(paths):
            _, image, error = self.decode([path], most_pixels)
            if error:
                errors[index] = error[0]
            else:
                images.append(image)
                pixels += int(image.pixels.sum())
            taken = index + 1
            if pixels >= most_pixels:
                break
        return taken, ImageBatch.concatenate(images), errors

    def close(self) -> None:
        if self._process is not None:
            self._process.close()
            self._process = None


def slot_bytes_for(part_pixels: int, most_images: int) -> int:
    """Bytes of a slot for a part of ``part_pixels`` RGB pixels in at most ``most_images`` images,
    each placed up to 15 bytes on (:func:`placed_at`); a multiple of 64, so that every slot of an
    arena starts on the same boundary as the first."""
    return -(-(3 * part_pixels + 16 * most_images) // 64) * 64


def placed_at(offset: int) -> int:
    """Where in a slot an image goes at or after ``offset``: :data:`~gpu_pipeline.inputs.decode.OFF_BOUNDARY`
    bytes past a 16-byte boundary, for the reason given there (the arena starts on a page, and
    :func:`slot_bytes_for` makes slots a multiple of 64 bytes)."""
    return offset + (OFF_BOUNDARY - offset) % 16


def place_in(room: np.ndarray, used: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """The view of ``room`` (uint8, a slot or a part's buffer) where an image of ``shape`` goes once
    ``used`` bytes of it are taken (:func:`placed_at`), or None when the image does not fit."""
    start, size = placed_at(used), math.prod(shape)
    return room[start:start + size].reshape(shape) if start + size <= len(room) else None


class _Worker:
    """The worker's side: decode the queued files in order, pack a part's pixels into a slot.

    The files of a chunk are queued once; each request takes the next part of them. Reading ahead
    (``decode_each`` reads a group of files before it decodes them) carries over from one request
    to the next, so a part that ends inside a group reads nothing twice. Plain JPEGs (every tile)
    are decoded straight into the slot; other images are decoded, then copied there.
    """

    def __init__(self, sock: socket.socket, arena: mmap.mmap, options: DecodeOptions, timed: bool = False,
                 connection: Connection | None = None) -> None:
        from gpu_pipeline.inputs.decode import decode_each

        self._decode_each = decode_each
        self._socket = sock
        self._connection = connection  # (asks the decoding budget: ask_budget)
        self._arena = np.frombuffer(arena, np.uint8)
        # under a time limit: since when, and on which file, it has been working (see DecodeProcess.stuck_on)
        self._progress = np.frombuffer(arena, np.float64, 2, len(arena) - PROGRESS_BYTES) if timed else None
        self._options = options
        self._queued: list[str] = []  # the chunk's paths not taken yet
        self._taken = 0  # the chunk's paths taken by earlier requests
        self._outcomes: Iterator[np.ndarray | tuple[str, str]] = iter(())  # decode_each of them
        self._carried: np.ndarray | None = None  # the first queued image: it did not fit the last slot
        self._room: tuple[int, int, int] | None = None  # the slot being filled: (slot, bytes used, slot bytes)
        self._in_place: np.ndarray | None = None  # the last image handed out to be decoded in place

    def queue(self, paths: list[str]) -> None:
        self._queued, self._carried, self._taken = paths, None, 0
        self._outcomes = self._decode_each(paths, self._options, into=self._next_place,
                                           working=self._working_on if self._progress is not None else None)

    def _working_on(self, position: int) -> None:
        """Note that the file at ``position`` of the chunk is read or decoded from now on, by its
        position in the request (one read ahead may lie past the part the request ends up taking)."""
        self._note(position - self._taken)

    def _note(self, position: float) -> None:
        # the time first: a note caught half written then has a time the main side never gave up on
        self._progress[0] = time.monotonic()
        self._progress[1] = position

    def ask_budget(self, charge: int) -> None:
        """Ask the main side for room for a large image's decoding (``charge`` bytes: what
        ``decode.budgeted`` asks), and wait for its go; the file's time limit starts again after
        the wait. The main side gone, :class:`_MainGone`: nothing more is decoded."""
        try:
            _send(self._connection, charge)  # (an int: a reply is a tuple)
            self._connection.recv()
        except (EOFError, ConnectionError) as exc:
            raise _MainGone from exc
        if self._progress is not None:
            self._note(self._progress[1])

    def _next_place(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """The slot's next place as an array of ``shape``, if the image fits in what is left."""
        if self._room is None:
            return None
        slot, used, slot_bytes = self._room
        self._in_place = place_in(self._arena[slot:slot + slot_bytes], used, shape)
        return self._in_place

    def answer(self, most_pixels: int, slot: int | None, slot_bytes: int):
        """The next part of the queued files: the reply, and the images to copy where it says
        (``(offset, image)``; those decoded in place are there already)."""
        to_copy, errors, placed, pixels, used, taken = [], {}, [], 0, 0, 0
        for index in range(len(self._queued)):
            if self._carried is not None:
                outcome, self._carried = self._carried, None
            else:
                self._room = (slot, used, slot_bytes) if slot is not None else None
                outcome = next(self._outcomes)
                self._room = None
            if isinstance(outcome, tuple):
                errors[index] = outcome
            else:
                start = placed_at(used)
                if slot is not None and placed and start + outcome.size > slot_bytes:
                    self._carried = outcome  # the next request starts with it
                    break
                placed.append((outcome.shape[0], outcome.shape[1], outcome.shape[2] if outcome.ndim == 3 else 0, start))
                if outcome is not self._in_place:
                    to_copy.append((start, outcome))
                used = start + outcome.size
                pixels += outcome.shape[0] * outcome.shape[1]
            self._in_place = None
            taken = index + 1
            if pixels >= most_pixels:
                break
        if self._progress is not None:
            self._note(-1)  # between files: packing and sending the reply is no file's doing
        self._queued = self._queued[taken:]
        self._taken += taken
        in_slot = slot is not None and used <= slot_bytes
        layout = np.array(placed, np.int64).reshape(-1, 4)  # sent as bytes: an array's pickle costs 10-20 us
        return (taken, layout.tobytes(), errors, used if in_slot else 0, 0 if in_slot else used), to_copy, in_slot

    def fill_slot(self, to_copy: list[tuple[int, np.ndarray]], slot: int) -> None:
        for offset, image in to_copy:
            self._arena[slot + offset:slot + offset + image.size] = image.reshape(-1)

    def send_in_own_memory(self, to_copy: list[tuple[int, np.ndarray]]) -> None:
        """The images in a memfd of their own, each at its offset, its descriptor sent over the socket."""
        shared = os.memfd_create("gpu-pipeline-pixels", os.MFD_CLOEXEC)
        try:
            parts, end = [], 0
            for offset, image in to_copy:
                parts += [bytes(offset - end), np.ascontiguousarray(image)]
                end = offset + image.size
            os.writev(shared, parts)  # faster than faulting in a mapping
            socket.send_fds(self._socket, [b"p"], [shared])
        finally:
            os.close(shared)


class _MainGone(BaseException):
    """The main side closed its end while a worker waited for its go: not an image's error."""


def _send(connection: Connection, message: object) -> None:
    """``connection.send(message)`` without its BytesIO: ``Connection.send`` pickles into one and
    sends a view of it, which the traceback of a failed send (a process that died) keeps alive. The
    garbage collector then clears the BytesIO under its view: CPython 3.12.1 crashes (segmentation
    fault, gh-111049) and 3.13 prints "Exception ignored in: <_io.BytesIO ...>" (gh-111331)."""
    connection.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def _serve(descriptor: int, arena_descriptor: int) -> None:
    """The worker's loop: requests in, pixels out, until the socket closes."""
    from gpu_pipeline.inputs.decode import budgeted, quiet_codecs

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_codecs()  # it writes to the run's stderr
    sock = socket.socket(fileno=descriptor)
    connection = Connection(os.dup(descriptor))
    arena = mmap.mmap(arena_descriptor, 0)
    os.close(arena_descriptor)
    try:
        options, slot_bytes, timed, asks = connection.recv()
        worker = _Worker(sock, arena, options, timed, connection)
        with budgeted(worker.ask_budget if asks else None):
            while True:
                text, most_pixels, slot = connection.recv()
                if text is not None:  # a new chunk; None: the next part of the last one
                    worker.queue(text.split("\0") if text else [])
                reply, to_copy, in_slot = worker.answer(most_pixels, slot, slot_bytes)
                if in_slot:
                    worker.fill_slot(to_copy, slot)  # before the reply: it says the pixels are there
                _send(connection, reply)
                if to_copy and not in_slot:  # then nothing was decoded in place
                    worker.send_in_own_memory(to_copy)
                to_copy = None  # (held while it waits for the next request, a scene was 36 MB a process)
    except (EOFError, ConnectionError, _MainGone):
        pass  # the main process closed its end (or died): nothing left to do


if __name__ == "__main__":
    if sys.argv[1] == "--fork-server":
        _serve_forks(int(sys.argv[2]))
    else:
        _serve(int(sys.argv[1]), int(sys.argv[2]))
