"""The cuda (numba.cuda) backend: PTX for sm_90, host logic, the simulator, then a real GPU.

Without a GPU: every kernel compiles to PTX for sm_90 with the argument types the backend
launches it with; the host-side planning is tested as plain functions; the whole backend runs
under the CUDA simulator in a subprocess (tests/_cudasim_check.py) and is held byte-equal to the
reference there. What only a GPU can tell (memory model, streams, timing, large images) is in
the @pytest.mark.gpu tests at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (the cuda13 or cuda12 extra): the kernels "
                    "cannot be compiled or simulated")

from gpu_pipeline.backends import _cuda_kernels as kernels
from gpu_pipeline.backends import numba_cuda, registry
from gpu_pipeline.backends._cuda_plan import (
    HYSTERESIS_MAX_CHUNK,
    HYSTERESIS_MAX_LAUNCHES,
    MAX_IMAGES_PER_LAUNCH,
    MAX_PIXELS_PER_IMAGE,
    MEMORY_FRACTION,
    PIXELS_PER_THREAD,
    SLOTS,
    BufferPool,
    device_bytes_per_image,
    grown_capacity,
    hysteresis_schedule,
    images_per_sub_batch,
    is_out_of_memory,
    pinned_bytes_per_image,
    pixel_grid,
    plan_sub_batches,
    tile_grid,
)
from gpu_pipeline.backends.base import BackendUnavailable
from gpu_pipeline.backends.numba_cuda import NumbaCudaBackend
from gpu_pipeline.cli import app
from gpu_pipeline.config import BLUR_SIZES, PipelineConfig
from tests.gpu import real_gpu_reason
from tests.oracle import expected_results
from tests.strategies import ODD_SHAPES

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
KERNEL_NAMES = sorted(kernel.py_func.__name__ for kernel in kernels.KERNEL_SIGNATURES)

# --- the kernels compile for an H100 -------------------------------------------------------------

# compile_ptx needs no GPU, but numba compiles the device functions a kernel calls for "the
# current device"; the child process answers that with sm_90, so this process stays untouched.
_COMPILE_ALL_KERNELS = """
import json, types
import numba.cuda.dispatcher
numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
from numba import cuda
from gpu_pipeline.backends import _cuda_kernels as kernels
report = {}
for kernel, signatures in kernels.KERNEL_SIGNATURES.items():
    for signature in signatures:
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
            report[kernel.py_func.__name__] = {"ptx": ptx}
        except Exception as exc:
            report[kernel.py_func.__name__] = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def ptx_of() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPU_PIPELINE_CUDA_SMALL_TILES")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", _COMPILE_ALL_KERNELS], check=False, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_kernel_compiles_to_ptx_for_sm_90(ptx_of, name):
    result = ptx_of[name]
    assert "error" not in result, result.get("error")
    assert ".target sm_90" in result["ptx"]
    assert re.search(rf"\.entry \S*{name}", result["ptx"]), "the kernel's entry point is missing"


def test_equalize_lut_keeps_float32_rounding(ptx_of):
    """cv2's float32 division and product, then round half to even, with nothing fused."""
    ptx = ptx_of["equalize_lut"]["ptx"]
    assert "div.rn.f32" in ptx
    assert "cvt.rni" in ptx
    assert "fma" not in ptx and "approx" not in ptx


def test_only_the_lut_touches_floating_point(ptx_of):
    for name, result in ptx_of.items():
        if name != "equalize_lut":
            assert not re.search(r"\.f(32|64)\b", result["ptx"]), name


def test_kernels_are_launched_with_the_declared_shared_geometry():
    assert kernels.BLOCK_X * kernels.BLOCK_Y == kernels.BLOCK_THREADS
    assert kernels.TILE_Y % kernels.BLOCK_Y == 0 and kernels.TILE_X == kernels.BLOCK_X
    assert not kernels.SMALL_TILES, "the small simulator geometry must not leak into this process"


# --- availability ----------------------------------------------------------------------------------


def test_unavailable_reason_is_one_line_or_none():
    reason = NumbaCudaBackend.unavailable_reason()
    assert reason is None or (reason.strip() and "\n" not in reason)
    assert registry.unavailable_reason("cuda") == reason


def test_without_a_gpu_it_says_why_and_auto_skips_it():
    reason = NumbaCudaBackend.unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailable, match=re.escape(reason)):
        registry.create("cuda")
    with pytest.raises(BackendUnavailable, match=re.escape(reason)):
        NumbaCudaBackend(allow_simulator=True)  # the opt-in is for the simulator only
    assert registry.resolve("auto") != "cuda"


# --- a stack numba-cuda cannot load (numba-cuda 0.30.4 on numpy 2.5): one line, never a traceback ---

ROW_STACK_FIX = "fix: pip install 'numpy<2.5'"


@pytest.fixture
def numpy_too_new(monkeypatch):
    """numba-cuda's array support failing to import as it does on numpy 2.5 (issue #20)."""
    def fail() -> None:
        raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(numba_cuda, "_load_array_support", fail)


@pytest.fixture
def few_images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_a_stack_numba_cuda_cannot_load_is_unavailable_with_the_fix(numpy_too_new):
    reason = registry.unavailable_reason("cuda")
    assert reason is not None and "\n" not in reason
    assert "row_stack" in reason and reason.endswith(ROW_STACK_FIX), reason
    with pytest.raises(BackendUnavailable, match=re.escape(reason)):
        registry.create("cuda")
    info = json.loads(runner.invoke(app, ["info", "--json"]).stdout)
    assert {"name": "cuda", "available": False, "reason": reason} in info["backends"]
    assert f"unavailable: {reason}" in " ".join(runner.invoke(app, ["info"]).stdout.split())


@pytest.mark.parametrize("command", ["run", "verify"])
def test_run_and_verify_on_such_a_stack_exit_2_with_one_line(numpy_too_new, few_images, tmp_path, command):
    out = tmp_path / "out.jsonl"
    args = ["--backend", "cuda", "--out", str(out)] if command == "run" else ["--backends", "cuda"]
    result = runner.invoke(app, [command, str(few_images), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unavailable" in lines[0] and lines[0].endswith(ROW_STACK_FIX), result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_auto_on_a_gpu_machine_with_such_a_stack_takes_the_next_backend_and_says_why(
        numpy_too_new, few_images, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "cuda_driver_loads", lambda: True)  # a GPU machine: the driver is there
    monkeypatch.setattr(registry, "AUTO_ORDER", ["cuda", "numba", "reference"])  # whatever cupy does here
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["run", str(few_images), "--backend", "auto", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gpu-pipeline: backend auto: using numba; cuda is unavailable: numba-cuda"), line
    assert line.endswith(ROW_STACK_FIX), line
    assert {json.loads(record)["backend"] for record in out.read_text().splitlines()} == {"numba"}


def test_auto_on_a_machine_without_a_cuda_driver_passes_over_gpu_backends_silently(monkeypatch):
    told = []
    monkeypatch.setattr(registry, "cuda_driver_loads", lambda: False)
    monkeypatch.setattr(registry, "notify", told.append)
    assert registry.resolve("auto") in ("numba", "reference") and told == []


def test_auto_takes_the_first_available_of_cupy_cuda_numba_reference(monkeypatch):
    """README and backends.md: the order auto tries; a CPU machine gets numba, never the slow reference."""
    monkeypatch.setattr(registry, "cuda_driver_loads", lambda: True)
    monkeypatch.setattr(registry, "notify", lambda message: None)
    order = ["cupy", "cuda", "numba", "reference"]
    for taken in range(len(order)):
        monkeypatch.setattr(registry, "unavailable_reason",
                            lambda name, gone=order[:taken]: "planted" if name in gone else None)
        assert registry.resolve("auto") == order[taken]


def test_auto_on_a_machine_without_a_driver_gives_numba_without_importing_gpu_backends():
    code = ("import sys; from gpu_pipeline.backends import registry; "
            "registry.cuda_driver_loads = lambda: False; "
            "print(registry.resolve('auto'), sorted(m for m in sys.modules if ('cuda' in m or 'cupy' in m) "
            "and m != '_numba_cuda_redirector'))")  # numba's own .pth hook, there before any import
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(None, 1) == ["numba", "[]\n"]


def test_the_real_import_failing_in_a_fresh_process_is_one_line_and_exit_2(few_images, tmp_path):
    """No monkeypatching of our code: numpy loses row_stack, as in 2.5, before numba-cuda is imported."""
    code = ("import sys, numpy; del numpy.row_stack; from gpu_pipeline.cli import main; "
            "sys.argv[0] = 'gpu-pipeline'; main()")
    proc = subprocess.run([sys.executable, "-c", code, "run", str(few_images), "--backend", "cuda",
                           "--out", str(tmp_path / "out.jsonl")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.strip().endswith(ROW_STACK_FIX), proc.stderr


# --- numba-cuda's low-occupancy warning stays off the user's stderr ---------------------------------


def _launch_warnings() -> list[str]:
    """The warnings numba-cuda's real launch check gives a 1-block grid (it needs no GPU)."""
    from numba.cuda.dispatcher import _LaunchConfiguration

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _LaunchConfiguration(None, (1, 1, 1), (32, 1, 1), 0, 0)
    return [str(warning.message) for warning in caught]


def test_the_backends_switch_silences_numba_cudas_low_occupancy_warning(monkeypatch):
    import numba

    monkeypatch.delenv("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", raising=False)
    monkeypatch.setattr(numba.config, "CUDA_LOW_OCCUPANCY_WARNINGS", 1)
    assert any("under-utilization" in message for message in _launch_warnings())  # it does warn by default
    numba_cuda.quiet_low_occupancy_warnings()
    assert _launch_warnings() == []


def test_the_users_own_low_occupancy_setting_wins(monkeypatch):
    import numba

    monkeypatch.setenv("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "1")
    monkeypatch.setattr(numba.config, "CUDA_LOW_OCCUPANCY_WARNINGS", 1)
    numba_cuda.quiet_low_occupancy_warnings()
    assert any("under-utilization" in message for message in _launch_warnings())


# --- pure host logic -------------------------------------------------------------------------------




shapes = st.tuples(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([(), (3,)])).map(
    lambda t: (t[0], t[1], *t[2]))


@given(shapes, st.booleans())
def test_bytes_per_image(shape, keep):
    pixels = shape[0] * shape[1]
    rgb = len(shape) == 3
    device = device_bytes_per_image(shape, keep)
    # input, gray of an RGB input, blurred/edges and state, equalized when kept: bytes per pixel
    assert device - 256 - 4 * kernels.STATS_WIDTH == pixels * ((3 + 1 if rgb else 1) + 2 + keep)
    assert pinned_bytes_per_image(shape, keep) == pixels * ((3 if rgb else 1) + 2 * keep) + 4 * kernels.STATS_WIDTH


@given(shapes, st.booleans(), st.floats(1e3, 2e11))
def test_sub_batch_size_respects_memory_and_launch_limits(shape, keep, free):
    count = images_per_sub_batch(shape, keep, free)
    assert 1 <= count <= MAX_IMAGES_PER_LAUNCH
    if count > 1:
        assert count * device_bytes_per_image(shape, keep) * SLOTS <= MEMORY_FRACTION * free


def test_sub_batch_size_limits():
    assert images_per_sub_batch((64, 64, 3), False, float("inf")) == 8 * 2**20 // 4096
    assert images_per_sub_batch((1, 1), False, float("inf")) == MAX_IMAGES_PER_LAUNCH
    assert images_per_sub_batch((8000, 8000, 3), True, 1e6) == 1  # the allocation will say
    assert images_per_sub_batch((MAX_PIXELS_PER_IMAGE, 1), False, float("inf")) == 1  # the most, not refused
    with pytest.raises(ValueError, match="pixels"):
        images_per_sub_batch((MAX_PIXELS_PER_IMAGE, 2), False, float("inf"))


@given(st.lists(st.sampled_from([(5, 7), (5, 7, 3), (64, 64, 3), (1, 1), (300, 200)]), max_size=60),
       st.booleans(), st.floats(1e5, 1e9), st.one_of(st.none(), st.integers(1, 9)))
def test_plan_covers_every_image_once_in_same_shape_sub_batches(shape_list, keep, free, max_images):
    plan = plan_sub_batches(shape_list, keep, free, max_images)
    assert sorted(i for batch in plan for i in batch.indices) == list(range(len(shape_list)))
    for batch in plan:
        assert batch.indices and all(shape_list[i] == batch.shape for i in batch.indices)
        assert list(batch.indices) == sorted(batch.indices)
        limit = images_per_sub_batch(batch.shape, keep, free)
        assert len(batch.indices) <= (limit if max_images is None else min(limit, max_images))
    for shape in set(shape_list):  # balanced sizes within a shape
        sizes = [len(b.indices) for b in plan if b.shape == shape]
        assert max(sizes) - min(sizes) <= 1
    first_seen = list(dict.fromkeys(shape_list))
    assert list(dict.fromkeys(b.shape for b in plan)) == first_seen


@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_grown_capacity(current, required):
    grown = grown_capacity(current, required)
    assert grown >= required and grown >= current
    if required <= current:
        assert grown == current
    else:
        assert grown >= current + current // 2


def test_buffer_pool_reuses_grows_and_releases():
    made: list[tuple[int, np.dtype]] = []

    def allocate(count, dtype):
        made.append((count, dtype))
        return np.zeros(count, dtype)

    pool = BufferPool(allocate)
    first = pool.get("a", 100, np.uint8)
    assert first.shape == (100,) and len(made) == 1
    smaller = pool.get("a", 60, np.uint8)
    assert smaller.shape == (60,) and np.shares_memory(first, smaller) and len(made) == 1
    bigger = pool.get("a", 120, np.uint8)
    assert bigger.shape == (120,) and made[-1] == (150, np.dtype(np.uint8))  # grew by half
    pool.get("a", 10, np.int32)  # another dtype: a new buffer
    assert made[-1] == (10, np.dtype(np.int32))
    pool.get("b", 7, np.uint8)
    assert pool.nbytes == 40 + 7
    pool.release()
    assert pool.nbytes == 0


@given(st.integers(1, 10**8), st.integers(1, MAX_IMAGES_PER_LAUNCH))
def test_pixel_grid_covers_each_image(pixels, images):
    blocks, one, z = pixel_grid(pixels, images)
    assert one == 1 and z == images
    assert blocks * kernels.BLOCK_THREADS * PIXELS_PER_THREAD >= pixels
    assert (blocks - 1) * kernels.BLOCK_THREADS * PIXELS_PER_THREAD < pixels


@given(st.integers(1, 10**6), st.integers(1, 10**6), st.integers(1, 100))
def test_tile_grid_covers_each_image(height, width, images):
    tiles, one, z = tile_grid(height, width, images)
    assert one == 1 and z == images
    assert tiles == -(-height // kernels.TILE_Y) * -(-width // kernels.TILE_X)


@given(st.integers(1, 500))
def test_hysteresis_schedule(max_launches):
    chunks = list(hysteresis_schedule(max_launches))
    assert sum(chunks) == max_launches
    growing = [min(2 ** (i + 2), HYSTERESIS_MAX_CHUNK) for i in range(len(chunks))]
    assert chunks[:-1] == growing[:-1] and 1 <= chunks[-1] <= growing[-1]


def test_hysteresis_stops_after_44_launches_in_4_host_synchronisations():
    """backends.md: `cuda` stops after 44 launches, chunks of 4, 8, 16, 16: at most 4 synchronisations."""
    assert list(hysteresis_schedule(HYSTERESIS_MAX_LAUNCHES)) == [4, 8, 16, 16]


def test_out_of_memory_is_recognised():
    from numba.cuda.cudadrv.driver import CudaAPIError, binding

    assert is_out_of_memory(CudaAPIError(binding.CUresult.CUDA_ERROR_OUT_OF_MEMORY, "out of memory"))
    assert not is_out_of_memory(CudaAPIError(binding.CUresult.CUDA_ERROR_INVALID_VALUE, "invalid"))
    assert not is_out_of_memory(MemoryError("host"))
    assert not is_out_of_memory(ValueError("out of memory"))


# --- the whole backend under the CUDA simulator -----------------------------------------------------


def test_the_backend_under_the_cuda_simulator_matches_the_reference():
    """tests/_cudasim_check.py in a subprocess, so that the simulator never leaks into this one."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", GPU_PIPELINE_CUDA_SMALL_TILES="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/_cudasim_check.py"],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary) and "skipped" not in summary, summary


# --- on a real GPU ----------------------------------------------------------------------------------

gpu_configs = [PipelineConfig(low_threshold=low, high_threshold=high, l2_gradient=l2, blur_ksize=k)
               for k in BLUR_SIZES for l2, low, high in [(False, 50, 150), (True, 40.5, 120.25)]]


@pytest.fixture(scope="module")
def gpu_backend():
    reason = real_gpu_reason()
    if reason is not None:
        pytest.skip(f"needs a real CUDA GPU: {reason}")
    with NumbaCudaBackend() as backend:
        yield backend


def assert_batch_matches_reference(backend, batch: list[np.ndarray], config: PipelineConfig) -> None:
    results = backend.process(batch, config, keep_images=True)
    expected = expected_results(batch, config)
    for number, (image, result, want) in enumerate(zip(batch, results, expected)):
        where = f"image {number}, shape {image.shape}, {config}"
        assert np.array_equal(result.histogram, want.histogram), where
        assert np.array_equal(result.equalized, want.equalized), where
        assert np.array_equal(result.edges, want.edges), where
        assert result.edge_count == want.edge_count, where


def _decoded(root: Path) -> list[np.ndarray]:
    """Every image under ``root``; TIFFs only where tifffile is installed (gpu_pipeline.inputs.decode needs it)."""
    try:
        from gpu_pipeline.inputs.decode import DecodeError, decode_image
        from gpu_pipeline.inputs.discover import discover
    except ImportError:  # no tifffile: Pillow formats only
        from PIL import Image

        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        return [np.asarray(Image.open(p).convert("RGB")) for p in files]
    from gpu_pipeline.config import DecodeOptions

    images_ = []
    for path in discover([root]):
        try:
            images_.append(decode_image(path, DecodeOptions()))
        except DecodeError:
            pass  # e.g. more than 4 bands: an error record, not an image
    return images_


def scene(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Smooth random structure (upscaled noise) plus a little noise: realistic edge chains."""
    import cv2

    h, w = shape[:2]
    coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), *shape[2:]), dtype=np.uint8)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).reshape(shape)
    return np.clip(smooth.astype(np.int16) + rng.integers(-6, 7, shape), 0, 255).astype(np.uint8)


@pytest.mark.gpu
def test_gpu_auto_prefers_a_gpu_backend():
    assert NumbaCudaBackend.unavailable_reason() is None
    assert registry.resolve("auto") in ("cupy", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("config", gpu_configs, ids=str)
def test_gpu_bundled_data_matches_the_reference(gpu_backend, bundled_data_dir, config):
    batch = _decoded(bundled_data_dir)
    assert batch
    assert_batch_matches_reference(gpu_backend, batch, config)


@pytest.mark.gpu
@pytest.mark.parametrize("config", gpu_configs[:2], ids=str)
def test_gpu_shared_data_matches_the_reference(gpu_backend, shared_data_dir, config):
    batch = _decoded(shared_data_dir)
    assert len(batch) >= 1000
    assert_batch_matches_reference(gpu_backend, batch, config)


@pytest.mark.gpu
@pytest.mark.parametrize("config", gpu_configs, ids=str)
def test_gpu_random_odd_and_large_shapes_in_mixed_batches(gpu_backend, config):
    rng = np.random.default_rng(zlib.crc32(str(config).encode()))
    shape_list = [*ODD_SHAPES, (2, 2, 3), (31, 33), (32, 32, 3), (33, 31)]
    shape_list += [(int(h), int(w)) if rng.random() < 0.5 else (int(h), int(w), 3)
                   for h, w in rng.integers(1, 260, (40, 2))]
    shape_list += [(int(h), int(w), 3) for h, w in rng.integers(300, 1500, (3, 2))]
    batch = [scene(s, rng) if rng.random() < 0.8 else rng.integers(0, 256, s, dtype=np.uint8) for s in shape_list]
    batch += [batch[-1].copy(), np.full((50, 70), 7, np.uint8)]  # a repeated shape, a constant image
    assert_batch_matches_reference(gpu_backend, batch, config)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, l2", [((4096, 4096, 3), False), ((4093, 4096), True), ((1, 4096, 3), True),
                                       ((4096, 1), False), ((3001, 2047, 3), True)], ids=str)
def test_gpu_large_images(gpu_backend, shape, l2):
    rng = np.random.default_rng(sum(shape))
    config = PipelineConfig(low_threshold=30, high_threshold=90, l2_gradient=l2, blur_ksize=7 if l2 else 5)
    assert_batch_matches_reference(gpu_backend, [scene(shape, rng)], config)


@pytest.mark.gpu
def test_gpu_many_sub_batches_overlap_and_give_the_same_bytes(gpu_backend):
    """Enough 64x64 tiles for several sub-batches, so both slots and their streams alternate."""
    rng = np.random.default_rng(2)
    tiles = [scene((64, 64, 3), rng) for _ in range(600)] * 30  # 18000 tiles, 74 MP
    config = PipelineConfig()
    plan = plan_sub_batches([t.shape for t in tiles], False, gpu_backend._free_device_bytes())
    assert len(plan) >= 3
    results = gpu_backend.process(tiles, config)
    expected = expected_results(tiles[:600], config)
    for number, result in enumerate(results):
        want = expected[number % 600]
        assert np.array_equal(result.histogram, want.histogram) and result.edge_count == want.edge_count, number


@pytest.mark.gpu
def test_gpu_kernels_were_compiled_only_for_the_declared_signatures(gpu_backend):
    """What CI compiles to PTX is what runs: no kernel picked up another specialisation."""
    rng = np.random.default_rng(4)
    gpu_backend.process([scene((40, 50, 3), rng), scene((40, 50), rng)], gpu_configs[1], keep_images=True)
    gpu_backend.process([scene((40, 50, 3), rng)], gpu_configs[0], keep_images=False)
    for kernel, signatures in kernels.KERNEL_SIGNATURES.items():
        assert len(kernel.overloads) == len(signatures), (kernel.py_func.__name__, list(kernel.overloads))


@pytest.mark.parametrize("index, count, message", [
    (1, 1, r"--device 1: no such GPU here \(1 visible; --device 0\)"),
    (7, 4, r"--device 7: no such GPU here \(4 visible; --device 0\.\.3\)"),
    (0, 0, r"--device 0: no such GPU here \(0 visible; none\)"),
])
def test_a_device_index_beyond_the_visible_gpus_says_which_exist(index, count, message):
    from gpu_pipeline.backends.base import checked_device_index

    with pytest.raises(BackendUnavailable, match=message):
        checked_device_index(index, count)
    assert checked_device_index(None, 2) == 0 and checked_device_index(1, 2) == 1


def test_device_is_refused_for_cpu_backends():
    with pytest.raises(BackendUnavailable, match="needs a GPU backend"):
        registry.create("numba", device=0)


@settings(deadline=None)  # the first example compiles the flood (or loads it from numba's cache)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 40), st.integers(1, 40),
       st.floats(0, 0.1), st.floats(0, 1))
def test_host_finish_of_hysteresis_is_the_reference_reachability(seed, count, height, width, strong, weak):
    from cpu_reference.stages import hysteresis as reference_hysteresis
    from gpu_pipeline.backends._host_hysteresis import finish_hysteresis

    draw = np.random.default_rng(seed).random((count, height, width))
    states = np.where(draw < strong, kernels.STRONG, np.where(draw < strong + weak, kernels.WEAK, kernels.NOT_EDGE))
    states = states.astype(np.uint8)
    expected = [reference_hysteresis(plane == kernels.STRONG, plane == kernels.WEAK) for plane in states]
    before = states.copy()
    finish_hysteresis(states)
    for plane, was, want in zip(states, before, expected):
        assert np.array_equal(plane == kernels.STRONG, want)
        assert np.array_equal(plane == kernels.NOT_EDGE, was == kernels.NOT_EDGE)


@pytest.mark.parametrize("shape", [(64, 64, 3), (1000, 1000, 3), (3000, 4000, 3)])
def test_a_gpu_call_makes_several_sub_batches_so_the_two_slots_overlap(shape):
    """Issue #14 item 5: one process() call carries GPU_BATCH_PIXELS; cut into one sub-batch it
    would leave the second slot idle (no copy overlaps a kernel)."""
    from gpu_pipeline.backends import cupy_gpu
    from gpu_pipeline.backends.base import GPU_BATCH_PIXELS

    count = max(1, GPU_BATCH_PIXELS // (shape[0] * shape[1]))
    assert count * shape[0] * shape[1] > GPU_BATCH_PIXELS // 2
    numba_plan = plan_sub_batches([shape] * count, False, 80 * 2**30)
    one = np.empty(shape, np.uint8)
    budget = cupy_gpu.sub_batch_budget(80 * 2**30, 0)
    cupy_plan = cupy_gpu.plan_sub_batches([one] * count, range(count), budget, False)
    for plan in (numba_plan, cupy_plan):
        assert len(plan) >= (2 if count > 1 else 1)
    if count >= 8:
        assert len(numba_plan) >= 3 and len(cupy_plan) >= 3
