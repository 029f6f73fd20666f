"""gpu-pipeline: batch image analysis that gives the same bytes on every CPU and GPU path.

The Python API (:mod:`gpu_pipeline.api`): ``gpu_pipeline.process(images, ...)`` for images in
memory, ``gpu_pipeline.run(paths, ...)`` for files (a record each), ``gpu_pipeline.run_batches(paths,
...)`` for files a batch of arrays at a time, ``gpu_pipeline.read_image(path, ...)`` for the pixels
``run`` computes on. Imported on first use, so that the command line does
not pay for it.
"""

import os
import sys

__version__ = "0.1.0"
__all__ = ["process", "run", "run_batches", "read_image", "Results", "Batch", "DeviceFailed", "DecodeError"]


def unsupported_platform() -> str | None:
    """Why gpu-pipeline cannot run here, or None. It needs what Windows' Python lacks (fork hooks,
    fcntl's locks, POSIX open flags): without this its modules failed to import with a traceback."""
    if sys.platform == "win32" or not hasattr(os, "register_at_fork"):
        return "gpu-pipeline runs on Linux and macOS, not on Windows: run it in WSL"
    return None


def __getattr__(name: str):
    if name in __all__:
        if (reason := unsupported_platform()) is not None:
            raise ImportError(reason)
        from gpu_pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'gpu_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})  # the lazy names too, for dir() and a notebook's completion
