"""The standard streams as a cron job, a daemon or a pipe leaves them.

* A closed descriptor (``2>&-``) makes Python's ``sys.stderr`` None (a crash at the first
  ``isatty``), and the next file the command opens takes its number: a library's message to fd 2
  would land in the output lock. Closed ones are opened on /dev/null first, and ``run --out -``
  with standard output closed is refused.
* Messages are not results: a full disk or a reader gone behind ``2>`` must not turn a command
  that did its work into a failure (GNU tools ignore it too), so failed writes to stderr are dropped.
* Results are: a failed write to stdout (a full disk, ``| head`` that stopped reading, a stdout
  closed at the start, ``>&-``) ends the command with exit 3 and one line, as ``run --out -`` does.
  stdout is wrapped to know that a write to it failed: a full disk under another file (numba's
  cache) is named as such (exit 1), and a broken pipe of ours (a socket), which click ends as if
  stdout's, is shown as it is. A command whose results go to stdout refuses a stdout closed at the
  start before it does anything (``options.refuse_closed_stdout``): a write that fails later came
  after its files were written.
* gpu-pipeline's own warnings (:class:`PipelineWarning`) read as the commands' other messages,
  ``warning: ...`` on one line, not in Python's format (the file and line that made the call).
* matplotlib's logged warnings (a home it cannot write, a font cache it builds) are not shown:
  they are not the commands' messages, and a system account's cron job printed them every night.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import sys
import warnings

from gpu_pipeline.errors import EXIT_WRITE_ERROR, PipelineWarning, printable

#: What a failed write to stdout raises: a full disk or quota, a reader gone, a terminal gone (closed
#: with the run still writing to it: an ssh session dropped under ``nohup`` or after a SIGHUP).
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EPIPE, errno.EIO})

#: The standard streams that were closed when the command started ("stdin", "stdout", "stderr").
closed: set[str] = set()
#: Whether rich met a closed pipe on stdout (it then exits 1, which for verify means "differs").
_pipe_closed = False
#: Whether a write to stdout failed (a full disk, a reader gone): what tells the command's end that an
#: OSError, or click's exit 1 after a broken pipe, was stdout's and not another file's or socket's.
stdout_failed = False
#: Whether stdout was closed when the command started and nothing has said so yet: its writes fail
#: (:class:`StdoutClosed`) rather than go to the /dev/null put in its place.
_stdout_lost = False


class ForgivingStream:
    """A text stream whose failed writes are dropped: stderr, for messages."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def prepare() -> None:
    """Open closed standard descriptors on /dev/null (lowest first, so each gets its own number),
    and make stderr forgiving."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(name)
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", encoding="utf-8", closefd=False,
                                    errors="backslashreplace" if name == "stderr" else "strict"))
    sys.stderr = ForgivingStream(sys.stderr)
    _note_failed_stdout_writes()
    _note_rich_broken_pipes()
    _one_line_warnings()
    logging.getLogger("matplotlib").setLevel(logging.ERROR)  # (--plot: see the module's docstring)


def _one_line_warnings() -> None:
    """:class:`PipelineWarning` printed ``warning: MESSAGE``: numba's dispatcher, which called the
    code that warned, was named as its source ("dispatcher.py:926: RuntimeWarning: ...", then that
    line of numba's code). Other warnings are shown as Python shows them."""
    show = warnings.showwarning

    def show_ours(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, PipelineWarning):
            return show(message, category, filename, lineno, file, line)
        print(f"warning: {printable(str(message))}", file=file or sys.stderr)

    warnings.showwarning = show_ours


class StdoutClosed(OSError):
    """A write to a standard output that was closed when the command started (``>&-``): the
    /dev/null put in its place would lose a table or the help without a word, exit 0."""


class _Stdout(io.FileIO):
    """File descriptor 1, noting a write that fails (:data:`stdout_failed`)."""

    def write(self, data) -> int | None:
        try:
            if _stdout_lost:
                raise StdoutClosed(errno.EBADF, "standard output is closed")
            return super().write(data)
        except OSError:
            global stdout_failed
            stdout_failed = True
            raise


def _note_failed_stdout_writes() -> None:
    """``sys.stdout`` as Python made it (encoding, errors, line buffering, unbuffered under ``-u``),
    over :class:`_Stdout`: print, click, rich and the records (``sys.stdout.buffer``) all write through it."""
    made = sys.stdout
    global _stdout_lost
    _stdout_lost = "stdout" in closed
    raw = _Stdout(1, "w", closefd=False)
    buffered = isinstance(getattr(made, "buffer", None), io.BufferedWriter)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw) if buffered else raw, encoding=made.encoding,
                                  errors=made.errors, line_buffering=made.line_buffering,
                                  write_through=getattr(made, "write_through", False))


def _note_rich_broken_pipes() -> None:
    from rich.console import Console

    exits = Console.on_broken_pipe

    def on_broken_pipe(console: Console) -> None:
        global _pipe_closed
        _pipe_closed = True
        exits(console)  # stdout onto /dev/null, then SystemExit(1)

    Console.on_broken_pipe = on_broken_pipe


def reader_went_away() -> bool:
    """Whether a command's stdout met a closed pipe, which click and rich end with exit 1 (click
    wraps stdout first, in a class of its own or of the copy typer carries)."""
    return _pipe_closed or type(sys.stdout).__name__ == "PacifyFlushWrapper"


def pipe_of_ours(exit: SystemExit) -> OSError | None:
    """The broken pipe that click ended with exit 1 as if stdout's reader had gone, when no write to
    stdout failed (a decode process's socket: a bug of ours, to be shown as it is); None when it was stdout's."""
    cause = exit.__context__
    return cause if isinstance(cause, OSError) and not (stdout_failed or _pipe_closed) else None


def write_failed(reason: str) -> int:
    """Say that stdout could not be written, send what is still buffered to /dev/null (Python's exit
    would try again, print "Exception ignored" and exit 120), and return :data:`EXIT_WRITE_ERROR`."""
    from gpu_pipeline.outputs.lines import stdout_to_devnull  # (not imported by every command's start)

    global _stdout_lost
    with contextlib.suppress(OSError):
        stdout_to_devnull()
    _stdout_lost = False  # (what is still buffered goes to /dev/null at exit)
    print(f"gpu-pipeline: error: cannot write to stdout: {reason}", file=sys.stderr)
    return EXIT_WRITE_ERROR
