"""Backends by name, imported lazily so that a missing GPU stack never breaks the CPU paths."""

from __future__ import annotations

import ctypes
import functools
import importlib
import sys
from dataclasses import dataclass
from typing import Callable

from gpu_pipeline.backends.base import Backend, BackendUnavailable
from gpu_pipeline.errors import one_line


@dataclass(frozen=True)
class BackendEntry:
    name: str
    description: str
    load: Callable[[], type[Backend]]
    #: Needs the CUDA driver: ``auto`` skips it without importing it when there is none.
    needs_cuda_driver: bool = False


_REGISTRY: dict[str, BackendEntry] = {}

#: ``auto`` takes the first available backend of this list.
AUTO_ORDER = ["cupy", "cuda", "numba", "reference"]


def _lazy(module: str, cls: str) -> Callable[[], type[Backend]]:
    def load() -> type[Backend]:
        return getattr(importlib.import_module(module), cls)

    return load


def register(name: str, load: Callable[[], type[Backend]], description: str = "",
             needs_cuda_driver: bool = False) -> None:
    """Make a backend known by ``name``; ``load`` returns its class (importing it if needed)."""
    _REGISTRY[name] = BackendEntry(name, description, load, needs_cuda_driver)


@functools.cache
def cuda_driver_loads() -> bool:
    """Whether the CUDA driver library can be loaded: a millisecond, where importing a GPU
    backend to ask it (numba.cuda, CuPy) costs about half a second of every start."""
    library = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def backend_names() -> list[str]:
    return list(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name``, imported but not instantiated (GPU backends compile on creation)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backend {name!r}; choose from auto, {', '.join(_REGISTRY)}")
    return _REGISTRY[name].load()


def unavailable_reason(name: str) -> str | None:
    """None when backend ``name`` can run here, else why not (import errors included)."""
    if name not in _REGISTRY:
        return f"unknown backend {name!r} (known: {', '.join(_REGISTRY)})"
    try:
        cls = _REGISTRY[name].load()
    except Exception as exc:  # an optional dependency that fails to import
        return f"cannot import: {type(exc).__name__}: {exc}".splitlines()[0]
    return cls.unavailable_reason()


def tell_on_stderr(message: str) -> None:
    print(f"gpu-pipeline: {message}", file=sys.stderr, flush=True)


#: How ``auto`` says why it passed over a GPU backend on a machine with a CUDA driver (tests replace it).
notify: Callable[[str], None] = tell_on_stderr


def resolve(name: str) -> str:
    """The concrete backend name for ``name`` (``auto`` picks the best available one).

    ``auto`` skips a GPU backend silently where there is no CUDA driver (a CPU machine); where there
    is one, a GPU backend that cannot run is a surprise (a broken install, numpy too new), so it
    says which backend it took instead and why, in one line through :data:`notify`.
    """
    concrete, passed_over = _choice(name, {})
    _tell_passed_over(concrete, passed_over)
    return concrete


def _choice(name: str, failed: dict[str, str]) -> tuple[str, list[str]]:
    """:func:`resolve`'s backend, and why ``auto`` passed over the GPU backends before it. ``failed``:
    the GPU backends :func:`create` could not start, with what happened ("cupy could not start: ...")."""
    if name != "auto":
        if name not in _REGISTRY:
            raise KeyError(f"unknown backend {name!r}; choose from auto, {', '.join(_REGISTRY)}")
        return name, []
    passed_over = []
    for candidate in AUTO_ORDER:
        if candidate not in _REGISTRY or _REGISTRY[candidate].needs_cuda_driver and not cuda_driver_loads():
            continue
        if candidate in failed:
            passed_over.append(failed[candidate])
            continue
        reason = unavailable_reason(candidate)
        if reason is None:
            return candidate, passed_over
        if _REGISTRY[candidate].needs_cuda_driver:
            passed_over.append(f"{candidate} is unavailable: {reason}")
    return "reference", []


def _tell_passed_over(concrete: str, passed_over: list[str]) -> None:
    if passed_over:
        notify(f"backend auto: using {concrete}; " + "; ".join(passed_over))


def create(name: str, threads: int | None = None, device: int | None = None) -> Backend:
    """An instance of backend ``name`` (or ``auto``); BackendUnavailable says why it cannot run.

    ``device``: the GPU a GPU backend binds (``--device``); refused for a CPU backend. A GPU backend
    that fails as it starts (a GPU that another process holds in exclusive mode, or whose memory it
    holds; a kernel the driver cannot load) is BackendUnavailable too, naming the error, where it was
    a traceback; ``auto`` (without ``device``) then takes the next backend and says why.
    """
    failed: dict[str, str] = {}
    while True:
        concrete, passed_over = _choice(name, failed)
        try:
            backend = _started(concrete, threads, device)
        except BackendUnavailable as exc:
            if name != "auto" or device is not None or not _REGISTRY[concrete].needs_cuda_driver:
                raise
            failed[concrete] = str(exc).replace(f"backend {concrete!r} ", f"{concrete} ", 1)
            continue
        _tell_passed_over(concrete, passed_over)  # (once, for the backend that started)
        return backend


def _started(concrete: str, threads: int | None, device: int | None) -> Backend:
    reason = unavailable_reason(concrete)
    if reason is not None:
        raise BackendUnavailable(f"backend {concrete!r} is unavailable: {reason}")
    cls = _REGISTRY[concrete].load()
    if device is not None and not cls.uses_gpu:
        raise BackendUnavailable(f"--device {device} needs a GPU backend (cuda or cupy); backend {concrete!r} is not one")
    try:
        return cls(threads=threads) if device is None else cls(threads=threads, device_index=device)
    except BackendUnavailable:
        raise
    except Exception as exc:
        if not cls.uses_gpu:  # (a CPU backend's failure is a bug to see whole)
            raise
        raise BackendUnavailable(f"backend {concrete!r} could not start: {one_line(exc)}") from exc


register("reference", _lazy("gpu_pipeline.backends.reference", "ReferenceBackend"),
         "plain NumPy, the executable specification (one thread)")
register("numba", _lazy("gpu_pipeline.backends.numba_cpu", "NumbaCpuBackend"),
         "numba CPU kernels (GIL-free) on every core")
register("cuda", _lazy("gpu_pipeline.backends.numba_cuda", "NumbaCudaBackend"),
         "numba.cuda GPU kernels", needs_cuda_driver=True)
register("cupy", _lazy("gpu_pipeline.backends.cupy_gpu", "CupyBackend"),
         "CuPy with CUDA C++ kernels", needs_cuda_driver=True)
