"""Process-wide numba settings the CPU kernels need, applied before any kernel is compiled.

Two things can break a numba program that works on the developer's machine:

* ``cache=True`` needs a writable cache directory. numba tries ``__pycache__`` beside the
  source, then its user-wide cache, and raises at import time when neither is writable (a
  read-only install in a container with a read-only home). :func:`choose_cache_dir` picks a
  writable directory first and hands it to numba; without one, caching is switched off.
* The ``workqueue`` threading layer aborts the process when parallel kernels are entered from
  several Python threads at once. :func:`choose_threading_layer` asks for a thread-safe layer
  (``omp`` or ``tbb``) when one can be loaded; otherwise the backend serialises its calls.

An explicit ``NUMBA_CACHE_DIR`` or ``NUMBA_THREADING_LAYER`` in the environment always wins.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import numba

#: Threading layers that may be entered from several Python threads at once.
THREADSAFE_LAYERS = ("omp", "tbb")


def _is_writable_dir(path: Path) -> bool:
    """True when ``path`` exists or can be made, and a file can be created in it (numba's own test)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpu-pipeline" / "numba"


def choose_cache_dir(package_dir: Path) -> str | None:
    """Where numba caches compiled kernels, or None when nowhere is writable.

    Order: ``$NUMBA_CACHE_DIR`` if the user set it; ``<package>/__pycache__`` (numba's default,
    nothing to set); ``$XDG_CACHE_HOME/gpu-pipeline/numba`` (``~/.cache/...``); a per-user
    folder in the system temp dir. A chosen folder is written to ``numba.config.CACHE_DIR``,
    which numba reads when a ``cache=True`` function is defined.
    """
    if numba.config.CACHE_DIR:
        return numba.config.CACHE_DIR
    if _is_writable_dir(package_dir / "__pycache__"):
        return str(package_dir / "__pycache__")
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    for candidate in (_user_cache_dir(), Path(tempfile.gettempdir()) / f"gpu-pipeline-numba-{uid}"):
        if _is_writable_dir(candidate):
            numba.config.CACHE_DIR = str(candidate)
            return str(candidate)
    return None


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


def threading_layer_is_threadsafe() -> bool:
    """True when concurrent calls from several Python threads are safe.

    Before the first parallel kernel runs this answers for the layer numba is about to pick.
    """
    launched = _launched_layer()
    if launched is not None:
        return launched in THREADSAFE_LAYERS
    requested = numba.config.THREADING_LAYER
    if requested in ("threadsafe", "safe", *THREADSAFE_LAYERS):
        return True
    return requested == "default" and any(_layer_loads(name) for name in THREADSAFE_LAYERS)


# Applied when the kernels are first imported, before numba compiles anything.
CACHE_DIR = choose_cache_dir(Path(__file__).resolve().parent)
choose_threading_layer()
# OpenMP's idle threads spin by default, taking the cores the decode threads need between two
# batches (measured on 50,000 EuroSAT tiles, 2 cores: 19 s of CPU and 12.9 s wall spinning,
# 12 s and 11.1 s passive). Read when OpenMP starts, at the first parallel kernel; the user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: Decorators of the CPU kernels: ``helper`` for serial code run inside one thread, ``parallel``
#: for the entry points whose ``prange`` loops spread over the threads. Both release the GIL.
helper = numba.njit(cache=CACHE_DIR is not None, nogil=True)
parallel = numba.njit(parallel=True, cache=CACHE_DIR is not None, nogil=True)
