"""Process-wide numba settings the CPU kernels need, applied before any kernel is compiled.

Two things can break a numba program that works on the developer's machine:

* ``cache=True`` needs a writable cache directory. numba tries ``__pycache__`` beside the
  source, then its user-wide cache, and raises at import time when neither is writable (a
  read-only install in a container with a read-only home). :func:`choose_cache_dir` picks a
  writable directory first, one that this user owns and no one else can write to (numba loads
  pickles from it), and hands it to numba; without one, caching is switched off.
* numba's cache checks only the source file of the function it caches, so a kernel that inlines a
  helper from another file kept its old machine code after that file changed (issue #20). Kernels
  are cached in a subfolder named by a digest of every kernel source (:data:`KERNEL_SOURCES`).
* The ``workqueue`` threading layer aborts the process when parallel kernels are entered from
  several Python threads at once. :func:`choose_threading_layer` asks for a thread-safe layer
  (``omp`` or ``tbb``) when one can be loaded; otherwise (or when the layer the user asked for
  cannot load: omp on a Mac without libomp) the label models' kernels run their serial twins.

An explicit ``NUMBA_CACHE_DIR`` or ``NUMBA_THREADING_LAYER`` in the environment always wins; the
digest subfolder applies under an explicit ``NUMBA_CACHE_DIR`` too (a persistent one, as
``scripts/gpu_check.sh`` uses, is where a ``git pull`` left stale kernels).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

import numba

from gpu_pipeline.errors import PipelineWarning

#: Threading layers that may be entered from several Python threads at once.
THREADSAFE_LAYERS = ("omp", "tbb")
#: The thread-safe layers numba may start for each ``NUMBA_THREADING_LAYER`` (its "safe" is tbb alone).
THREADSAFE_CANDIDATES = {"default": THREADSAFE_LAYERS, "threadsafe": THREADSAFE_LAYERS, "safe": ("tbb",),
                         "omp": ("omp",), "tbb": ("tbb",)}

#: The package folder (``gpu_pipeline``), which the kernel sources are relative to.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

#: Every file with a cached numba function (CPU or CUDA), and this one (its decorators' options).
#: numba's cache checks only the source file of the function it caches: a kernel that inlines a
#: helper or folds in a constant from another file (``_numba_kernels`` calls ``_numba_rows``) would
#: keep its old machine code after an edit to that file. So the cache folder is named by a digest of
#: them all: an edit to any one recompiles every kernel once (10-15 s) and never runs stale code.
#: tests/test_numba_cache.py fails when a file with a jitted function is missing here.
KERNEL_SOURCES = (
    "backends/_numba_setup.py",
    "backends/_numba_rows.py",
    "backends/_numba_kernels.py",
    "backends/_host_hysteresis.py",
    "backends/_cuda_kernels.py",
    "labels/features.py",
    "labels/model.py",
    "labels/cnn.py",
    "outputs/records.py",
)


def _is_private_dir(path: Path) -> bool:
    """True when ``path`` is (or can be made) a folder of this user's that no one else may write to,
    below folders that no one else may change.

    numba loads pickled kernels from its cache, so a folder another user owns or can write to
    (``/tmp/...`` made by someone else, or mode 0777) could hand us their code; so could a folder
    above it that another user may write to (they swap the cache folder for a link to theirs
    between this check and numba's load).
    """
    made: list[Path] = []
    try:
        _make_folders(path, made)
        info = path.lstat()  # a symbolic link is not followed: it could point anywhere
        if not stat.S_ISDIR(info.st_mode) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return _refused(made)
        if hasattr(os, "getuid") and (info.st_uid != os.getuid() or not _safe_above(path)):
            return _refused(made)
        tempfile.TemporaryFile(dir=path).close()  # numba's own test that it can write there
    except OSError:
        return _refused(made)
    return True


def _refused(made: list[Path]) -> bool:
    """False, once the folders made for a refused cache folder are removed again (empty ones only)."""
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()
    return False


def _make_folders(path: Path, made: list[Path]) -> None:
    """``path`` and its missing parents, each mode 0700 (``mkdir(parents=True)`` makes the parents
    0777 less the umask: under umask 000, folders anyone may write to); ``made`` receives them."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # (another process made it meanwhile)
            folder.mkdir(mode=0o700)
            made.append(folder)


def _safe_above(path: Path) -> bool:
    """Whether every folder above ``path``, as written and with its links resolved, is this user's
    or root's and writable by no one else unless sticky, as /tmp is (there no one may rename or
    remove another's entry); a link on the way must be this user's or root's too (numba uses the
    path as written: a link another user made, in a sticky folder, they may point elsewhere)."""
    for folder in [*Path(os.path.abspath(path)).parents, *path.resolve().parents]:
        info = os.lstat(folder)
        if info.st_uid not in (os.getuid(), 0):
            return False
        if stat.S_ISLNK(info.st_mode):
            continue  # (its own mode means nothing; where it leads is checked in the resolved path)
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            return False
    return True


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpu-pipeline" / "numba"


#: Whether :func:`choose_cache_dir` had to make a fresh private folder: no later run will find it.
CACHE_IS_FRESH = False


def choose_cache_dir(package_dir: Path) -> str | None:
    """Where numba caches compiled kernels, or None when nowhere is writable.

    Order: ``$NUMBA_CACHE_DIR`` if the user set it; ``<package>/__pycache__`` (numba's default,
    nothing to set); ``$XDG_CACHE_HOME/gpu-pipeline/numba`` (``~/.cache/...``); a per-user
    folder in the system temp dir. Each must be owned by this user and writable by no one else;
    when none is, a new private folder (``mkdtemp``, mode 0700) is used: kernels are then compiled
    again by each run, but never loaded from a folder someone else controls. A chosen fallback is
    written to ``numba.config.CACHE_DIR``, which numba reads when a ``cache=True`` function is defined;
    the kernels then go to :func:`keyed_cache_dir` of the chosen folder.
    """
    if numba.config.CACHE_DIR:
        return numba.config.CACHE_DIR
    if _is_private_dir(package_dir / "__pycache__"):
        return str(package_dir / "__pycache__")
    if _is_private_dir(_user_cache_dir()):
        numba.config.CACHE_DIR = str(_user_cache_dir())
        return numba.config.CACHE_DIR
    chosen = private_temp_folder("numba")
    if chosen is None:
        return None
    global CACHE_IS_FRESH
    numba.config.CACHE_DIR, CACHE_IS_FRESH = chosen
    return numba.config.CACHE_DIR


def private_temp_folder(kind: str) -> tuple[str, bool] | None:
    """A cache folder for ``kind`` in the system temp dir, this user's and writable by no one else,
    and whether it is fresh: ``gpu-pipeline-<kind>-<uid>``, kept for later runs; else a fresh private
    one (``mkdtemp``), removed at exit; None when neither can be made (see :func:`choose_cache_dir`)."""
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    try:  # (no usable temp folder: TMPDIR, /tmp, /var/tmp, here)
        kept = Path(tempfile.gettempdir()) / f"gpu-pipeline-{kind}-{uid}"
        if _is_private_dir(kept):
            return str(kept), False
        if hasattr(os, "getuid") and not _safe_above(Path(tempfile.gettempdir()) / "x"):
            return None  # (a temporary folder others may change: no cache at all)
        fresh = tempfile.mkdtemp(prefix=f"gpu-pipeline-{kind}-")
    except OSError:
        return None
    atexit.register(_remove_fresh_cache, fresh, os.getpid())  # no later run finds it: 1.5 MB a run, kept
    return fresh, True


def _remove_fresh_cache(folder: str, owner: int) -> None:
    """The fresh private cache folder, at the exit of the process that made it (not of its forks)."""
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


def kernel_source_digest(package_root: Path = PACKAGE_ROOT) -> str:
    """16 hex digits that change whenever any file of :data:`KERNEL_SOURCES` changes."""
    digest = hashlib.sha256()
    for name in KERNEL_SOURCES:
        path = package_root / name
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"(missing)")
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def keyed_cache_dir(root: str | None, package_root: Path = PACKAGE_ROOT) -> str | None:
    """The folder under ``root`` for the kernels of exactly these sources (``kernels-<digest>``), made
    private to this user; None without a root, or when that folder cannot be used (then nothing is
    cached). Folders of other versions are left alone: another checkout may share the root."""
    if root is None:
        return None
    keyed = Path(root) / f"kernels-{kernel_source_digest(package_root)}"
    return str(keyed) if _is_private_dir(keyed) else None


def _layer_loads(name: str) -> bool:
    """Whether numba could start threading layer ``name`` (its native library is present)."""
    try:
        importlib.import_module(f"numba.np.ufunc.{name}pool")
    except (ImportError, OSError):
        return False
    return True


def _launched_layer() -> str | None:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet in this process
        return None


def choose_threading_layer() -> None:
    """Ask numba for a thread-safe layer unless the user chose one or threads already started."""
    if os.environ.get("NUMBA_THREADING_LAYER") or _launched_layer() is not None:
        return
    if any(_layer_loads(name) for name in THREADSAFE_LAYERS):
        numba.config.THREADING_LAYER = "threadsafe"


_omp_before_fork = False  # GNU OpenMP was running when this process was forked


def _note_fork() -> None:
    global _omp_before_fork
    _omp_before_fork = _omp_before_fork or _launched_layer() == "omp"


os.register_at_fork(after_in_child=_note_fork)


def parallel_kernels_usable() -> bool:
    """Whether the ``prange`` entry points may run here, or their serial twins must: the threading
    layer must be safe for concurrent calls from several Python threads, and GNU OpenMP, once
    started, cannot run in a forked child (it kills it: "fork() called from a process already using
    GNU OpenMP"), as ``multiprocessing``'s default start method on Linux makes them."""
    return not _omp_before_fork and threading_layer_is_threadsafe()


_parallel_threads: int | None = None  # parallel_threads(), once known


def parallel_threads() -> int:
    """numba's threads for a prange kernel: the usable cores (:mod:`gpu_pipeline.engine.cores`), at
    most its pool. numba sizes its pool by the affinity mask alone: under a container's CPU quota of
    4 on a 64-core machine, 64 threads would share 4 CPUs' worth of time. A ``NUMBA_NUM_THREADS``
    the user set is taken as it is."""
    global _parallel_threads
    if _parallel_threads is None:
        from gpu_pipeline.engine.cores import usable_cores

        pool = numba.config.NUMBA_NUM_THREADS
        _parallel_threads = pool if "NUMBA_NUM_THREADS" in os.environ else max(1, min(pool, usable_cores()))
    return _parallel_threads


def parallel_or_serial(parallel_kernel, serial_kernel):
    """The kernel for the calling thread to run: ``parallel_kernel``, on :func:`parallel_threads`
    threads (numba's setting is one per calling thread), where the prange entry points may run
    (:func:`parallel_kernels_usable`), else ``serial_kernel``."""
    if not parallel_kernels_usable():
        return serial_kernel
    if numba.get_num_threads() != parallel_threads():
        numba.set_num_threads(parallel_threads())
    return parallel_kernel


def threading_layer_is_threadsafe() -> bool:
    """True when concurrent calls from several Python threads are safe.

    Before the first parallel kernel runs this answers for the layer numba is about to pick.
    """
    launched = _launched_layer()
    if launched is not None:
        return launched in THREADSAFE_LAYERS
    # Only a layer that can load: numba raises at the first prange kernel when the one asked for
    # cannot (omp on a Mac without libomp, tbb without libtbb); the serial twins run then.
    candidates = THREADSAFE_CANDIDATES.get(numba.config.THREADING_LAYER, ())
    return any(_layer_loads(name) for name in candidates)


# Applied when the kernels are first imported, before numba compiles anything (numba picks a
# cached function's folder when it is decorated).
#: The folder chosen by :func:`choose_cache_dir`, and the one kernels are cached in (None: no cache).
CACHE_ROOT = choose_cache_dir(Path(__file__).resolve().parent)
CACHE_DIR = keyed_cache_dir(CACHE_ROOT)
if CACHE_DIR is not None:
    numba.config.CACHE_DIR = CACHE_DIR
choose_threading_layer()
# OpenMP's idle threads spin by default, taking the cores the decode threads need between two
# batches (measured on 50,000 EuroSAT tiles, 2 cores: 19 s of CPU and 12.9 s wall spinning,
# 12 s and 11.1 s passive). Read when OpenMP starts, at the first parallel kernel; the user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

def compiles_on_first_call(kernels) -> bool:
    """True unless numba's cache holds a current entry for every one of ``kernels`` (dispatchers):
    a missing, stale or disabled cache means they compile on their first call (seconds each)."""
    for kernel in kernels:
        try:
            if not kernel._cache._cache_file._load_index():  # numba's own check: source stamp, version
                return True
        except Exception:  # no cache (caching disabled) or a numba without these internals
            return True
    return False


unsaved: list[str] = []  # why a compiled kernel could not be kept (said once)


def keeps_going_uncached(decorator):
    """``decorator``, whose dispatchers run on when numba cannot save what they compiled (the cache
    folder's disk full, or made read-only since): numba raised the OSError out of the kernel's first
    call, which ended a run at its warm-up and made ``verify`` report every image of the backend as
    a difference. The kernels are then compiled again at the next run; a warning says so, once.
    numba-cuda's dispatchers (``cuda.jit``) are wrapped the same way."""
    def decorate(function):
        dispatcher = decorator(function)
        cache = getattr(dispatcher, "_cache", None)
        save = getattr(cache, "save_overload", None)
        if save is None:  # no cache at all (the CUDA simulator's kernels)
            return dispatcher

        def save_overload(signature, data):
            try:
                save(signature, data)
            except OSError as exc:
                if not unsaved:
                    unsaved.append(str(exc))
                    warnings.warn(f"the compiled kernels cannot be kept in {CACHE_DIR} ({exc.strerror or exc}): "
                                  "they are compiled again at every run", PipelineWarning, stacklevel=2)

        cache.save_overload = save_overload
        return dispatcher

    return decorate


#: Decorators of the CPU kernels: ``helper`` for serial code run inside one thread, ``parallel``
#: for the entry points whose ``prange`` loops spread over the threads. Both release the GIL.
helper = keeps_going_uncached(numba.njit(cache=CACHE_DIR is not None, nogil=True))
parallel = keeps_going_uncached(numba.njit(parallel=True, cache=CACHE_DIR is not None, nogil=True))
