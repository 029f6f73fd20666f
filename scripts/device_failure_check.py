#!/usr/bin/env python3
"""On a GPU machine: make the GPU fail for good, then check that gpu-pipeline takes it for a device
failure and not for an image's error (docs/backends.md, "A failed GPU"; the tests check it with the
libraries' exception types only).

    python scripts/device_failure_check.py cupy|cuda

A kernel writes through an unmapped address, a sticky cudaErrorIllegalAddress (700): the process's
CUDA context is unusable from then on, so each backend is checked in a process of its own
(scripts/gpu_check.sh runs both). Prints one line per step; exit 0 when the backend's next call
raises gpu_pipeline.DeviceFailed, 1 when it raises anything else or nothing, 2 when the backend
cannot run here (no GPU).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def crash_cupy() -> BaseException:
    import cupy

    kernel = cupy.RawKernel(r'extern "C" __global__ void crash() { *((volatile int *) 16) = 1; }', "crash")
    kernel((1,), (1,), ())
    try:
        cupy.cuda.runtime.deviceSynchronize()
    except Exception as exc:
        return exc
    raise SystemExit("the faulting kernel raised nothing")


def crash_cuda() -> BaseException:
    from numba import cuda

    @cuda.jit
    def crash(out):
        out[1 << 40] = 1  # (no bounds check: 4 TB past the array, unmapped)

    out = cuda.device_array(4, np.int32)
    crash[1, 1](out)
    try:
        cuda.synchronize()
    except Exception as exc:
        return exc
    raise SystemExit("the faulting kernel raised nothing")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", choices=["cupy", "cuda"])
    name = parser.parse_args().backend

    import gpu_pipeline
    from gpu_pipeline.api import shared_backend
    from gpu_pipeline.backends import BackendUnavailable

    image = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    try:
        before = gpu_pipeline.process([image], backend=name)
    except BackendUnavailable as exc:
        print(f"{name}: cannot run here: {exc}")
        return 2
    print(f"{name}: before the fault, edge count {int(before.edge_counts[0])}")
    fault = crash_cupy() if name == "cupy" else crash_cuda()
    classified = shared_backend(name).is_device_failure(fault)
    print(f"{name}: the fault: {type(fault).__name__}: {fault}; taken for a device failure: {classified}")
    try:
        gpu_pipeline.process([image], backend=name)
    except gpu_pipeline.DeviceFailed as exc:
        print(f"{name}: the next call: DeviceFailed: {exc} (cause {type(exc.__cause__).__name__})")
        return 0
    except Exception as exc:
        print(f"{name}: the next call raised {type(exc).__name__}: {exc}, not DeviceFailed")
        return 1
    print(f"{name}: the next call succeeded after the fault (the context was not lost?)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
