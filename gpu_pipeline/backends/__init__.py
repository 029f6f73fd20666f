"""Backends: one interface (``base.Backend``), one registry (``registry``)."""

from gpu_pipeline.backends.base import Backend, BackendUnavailable, BatchResult, StageResult
from gpu_pipeline.backends.registry import backend_names, create, register, resolve, unavailable_reason

__all__ = [
    "Backend", "BackendUnavailable", "BatchResult", "StageResult",
    "backend_names", "create", "register", "resolve", "unavailable_reason",
]
