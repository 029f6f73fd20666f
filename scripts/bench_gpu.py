"""GPU benchmark: megapixels per second of every available GPU backend of the registry, against
the numba CPU backend and OpenCV with all cores, compute-only and end to end, written as JSON.

    PYTHONPATH=. python scripts/bench_gpu.py [--json FILE] [--quick] [--repeats N]

Workloads: a batch of 1 MP RGB images (1000 x 1000) and a batch of 64 x 64 RGB tiles, synthetic
scenes (smooth structure plus noise, so that edges form chains as in real imagery). For each
backend:

* ``setup_s``: construction and warm-up hook (kernel compilation or cache load);
* ``warmup_s``: its first batch of each workload (allocations, first launches), excluded from
  the rates and reported;
* ``compute``: ``process()`` on decoded images in memory, best of ``--repeats``; for GPU
  backends this includes staging and host<->device copies. A backend with ``device_times``
  (the cuda backend) also reports GPU time per phase: kernels versus copies;
* ``end_to_end``: JPEG files decoded in a thread pool and processed batch by batch (through
  gpu_pipeline's engine when it imports, else a plain Pillow loop), next to decode alone.

GPU backends that are unavailable are listed with the reason and skipped, so the script also
runs on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gpu_pipeline.backends import registry
from gpu_pipeline.backends.base import Backend, StageResult
from gpu_pipeline.config import PipelineConfig

CPU_COUNT = os.cpu_count() or 1


def scene(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Upscaled random structure plus a little noise."""
    import cv2

    h, w = shape[:2]
    coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), *shape[2:]), dtype=np.uint8)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).reshape(shape)
    return np.clip(smooth.astype(np.int16) + rng.integers(-8, 9, shape), 0, 255).astype(np.uint8)


def tiles(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """64x64 tiles cut from 1024x1024 scenes."""
    out: list[np.ndarray] = []
    while len(out) < count:
        big = scene((1024, 1024, 3), rng)
        out += [big[r:r + 64, c:c + 64].copy() for r in range(0, 1024, 64) for c in range(0, 1024, 64)]
    return out[:count]


class OpenCvThreads(Backend):
    """OpenCV with all cores: one image per thread (cv2 releases the GIL), cv2's own threading
    off so that the threads do not oversubscribe the cores."""

    name = "opencv"

    def __init__(self, threads: int | None = None) -> None:
        import cv2

        super().__init__(threads or CPU_COUNT)
        self._cv2 = cv2
        cv2.setNumThreads(1)
        self._pool = ThreadPoolExecutor(self.threads)

    def _one(self, image: np.ndarray, config: PipelineConfig) -> StageResult:
        cv2 = self._cv2
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        histogram = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.int64)
        blurred = cv2.GaussianBlur(cv2.equalizeHist(gray), (config.blur_ksize,) * 2, 0)
        edges = cv2.Canny(blurred, config.low_threshold, config.high_threshold, L2gradient=config.l2_gradient)
        return StageResult(histogram=histogram, edge_count=int(cv2.countNonZero(edges)))

    def process(self, images, config, keep_images=False):
        return list(self._pool.map(lambda image: self._one(image, config), images))

    def close(self) -> None:
        self._pool.shutdown()


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def write_jpegs(images: Sequence[np.ndarray], folder: Path) -> list[Path]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, image in enumerate(images):
        path = folder / f"{number:06d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(path)
    return paths


def decoder() -> tuple[str, Callable[[Path], np.ndarray]]:
    """gpu_pipeline.io's decoder (needs tifffile), else Pillow directly."""
    try:
        from gpu_pipeline.config import DecodeOptions
        from gpu_pipeline.io import decode_image

        options = DecodeOptions()
        return "gpu_pipeline.io", lambda path: decode_image(path, options)
    except ImportError:
        from PIL import Image

        return "pillow", lambda path: np.asarray(Image.open(path).convert("RGB"))


def decode_only(paths: Sequence[Path], decode: Callable[[Path], np.ndarray]) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(CPU_COUNT) as pool:
        for _ in pool.map(decode, paths):
            pass
    return time.perf_counter() - start


def end_to_end(backend: Backend, paths: Sequence[Path], config: PipelineConfig, batch_size: int,
               decode: Callable[[Path], np.ndarray]) -> tuple[str, float]:
    """Seconds to decode and process ``paths``, through the engine when it imports."""
    try:
        from gpu_pipeline.engine import Engine

        class NullSink:
            def write(self, records):
                for _ in records:
                    pass

        engine = Engine(backend=backend, config=config, batch_size=batch_size, workers=CPU_COUNT)
        start = time.perf_counter()
        summary = engine.run(list(paths), NullSink())
        if summary.failed:
            raise RuntimeError(f"{summary.failed} images failed end to end: {summary.failures_by_stage}")
        return "engine", time.perf_counter() - start
    except ImportError:
        start = time.perf_counter()
        with ThreadPoolExecutor(CPU_COUNT) as pool:
            decoded = pool.map(decode, paths)
            batch: list[np.ndarray] = []
            for image in decoded:
                batch.append(image)
                if len(batch) == batch_size:
                    backend.process(batch, config)
                    batch = []
            if batch:
                backend.process(batch, config)
        return "pillow-loop", time.perf_counter() - start


def competitors() -> tuple[dict[str, Callable[[], Backend]], dict[str, str]]:
    """Constructors of every backend to measure, and why the others are skipped."""
    makers: dict[str, Callable[[], Backend]] = {}
    skipped: dict[str, str] = {}
    for name in registry.backend_names():
        reason = registry.unavailable_reason(name)
        if reason is not None:
            skipped[name] = reason
            continue
        cls = registry.backend_class(name)
        if cls.uses_gpu or name == "numba":
            makers[name] = lambda cls=cls: cls(threads=CPU_COUNT)
    makers["opencv"] = lambda: OpenCvThreads(CPU_COUNT)
    return makers, skipped


def gpu_name() -> str | None:
    try:
        from numba import cuda

        return cuda.get_current_device().name.decode() if cuda.is_available() else None
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="small batches (a smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(20260801)
    scale = 8 if args.quick else 1
    workloads = {
        "1mp_rgb": [scene((1000, 1000, 3), rng) for _ in range(96 // scale)],
        "tiles_64": tiles(16384 // scale, rng),
    }
    batch_sizes = {"1mp_rgb": 32, "tiles_64": 4096 // scale}
    config = PipelineConfig()
    decoder_name, decode = decoder()
    makers, skipped = competitors()
    report: dict = {
        "machine": {"cpu_count": CPU_COUNT, "gpu": gpu_name(), "python": platform.python_version()},
        "config": vars(config) | {"keep_images": False},
        "workloads": {name: {"images": len(batch), "megapixels": sum(i.shape[0] * i.shape[1] for i in batch) / 1e6}
                      for name, batch in workloads.items()},
        "skipped": skipped,
        "decoder": decoder_name,
        "decode_only_mp_s": {},
        "backends": {},
    }
    for name, reason in skipped.items():
        print(f"skip {name}: {reason}")

    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        files = {name: write_jpegs(batch[: len(batch) // 2 if name == "1mp_rgb" else len(batch) // 4], Path(tmp) / name)
                 for name, batch in workloads.items()}
        file_mp = {name: len(paths) * workloads[name][0].shape[0] * workloads[name][0].shape[1] / 1e6
                   for name, paths in files.items()}
        for name, paths in files.items():
            decode_only(paths[:8], decode)  # warm the decoder
            report["decode_only_mp_s"][name] = file_mp[name] / decode_only(paths, decode)

        for backend_name, make in makers.items():
            start = time.perf_counter()
            backend = make()
            if hasattr(backend, "warm_up"):
                backend.warm_up()
            entry: dict = {"setup_s": time.perf_counter() - start, "workloads": {}}
            report["backends"][backend_name] = entry
            with backend:
                for name, batch in workloads.items():
                    megapixels = report["workloads"][name]["megapixels"]
                    start = time.perf_counter()
                    backend.process(batch[: batch_sizes[name]], config)
                    result: dict = {"warmup_s": time.perf_counter() - start}
                    if hasattr(backend, "device_times"):
                        backend.device_times = type(backend.device_times)()
                    repeats = args.repeats if getattr(backend, "uses_gpu", False) else max(1, args.repeats - 1)
                    seconds = best_of(repeats, lambda backend=backend, batch=batch: backend.process(batch, config))
                    result["compute_s"] = seconds
                    result["compute_mp_s"] = megapixels / seconds
                    if hasattr(backend, "device_times"):
                        times = backend.device_times
                        result["device"] = {
                            "kernels_mp_s": times.pixels / 1e6 / times.kernels if times.kernels > 0 else None,
                            "copy_in_s_per_repeat": times.copy_in / repeats,
                            "kernels_s_per_repeat": times.kernels / repeats,
                            "copy_out_s_per_repeat": times.copy_out / repeats,
                            "sub_batches_per_repeat": times.sub_batches / repeats,
                            "hysteresis_launches_per_repeat": times.hysteresis_launches / repeats,
                        }
                    how, seconds = end_to_end(backend, files[name], config, batch_sizes[name], decode)
                    result["end_to_end_s"] = seconds
                    result["end_to_end_mp_s"] = file_mp[name] / seconds
                    result["end_to_end_via"] = how
                    entry["workloads"][name] = result
                    device = result.get("device") or {}
                    kernels = f", kernels {device['kernels_mp_s']:.0f} MP/s" if device.get("kernels_mp_s") else ""
                    print(f"{backend_name:>10} {name:>9}: warm-up {result['warmup_s']:.2f} s, compute "
                          f"{result['compute_mp_s']:.0f} MP/s{kernels}, end to end {result['end_to_end_mp_s']:.0f} MP/s "
                          f"(decode alone {report['decode_only_mp_s'][name]:.0f} MP/s)", flush=True)

    opencv = report["backends"]["opencv"]["workloads"]
    for entry in report["backends"].values():
        for name, result in entry["workloads"].items():
            result["compute_vs_opencv"] = result["compute_mp_s"] / opencv[name]["compute_mp_s"]
            result["end_to_end_vs_decode_only"] = result["end_to_end_mp_s"] / report["decode_only_mp_s"][name]
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
