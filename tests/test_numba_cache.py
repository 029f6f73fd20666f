"""numba's kernel cache: only a folder this user owns and no one else can write to (numba loads pickles from it)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numba
import pytest

from gpu_pipeline.backends import _numba_setup

OTHER_USER = 54321


def _planted(folder: Path, mode: int, owner: int | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "planted.nbi").write_text("someone else's kernel index")
    folder.chmod(mode)
    if owner is not None:
        os.chown(folder, owner, -1)
    return folder


@pytest.fixture
def no_user_choice(monkeypatch, tmp_path):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()


def test_a_world_writable_or_foreign_cache_folder_is_never_adopted(tmp_path, no_user_choice):
    if not hasattr(os, "getuid"):
        pytest.skip("no POSIX owners here")
    package = tmp_path / "package"
    _planted(package / "__pycache__", 0o777)  # anyone can write: not trusted
    _planted(tmp_path / "xdg" / "gpu-pipeline" / "numba", 0o777)
    shared = tmp_path / "tmp" / f"gpu-pipeline-numba-{os.getuid()}"
    if os.getuid() == 0:
        _planted(shared, 0o755, owner=OTHER_USER)  # owned by someone else, as on a shared /tmp
    else:
        _planted(shared, 0o777)
    chosen = Path(_numba_setup.choose_cache_dir(package))
    assert chosen not in (package / "__pycache__", tmp_path / "xdg" / "gpu-pipeline" / "numba", shared)
    info = chosen.stat()
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    assert not list(chosen.iterdir())
    assert numba.config.CACHE_DIR == str(chosen)


def test_the_users_own_private_folder_is_used(tmp_path, no_user_choice):
    package = tmp_path / "package"
    package.mkdir()
    (package / "__pycache__").write_text("a file where numba wants a folder")
    chosen = _numba_setup.choose_cache_dir(package)
    assert chosen == str(tmp_path / "xdg" / "gpu-pipeline" / "numba")
    assert not Path(chosen).stat().st_mode & 0o022
