"""``gpu_pipeline.process`` on tiles in memory: a list of arrays against one (N, H, W, 3) stack.

    PYTHONPATH=. python scripts/bench_api.py [FOLDER] [--count 8192] [--threads N] [--backend numba] [--repeats 9]

Decodes the JPEG tiles of FOLDER (default: the bundled data/eurosat; repeated up to ``--count``),
then times ``gpu_pipeline.process`` on the same tiles given both ways, alternately, ``--repeats``
times each. It prints, per form, the wall time and the calling thread's CPU time per tile (min and
median): a stack goes to the backend as it lies in memory, a list costs the Python of each image
(docs/benchmarks.md, "Fifth round").

``--null-device`` times the cupy backend's host side instead, on any machine: ``process()`` with a
device whose launches and copies do nothing (on a GPU they are the device's work), for a list, an
``ImageBatch`` of one buffer per image (the engine's batches from decode threads) and a stack.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gpu_pipeline  # noqa: E402
from gpu_pipeline.backends.base import BackendUnavailable  # noqa: E402
from gpu_pipeline.config import DecodeOptions  # noqa: E402
from gpu_pipeline.inputs.decode import decode_each  # noqa: E402
from gpu_pipeline.inputs.discover import find_files  # noqa: E402


class NullDevice:
    """The cupy backend's device interface with nothing behind it: what is left is the host's work."""

    sm_count = 132

    def __init__(self) -> None:
        self.arenas: list[np.ndarray] = []

    @contextlib.contextmanager
    def bind(self):
        yield

    def free_bytes(self) -> int:
        return 140 * 2**30

    def alloc(self, nbytes: int) -> np.ndarray:
        self.arenas.append(np.zeros(nbytes, np.uint8))
        return self.arenas[-1]

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        return np.zeros(nbytes, np.uint8)

    @staticmethod
    def address(arena: np.ndarray) -> int:
        return arena.ctypes.data

    def new_stream(self) -> object:
        return object()

    def upload(self, address, host, stream) -> None: ...
    def download(self, host, address, stream) -> None: ...
    def zero(self, address, nbytes, stream) -> None: ...
    def launch(self, launch, stream) -> None: ...
    def synchronize(self, stream) -> None: ...
    def release_cached(self) -> None: ...
    def release_pinned(self) -> None: ...


def host_side(stack: np.ndarray, repeats: int) -> None:
    """The cupy backend's host time per tile with a :class:`NullDevice`, per form of the same tiles."""
    from gpu_pipeline.backends.cupy_gpu import CupyBackend
    from gpu_pipeline.config import PipelineConfig
    from gpu_pipeline.images import ImageBatch

    backend, config = CupyBackend(device=NullDevice()), PipelineConfig()
    forms = {"list": list(stack), "ImageBatch.of": ImageBatch.of(list(stack)), "stack": ImageBatch.stacked(stack)}
    best = {name: float("inf") for name in forms}
    for _ in range(repeats):
        for name, images in forms.items():
            start = time.perf_counter()
            backend.process(images, config)
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"cupy backend, host side only (a device that does nothing), {len(stack)} tiles, best of {repeats}")
    for name, seconds in best.items():
        print(f"{name:14s} {seconds * 1e6 / len(stack):6.2f} us/tile")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(REPO / "data" / "eurosat"))
    parser.add_argument("--count", type=int, default=8192)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--null-device", action="store_true", help="the cupy backend's host side instead")
    args = parser.parse_args(argv)

    files = find_files([args.folder], glob="*.jpg")
    tiles = [image for image in decode_each(files[:args.count], DecodeOptions()) if isinstance(image, np.ndarray)]
    shape = tiles[0].shape
    tiles = [tile for tile in tiles if tile.shape == shape]
    stack = np.stack([tiles[i % len(tiles)] for i in range(args.count)])
    if args.null_device:
        host_side(stack, args.repeats)
        return 0
    forms = {"list": list(stack), "stack": stack}
    try:
        gpu_pipeline.process(stack[:8], backend=args.backend, threads=args.threads)  # kernels loaded
    except BackendUnavailable as exc:
        print(f"bench_api: {exc}", file=sys.stderr)
        return 2
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in forms}
    for _ in range(args.repeats):
        for name, images in forms.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            gpu_pipeline.process(images, backend=args.backend, threads=args.threads)
            times[name].append(((time.perf_counter() - wall) * 1e6 / len(stack),
                                (time.thread_time() - cpu) * 1e6 / len(stack)))
    print(f"{len(stack)} tiles of {shape}, backend {args.backend}, threads {args.threads or 'default'}, "
          f"{args.repeats} alternated repeats")
    for name, runs in times.items():
        walls, cpus = [run[0] for run in runs], [run[1] for run in runs]
        print(f"{name:6s} wall {min(walls):6.2f} min {statistics.median(walls):6.2f} median us/tile; "
              f"calling thread CPU {min(cpus):6.2f} min {statistics.median(cpus):6.2f} median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
