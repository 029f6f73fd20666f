"""The decode processes' fork server dying in the middle of a run (a kill, the OOM killer): its
decode processes die with it, a fresh one takes over, and no image is lost. It used to end the run
with "cannot write to stdout: the reader closed the pipe" (exit 3) and no record of the batches
decoded meanwhile."""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gpu_pipeline.cli import app
from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.inputs import processes
from gpu_pipeline.inputs.decode import decode_image
from tests.runs import decoder_with_server, hanging_decoder, sitecustomize, start, tagged, wait_until

pytestmark = pytest.mark.skipif(not processes.available(), reason="decode processes need Linux (memfd)")
BUNDLED = Path(__file__).resolve().parent.parent / "data"


def images(folder: Path, count: int) -> list[Path]:
    """Images of 300 x 300: a decode process's part holds five of them, so a run asks for many parts."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    paths = [folder / f"img{index:03d}.png" for index in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (300, 300, 3), np.uint8)).save(path, compress_level=1)
    return paths


def dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def test_a_fork_server_that_died_is_replaced_and_its_decode_processes_count_as_killed():
    tiles = [str(path) for path in sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:3]]
    server = processes.ForkServer()
    try:
        first = processes.DecodeProcess(DecodeOptions(), server=server)
        assert first.decode(tiles, 1 << 30)[0] == 3
        died = server._process.pid
        os.kill(died, signal.SIGKILL)
        wait_until(lambda: dead(first.pid), "its decode process dying with it")
        with pytest.raises(processes.DecoderDied, match="SIGKILL"):
            first.decode(tiles, 1 << 30)
        first.close()
        assert first.returncode == -signal.SIGKILL  # (its old server cannot be asked: it is gone)
        second = processes.DecodeProcess(DecodeOptions(), server=server)
        taken, decoded, errors = second.decode(tiles, 1 << 30)
        assert (taken, errors) == (3, {}) and server.restarts == 1 and server._process.pid != died
        assert [image.tobytes() for image in decoded] == [decode_image(p, DecodeOptions()).tobytes() for p in tiles]
        second.close()
        assert second.returncode == 0  # asked of the fresh server
    finally:
        server.close()
    # closed, it is not restarted
    with pytest.raises(OSError):
        processes.DecodeProcess(DecodeOptions(), server=server)
    assert server.restarts == 1


@pytest.mark.parametrize("time_limit", [None, 30.0])
def test_a_file_asked_alone_of_a_process_that_died_with_its_server_is_decoded_again(time_limit):
    """Not the file's doing: the first file of a run, a large image, the last of a chunk are asked
    alone, and each got "the decode process died of SIGKILL while decoding this file"."""
    tile = str(sorted((BUNDLED / "eurosat").rglob("*.jpg"))[0])
    with decoder_with_server(time_limit) as (decoder, server):
        assert decoder.decode([tile], 1 << 30)[2] == {}
        os.kill(server._process.pid, signal.SIGKILL)
        wait_until(lambda: dead(decoder._process.pid), "its decode process dying with it")
        taken, decoded, errors = decoder.decode([tile], 1 << 30)
        assert (taken, len(decoded), errors, server.restarts) == (1, 1, {}, 1)


def test_a_fresh_fork_server_that_dies_at_once_is_replaced_too(monkeypatch):
    """Killed again before its first fork (the OOM killer, during its imports): the next one."""
    real_start, started = processes.ForkServer._start, []

    def start_and_kill_the_second(self):
        real_start(self)
        started.append(self._process.pid)
        if len(started) == 2:
            self._process.kill()
            self._process.wait()

    monkeypatch.setattr(processes.ForkServer, "_start", start_and_kill_the_second)
    server = processes.ForkServer()
    try:
        processes.DecodeProcess(DecodeOptions(), server=server).close()
        os.kill(started[0], signal.SIGKILL)
        processes.DecodeProcess(DecodeOptions(), server=server).close()
        assert len(started) == 3 and server.restarts == 2
    finally:
        server.close()


def test_a_fork_server_is_replaced_three_times_and_the_fourth_death_ends_it():
    """docs/nightly.md: "A server that dies four times in one run ends it" (three fresh ones take over)."""
    server = processes.ForkServer()
    try:
        for deaths in range(1, 4):
            processes.DecodeProcess(DecodeOptions(), server=server).close()
            os.kill(server._process.pid, signal.SIGKILL)
            server._process.wait()
            processes.DecodeProcess(DecodeOptions(), server=server).close()  # a fresh server forks it
            assert server.restarts == deaths
        os.kill(server._process.pid, signal.SIGKILL)
        server._process.wait()
        with pytest.raises(processes.ForkServerDied, match="fork server ended 4 times during the run"):
            processes.DecodeProcess(DecodeOptions(), server=server)
    finally:
        server.close()


def test_a_process_whose_server_is_killed_as_it_forks_it_is_asked_again_of_a_fresh_server(monkeypatch):
    """Its fork server killed just after the fork (the OOM killer), a decode process died before it
    was told anything. The first message to it raised BrokenPipeError out of the decoder, and
    `gpu-pipeline run` took it for a closed stdout (exit 3, "the reader closed the pipe", the run cut
    short). It is a request that failed, and no file's doing: asked again of a fresh server."""
    tiles = [str(path) for path in sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:3]]
    real_fork, forked = processes.ForkServer.fork, []

    def fork_and_kill_the_server_once(self, connection, arena):
        pid = real_fork(self, connection, arena)
        forked.append(pid)
        if len(forked) == 1:
            os.kill(self._process.pid, signal.SIGKILL)
            wait_until(lambda: dead(pid), "the decode process dying with its server")
        return pid

    monkeypatch.setattr(processes.ForkServer, "fork", fork_and_kill_the_server_once)
    with decoder_with_server() as (decoder, server):
        taken, decoded, errors = decoder.decode(tiles, 1 << 30)
        assert (taken, errors, len(forked), server.restarts) == (3, {}, 2, 1)
    assert [image.tobytes() for image in decoded] == [decode_image(p, DecodeOptions()).tobytes() for p in tiles]


def test_a_run_whose_fork_server_is_killed_loses_no_image(tmp_path):
    paths = images(tmp_path / "in", 150)
    slow = hanging_decoder(tmp_path / "site", "img", seconds=0.05)  # (a run of a few seconds)
    tag = f"fork-server-{os.getpid()}"
    # (numba: the reference backend's 90 ms an image made this test the suite's slowest)
    process = start(tmp_path / "in", tmp_path / "out.jsonl", "--decode", "processes", "--backend", "numba", tag=tag,
                    env=slow)
    try:
        def server() -> list[int]:  # the fork server, not its children (the decode processes)
            forking, parents = [], {}
            for pid in tagged(tag):
                try:
                    if b"--fork-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                        forking.append(pid)
                except OSError:  # (ended meanwhile)
                    continue
            return [pid for pid in forking if parents[pid] not in forking]

        wait_until(lambda: (tmp_path / "out.jsonl").exists() and (tmp_path / "out.jsonl").stat().st_size
                   and server(), "the first records")
        os.kill(server()[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "150 ok" in stderr
    written = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line)["path"] for line in written] == [str(path) for path in paths]
    wait_until(lambda: not tagged(tag), "the run's processes ending", timeout=30)
    clean = start(tmp_path / "in", tmp_path / "clean.jsonl", "--decode", "processes", "--backend", "numba")
    assert clean.wait(timeout=120) == 0, clean.stderr.read()
    assert written == (tmp_path / "clean.jsonl").read_text().splitlines()


@pytest.mark.parametrize("given, said", [
    ((), "; the records written before are kept: run the same command again to resume, or use --decode threads"),
    # a time limit needs decode processes; to stdout there is nothing to resume
    (("--decode-timeout", "60"), "; the records written before are kept: run the same command again to resume"),
    (("--out", "-"), "; use --decode threads"),
])
def test_a_fork_server_that_keeps_dying_ends_the_run_in_one_line_and_keeps_the_records(tmp_path, monkeypatch,
                                                                                     given, said):
    paths = images(tmp_path / "in", 60)
    monkeypatch.setattr(processes, "FORK_SERVER_RESTARTS", 0)
    servers, answers = [], []
    real_start, real_answer = processes.ForkServer._start, processes.DecodeProcess.answer

    def started(self):
        real_start(self)
        servers.append(self._process.pid)

    def answer(self, budget=None):
        answers.append(self.pid)
        if len(answers) == 4:
            os.kill(servers[-1], signal.SIGKILL)
            wait_until(lambda: dead(self.pid), "the decode process dying with its server")
        return real_answer(self, budget)

    monkeypatch.setattr(processes.ForkServer, "_start", started)
    monkeypatch.setattr(processes.DecodeProcess, "answer", answer)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "in"), "--out", str(out), "--backend", "reference",
                                      "--decode", "processes", "--workers", "1", "--batch-size", "5", *given])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert ("gpu-pipeline: error: the decode processes' fork server ended once during the run (it died of SIGKILL "
            f"the last time){said}\n") in result.stderr
    if given[:1] == ("--out",):
        assert 0 < len(result.stdout.splitlines()) < len(paths)
        return
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(kept) < len(paths) and all("error" not in record for record in kept)
    monkeypatch.setattr(processes.DecodeProcess, "answer", real_answer)
    resumed = CliRunner().invoke(app, ["run", str(tmp_path / "in"), "--out", str(out), "--backend", "reference"])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(json.loads(line)["path"] for line in out.read_text().splitlines()) == [str(p) for p in paths]


def test_a_decode_process_that_died_with_a_replaced_server_is_not_asked_of_the_new_one():
    """Its pid means nothing to the fresh server (never its child): asking would wait 5 s and kill
    whatever process has that number now, or fail."""
    server = processes.ForkServer()
    try:
        process = processes.DecodeProcess(DecodeOptions(), server=server)
        os.kill(server._process.pid, signal.SIGKILL)
        wait_until(lambda: dead(process.pid), "its decode process dying with it")
        processes.DecodeProcess(DecodeOptions(), server=server).close()  # a fresh server forks it
        started = time.monotonic()
        process.close()
        assert process.returncode == -signal.SIGKILL and time.monotonic() - started < 1
        # and the fresh server still serves, not restarted again
        processes.DecodeProcess(DecodeOptions(), server=server).close()
        assert server.restarts == 1
    finally:
        server.close()


def test_a_fork_server_closed_while_a_fork_restarts_it_is_stopped_not_left_running(monkeypatch):
    """A close does not wait for a fork: one that was starting a fresh server (the old one died)
    stops it when it sees the close, rather than leave it (and what it forks) to the process's end."""
    real_start, started = processes.ForkServer._start, []

    def start_then_close(self):
        real_start(self)
        started.append(self._process)
        if len(started) == 2:  # the fresh one: the pool closes the server meanwhile
            closing = threading.Thread(target=self.close)
            closing.start()
            closing.join()

    monkeypatch.setattr(processes.ForkServer, "_start", start_then_close)
    server = processes.ForkServer()
    processes.DecodeProcess(DecodeOptions(), server=server).close()
    os.kill(started[0].pid, signal.SIGKILL)
    with pytest.raises(OSError, match="closed"):
        processes.DecodeProcess(DecodeOptions(), server=server)
    assert len(started) == 2 and started[1].returncode is not None  # ended and waited for


def test_a_fork_server_closed_while_it_forks_is_not_started_again(monkeypatch):
    """A fork that fails because the pool closed the server meanwhile is no death: the fork says
    closed, and no fresh server is started only to be stopped."""
    real_fork = processes.ForkServer._fork

    def close_then_fork(self, connection, arena):
        closing = threading.Thread(target=self.close)
        closing.start()
        closing.join()
        return real_fork(self, connection, arena)

    monkeypatch.setattr(processes.ForkServer, "_fork", close_then_fork)
    started = []
    real_started = processes.ForkServer._started
    monkeypatch.setattr(processes.ForkServer, "_started", lambda self: started.append(1) or real_started(self))
    server = processes.ForkServer()
    with pytest.raises(OSError):
        processes.DecodeProcess(DecodeOptions(), server=server)
    assert (len(started), server.restarts) == (1, 0)



def test_a_decode_process_whose_fork_fails_leaves_no_socket_open():
    """A run that closes while a decoder starts its decode process (an early close of the Python API's
    generator, a Ctrl-C) closes the fork server under it: the fork fails, and its end of the socket
    pair was left to the garbage collector, which said so on stderr under ``python -X dev``
    ("ResourceWarning: unclosed <socket.socket ...>", found by the race soak)."""
    server = processes.ForkServer()
    server.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            processes.DecodeProcess(DecodeOptions(), server=server)
        except OSError:
            pass  # (the exception and its frames go here: a socket left open is collected, and warns)
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []



def test_a_fork_server_that_cannot_start_leaves_no_socket_open(monkeypatch):
    """A fork server whose interpreter cannot be started (a limit on processes: EAGAIN; or a Ctrl-C as
    it starts) left our end of its socket pair to the garbage collector, which said so under
    ``python -X dev`` ("ResourceWarning: unclosed <socket.socket ...>", found by the race soak)."""
    def cannot_start(*arguments, pass_fds):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(processes, "_interpreter", cannot_start)
    server = processes.ForkServer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            server.fork(0, 0)
        except processes.DecodeProcessesFailed:
            pass  # (the exception and its frames go here: a socket left open is collected, and warns)
        gc.collect()
    server.close()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


REAPER = """
import ctypes, os, signal, sys, time
sys.path.insert(0, {repo!r})
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: as PID 1 in a container, orphans become ours
from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.inputs import processes
from tests.runs import wait_until
server = processes.ForkServer()
process = processes.DecodeProcess(DecodeOptions(), server=server)
os.kill(server._process.pid, signal.SIGKILL)
wait_until(lambda: open(f"/proc/{{process.pid}}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", "its death")
processes.DecodeProcess(DecodeOptions(), server=server).close()  # a fresh server
process.close()
server.close()
def parent(pid):
    try:
        return int(open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[1])
    except OSError:  # (another process of the machine, ended since the listing)
        return None
children = [pid for pid in os.listdir("/proc") if pid.isdigit() and parent(pid) == os.getpid()]
print(len(children), process.returncode)
"""


def test_decode_processes_of_a_dead_server_are_reaped_where_they_become_the_runs_children():
    """PID 1 in a container (docker without --init), or a subreaper: the decode processes of a fork
    server that died are the run's children, and stayed zombies for its life."""
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", REAPER.format(repo=repo)], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0", str(-signal.SIGKILL)], done.stderr


FORK_FAILS = """
import os
if os.environ.get("FORK_FAILS"):
    def fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")
    os.fork = fork
"""


def test_a_fork_server_that_cannot_fork_ends_the_run_in_one_line(tmp_path):
    """A limit on processes (a pids cgroup) or no memory: the server says so, rather than die with a
    traceback (three times, then "Aborted.")."""
    import subprocess
    import sys

    images(tmp_path / "in", 30)
    env = dict(os.environ, FORK_FAILS="1", **sitecustomize(tmp_path / "site", FORK_FAILS))
    done = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(tmp_path / "in"), "--out",
                           str(tmp_path / "out.jsonl"), "--backend", "reference", "--decode", "processes"],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "gpu-pipeline: error: cannot start a decode process: Resource temporarily unavailable; the records written "
        "before are kept: run the same command again to resume, or use --decode threads")
    assert "Traceback" not in done.stderr


def test_parts_decoded_before_the_decoders_failed_still_make_a_batch():
    """A batch not yet full when the decoders fail for good: its images go on to be computed and
    written (resume then starts after them), before the failure is raised."""
    from gpu_pipeline.engine.decoding import DecodedPart
    from gpu_pipeline.engine.stream import part_batches
    from gpu_pipeline.images import ImageBatch

    def parts():
        for first in (0, 2):
            yield DecodedPart([f"{first + k}.png" for k in range(2)],
                              ImageBatch.of([np.full((4, 4), first + k, np.uint8) for k in range(2)]))
        raise processes.ForkServerDied("the decode processes' fork server ended 4 times")

    batches = part_batches(parts(), batch_size=10, batch_pixels=1 << 20)
    batch = next(batches)
    assert batch.paths == ["0.png", "1.png", "2.png", "3.png"] and len(batch.images) == 4
    with pytest.raises(processes.ForkServerDied):
        next(batches)


def test_a_fork_server_that_cannot_be_started_again_ends_the_run_in_one_line(tmp_path, monkeypatch):
    """Its interpreter cannot be started (a limit on processes) after the first one died."""
    images(tmp_path / "in", 60)
    real_interpreter, real_answer, started, answers = processes._interpreter, processes.DecodeProcess.answer, [], []

    def interpreter(*arguments, pass_fds):
        if started:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        started.append(real_interpreter(*arguments, pass_fds=pass_fds))
        return started[-1]

    def answer(self, budget=None):
        answers.append(self.pid)
        if len(answers) == 4:
            started[0].kill()
            wait_until(lambda: dead(self.pid), "the decode process dying with its server")
        return real_answer(self, budget)

    monkeypatch.setattr(processes, "_interpreter", interpreter)
    monkeypatch.setattr(processes.DecodeProcess, "answer", answer)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "in"), "--out", str(out), "--backend", "reference",
                                      "--decode", "processes", "--workers", "1", "--batch-size", "5"])
    assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit))
    assert result.stderr.splitlines()[-1] == (
        "gpu-pipeline: error: cannot start the decode processes' fork server: Resource temporarily unavailable; "
        "the records written before are kept: run the same command again to resume, or use --decode threads")
    assert out.read_text().count("\n") > 0


EARLY_CLOSE = """
import ctypes, os, sys, time
sys.path.insert(0, {repo!r})
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: as PID 1 in a container, orphans become ours
import gpu_pipeline
for _ in range(3):
    records = gpu_pipeline.run({folder!r}, backend="reference", decode="processes", workers=2)
    [next(records) for _ in range(3)]
    records.close()
time.sleep(1)
def state_and_parent(pid):
    try:  # (a process of the machine's that ends meanwhile, one the test never made, has no stat)
        with open(f"/proc/{{pid}}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None, None
    return fields[0], int(fields[1])
zombies = [pid for pid in os.listdir("/proc") if pid.isdigit() and state_and_parent(pid) == ("Z", os.getpid())]
print(len(zombies))
"""


def test_an_early_close_leaves_no_zombie_where_the_run_is_pid_1(tmp_path):
    """Closing the pool stops the fork server first: it reaps the decode processes it forked
    before it ends (they were left to the run, PID 1 in a container, as zombies: two a closed run)."""
    import subprocess
    import sys

    folder = tmp_path / "in"
    folder.mkdir()
    tile = np.random.default_rng(3).integers(0, 256, (64, 64, 3), np.uint8)
    for index in range(5000):  # (the decoders are still at work when the third record comes)
        Image.fromarray(tile).save(folder / f"{index:04d}.jpg")
    repo = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", EARLY_CLOSE.format(repo=repo, folder=str(folder))],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["0"], done.stderr


def test_a_decode_process_that_does_not_die_of_sigkill_is_not_waited_for_for_ever(monkeypatch):
    """A process in an uninterruptible read (a dead block device, some FUSE mounts) ends only when the
    read does: after the kill, it is said killed rather than waited for, and the fork server's lock
    (every other decoder's next fork) is not held for ever."""
    killed = []
    monkeypatch.setattr(processes.os, "waitpid", lambda pid, options: (0, 0))  # never ends
    monkeypatch.setattr(processes.os, "kill", lambda pid, number: killed.append((pid, number)))
    started = time.monotonic()
    assert processes._reaped(12345, wait_s=0.05) == -signal.SIGKILL
    assert killed == [(12345, signal.SIGKILL)] and time.monotonic() - started < 1


def test_a_fork_server_that_cannot_be_started_at_all_ends_the_run_in_one_line(tmp_path, monkeypatch):
    """Started early, while the backend loads: its failure is said by the run, not as a traceback."""
    images(tmp_path / "in", 20)

    def interpreter(*arguments, pass_fds):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(processes, "_interpreter", interpreter)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "in"), "--out", str(tmp_path / "out.jsonl"),
                                      "--backend", "reference", "--decode", "processes", "--workers", "1"])
    assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit))
    assert result.stderr.splitlines()[-1] == (
        "gpu-pipeline: error: cannot start the decode processes' fork server: Resource temporarily unavailable; "
        "the records written before are kept: run the same command again to resume, or use --decode threads")


def test_a_run_whose_decoders_fail_for_good_writes_every_batch_decoded_before():
    """The batch computing when the failure comes is handed on too, then the failure is raised."""
    from gpu_pipeline.backends import create
    from gpu_pipeline.engine import stream
    from gpu_pipeline.engine.decoding import DecodedPart
    from gpu_pipeline.engine.stream import Engine
    from gpu_pipeline.images import ImageBatch

    def decoded(paths):
        for first in (0, 2, 4):
            yield DecodedPart(paths[first:first + 2],
                              ImageBatch.of([np.full((8, 8), 40 * (first + k), np.uint8) for k in range(2)]))
        raise processes.ForkServerDied("the decode processes' fork server ended 4 times")

    class Parts:  # what decode_parts gives: its parts, a stop, a close
        def __init__(self, paths):
            self._parts = decoded(paths)

        def __iter__(self):
            return self._parts

        def stop_decoding(self):
            pass

        def close(self):
            self._parts.close()

    def parts(paths, *args, **kwargs):
        return Parts(paths)

    paths = [f"/in/{k}.png" for k in range(6)]
    written = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stream, "decode_parts", parts)
        with pytest.raises(processes.ForkServerDied):
            for batch in Engine(create("reference"), batch_size=2, processes=False).record_batches(paths):
                written += [record["path"] for record in batch]
    assert written == paths


def _views_of_other_than_bytes(exc: BaseException) -> list[memoryview]:
    """The memoryviews that the frames of ``exc``'s traceback hold, but views of bytes."""
    views, traceback = [], exc.__traceback__
    while traceback is not None:
        views += [value for value in traceback.tb_frame.f_locals.values()
                  if isinstance(value, memoryview) and not isinstance(value.obj, bytes)]
        traceback = traceback.tb_next
    return views


def test_a_request_to_a_dead_process_leaves_nothing_for_the_garbage_collector_to_complain_of():
    """``Connection.send`` pickles into a BytesIO and sends a view of it. The failed send's traceback,
    kept with the request, held that view, and the garbage collector cleared the BytesIO under it:
    Python 3.12.1 crashed (segmentation fault in the collector, CPython gh-111049: the decode tests, 4
    runs in 10), 3.13 printed "Exception ignored in: <_io.BytesIO ...>" on the run's stderr.
    The view is checked on every Python; the crash and the complaint where they happen."""
    import gc
    import sys

    complaints = []
    hook, sys.unraisablehook = sys.unraisablehook, complaints.append
    try:
        with decoder_with_server() as (decoder, _):
            tiles = [str(path) for path in sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:2]]
            decoder.decode(tiles, 1 << 30)
            process = decoder._process
            os.kill(process.pid, signal.SIGKILL)
            wait_until(lambda: dead(process.pid), "the decode process dying")
            process.ask(tiles, 1 << 30)  # the send fails: answer() says so
            _, _, failure = process._asked
            assert isinstance(failure, OSError) and _views_of_other_than_bytes(failure) == []
            with pytest.raises(processes.DecoderDied):
                process.answer()
            decoder._process = None
            process.close()
            del process, failure
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert complaints == []


def test_a_fork_server_answering_a_run_that_closed_its_end_ends_quietly():
    """A pool of decode processes closed (an early stop, parts closed) while the fork server answers
    one of them: the answer found the socket closed, and the server printed a BrokenPipeError
    traceback on the run's stderr (seen once in 80 early closes). It ends as when its run has gone."""
    import socket
    import subprocess

    ours, servers = socket.socketpair()
    child = subprocess.Popen(["true"])
    ours.sendall(b"w" + child.pid.to_bytes(8, "little", signed=True))  # how did it end?
    ours.close()
    with servers:
        processes._serve_fork_requests(servers, set())


def test_a_fork_server_reads_a_request_that_comes_in_pieces():
    """A stream socket may hand a request over in pieces: the server reads all 9 bytes of one (its
    letter and the pid), however they are cut, and the next request from where that one ends."""
    import fcntl
    import socket
    import struct
    import subprocess
    import termios

    def unread(sock):
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]

    ours, servers = socket.socketpair()
    ours.settimeout(30)  # (a request misread: the server waits for bytes that never come, or has failed)
    serving = threading.Thread(target=processes._serve_fork_requests, args=(servers, set()), daemon=True)
    serving.start()
    codes = []
    for cut in range(8, 0, -1):
        child = subprocess.Popen(["sh", "-c", f"exit {cut}"])
        request = b"s" + child.pid.to_bytes(8, "little", signed=True)
        ours.sendall(request[:cut])
        wait_until(lambda: unread(servers) == 0, "the server reading the first piece")
        ours.sendall(request[cut:])
        codes.append(processes._number(ours))
    ours.close()
    serving.join(60)
    servers.close()
    assert codes == list(range(8, 0, -1)) and not serving.is_alive()


def test_a_fork_server_whose_run_ends_in_the_middle_of_a_request_ends():
    """The run killed as it sent a request: the server read an empty string for the rest of it, for
    ever, one core busy, rather than end as when its run has gone."""
    import socket

    ours, servers = socket.socketpair()
    ours.sendall(b"s" + (1234).to_bytes(8, "little", signed=True)[:3])
    ours.close()
    serving = threading.Thread(target=processes._serve_fork_requests, args=(servers, set()), daemon=True)
    serving.start()
    serving.join(60)
    servers.close()
    assert not serving.is_alive()
