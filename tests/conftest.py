"""Shared fixtures: where the sample data lives, and skips that say why."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
from hypothesis import settings

# CI draws the same hypothesis examples on every run (.ci/run sets GPU_PIPELINE_HYPOTHESIS=ci): a red CI
# is the change's doing, never a new draw (one found an edge case of discovery after green runs, and a
# round did not land). Any other run draws new ones, and GPU_PIPELINE_EXAMPLES=20 makes it a soak.
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("GPU_PIPELINE_HYPOTHESIS", "default"))

REPO = Path(__file__).resolve().parent.parent
BUNDLED_DATA = REPO / "data"
SHARED_DATA = REPO.parent / "shared" / "data"


def _images_under(root: Path) -> list[Path]:
    from gpu_pipeline.inputs.discover import discover

    return discover([root])


@pytest.fixture(scope="session")
def bundled_data_dir() -> Path:
    return BUNDLED_DATA


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it sits beside the checkout in CI, not in a user's clone)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.gpu tests, with the reason, when no real CUDA GPU is present."""
    from tests.gpu import real_gpu_reason

    reason = real_gpu_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a real CUDA GPU: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def register():
    """``register(*classes)`` makes test backends known for one test; they are removed afterwards."""
    from gpu_pipeline.backends import registry

    names = []

    def add(*classes):
        for cls in classes:
            registry.register(cls.name, lambda cls=cls: cls, "test backend")
            names.append(cls.name)

    yield add
    for name in names:
        registry.unregister(name)


@pytest.fixture
def locked(monkeypatch):
    """``locked(name)``: folders named ``name`` cannot be listed from now on in this test, as for a
    user without the permission (tests run as root, who may list anything)."""
    real = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.path.basename(os.fspath(path)) in names:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    names: set[str] = set()
    monkeypatch.setattr(os, "scandir", scandir)
    return names.add


@pytest.fixture
def umask():
    """Set the process's umask for one test (``umask(0o002)``), the old one put back after it."""
    old = os.umask(0o022)  # (the only way to read it)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.fixture
def hangups_heard():
    """SIGHUP's default action in this process, and so in the commands it starts: under ``nohup`` (a
    CI runner's, perhaps) they would inherit SIGHUP ignored, and ignore it, as they should."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


@pytest.fixture
def hangups_ignored():
    """SIGHUP ignored in this process, and so in the commands it starts, as ``nohup`` starts one."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGHUP, previous)
