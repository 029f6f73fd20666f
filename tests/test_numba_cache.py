"""numba's kernel cache: only a folder this user owns and no one else can write to (numba loads pickles from it),
and one keyed by every kernel source, so that an edit to a helper another file's kernel inlines recompiles it."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
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
    monkeypatch.setattr(_numba_setup, "CACHE_IS_FRESH", _numba_setup.CACHE_IS_FRESH)  # (a mkdtemp sets it)
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


def test_a_folder_below_one_another_user_may_change_is_never_adopted(tmp_path, no_user_choice):
    """Whoever may write to a folder above the cache can swap the cache folder for a link to theirs
    between the check and numba's load (done in a hunt: their pickle ran as the victim). The folders
    made for the cache are 0700 whatever the umask (under umask 000, ~/.cache was made 0777)."""
    if not hasattr(os, "getuid"):
        pytest.skip("no POSIX owners here")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert not _numba_setup._is_private_dir(shared / "gpu-pipeline" / "numba")
    assert list(shared.iterdir()) == []  # the folders made for it, refused, are gone again
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o770)
    assert not _numba_setup._is_private_dir(group / "numba")
    sticky = tmp_path / "sticky"  # as /tmp: no one may rename or remove another's entry
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert _numba_setup._is_private_dir(sticky / "mine")
    if os.getuid() == 0:  # a link another user made in a sticky folder: they may point it elsewhere later
        (tmp_path / "victim").mkdir(mode=0o700)
        (sticky / "cache").symlink_to(tmp_path / "victim")
        os.lchown(sticky / "cache", OTHER_USER, -1)
        assert not _numba_setup._is_private_dir(sticky / "cache" / "numba")
    old = os.umask(0)
    try:
        made = tmp_path / "made" / "a" / "b"
        assert _numba_setup._is_private_dir(made)
    finally:
        os.umask(old)
    for folder in (tmp_path / "made", tmp_path / "made" / "a", made):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_a_fresh_private_folder_is_removed_when_its_process_ends(tmp_path):
    """No later run finds it: each start left 1.5 MB in the temporary folder for good (a nightly job
    in a container with a read-only home filled /tmp)."""
    if not hasattr(os, "getuid"):
        pytest.skip("no POSIX owners here")
    package, xdg, tmp = tmp_path / "package", tmp_path / "xdg", tmp_path / "tmp"
    _planted(package / "__pycache__", 0o777)
    _planted(xdg / "gpu-pipeline" / "numba", 0o777)
    if os.getuid() == 0:  # another user's (only root may give a folder away); else one anyone may write to
        _planted(tmp / f"gpu-pipeline-numba-{os.getuid()}", 0o755, owner=OTHER_USER)
    else:
        _planted(tmp / f"gpu-pipeline-numba-{os.getuid()}", 0o777)
    code = ("import os, tempfile\nfrom pathlib import Path\nimport numba\n"
            "from gpu_pipeline.backends import _numba_setup\n"
            f"numba.config.CACHE_DIR = ''\nos.environ['XDG_CACHE_HOME'] = {str(xdg)!r}\ntempfile.tempdir = {str(tmp)!r}\n"
            f"chosen = _numba_setup.choose_cache_dir(Path({str(package)!r}))\n"
            "(Path(chosen) / 'kernel.nbi').write_text('compiled')\nprint(chosen, _numba_setup.CACHE_IS_FRESH)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    chosen, fresh = done.stdout.split()
    assert fresh == "True" and Path(chosen).parent == tmp, done.stderr
    assert not Path(chosen).exists()


def test_no_fresh_folder_in_a_temporary_folder_others_may_change(tmp_path, no_user_choice):
    """The last resort, mkdtemp, was made in the very folder just found unsafe, unchecked."""
    if not hasattr(os, "getuid"):
        pytest.skip("no POSIX owners here")
    package = tmp_path / "package"
    _planted(package / "__pycache__", 0o777)
    _planted(tmp_path / "xdg" / "gpu-pipeline" / "numba", 0o777)
    (tmp_path / "tmp").chmod(0o777)  # anyone may write, not sticky (a shared volume)
    assert _numba_setup.choose_cache_dir(package) is None
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == []  # (the candidate made, refused, removed)


def test_the_package_cache_then_the_users_then_the_temporary_folder(tmp_path, no_user_choice):
    """nightly.md and backends.md: __pycache__ beside the kernels when usable, else ~/.cache's,
    else <tempdir>/gpu-pipeline-numba-<uid>."""
    package = tmp_path / "package"
    (package / "__pycache__").mkdir(parents=True, mode=0o755)
    assert _numba_setup.choose_cache_dir(package) == str(package / "__pycache__")
    assert numba.config.CACHE_DIR == ""  # numba's own default: nothing to set
    (package / "__pycache__").rmdir()
    (package / "__pycache__").write_text("a file where numba wants a folder")
    (tmp_path / "xdg").write_text("a file where the user's cache would be")
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    chosen = _numba_setup.choose_cache_dir(package)
    assert chosen == str(tmp_path / "tmp" / f"gpu-pipeline-numba-{uid}") == numba.config.CACHE_DIR


def test_the_users_own_private_folder_is_used(tmp_path, no_user_choice):
    package = tmp_path / "package"
    package.mkdir()
    (package / "__pycache__").write_text("a file where numba wants a folder")
    chosen = _numba_setup.choose_cache_dir(package)
    assert chosen == str(tmp_path / "xdg" / "gpu-pipeline" / "numba")
    assert not Path(chosen).stat().st_mode & 0o022


# --- the cache is keyed by every kernel source (issue #20) ----------------------------------------

REPO = Path(__file__).resolve().parent.parent
#: A function numba compiles: a decorator of numba or of _numba_setup, or _numba_setup's decorator called.
JITTED = re.compile(r"^\s*@(?:numba\.|cuda\.|_numba_setup\.)?(?:njit|jit|helper|parallel|inlined)\b|\bhelper\(", re.M)


def test_every_file_with_a_jitted_function_is_a_kernel_source():
    package = Path(_numba_setup.__file__).resolve().parent.parent
    jitted = {path.relative_to(package).as_posix() for path in package.rglob("*.py")
              if JITTED.search(path.read_text(encoding="utf-8"))}
    assert jitted, "the pattern finds no kernel at all"
    assert jitted <= set(_numba_setup.KERNEL_SOURCES), sorted(jitted - set(_numba_setup.KERNEL_SOURCES))


def test_kernels_are_cached_under_a_folder_named_by_the_sources_digest():
    assert _numba_setup.CACHE_DIR == numba.config.CACHE_DIR
    assert Path(_numba_setup.CACHE_DIR) == Path(_numba_setup.CACHE_ROOT) / f"kernels-{_numba_setup.kernel_source_digest()}"


# Each kernel module imported first in a fresh process: one that defined its kernels before
# _numba_setup chose the folder would have them cached beside its source, unkeyed.
_CACHE_PATHS_OF_FIRST_IMPORT = textwrap.dedent("""
    import importlib, json, sys
    module = importlib.import_module(sys.argv[1])
    functions = [value for value in vars(module).values() if getattr(value, "_cache", None) is not None]
    if module.__name__.endswith(".records"):
        functions.append(module._compiled_histogram_lines())
    from gpu_pipeline.backends import _numba_setup
    print(json.dumps({"keyed": _numba_setup.CACHE_DIR, "paths": [function._cache._cache_path
                      for function in functions if hasattr(function._cache, "_cache_path")]}))
""")


@pytest.mark.parametrize("source", _numba_setup.KERNEL_SOURCES[1:])
def test_every_cached_kernel_cpu_and_cuda_lives_in_the_keyed_folder(source, tmp_path):
    if source.endswith("_cuda_kernels.py"):
        pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    module = "gpu_pipeline." + source.removesuffix(".py").replace("/", ".")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("NUMBA_", "GPU_PIPELINE_"))}
    env.update(NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", _CACHE_PATHS_OF_FIRST_IMPORT, module], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert found["paths"], f"no cached kernel in {source}"
    for path in found["paths"]:
        assert Path(path).parent == Path(found["keyed"]), (source, path)


def _copy_of_the_package(tmp_path: Path) -> Path:
    install = tmp_path / "install"
    for package in ("gpu_pipeline", "cpu_reference"):
        shutil.copytree(REPO / package, install / package, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in [install, *(path for path in install.rglob("*") if path.is_dir())]:
        folder.chmod(0o755)  # as an install: a checkout made under umask 002 is group-writable, and
        # numba's cache is never kept below a folder others may change
    return install


def test_the_digest_changes_with_any_kernel_source(tmp_path):
    package = _copy_of_the_package(tmp_path) / "gpu_pipeline"
    digests = {_numba_setup.kernel_source_digest(package)}
    for name in _numba_setup.KERNEL_SOURCES:
        with (package / name).open("a") as source:
            source.write("\n# edited\n")
        digests.add(_numba_setup.kernel_source_digest(package))
    assert len(digests) == len(_numba_setup.KERNEL_SOURCES) + 1


# _band_histogram (_numba_kernels.py) converts RGB rows with rgb_row_to_gray (_numba_rows.py): a cheap
# kernel (2-3 s to compile) with the same shape as the pipeline's, a kernel inlining another file's helper.
_HISTOGRAM_OF_A_ROW_HELPER = textwrap.dedent("""
    import json, numba, numpy as np
    from gpu_pipeline.backends import _numba_kernels
    image = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    gray, hist = np.empty(6 * 7, np.uint8), np.zeros(256, np.int64)
    _numba_kernels._band_histogram(image.ravel(), True, gray, 7, 0, 6, hist, np.empty((4, 256), np.int64))
    print(numba.config.CACHE_DIR)
    print(json.dumps(gray.tolist()))
""")


def _gray_of(env: dict, cwd: Path) -> tuple[str, list]:
    done = subprocess.run([sys.executable, "-c", _HISTOGRAM_OF_A_ROW_HELPER], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    folder, gray = done.stdout.strip().splitlines()
    return folder, json.loads(gray)


@pytest.mark.slow
@pytest.mark.parametrize("explicit", [True, False], ids=["NUMBA_CACHE_DIR", "package __pycache__"])
def test_an_edit_to_an_inlined_helper_recompiles_the_kernel(tmp_path, explicit):
    """The issue's case: a persistent cache, then an edit to a helper of _numba_rows.py (no change to
    _numba_kernels.py, whose kernel inlines it): the next run must give the new bytes, not the old."""
    install = _copy_of_the_package(tmp_path)
    env = {key: value for key, value in os.environ.items() if not key.startswith("NUMBA_")}
    env.update(PYTHONPATH=str(install), PYTHONDONTWRITEBYTECODE="1")
    if explicit:
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8).reshape(-1, 3).astype(np.int64)

    folder, gray = _gray_of(env, tmp_path)
    assert gray == ((9798 * rgb[:, 0] + 19235 * rgb[:, 1] + 3735 * rgb[:, 2] + 16384) >> 15).tolist()
    root = tmp_path / "numba-cache" if explicit else install / "gpu_pipeline" / "backends" / "__pycache__"
    assert Path(folder).parent == root and Path(folder).name.startswith("kernels-"), folder
    assert list(Path(folder).rglob("_numba_kernels._band_histogram*.nbi")), "the kernel was not cached"

    rows = install / "gpu_pipeline" / "backends" / "_numba_rows.py"
    source = rows.read_text()
    assert source.count("(9798 * np.int32(rgb[3 * x])") == 1
    rows.write_text(source.replace("(9798 * np.int32(rgb[3 * x])", "(0 * np.int32(rgb[3 * x])"))  # no red

    edited_folder, edited_gray = _gray_of(env, tmp_path)
    assert edited_gray == ((19235 * rgb[:, 1] + 3735 * rgb[:, 2] + 16384) >> 15).tolist(), "stale kernel ran"
    assert Path(edited_folder).parent == root and edited_folder != folder


NO_ROOM_FOR_KERNELS = """
import errno
from numba.core import caching

def save(self, key, data):
    raise OSError(errno.ENOSPC, "No space left on device")

caching.IndexDataCacheFile.save = save
"""


def test_a_cache_that_cannot_keep_the_kernels_does_not_stop_the_run(tmp_path):
    """numba raised its cache's OSError (the disk full) out of a kernel's first call: the run ended at
    its warm-up with no record (taken for stdout's full disk, exit 3, until this round), and verify
    reported every image of the backend as a difference. The kernels run uncached, and it is said."""
    from tests.runs import sitecustomize

    env = {**os.environ, **sitecustomize(tmp_path / "site", NO_ROOM_FOR_KERNELS),
           "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "o.jsonl"
    done = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(REPO / "data" / "eurosat"),
                           "--out", str(out), "--backend", "numba"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(out.read_text().splitlines()) == len(list((REPO / "data" / "eurosat").rglob("*.jpg")))
    assert done.stderr.count("cannot be kept in") == 1 and "(No space left on device)" in done.stderr
    assert "(kernels compiled; the cache could not keep them)" in done.stderr
    # one line, as the other messages: not Python's format, which named numba's dispatcher.py as its source
    assert re.search(r"^warning: the compiled kernels cannot be kept in \S+ \(No space left on device\): they are "
                     r"compiled again at every run$", done.stderr, re.MULTILINE), done.stderr
    assert "Warning" not in done.stderr and "dispatcher" not in done.stderr


def test_a_kernel_whose_cache_cannot_save_it_warns_once_and_goes_on(monkeypatch):
    """The wrapper itself, on a stand-in dispatcher: an OSError from the save is one warning a run."""
    import warnings

    from gpu_pipeline.errors import PipelineWarning

    class FullCache:
        def save_overload(self, signature, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    class Dispatcher:
        def __init__(self, function):
            self._cache = FullCache()

    monkeypatch.setattr(_numba_setup, "unsaved", [])
    kernels = [_numba_setup.keeps_going_uncached(Dispatcher)(lambda: None) for _ in range(2)]
    with pytest.warns(PipelineWarning, match=r"cannot be kept in .* \(No space left on device\)"):
        kernels[0]._cache.save_overload("(int64,)", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels[1]._cache.save_overload("(int64,)", None)  # said once
    assert _numba_setup.unsaved == ["[Errno 28] No space left on device"]


def test_every_cuda_kernel_goes_on_when_its_cache_cannot_keep_it():
    """The CUDA kernels' cache raised the same OSError out of their first launch (a full cache
    folder stopped --backend cuda): each is wrapped as the CPU kernels are. Checked on the
    dispatchers, which numba-cuda makes without a GPU; no GPU here saves a CUDA kernel."""
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    if numba.config.ENABLE_CUDASIM:
        pytest.skip("the CUDA simulator's kernels have no cache")
    try:
        from numba.cuda.dispatcher import CUDADispatcher

        from gpu_pipeline.backends import _cuda_kernels
    except Exception as exc:  # (a broken stack: tests/test_numba_cuda.py says it)
        pytest.skip(f"numba-cuda cannot load here: {exc}")

    kernels = [value for value in vars(_cuda_kernels).values() if isinstance(value, CUDADispatcher)
               and not value.targetoptions.get("device")]
    assert len(kernels) >= 8
    for kernel in kernels:
        assert kernel._cache.save_overload.__qualname__.startswith("keeps_going_uncached."), kernel.__name__
