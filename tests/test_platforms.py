"""README "Platforms": what runs where, checked by simulating what macOS and Windows lack here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import gpu_pipeline
from gpu_pipeline.cli import app
from tests.conftest import BUNDLED_DATA

# What Windows' Python lacks that gpu-pipeline needs: fork hooks, fcntl's locks, POSIX open flags.
_AS_ON_WINDOWS = """
import os, sys
for name in ("register_at_fork", "O_NOFOLLOW", "O_DIRECTORY", "pread", "getuid", "sched_getaffinity", "memfd_create"):
    if hasattr(os, name):
        delattr(os, name)
sys.modules["fcntl"] = sys.modules["resource"] = None
"""


def test_on_windows_the_command_line_refuses_with_one_line():
    call = _AS_ON_WINDOWS + "sys.argv = ['gpu-pipeline', 'run']\nfrom gpu_pipeline.cli import main\nmain()\n"
    done = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "gpu-pipeline: error: gpu-pipeline runs on Linux and macOS, not on Windows: run it in WSL\n"


def test_on_windows_the_api_raises_one_import_error():
    call = _AS_ON_WINDOWS + "import gpu_pipeline\ngpu_pipeline.run\n"
    done = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, timeout=60)
    assert done.stderr.splitlines()[-1] == ("ImportError: gpu-pipeline runs on Linux and macOS, not on Windows: "
                                            "run it in WSL")


@pytest.fixture
def as_on_macos(monkeypatch):
    """No memfd_create (macOS has descriptor passing, not anonymous shared memory files)."""
    monkeypatch.delattr(os, "memfd_create", raising=False)


@pytest.mark.parametrize("options, line", [
    (["--decode", "processes"], "--decode processes needs Linux (memfd_create and descriptor passing); "
                                "use --decode threads"),
    (["--decode-timeout", "5"], "--decode-timeout needs decode processes, which need Linux (memfd_create and "
                                "descriptor passing)")])
def test_on_macos_decode_processes_are_refused_with_one_line(as_on_macos, tmp_path, options, line):
    result = CliRunner().invoke(app, ["run", str(BUNDLED_DATA / "eurosat"), "--out", str(tmp_path / "r.jsonl"),
                                      "--backend", "reference", *options])
    assert result.exit_code == 2 and result.stderr == f"gpu-pipeline: error: {line}\n"
    assert list(tmp_path.iterdir()) == []


def test_on_macos_the_api_refuses_decode_processes_and_runs_with_threads(as_on_macos):
    with pytest.raises(ValueError, match=r"^decode='processes' needs Linux .*; use decode='threads'$"):
        next(gpu_pipeline.run(BUNDLED_DATA / "eurosat", backend="reference", decode="processes"))
    records = list(gpu_pipeline.run(BUNDLED_DATA / "eurosat", backend="reference"))  # decode="auto": threads
    assert records and all("error" not in record for record in records)
