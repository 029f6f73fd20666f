"""The decode processes' fork server dying in the middle of a run (a kill, the OOM killer): its
decode processes die with it, a fresh one takes over, and no image is lost. It used to end the run
with "cannot write to stdout: the reader closed the pipe" (exit 3) and no record of the batches
decoded meanwhile."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gpu_pipeline.cli import app
from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.inputs import processes
from gpu_pipeline.inputs.decode import decode_image
from tests.runs import hanging_decoder, start, tagged, wait_until

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


def test_a_run_whose_fork_server_is_killed_loses_no_image(tmp_path):
    paths = images(tmp_path / "in", 150)
    slow = hanging_decoder(tmp_path / "site", "img", seconds=0.03)  # (a run of a few seconds)
    tag = f"fork-server-{os.getpid()}"
    process = start(tmp_path / "in", tmp_path / "out.jsonl", "--decode", "processes", tag=tag, env=slow)
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
    clean = start(tmp_path / "in", tmp_path / "clean.jsonl", "--decode", "processes")
    assert clean.wait(timeout=120) == 0, clean.stderr.read()
    assert written == (tmp_path / "clean.jsonl").read_text().splitlines()


def test_a_fork_server_that_keeps_dying_ends_the_run_in_one_line_and_keeps_the_records(tmp_path, monkeypatch):
    paths = images(tmp_path / "in", 60)
    monkeypatch.setattr(processes, "FORK_SERVER_RESTARTS", 0)
    servers, answers = [], []
    real_start, real_answer = processes.ForkServer._start, processes.DecodeProcess.answer

    def started(self):
        real_start(self)
        servers.append(self._process.pid)

    def answer(self):
        answers.append(self.pid)
        if len(answers) == 4:
            os.kill(servers[-1], signal.SIGKILL)
            wait_until(lambda: dead(self.pid), "the decode process dying with its server")
        return real_answer(self)

    monkeypatch.setattr(processes.ForkServer, "_start", started)
    monkeypatch.setattr(processes.DecodeProcess, "answer", answer)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "in"), "--out", str(out), "--backend", "reference",
                                      "--decode", "processes", "--workers", "1", "--batch-size", "5"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert ("gpu-pipeline: error: the decode processes' fork server ended once during the run (it died of SIGKILL "
            "the last time); the records written before are kept") in result.stderr
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
