"""Is a real CUDA GPU here? (The simulator does not count.)"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def real_gpu_reason() -> str | None:
    """None when a real GPU is usable, else why not."""
    try:
        import numba
        from numba import cuda
    except Exception as exc:  # numba-cuda missing
        return f"numba.cuda cannot be imported ({exc})"
    if numba.config.ENABLE_CUDASIM:
        return "NUMBA_ENABLE_CUDASIM=1 (the simulator is not a GPU)"
    try:
        if not cuda.is_available():
            return "no CUDA driver or device"
    except Exception as exc:
        return f"CUDA probe failed ({exc})"
    return None
