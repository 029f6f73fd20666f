"""Backends: one interface (``base.Backend``), one registry (``registry``)."""

from gpu_pipeline.backends.base import Backend, BackendUnavailable, BatchResult, StageResult
from gpu_pipeline.backends.registry import backend_names, create, register, resolve, unavailable_reason

#: Set by ``gpu-pipeline info`` (which writes nothing) before the numba setup is first imported: it
#: then finds the kernel cache folder without making it, and caches no kernel (``_numba_setup``).
NUMBA_CACHE_READ_ONLY = False

__all__ = [
    "Backend", "BackendUnavailable", "BatchResult", "StageResult",
    "backend_names", "create", "register", "resolve", "unavailable_reason",
]
