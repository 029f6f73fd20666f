"""Real ``gpu-pipeline run`` processes, for the tests that kill, signal or race them, and the decode
processes and interpreters of a run, made to hang, fail or be counted."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent


def start(folder: Path, out: Path, *extra: str, tag: str | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """``gpu-pipeline run`` on ``folder`` into ``out`` in small batches (many writes to kill between).
    ``tag`` goes into the run's environment, which its decode processes inherit (see :func:`tagged`);
    ``env`` adds variables to it."""
    command = [sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", str(out),
               "--backend", "reference", "--batch-size", "8", "--workers", "2", *extra]
    extra = dict(env or {})
    if tag:
        extra["GPU_PIPELINE_TEST_TAG"] = tag
    env = dict(os.environ, **extra) if extra else None
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


#: Makes standard input, a terminal, the controlling terminal of the session this interpreter leads,
#: then runs the rest of its arguments as ``python ARGS``.
_TAKE_THE_TERMINAL = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                      "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


class Terminal:
    """``python ARGS`` in a session of its own whose controlling terminal is a new pseudo-terminal
    (its standard streams too), as an ssh session runs a command: :meth:`hang_up` closes the
    terminal's other end, as a dropped connection does, and the kernel sends the session SIGHUP.
    What the command writes there is read all along (a full terminal would stop it), into ``shown``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        import pty
        import threading

        self._master, slave = pty.openpty()
        try:
            self.process = subprocess.Popen([sys.executable, "-c", _TAKE_THE_TERMINAL, *args], cwd=REPO,
                                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                            env=dict(os.environ, **(env or {})))
        finally:
            os.close(slave)
        self.shown = bytearray()
        self._open = True
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        import select

        while self._open:
            if select.select([self._master], [], [], 0.05)[0]:
                try:
                    self.shown += os.read(self._master, 65536)
                except OSError:  # (EIO: the command has ended and closed its side)
                    return

    def hang_up(self) -> None:
        self._open = False
        self._reader.join()
        os.close(self._master)


def tagged(tag: str) -> list[int]:
    """Processes whose environment carries ``tag``: a run started with it and all it started."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"GPU_PIPELINE_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll ``ready`` until it holds; AssertionError naming ``what`` never happened after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} never happened within {timeout:.0f} s")


#: A ``sitecustomize`` that makes decoding hang for an hour (``$HANG_SECONDS`` when set) on files whose
#: name holds ``$HANG_ON``: a codec in an endless loop, or a read from a hung mount; it creates the file
#: ``$HANG_MARK`` (when set) as it starts to hang. Every interpreter
#: of the run imports it (the run, its fork server and decode processes) when its folder is on ``PYTHONPATH``.
HANGING_DECODER = """
import os, time
if os.environ.get("HANG_ON"):
    import gpu_pipeline.inputs.decode as decode

    def hanging(each):
        def decode_each(paths, *args, **kwargs):
            for path, outcome in zip(paths, each(paths, *args, **kwargs)):
                if os.environ["HANG_ON"] in os.fspath(path):
                    if os.environ.get("HANG_MARK"):
                        open(os.environ["HANG_MARK"], "a").close()
                    time.sleep(float(os.environ.get("HANG_SECONDS", 3600)))
                yield outcome
        return decode_each

    decode.decode_each = hanging(decode.decode_each)
"""


#: A ``sitecustomize`` that creates the file ``$STARTED_MARK`` once the command line's own code runs:
#: ``gpu_pipeline.cli.app`` is being imported and has put its Ctrl-C hook in place (``sys.excepthook``,
#: its first statement), or 50 ms have passed without it (a hook gone: the mark still comes, during
#: the imports), seen by a thread that polls. Only the first interpreter (the run, not its decode
#: processes) watches: the variable is taken out of the environment its children get.
STARTED_MARKER = """
import os, sys, threading, time
mark = os.environ.pop("STARTED_MARK", None)
if mark:
    def watch():
        while "gpu_pipeline.cli.app" not in sys.modules:
            time.sleep(0.001)
        deadline = time.monotonic() + 0.05
        while sys.excepthook is sys.__excepthook__ and time.monotonic() < deadline:
            time.sleep(0.001)
        open(mark, "a").close()
    threading.Thread(target=watch, daemon=True).start()
"""


def sitecustomize(folder: Path, source: str) -> dict[str, str]:
    """The environment in which every interpreter imports ``source`` first (a run, its fork server and
    decode processes): written as ``folder``'s ``sitecustomize``, ``folder`` put on ``PYTHONPATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(source)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def hanging_decoder(folder: Path, name_part: str, seconds: float = 3600) -> dict[str, str]:
    """The environment that makes a run's decoding of files named with ``name_part`` hang for
    ``seconds`` (see :data:`HANGING_DECODER`), its ``sitecustomize`` written in ``folder``; the file
    ``folder / "hanging"`` appears when a decoder starts to hang (see :func:`wait_until_hanging`)."""
    return {**sitecustomize(folder, HANGING_DECODER), "HANG_ON": name_part, "HANG_SECONDS": str(seconds),
            "HANG_MARK": str(folder / "hanging")}


def wait_until_hanging(folder: Path, timeout: float = 60) -> None:
    """Wait until a decoder of :func:`hanging_decoder` (its ``folder``) hangs: a test that acts
    "once the run is stuck" after a sleep passed without testing where a loaded machine had not
    got there yet."""
    wait_until((folder / "hanging").exists, "a decoder hanging", timeout=timeout)


def count_decode_processes(monkeypatch) -> list:
    """Records every DecodeProcess started from now on (the list fills as they start)."""
    from gpu_pipeline.inputs import processes

    started = []
    real = processes.DecodeProcess

    def counted(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(processes, "DecodeProcess", counted)
    return started


def decoding_charge(path: Path) -> int:
    """What decoding ``path`` asks the decoding budget (``decode.budgeted``), in a thread or in a
    decode process alike."""
    from gpu_pipeline.config import DecodeOptions
    from gpu_pipeline.inputs.decode import budgeted, decode_image

    asked: list[int] = []
    with budgeted(asked.append):
        decode_image(path, DecodeOptions())
    (charge,) = asked
    return charge


def count_budget_grants(monkeypatch) -> list[int]:
    """[images the decoding budget has let decode so far], counted as each is let through, from a
    decode thread or for a decode process."""
    import threading

    from gpu_pipeline.engine import decoding

    granted, lock, real = [0], threading.Lock(), decoding._DecodePool._take_budget

    def take_budget(pool, number, charge, charged):
        real(pool, number, charge, charged)  # (returns once there is room)
        with lock:
            granted[0] += 1

    monkeypatch.setattr(decoding._DecodePool, "_take_budget", take_budget)
    return granted


@contextlib.contextmanager
def decoder_with_server(time_limit: float | None = None) -> Iterator:
    """A decode process :class:`~gpu_pipeline.inputs.processes.Decoder` (``time_limit`` its limit a
    file) forking from a fork server of its own; both closed after."""
    from gpu_pipeline.config import DecodeOptions
    from gpu_pipeline.inputs import processes

    server = processes.ForkServer()
    decoder = processes.Decoder(DecodeOptions(), server=server, time_limit=time_limit)
    try:
        yield decoder, server
    finally:
        decoder.close()
        server.close()
