"""``--decode-timeout``: an image whose decoding never ends (a codec caught in a loop, a read from a
hung mount) gets an error record, its decode process is killed, and the run goes on. Without it such
an image held its batch, and every record after it, until the run was stopped."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import gpu_pipeline
from gpu_pipeline.backends import create
from gpu_pipeline.cli import app
from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.engine.stream import Engine
from gpu_pipeline.inputs import processes
from gpu_pipeline.inputs.decode import decode_image
from tests.runs import (count_budget_grants, count_decode_processes, decoder_with_server, decoding_charge,
                        hanging_decoder, sitecustomize, start, tagged, wait_until, wait_until_hanging)

needs_processes = pytest.mark.skipif(not processes.available(), reason="decode processes need Linux (memfd)")
BUNDLED = Path(__file__).resolve().parent.parent / "data"


def timed_out(seconds: float) -> str:
    return f"reading and decoding took longer than the time limit of {seconds:g} s; its decode process was killed"


def images(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(size)
    paths = [folder / f"img{index:03d}.png" for index in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(path)
    return paths


def lines_by_path(path: Path) -> dict[str, str]:
    return {json.loads(line)["path"]: line for line in path.read_text().splitlines()}


@needs_processes
@pytest.mark.parametrize("size", [64, 600])  # parts of many tiles; scenes (decoded in threads without a limit)
def test_an_image_stuck_in_its_decoder_gets_an_error_record_and_the_run_goes_on(tmp_path, size):
    paths = images(tmp_path / "in", 40 if size == 64 else 8, size)
    stuck = paths[len(paths) // 2]
    tag = f"timeout-{size}-{os.getpid()}"
    started = time.monotonic()
    process = start(tmp_path / "in", tmp_path / "out.jsonl", "--decode-timeout", "1", tag=tag,
                    env=hanging_decoder(tmp_path / "site", stuck.stem))
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    # the stuck image's part waits out the limit once
    assert time.monotonic() - started < 30
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr and "1 failed" in stderr
    records = lines_by_path(tmp_path / "out.jsonl")
    assert list(records) == [str(path) for path in paths]
    assert json.loads(records.pop(str(stuck))) == {"path": str(stuck), "stage": "decode", "error": timed_out(1)}
    wait_until(lambda: not tagged(tag), "the run's processes ending", timeout=30)
    # every other record is what a run without the stuck image writes, byte for byte
    stuck.unlink()
    clean = start(tmp_path / "in", tmp_path / "clean.jsonl", "--decode-timeout", "1")
    assert clean.wait(timeout=60) == 0, clean.stderr.read()
    assert records == lines_by_path(tmp_path / "clean.jsonl")


@needs_processes
def test_a_decoder_gives_up_on_the_file_it_was_stuck_on_and_keeps_the_others(tmp_path, monkeypatch):
    """The second part of a chunk is asked of the process, which does not answer in time: killed
    once. It had noted which file of the part it was on: that one gets the error, the one before it
    is decoded again in a fresh process, and the part ends there; the rest is asked for next, as
    after any part."""
    for name, value in hanging_decoder(tmp_path / "site", "stuck").items():
        monkeypatch.setenv(name, value)  # (the fork server's interpreter takes it up)
    tiles = sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:4]
    paths = [str(tiles[0]), str(tiles[1]), str(tmp_path / "stuck.jpg"), str(tiles[2]), str(tiles[3])]
    Path(paths[2]).write_bytes(tiles[0].read_bytes())
    started_processes = count_decode_processes(monkeypatch)
    with decoder_with_server(time_limit=1.0) as (decoder, _):
        first = decoder.decode(paths, 64 * 64)  # one tile's worth
        started = time.monotonic()
        second = decoder.decode(paths[1:], 1 << 30)
        elapsed = time.monotonic() - started
        rest = decoder.decode(paths[3:], 1 << 30)
        # only the one asked for the part was killed (the stuck file was not tried again)
        assert [process.returncode for process in started_processes] == [-9, None]
    assert [(taken, errors) for taken, _, errors in (first, second, rest)] == [
        (1, {}), (2, {1: ("decode", timed_out(1))}), (2, {})]
    expected = [decode_image(paths[k], DecodeOptions()).tobytes() for k in (0, 1, 3, 4)]
    assert [image.tobytes() for _, images, _ in (first, second, rest) for image in images] == expected
    assert elapsed >= 1  # the limit was waited out



@needs_processes
def test_a_decoder_stuck_on_the_first_file_of_a_part_blames_it_at_once(tmp_path, monkeypatch):
    """The file at position 0 of a request is a file like any other: the one killed process blames
    it, and nothing is asked again (it was not redone a file at a time, which cost the limit twice)."""
    for name, value in hanging_decoder(tmp_path / "site", "stuck").items():
        monkeypatch.setenv(name, value)  # (the fork server's interpreter takes it up)
    tiles = sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:2]
    paths = [str(tmp_path / "stuck.jpg"), *map(str, tiles)]
    Path(paths[0]).write_bytes(tiles[0].read_bytes())
    started_processes = count_decode_processes(monkeypatch)
    with decoder_with_server(time_limit=1.0) as (decoder, _):
        taken, decoded, errors = decoder.decode(paths, 1 << 30)
        rest_taken, rest, rest_errors = decoder.decode(paths[taken:], 1 << 30)
        assert [process.returncode for process in started_processes] == [-9, None]  # one kill
    assert (taken, len(decoded), errors) == (1, 0, {0: ("decode", timed_out(1))})
    assert (rest_taken, rest_errors) == (2, {})
    assert [image.tobytes() for image in rest] == [decode_image(p, DecodeOptions()).tobytes() for p in tiles]


@needs_processes
def test_a_process_killed_at_its_limit_as_its_fork_server_dies_still_blames_its_file(tmp_path, monkeypatch):
    """Its fork server gone by the time it is waited for, a process killed at its limit cannot be
    told from one that died with its server; it was still given up on for its file: that one gets
    the error at once, rather than the whole request asked again (and the limit waited out twice)."""
    for name, value in hanging_decoder(tmp_path / "site", "stuck").items():
        monkeypatch.setenv(name, value)  # (the fork server's interpreter takes it up)
    tiles = sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:2]
    paths = [str(tiles[0]), str(tmp_path / "stuck.jpg"), str(tiles[1])]
    Path(paths[1]).write_bytes(tiles[0].read_bytes())
    real_answered_in_time, killed = processes.DecodeProcess._answered_in_time, []

    def and_the_server_dies_once(self):
        if real_answered_in_time(self):
            return True
        if not killed:
            killed.append(self._server._process.pid)
            self._server._process.kill()
            self._server._process.wait()
        return False

    monkeypatch.setattr(processes.DecodeProcess, "_answered_in_time", and_the_server_dies_once)
    started_processes = count_decode_processes(monkeypatch)
    with decoder_with_server(time_limit=1.0) as (decoder, server):
        taken, decoded, errors = decoder.decode(paths, 1 << 30)
        assert [process.returncode for process in started_processes] == [-9, None]  # one kill
        assert killed and server.restarts == 1
    assert (taken, errors) == (2, {1: ("decode", timed_out(1))})
    assert [image.tobytes() for image in decoded] == [decode_image(paths[0], DecodeOptions()).tobytes()]


@needs_processes
def test_a_large_image_stuck_after_its_wait_for_room_is_blamed_at_once(tmp_path, monkeypatch):
    """A large image's process waits for room, then decodes; its time limit starts again after the
    wait, and so does its note of the file it is on. Stuck after the go, that file is the one given
    up on: it gets the error at the first kill, and the file before it is decoded again. (With the
    note from before the wait, the request was redone a file at a time, the stuck file killed a
    second process, and its error came after twice the limit.)"""
    for name, value in hanging_decoder(tmp_path / "site", "never-decodes").items():
        monkeypatch.setenv(name, value)  # (the fork server's interpreter takes it up; the test's name says "stuck")
    first, stuck, last = images(tmp_path / "in", 3, 1024)
    stuck = stuck.rename(stuck.with_name("never-decodes.png"))
    paths = [str(first), str(stuck), str(last)]
    started_processes = count_decode_processes(monkeypatch)
    with decoder_with_server(time_limit=1.0) as (decoder, _):
        decoder.budget = lambda charge: time.sleep(1.5)  # each large image waits longer than the limit
        taken, decoded, errors = decoder.decode(paths, 1 << 30)
        assert [process.returncode for process in started_processes] == [-9, None]  # one kill
    assert (taken, errors) == (2, {1: ("decode", timed_out(1))})
    assert [image.tobytes() for image in decoded] == [decode_image(first, DecodeOptions()).tobytes()]


STUCK_READ = """
import os, time
if os.environ.get("STUCK_READ"):
    import gpu_pipeline.inputs.decode as decode

    def stuck(read):
        def read_small_file(path):
            if os.environ["STUCK_READ"] in os.fspath(path):
                time.sleep(3600)
            return read(path)
        return read_small_file

    decode._read_small_file = stuck(decode._read_small_file)
"""


@needs_processes
def test_a_read_stuck_ahead_of_the_part_blames_that_file_once(tmp_path, monkeypatch):
    """Small files are read a group at a time before they are decoded, so a read that hangs may be
    of a file past the part being asked for (two tiles' worth of pixels here, the stuck file the
    fourth). The file it was reading gets the error, at the first kill: the part grows to it.
    (Redone one at a time, the part's files decoded, the process read ahead into the stuck file
    again, and it cost the limit three times.)"""
    for name, value in {**sitecustomize(tmp_path / "site", STUCK_READ), "STUCK_READ": "stuck"}.items():
        monkeypatch.setenv(name, value)
    tiles = [str(path) for path in sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:5]]
    paths = [*tiles[:3], str(tmp_path / "stuck.jpg"), *tiles[3:]]
    Path(paths[3]).write_bytes(Path(tiles[0]).read_bytes())
    started_processes = count_decode_processes(monkeypatch)
    with decoder_with_server(time_limit=1.0) as (decoder, _):
        taken, decoded, errors = decoder.decode(paths, 2 * 64 * 64)
        rest_taken, rest, rest_errors = decoder.decode(paths[taken:], 1 << 30)
        assert [process.returncode for process in started_processes] == [-9, None]
    assert (taken, errors, rest_taken, rest_errors) == (4, {3: ("decode", timed_out(1))}, 2, {})
    expected = [decode_image(paths[k], DecodeOptions()).tobytes() for k in (0, 1, 2, 4, 5)]
    assert [image.tobytes() for image in [*decoded, *rest]] == expected


STUCK_REPLY = """
import os, pickle, time
if os.environ.get("STUCK_REPLY"):
    from multiprocessing.connection import Connection

    def stuck_once(send_bytes):
        def send_reply(self, data):
            message = pickle.loads(data)
            if isinstance(message, tuple) and len(message) == 5:  # a decode process's reply to a request
                try:
                    os.close(os.open(os.environ["STUCK_REPLY"], os.O_CREAT | os.O_EXCL))
                    time.sleep(3600)
                except FileExistsError:
                    pass
            return send_bytes(self, data)
        return send_reply

    Connection.send_bytes = stuck_once(Connection.send_bytes)
"""


def test_a_process_that_moved_on_as_it_was_killed_blames_no_file():
    """The file a killed process was on is blamed only when its note is the one the limit was
    passed on, and was written for this request: one written after (it finished that file as the
    limit passed) is another file's, and one from before the request is no file's."""
    process = processes.DecodeProcess.__new__(processes.DecodeProcess)
    process._asked = (["a.jpg", "b.jpg", "c.jpg"], None, None)
    process._asked_at = 99.0
    process._given_up_at = 100.0
    process._progress = np.array([100.0, 1.0])
    assert process.stuck_on() == 1
    process._progress = np.array([100.5, 2.0])  # moved on to the next file after the decision
    assert process.stuck_on() is None
    process._progress = np.array([100.0, -1.0])  # between files
    assert process.stuck_on() is None
    process._asked_at, process._progress = 101.0, np.array([100.0, 0.0])  # the last request's note
    assert process.stuck_on() is None


class _NotedAsItWasKilled:
    """A decode process's progress as the main side reads it: file 1 noted at 100 s and past the
    limit, then file 2 noted between the decision and any later look (the worker finished file 1)."""

    def __init__(self) -> None:
        self.looks, self.values = 0, np.array([100.0, 1.0])

    def __getitem__(self, index):
        if index == 0:
            self.looks += 1
            if self.looks == 3:  # (the first look sets the wait, the second decides)
                self.values[:] = [time.monotonic(), 2.0]
        return self.values[index]


def test_the_note_a_process_was_given_up_on_is_the_one_the_limit_was_passed_on(monkeypatch):
    """Read again after the decision, the note named file 2, which had just begun: it was blamed,
    and file 1, the slow one, decoded again (the limit waited out twice)."""
    process = processes.DecodeProcess.__new__(processes.DecodeProcess)
    process._asked, process._asked_at, process.time_limit = (["a.jpg", "b.jpg", "c.jpg"], None, None), 0.0, 1.0
    process._progress, process.pid = _NotedAsItWasKilled(), -1
    process._connection = type("Silent", (), {"poll": lambda self, timeout: False})()
    monkeypatch.setattr(processes.os, "kill", lambda pid, signal: None)
    with pytest.raises(processes.DecodeTimedOut):
        process.answer()
    assert process._given_up_at == 100.0 and process.stuck_on() is None  # (file 1 was not what it was on last)


SLOW_START = """
import os, time
if os.environ.get("SLOW_START"):
    from multiprocessing.connection import Connection

    def slow_once(recv):
        def receive(self):
            message = recv(self)
            if isinstance(message, tuple) and len(message) == 3 and (message[0] is None or isinstance(message[0], str)):
                try:  # a decode process's first request: 2 s before it begins the first file
                    os.close(os.open(os.environ["SLOW_START"], os.O_CREAT | os.O_EXCL))
                    time.sleep(2)
                except FileExistsError:
                    pass
            return message
        return receive

    Connection.recv = slow_once(Connection.recv)
"""


@needs_processes
@pytest.mark.parametrize("source, variable", [(STUCK_REPLY, "STUCK_REPLY"), (SLOW_START, "SLOW_START")],
                         ids=["sending its reply", "before its first file"])
def test_a_process_killed_on_no_file_blames_none_of_them(tmp_path, monkeypatch, source, variable):
    """A process killed while it sends its reply, or before it began the request's first file (a
    busy machine; a fresh process's notes are zeros, and file 0 was blamed though never opened),
    was on no file: the part's files are decoded again one at a time, and none gets an error. Each
    happens the first time only."""
    marker = tmp_path / "once"
    for name, value in {**sitecustomize(tmp_path / "site", source), variable: str(marker)}.items():
        monkeypatch.setenv(name, value)
    tiles = [str(path) for path in sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:3]]
    started_processes = count_decode_processes(monkeypatch)
    with decoder_with_server(time_limit=1.0) as (decoder, _):
        taken, decoded, errors = decoder.decode(tiles, 1 << 30)
        assert [process.returncode for process in started_processes] == [-9, None]
    assert marker.exists() and (taken, errors) == (3, {})
    assert [image.tobytes() for image in decoded] == [decode_image(path, DecodeOptions()).tobytes() for path in tiles]


@needs_processes
def test_an_image_slower_than_usual_but_within_the_limit_decodes(tmp_path, monkeypatch):
    for name, value in hanging_decoder(tmp_path / "site", "slow", seconds=0.5).items():
        monkeypatch.setenv(name, value)
    tile = sorted((BUNDLED / "eurosat").rglob("*.jpg"))[0]
    (tmp_path / "slow.jpg").write_bytes(tile.read_bytes())
    with decoder_with_server(time_limit=3.0) as (decoder, _):
        taken, decoded, errors = decoder.decode([str(tile), str(tmp_path / "slow.jpg")], 1 << 30)
    assert (taken, len(decoded), errors) == (2, 2, {})


@needs_processes
def test_the_limit_is_a_files_not_its_parts(tmp_path, monkeypatch):
    """Five files of 0.6 s each in one part (3 s) under a 1 s limit: none is stuck, none is killed
    (the part's time was once what counted: killed, and every file redone one at a time)."""
    for name, value in hanging_decoder(tmp_path / "site", "slow", seconds=0.6).items():
        monkeypatch.setenv(name, value)
    tile = sorted((BUNDLED / "eurosat").rglob("*.jpg"))[0]
    paths = [str(tmp_path / f"slow{k}.jpg") for k in range(5)]
    for path in paths:
        Path(path).write_bytes(tile.read_bytes())
    started_processes = count_decode_processes(monkeypatch)
    with decoder_with_server(time_limit=1.0) as (decoder, _):
        taken, decoded, errors = decoder.decode(paths, 1 << 30)
    assert (taken, len(decoded), errors, len(started_processes)) == (5, 5, {}, 1)


SLOW_READS = """
import os, time
if os.environ.get("SLOW_READS"):
    import gpu_pipeline.inputs.decode as decode

    def slow(read):
        def read_small_file(path):
            time.sleep(float(os.environ["SLOW_READS"]))
            return read(path)
        return read_small_file

    decode._read_small_file = slow(decode._read_small_file)
"""


@needs_processes
def test_a_slow_mount_under_the_limit_is_not_taken_for_a_stuck_one(tmp_path, monkeypatch):
    """Small files are read a group at a time (32) before they are decoded: 8 reads of 0.3 s under
    a 1 s limit. Each read counts as progress."""
    for name, value in {**sitecustomize(tmp_path / "site", SLOW_READS), "SLOW_READS": "0.3"}.items():
        monkeypatch.setenv(name, value)
    tiles = [str(path) for path in sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:8]]
    started_processes = count_decode_processes(monkeypatch)
    with decoder_with_server(time_limit=1.0) as (decoder, _):
        taken, decoded, errors = decoder.decode(tiles, 1 << 30)
    assert (taken, len(decoded), errors, len(started_processes)) == (8, 8, {}, 1)


@needs_processes
def test_the_python_api_takes_a_decode_timeout(tmp_path, monkeypatch):
    paths = images(tmp_path / "in", 12, 64)
    # (stuck for 30 s, not an hour: without the limit the test fails, rather than waits)
    for name, value in hanging_decoder(tmp_path / "site", paths[5].stem, seconds=30).items():
        monkeypatch.setenv(name, value)
    records = list(gpu_pipeline.run(tmp_path / "in", backend="reference", workers=2, decode_timeout=1.5))
    assert [record["path"] for record in records] == [str(path) for path in paths]
    assert records[5] == {"path": str(paths[5]), "stage": "decode", "error": timed_out(1.5)}


@needs_processes
def test_closing_the_python_api_while_a_decoder_waits_out_the_limit_returns_at_once(tmp_path, monkeypatch):
    """The decode processes are stopped first: the thread that waits for a stuck one is let go at
    once (the pool waited 10 s for it, and it went on to decode the part again for no one)."""
    paths = images(tmp_path / "in", 700, 64)
    for name, value in hanging_decoder(tmp_path / "site", paths[600].stem, seconds=60).items():
        monkeypatch.setenv(name, value)
    records = gpu_pipeline.run(tmp_path / "in", backend="reference", workers=1, decode_timeout=600)
    # (records come a batch behind, and a batch here is 256 tiles: the third holds the stuck one)
    assert next(records)["path"] == str(paths[0])
    wait_until_hanging(tmp_path / "site")  # (a sleep here let a loaded machine close before it)
    started = time.monotonic()
    records.close()
    assert time.monotonic() - started < 3
    assert list(records) == []  # closed: nothing more comes (a check over it held whatever it said)


@needs_processes
def test_a_time_limit_decodes_every_image_in_a_process(tmp_path):
    """However short the run and large its images: a decode thread cannot be stopped."""
    engine = Engine(create("reference"), decode_timeout=5)
    assert engine.processes is True and engine.decodes_in_processes(1)


@pytest.mark.parametrize("given, said", [
    (["--decode-timeout", "0"], "--decode-timeout takes a number of seconds from 1 to 86400, got 0.0"),
    (["--decode-timeout", "-2"], "--decode-timeout takes a number of seconds from 1 to 86400"),
    (["--decode-timeout", "0.5"], "--decode-timeout takes a number of seconds from 1 to 86400, got 0.5"),
    (["--decode-timeout", "nan"], "--decode-timeout takes a number of seconds from 1 to 86400"),
    (["--decode-timeout", "inf"], "--decode-timeout takes a number of seconds from 1 to 86400"),
    (["--decode-timeout", "1e6"], "--decode-timeout takes a number of seconds from 1 to 86400"),
    (["--decode-timeout", "5", "--decode", "threads"], "--decode-timeout needs decode processes: a decode thread"),
    (["--decode-timeout", "5", "--dask", "local:1"], "--decode-timeout is for a run on this machine"),
])
def test_a_bad_decode_timeout_is_refused_before_anything_is_written(tmp_path, given, said):
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["run", str(BUNDLED / "eurosat"), "--out", str(out), *given])
    assert result.exit_code == 2, result.output
    assert said in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_decode_timeout_where_decode_processes_cannot_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(processes, "available", lambda: False)
    from gpu_pipeline.engine import decoding

    monkeypatch.setattr(decoding, "processes_available", lambda: False)
    result = CliRunner().invoke(app, ["run", str(BUNDLED / "eurosat"), "--out", str(tmp_path / "o.jsonl"),
                                      "--decode-timeout", "5"])
    assert result.exit_code == 2 and "--decode-timeout needs decode processes, which need Linux" in result.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="decode_timeout needs decode processes, which need Linux"):
        gpu_pipeline.run(BUNDLED / "eurosat", decode_timeout=5)


@pytest.mark.parametrize("value", [0, -1, 0.999, math.nan, math.inf, True, np.True_, "5", 1e6])
def test_the_python_api_refuses_a_bad_decode_timeout_when_called(value):
    with pytest.raises(ValueError, match="decode_timeout takes a number of seconds from 1 to 86400"):
        gpu_pipeline.run(BUNDLED / "eurosat", decode_timeout=value)


@needs_processes
@pytest.mark.parametrize("value", [1, 2.5, np.int64(5), np.float32(5)])
def test_the_python_api_takes_any_real_number_of_seconds(value):
    """As its other numbers (workers=np.int64(2), low=np.float32(100)); the engine keeps a float."""
    from gpu_pipeline.engine.stream import Engine

    assert next(gpu_pipeline.run(BUNDLED / "eurosat", backend="reference", decode_timeout=value))["path"]
    assert Engine(create("reference"), decode_timeout=value).decode_timeout == float(value)


def test_the_python_api_refuses_a_decode_timeout_with_decode_threads():
    with pytest.raises(ValueError, match=r"decode_timeout needs decode processes.*decode='processes' or 'auto'"):
        gpu_pipeline.run(BUNDLED / "eurosat", decode="threads", decode_timeout=5)


@needs_processes
def test_the_python_api_refuses_a_decode_timeout_it_has_no_open_files_for_when_called():
    """``ulimit -n 14``: the decode processes a limit needs cannot run; said by ``run`` itself (the
    generator's first record is too late), in the API's words."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_NOFILE, (14, 14))

    code = ("import gpu_pipeline\n"
            "try:\n"
            f"    gpu_pipeline.run({str(BUNDLED / 'eurosat')!r}, decode_timeout=5, workers=2)\n"
            "except ValueError as exc:\n"
            "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], preexec_fn=limited, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == ("decode_timeout: 2 decode processes need about 48 open files; this process may "
                                   "open 14 (ulimit -n); raise the limit or use fewer workers"), done.stderr


# ---------------------------------------------------------------- verify takes the same limit


@needs_processes
def test_verify_skips_an_image_stuck_in_its_decoder_as_a_decode_error(tmp_path):
    """``verify`` over the nightly folder meets the same stuck file: with a limit it is skipped as a
    decode error, in the report too, and every other image is compared. (A real command, so that
    without the limit the test fails at its timeout instead of hanging.)"""
    folder = tmp_path / "in"
    folder.mkdir()
    tiles = sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:6]
    for tile in tiles:
        (folder / tile.name).write_bytes(tile.read_bytes())
    stuck = folder / "stuck.jpg"
    stuck.write_bytes(tiles[0].read_bytes())
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "verify", str(folder), "--backends", "numba",
                           "--decode-timeout", "1", "--workers", "2", "--report", str(report)],
                          env=dict(os.environ, **hanging_decoder(tmp_path / "site", "stuck")),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skipped {stuck}: decode error: {timed_out(1)}" in done.stdout
    written = json.loads(report.read_text())
    assert written["images"] == {"found": len(tiles) + 1, "decoded": len(tiles), "compared": len(tiles)}
    assert written["decode_errors"] == [{"image": str(stuck), "stage": "decode", "error": timed_out(1)}]
    assert written["execution"]["decode_timeout"] == 1


@pytest.mark.parametrize("given, said", [
    (["--decode-timeout", "0.5"], "--decode-timeout takes a number of seconds from 1 to 86400"),
    (["--decode-timeout", "5"], "--decode-timeout: 2 decode processes need"),
])
def test_verify_refuses_a_decode_timeout_it_cannot_keep_before_anything_is_written(tmp_path, monkeypatch, given, said):
    from gpu_pipeline.engine import decoding

    monkeypatch.setattr(decoding, "processes_available", lambda: True)
    monkeypatch.setattr(decoding, "room_for_descriptors", lambda decoders: f"{decoders} decode processes need "
                                                                            "about 48 open files; this process may open 14")
    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["verify", str(BUNDLED / "eurosat"), "--backends", "numba", "--workers", "2",
                                      "--report", str(report), *given])
    assert result.exit_code == 2, result.output
    assert said in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@needs_processes
@pytest.mark.parametrize("budget_images", [0, 2])
def test_large_images_decoded_in_processes_fit_the_decoding_budget(tmp_path, monkeypatch, budget_images):
    """Under a time limit every image is decoded in a decode process, scenes too. A process asks the
    main side for room before it decodes a large image, as a decode thread does, and waits for its
    go: the processes ignored the budget (docs/nightly.md recommends the limit for nightly runs, and
    eight processes of 13-band TIFFs held 2.4 GB). The image the consumer waits for goes on, so a
    budget smaller than one image still ends, in order."""
    from gpu_pipeline.engine import decoding

    paths = images(tmp_path / "in", 12, 1024)
    charge = max(map(decoding_charge, paths))  # (each over decode.BUDGETED_FROM_BYTES)
    granted = count_budget_grants(monkeypatch)
    taken, ahead = [], []  # ahead: images let decode and not yet taken, as each part is taken
    parts = decoding.decode_parts(paths, DecodeOptions(), workers=6, prefetch_pixels=10**9, processes=True,
                                  time_limit=60, budget_bytes=budget_images * charge)
    with contextlib.closing(parts):
        for part in parts:
            time.sleep(0.05)
            assert part.errors == {}
            taken.extend(part.paths)
            ahead.append(granted[0] - len(taken))
    assert taken == paths
    assert max(ahead) <= budget_images + 1
    assert max(ahead[len(ahead) // 2:]) >= budget_images  # the room is used, and given back


@needs_processes
def test_a_decode_process_waiting_for_room_is_not_held_to_its_time_limit(tmp_path):
    """The time limit is for reading and decoding a file: a process waiting for its go meanwhile
    would be killed as stuck, and its image get an error record, for the consumer's slowness."""
    from gpu_pipeline.engine import decoding

    paths = images(tmp_path / "in", 4, 1024)
    parts = decoding.decode_parts(paths, DecodeOptions(), workers=4, prefetch_pixels=10**9, processes=True,
                                  time_limit=1, budget_bytes=0)
    with contextlib.closing(parts):
        for part in parts:
            time.sleep(1.5)  # the other three wait for room meanwhile, then decode one at a time
            assert part.errors == {}, part.errors
            assert len(part.paths) == 1


@needs_processes
def test_decode_processes_waiting_for_room_decode_nothing_once_the_parts_are_closed(tmp_path, monkeypatch):
    """Closed while decode processes wait for room (a stop, an API caller that stops early), the pool
    ends them: they decode nothing more, and none is left behind."""
    from gpu_pipeline.engine import decoding

    paths = images(tmp_path / "in", 8, 1024)
    granted = count_budget_grants(monkeypatch)
    started = count_decode_processes(monkeypatch)
    parts = decoding.decode_parts(paths, DecodeOptions(), workers=6, processes=True, time_limit=60, budget_bytes=0)
    first = next(parts)  # the consumer now waits for the second image: its process goes on, four others wait
    assert first.paths == [paths[0]]
    time.sleep(1.0)
    parts.close()
    for thread in parts._pool._threads:
        thread.join(10)
        assert not thread.is_alive()
    assert granted[0] <= 2  # the first image, and the second if its process got to it before the close
    assert started and all(process.returncode is not None for process in started)  # (each ended and was waited for)
