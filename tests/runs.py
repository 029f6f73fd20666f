"""Real ``gpu-pipeline run`` processes, for the tests that kill, signal or race them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def start(folder: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``gpu-pipeline run`` on ``folder`` into ``out`` in small batches (many writes to kill between)."""
    command = [sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", str(out),
               "--backend", "reference", "--batch-size", "8", "--workers", "2", *extra]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll ``ready`` until it holds; AssertionError naming ``what`` never happened after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} never happened within {timeout:.0f} s")
