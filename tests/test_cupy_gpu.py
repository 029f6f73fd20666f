"""The cupy backend: kernels compiled for sm_90, host logic, the kernels run on the CPU, then the GPU.

Without a GPU the CUDA C++ of cupy_pipeline.cu still runs: tests/cupy_host/harness.cpp compiles it
with g++ behind a small CUDA shim, and :class:`HostDevice` stands in for CupyDevice, so the whole
backend (planning, arenas, launches, hysteresis rounds, result copies) is held byte-equal to the
reference. The threads of a block are real threads there, so missing barriers and loops that assume
a block shape can show up too. What only a GPU can tell (memory model, streams, timing) is in the
@pytest.mark.gpu tests at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpu_reference
from cpu_reference.stages import hysteresis as reference_hysteresis
from gpu_pipeline.backends import cupy_gpu, registry
from gpu_pipeline.backends.base import BackendUnavailable
from gpu_pipeline.backends.cupy_gpu import (
    HYSTERESIS_LAUNCHES_PER_ROUND,
    KERNEL_NAMES,
    KERNEL_SOURCE,
    NVRTC_OPTIONS,
    TILE_SIDE,
    BatchLayout,
    CnnShape,
    CupyBackend,
    GpuOutOfMemory,
    KernelSettings,
    Launch,
    edge_launches,
    front_launches,
    grown_capacity,
    staging_capacity,
    max_images_per_batch,
    plan_sub_batches,
    split_evenly,
    sub_batch_budget,
)
from gpu_pipeline.config import BLUR_SIZES, PipelineConfig
from gpu_pipeline.images import ImageBatch
from tests.chains import spiral
from tests.cnn_networks import model_of, random_network
from tests.oracle import expected_results
from tests.strategies import examples, image_shapes, images, ODD_SHAPES, packed_batch

HOST_DIR = Path(__file__).parent / "cupy_host"
CU_SOURCES = sorted(KERNEL_SOURCE.parent.glob("*.cu"))
MASK64 = 2**64 - 1


# --- the kernels compile for the GPU ------------------------------------------------------------------


def _nvrtc_cubin(source: Path) -> tuple[bytes, str]:
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(source.read_text(), source.name, [], [])
    try:
        # CuPy's RawModule adds -ftz=true and the device's -arch to NVRTC_OPTIONS.
        options = [*NVRTC_OPTIONS, "-ftz=true", "--gpu-architecture=sm_90"]
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as exc:
            pytest.fail(f"NVRTC rejects {source.name}: {exc}\n{nvrtc.getProgramLog(program)}")
        return nvrtc.getCUBIN(program), nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)


def _nvcc_cubin(source: Path, tmp_path: Path) -> tuple[bytes, str]:
    nvcc = shutil.which("nvcc") or "/usr/local/bin/nvcc"
    if not Path(nvcc).exists():
        pytest.skip("neither NVRTC (cupy_backends.cuda.libs.nvrtc) nor nvcc is available")
    out = tmp_path / "kernels.cubin"
    run = subprocess.run([nvcc, *NVRTC_OPTIONS, "-arch=sm_90", "-cubin", str(source), "-o", str(out)],
                         check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return out.read_bytes(), run.stderr


def test_the_backend_ships_its_kernel_source():
    assert KERNEL_SOURCE in CU_SOURCES


@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_kernel_source_compiles_for_sm_90_without_warnings(source, tmp_path):
    try:
        cubin, log = _nvrtc_cubin(source)
    except ImportError:
        cubin, log = _nvcc_cubin(source, tmp_path)
    assert "warning" not in log.lower(), log
    if source == KERNEL_SOURCE:
        for name in KERNEL_NAMES:  # extern "C" names appear verbatim in the ELF symbol table
            assert name.encode() + b"\0" in cubin, f"kernel {name} missing from the compiled module"


def test_no_fast_math():
    assert not any("fast" in option for option in NVRTC_OPTIONS)
    source = KERNEL_SOURCE.read_text()
    assert "__fmul_rn" in source and "__fdiv_rn" in source and "__float2int_rn" in source


# --- availability -----------------------------------------------------------------------------------


def test_unavailable_reason_is_one_line_or_none():
    reason = CupyBackend.unavailable_reason()
    assert reason is None or (reason.strip() and "\n" not in reason)
    assert registry.unavailable_reason("cupy") == reason


class FakeCupy:
    """CuPy as ``unavailable_reason`` asks it: how many GPUs its runtime counts, whether it can use one."""

    def __init__(self, count=None, failure=None, available=True):
        def device_count():
            if failure is not None:
                raise failure
            return count

        self.cuda = type("cuda", (), {"runtime": type("runtime", (), {"getDeviceCount": staticmethod(device_count)})})
        self.is_available = lambda: available


@pytest.mark.parametrize("cupy, reason", [
    (ImportError("No module named 'cupy'\n(a second line)"), "CuPy cannot be imported (ImportError: No module named 'cupy')"),
    (FakeCupy(failure=RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")),
     "no usable CUDA driver (cudaErrorInsufficientDriver: CUDA driver version is insufficient)"),
    (FakeCupy(failure=RuntimeError("cudaErrorUnknown\n(more)")), "no usable CUDA driver (cudaErrorUnknown)"),
    (FakeCupy(failure=RuntimeError()), "no usable CUDA driver (RuntimeError)"),
    (FakeCupy(count=0), "CuPy finds no usable CUDA GPU"),
    (FakeCupy(count=1, available=False), "CuPy finds no usable CUDA GPU"),
    (FakeCupy(count=1), None),
])
def test_unavailable_when_cupy_cannot_be_imported_no_driver_fits_or_there_is_no_gpu(monkeypatch, cupy, reason):
    """backends.md: each of the three, in one line (the first of a message, the sentence kept whole: cut
    at the message's first newline it lost its closing bracket); a GPU CuPy can use is available."""
    def import_cupy():
        if isinstance(cupy, Exception):
            raise cupy
        return cupy

    monkeypatch.setattr(cupy_gpu, "_import_cupy", import_cupy)
    assert CupyBackend.unavailable_reason() == reason


def test_creating_it_without_a_gpu_says_why():
    reason = CupyBackend.unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailable, match=re.escape(reason)):
        registry.create("cupy")
    assert registry.resolve("auto") != "cupy"


def test_cupy_imports_where_the_home_folder_is_read_only(tmp_path):
    """CuPy makes ``~/.cupy/kernel_cache`` as it is imported, and failed to import where it could
    not (a GPU container with a read-only home): ``--backend cupy`` was "CuPy cannot be imported
    (FileNotFoundError: ... '/proc/1/.cupy')" and ``auto`` passed cupy over. Its cache then goes to
    a private folder in the temporary folder."""
    pytest.importorskip("cupy")
    code = ("import os\nfrom gpu_pipeline.backends.cupy_gpu import CupyBackend\n"
            "print(CupyBackend.unavailable_reason())\nprint(os.environ['CUPY_CACHE_DIR'])")
    env = {key: value for key, value in os.environ.items() if key != "CUPY_CACHE_DIR"}
    env.update(HOME="/proc/1", TMPDIR=str(tmp_path))  # (nothing can be made in /proc, not even by root)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    reason, folder = done.stdout.splitlines()
    assert "cannot be imported" not in reason
    assert Path(folder).parent == tmp_path and Path(folder).is_dir()
    assert Path(folder).stat().st_mode & 0o077 == 0  # no one else may put kernels there


# --- pure host logic --------------------------------------------------------------------------------



@given(st.lists(st.integers(), max_size=60), st.integers(1, 70))
def test_split_evenly(indices, max_size):
    parts = split_evenly(indices, max_size)
    assert [i for part in parts for i in part] == indices
    assert all(0 < len(part) <= max_size for part in parts)
    assert len(parts) == -(-len(indices) // max_size)
    assert not parts or max(map(len, parts)) - min(map(len, parts)) <= 1


shapes = st.tuples(st.integers(1, 300), st.integers(1, 300), st.sampled_from([(), (3,)])).map(
    lambda t: (t[0], t[1], *t[2]))


@given(shapes, st.integers(1, 50), st.booleans(), st.sampled_from([None, CnnShape(32, (16, 32, 64, 128)), CnnShape(8, (3,))]))
def test_layout_sections_are_aligned_disjoint_and_within_budget(shape, count, keep, cnn):
    layout = BatchLayout.plan(count, shape, keep, cnn)
    for sections in (layout.device, layout.host):
        used = sorted((s.offset, s.end) for s in sections.values() if s.nbytes)
        assert all(start % cupy_gpu.SECTION_ALIGNMENT == 0 for start, _ in used)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(used))
        span = BatchLayout.results_span(sections)
        last = sections["label_features"] if cnn is not None else sections["counters"]
        assert span.offset == sections["histograms"].offset and span.end == last.end  # one copy covers them all
        assert sections["histograms"].end == sections["counters"].offset  # histogram rows keep the alignment
    # The same relative offsets on both sides, so the one copy lands every result in its place.
    for name in ("counters", "label_features"):
        assert (layout.device[name].offset - layout.device["histograms"].offset
                == layout.host[name].offset - layout.host["histograms"].offset)
    assert BatchLayout.results_span(layout.device).nbytes == BatchLayout.results_span(layout.host).nbytes
    assert layout.device_bytes <= (cupy_gpu.LAYOUT_OVERHEAD_BYTES
                                   + count * cupy_gpu.device_bytes_per_image(shape, keep, cnn))
    assert (layout.device["cnn_a"].nbytes > 0) == (cnn is not None)
    assert (layout.device["gray"].nbytes > 0) == (len(shape) == 3)
    assert (layout.device["edges"].nbytes > 0) == keep


@given(st.lists(shapes, min_size=1, max_size=12), st.integers(2**10, 2**24), st.booleans())
def test_plan_sub_batches(image_shapes, budget, keep):
    batch = [np.empty(shape, np.uint8) for shape in image_shapes]
    plan = plan_sub_batches(batch, range(len(batch)), budget, keep)
    assert sorted(i for sub in plan for i in sub) == list(range(len(batch)))
    for sub in plan:
        assert len({batch[i].shape for i in sub}) == 1
        assert sub == sorted(sub)
        layout = BatchLayout.plan(len(sub), batch[sub[0]].shape, keep)
        assert len(sub) == 1 or layout.device_bytes <= budget
    first_seen = list(dict.fromkeys(s.shape for s in batch))
    assert list(dict.fromkeys(batch[sub[0]].shape for sub in plan)) == first_seen


def test_max_images_per_batch_is_capped_by_the_grid_and_at_least_one():
    assert max_images_per_batch((1, 1), False, 2**40) == cupy_gpu.MAX_IMAGES_PER_LAUNCH
    assert max_images_per_batch((4000, 4000, 3), True, 2**20) == 1


def test_budget_and_capacity():
    assert sub_batch_budget(free_bytes=10 * 2**30, held_bytes=0) == cupy_gpu.SUB_BATCH_TARGET_BYTES
    assert sub_batch_budget(free_bytes=100 * 2**20, held_bytes=0) == int(100 * 2**20 * 0.8) // 2
    assert sub_batch_budget(free_bytes=0, held_bytes=100 * 2**20) == int(100 * 2**20 * 0.8) // 2
    assert grown_capacity(8 * 2**20, 5 * 2**20) == 8 * 2**20
    assert grown_capacity(0, 1) == cupy_gpu.ARENA_GRANULE
    assert grown_capacity(2**20, 5 * 2**20 + 1) == 6 * 2**20


@given(shapes, st.integers(1, 70000), st.sampled_from(BLUR_SIZES), st.booleans())
def test_launch_grids_fit_cuda_limits_and_cover_the_batch(shape, count, ksize, keep):
    count = min(count, cupy_gpu.MAX_IMAGES_PER_LAUNCH)
    layout = BatchLayout.plan(count, shape, keep)
    launches = front_launches(layout, 4096, KernelSettings(ksize, 10, 20, False)) + edge_launches(layout, 4096, 132)
    assert [launch.kernel for launch in launches] == (
        ["gray_histogram", "equalize_lut", f"blur_sobel_nms_k{ksize}"]
        + ["hysteresis"] * HYSTERESIS_LAUNCHES_PER_ROUND + ["finalize_edges"])
    for launch in launches:
        assert launch.grid[0] <= 2**31 - 1 and launch.grid[1] <= 65535 and launch.grid[2] <= 65535
        assert np.prod(launch.block) <= 1024
        assert all(isinstance(arg, (np.uint64, np.int32, np.int64)) for arg in launch.args)
        if launch.kernel != "hysteresis":  # hysteresis walks a flat tile list
            assert launch.grid[2] == count
    blur = launches[2]
    assert blur.grid[0] * TILE_SIDE >= shape[1] and blur.grid[0] * TILE_SIDE < shape[1] + TILE_SIDE
    assert blur.grid[1] == min(cupy_gpu.MAX_GRID_Y, -(-shape[0] // TILE_SIDE))
    assert [launch.args[-1] for launch in launches if launch.kernel == "hysteresis"] == list(
        range(HYSTERESIS_LAUNCHES_PER_ROUND))


def test_null_pointers_only_where_the_kernels_accept_them():
    gray_layout = BatchLayout.plan(2, (5, 7), keep_images=False)
    launches = {launch.kernel: launch for launch in front_launches(gray_layout, 4096, KernelSettings(5, 1, 2, True))}
    assert launches["gray_histogram"].args[4] == 0  # a gray input writes no gray plane
    assert launches["blur_sobel_nms_k5"].args[0] == 4096 + gray_layout.device["input"].offset
    assert launches["blur_sobel_nms_k5"].args[-1] == 0  # equalized not kept
    rgb_layout = BatchLayout.plan(2, (5, 7, 3), keep_images=True)
    launches = {launch.kernel: launch for launch in front_launches(rgb_layout, 4096, KernelSettings(5, 1, 2, True))}
    assert launches["blur_sobel_nms_k5"].args[0] == 4096 + rgb_layout.device["gray"].offset
    assert launches["blur_sobel_nms_k5"].args[-1] == 4096 + rgb_layout.device["equalized"].offset


# --- the kernels, run on the CPU ----------------------------------------------------------------------


class KernelHarness:
    """cupy_pipeline.cu built with g++ (tests/cupy_host/harness.cpp), called like cupy.RawKernel."""

    def __init__(self, library: Path) -> None:
        self._lib = ctypes.CDLL(str(library))
        self._lib.launch_kernel.restype = ctypes.c_int
        self._lib.launch_kernel.argtypes = [ctypes.c_char_p, *[ctypes.c_uint] * 6, ctypes.c_int,
                                            ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint)]
        self._lib.set_only_block.argtypes = [ctypes.c_longlong]

    def run(self, launch: Launch, block: tuple[int, int, int]) -> None:
        n = len(launch.args)
        slots = (ctypes.c_uint64 * n)(*[int(arg) & MASK64 for arg in launch.args])
        sizes = (ctypes.c_uint * n)(*[arg.nbytes for arg in launch.args])
        status = self._lib.launch_kernel(launch.kernel.encode(), *launch.grid, *block, n, slots, sizes)
        assert status == 0, f"{launch.kernel}: harness status {status} (-1 unknown, -2 arity, -3-i size of arg i)"

    def run_hysteresis_with_launch_start_halos(self, launch: Launch, block, order: str, rng) -> None:
        """A hysteresis launch as on a GPU whose blocks all read their tiles and halos before any
        block writes (the worst case for launches): each block runs alone on the states as of the
        launch start, in ``order`` (forward, reverse, random); the promotions are merged after."""
        address, plane_stride, count = int(launch.args[0]), int(launch.args[1]), int(launch.args[4])
        states = np.ctypeslib.as_array((ctypes.c_uint8 * (plane_stride * count)).from_address(address))
        at_start = states.copy()
        promoted = np.zeros(states.shape, bool)
        blocks = np.arange(launch.grid[0] * launch.grid[1] * launch.grid[2])
        blocks = {"forward": blocks, "reverse": blocks[::-1], "random": rng.permutation(blocks)}[order]
        try:
            for number in blocks:
                states[:] = at_start
                self._lib.set_only_block(ctypes.c_longlong(int(number)))
                self.run(launch, block)
                promoted |= states != at_start
        finally:
            self._lib.set_only_block(ctypes.c_longlong(-1))
        states[:] = np.where(promoted, 2, at_start)


@pytest.fixture(scope="session")
def harness(tmp_path_factory) -> KernelHarness:
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++ or clang++) to run the CUDA kernels on the CPU")
    library = tmp_path_factory.mktemp("cupy_host") / "harness.so"
    command = [compiler, "-std=c++20", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
               "-pthread", "-Wall", "-Wextra", "-Werror", f"-DTILE_SIDE={TILE_SIDE}", "-I", str(HOST_DIR),
               "-I", str(KERNEL_SOURCE.parent), str(HOST_DIR / "harness.cpp"), "-o", str(library)]
    build = subprocess.run(command, check=False, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return KernelHarness(library)


class HostDevice:
    """CupyDevice's interface on the CPU: arenas are NumPy arrays fenced by canaries, kernels run in the harness.

    ``block`` overrides the launch's block shape (None keeps it); ``memory`` is how many bytes the
    fake device and pinned pool hold in all (None: unlimited); ``after_launch`` may edit memory.
    """

    CANARY = 4096

    def __init__(self, harness: KernelHarness, block=(1, 1, 1), memory: int | None = None, after_launch=None,
                 block_order: str | None = None):
        """``block_order`` (forward, reverse, random): run hysteresis launches with launch-start halos
        (see KernelHarness.run_hysteresis_with_launch_start_halos), one block per tile."""
        self.harness, self.block, self.memory, self.after_launch = harness, block, memory, after_launch
        self.block_order, self.rng = block_order, np.random.default_rng(0)
        self.sm_count = 1  # a small hysteresis grid: its blocks loop over many tiles
        if block_order is not None:
            self.sm_count = 2**20  # a block per tile: a block walking several tiles would see its own writes
        self.live: dict[int, np.ndarray] = {}  # address -> the fenced array
        self.launches: list[Launch] = []
        self.allocations = 0
        self.failed_allocations = 0
        self.released = 0
        self.syncs = 0
        self.bound = threading.local()  # bind() depth per thread: every device call must be bound
        self.pinned_pool: list[int] = []  # sizes of the dropped pinned blocks CuPy's pool keeps
        self.pinned_locked = 0  # page-locked bytes: in use or kept by the pool

    @contextlib.contextmanager
    def bind(self):
        self.bound.depth = getattr(self.bound, "depth", 0) + 1
        try:
            yield
        finally:
            self.bound.depth -= 1

    def assert_bound(self) -> None:
        assert getattr(self.bound, "depth", 0) > 0, "a device call outside bind() in this thread"

    def free_bytes(self) -> int:
        self.assert_bound()
        return 2**30 if self.memory is None else self.memory - self._used()

    def _used(self) -> int:
        return sum(fenced.nbytes - 2 * self.CANARY for fenced in self.live.values())

    def alloc(self, nbytes: int) -> np.ndarray:
        self.assert_bound()
        if self.memory is not None and self._used() + nbytes > self.memory:
            self.failed_allocations += 1
            raise GpuOutOfMemory(f"fake device: {nbytes} bytes do not fit")
        self.allocations += 1
        fenced = np.full(nbytes + 2 * self.CANARY, 0xA5, np.uint8)  # garbage, as fresh GPU memory
        arena = fenced[self.CANARY:-self.CANARY]
        address = arena.ctypes.data
        self.live[address] = fenced
        weakref.finalize(arena, self.live.pop, address, None)  # freed when the backend drops it
        return arena

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        """Pinned memory as CuPy's pool holds it: a dropped buffer's block stays locked in the pool,
        reused only by a request of exactly its size, until ``release_pinned``."""
        if nbytes in self.pinned_pool:
            self.pinned_pool.remove(nbytes)
        else:
            self.pinned_locked += nbytes
        arena = self.alloc(nbytes)
        weakref.finalize(arena, self.pinned_pool.append, nbytes)
        return arena

    def release_pinned(self) -> None:
        self.pinned_locked -= sum(self.pinned_pool)
        self.pinned_pool.clear()

    @staticmethod
    def address(arena: np.ndarray) -> int:
        return arena.ctypes.data

    def new_stream(self) -> object:
        self.assert_bound()
        return object()

    def _check_range(self, address: int, nbytes: int) -> None:
        inside = any(start <= address and address + nbytes <= start + fenced.nbytes - 2 * self.CANARY
                     for start, fenced in self.live.items())
        assert inside, f"copy of {nbytes} bytes at {address:#x} outside every arena"

    def upload(self, address: int, host: np.ndarray, stream) -> None:
        self.assert_bound()
        self._check_range(address, host.nbytes)
        ctypes.memmove(address, host.ctypes.data, host.nbytes)

    def download(self, host: np.ndarray, address: int, stream) -> None:
        self.assert_bound()
        self._check_range(address, host.nbytes)
        ctypes.memmove(host.ctypes.data, address, host.nbytes)

    def zero(self, address: int, nbytes: int, stream) -> None:
        self.assert_bound()
        self._check_range(address, nbytes)
        ctypes.memset(address, 0, nbytes)

    def launch(self, launch: Launch, stream) -> None:
        self.assert_bound()
        self.launches.append(launch)
        if launch.kernel == "hysteresis" and self.block_order is not None:
            self.harness.run_hysteresis_with_launch_start_halos(
                launch, self.block or launch.block, self.block_order, self.rng)
        else:
            self.harness.run(launch, self.block or launch.block)
        self.check_canaries()
        if self.after_launch is not None:
            self.after_launch(self, launch)

    def check_canaries(self) -> None:
        for fenced in self.live.values():
            assert (fenced[:self.CANARY] == 0xA5).all() and (fenced[-self.CANARY:] == 0xA5).all(), \
                "a kernel wrote outside its arena"

    def synchronize(self, stream) -> None:
        self.assert_bound()
        self.syncs += 1

    def release_cached(self) -> None:
        self.assert_bound()
        self.released += 1
        self.release_pinned()


def assert_same_as_reference(results, batch, config, keep_images=True):
    assert len(results) == len(batch)
    for k, (result, expected) in enumerate(zip(results, expected_results(batch, config), strict=True)):
        where = f"image {k} of shape {batch[k].shape}, {config}"
        assert result.histogram.dtype == np.int64 and np.array_equal(result.histogram, expected.histogram), where
        assert result.edge_count == expected.edge_count, where
        if keep_images:
            assert np.array_equal(result.equalized, expected.equalized), where
            assert np.array_equal(result.edges, expected.edges), where
        else:
            assert result.equalized is None and result.edges is None


def _decoded(root: Path) -> list[np.ndarray]:
    from gpu_pipeline.config import DecodeOptions
    from gpu_pipeline.inputs.decode import decode_image
    from gpu_pipeline.inputs.discover import discover

    decoded = []
    for path in discover([root]):
        decoded.append(decode_image(path, DecodeOptions()))  # a decode error fails the test: every sample decodes
    return decoded


configs = st.builds(
    PipelineConfig,
    low_threshold=st.floats(0, 300), high_threshold=st.floats(0, 300),
    l2_gradient=st.booleans(), blur_ksize=st.sampled_from(BLUR_SIZES))


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(images(max_side=80), min_size=1, max_size=5), configs)
def test_kernels_on_the_cpu_match_the_reference(harness, batch, config):
    backend = CupyBackend(device=HostDevice(harness))
    assert_same_as_reference(backend.process(batch, config, keep_images=True), batch, config)


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(images(max_side=40), min_size=1, max_size=6), st.data())
def test_a_packed_batch_gives_the_bytes_of_its_images(harness, batch, data):
    """An ImageBatch is grouped and staged from its arrays (a run of packed images in one copy):
    the same bytes as the images one by one."""
    batch = batch + [batch[0]] * 3  # a run of one shape
    gaps = data.draw(st.lists(st.sampled_from([0, 0, 5]), min_size=len(batch), max_size=len(batch)))
    config = PipelineConfig(40, 120)
    backend = CupyBackend(device=HostDevice(harness))
    for packed in (ImageBatch.of(batch), packed_batch(batch, gaps)):
        assert_same_as_reference(backend.process(packed, config, keep_images=True), batch, config)


def test_a_stack_cut_into_sub_batches_after_out_of_memory_gives_the_bytes_of_its_images(harness, monkeypatch):
    """Sub-batches of a packed stack, halved on the retry: each stages its own run of the stack."""
    monkeypatch.setattr(cupy_gpu, "ARENA_GRANULE", 256)
    stack = np.random.default_rng(8).integers(0, 256, (9, 30, 50, 3), dtype=np.uint8)
    one = BatchLayout.plan(1, (30, 50, 3), False)
    device = HostDevice(harness, memory=4 * (one.device_bytes + one.host_bytes))
    device.free_bytes = lambda: 2**30
    results = CupyBackend(device=device).process(ImageBatch.stacked(stack), PipelineConfig())
    assert_same_as_reference(results, list(stack), PipelineConfig(), keep_images=False)
    assert device.failed_allocations >= 1
    assert max(launch.grid[2] for launch in device.launches if launch.kernel == "gray_histogram") < len(stack)


def test_images_past_the_pixel_limit_are_refused_before_any_work(harness, monkeypatch):
    monkeypatch.setattr(cupy_gpu, "MAX_PIXELS", 100)
    backend = CupyBackend(device=HostDevice(harness))
    images_ = [np.zeros((5, 5), np.uint8), np.zeros((10, 11, 3), np.uint8)]
    for given_ in (images_, ImageBatch.of(images_)):
        with pytest.raises(ValueError, match=r"at most 100 pixels, got \(10, 11, 3\)"):
            backend.process(given_, PipelineConfig())


@pytest.mark.parametrize("config", [PipelineConfig(), PipelineConfig(60, 20, True, 7)], ids=str)
def test_bundled_data_on_the_cpu(harness, bundled_data_dir, config):
    batch = _decoded(bundled_data_dir)
    assert batch
    backend = CupyBackend(device=HostDevice(harness))
    assert_same_as_reference(backend.process(batch, config, keep_images=True), batch, config)


def test_shared_data_on_the_cpu(harness, shared_data_dir):
    batch = _decoded(shared_data_dir)
    config = PipelineConfig(40, 120, True, 3)
    backend = CupyBackend(device=HostDevice(harness))
    assert_same_as_reference(backend.process(batch, config, keep_images=True), batch, config)


def test_equalize_rounds_in_float32_half_to_even(harness):
    # 510 pixels above the first value: lut = rint(sum * 255 / 510) hits exact halves 0.5 and 2.5.
    halves = np.array([0] + [1] + [2] * 4 + [3] * 505, np.uint8).reshape(7, 73)
    # docs/contract.md: 7 * 255 / 14 is 127.5 exactly, the float32 product is just below.
    below_half = np.array([0] + [10] * 7 + [20] * 7 + [20], np.uint8).reshape(4, 4)
    batch = [halves, below_half, np.full((3, 5), 77, np.uint8)]
    results = CupyBackend(device=HostDevice(harness)).process(batch, PipelineConfig(), keep_images=True)
    assert sorted(set(results[0].equalized.ravel())) == [0, 2, 255]
    assert_same_as_reference(results, batch, PipelineConfig())


def _identity_luts(device, launch):
    """Skip equalization: the blur then sees the gray image itself, any values the test likes."""
    if launch.kernel == "equalize_lut":
        identity = np.tile(np.arange(256, dtype=np.uint8), launch.grid[2])
        ctypes.memmove(int(launch.args[2]), identity.ctypes.data, identity.nbytes)


@st.composite
def faint_images(draw):
    """Gray images of small amplitude: magnitudes of 0, 1, 2 everywhere, at the borders too."""
    shape = draw(image_shapes(max_side=40))
    amplitude = draw(st.sampled_from([1, 2, 3, 255]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (100 + rng.integers(0, amplitude + 1, shape)).clip(0, 255).astype(np.uint8)


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(faint_images(), min_size=1, max_size=4), st.floats(0, 4), st.floats(0, 12), st.booleans(),
       st.sampled_from(BLUR_SIZES))
def test_blur_and_canny_kernels_on_faint_images(harness, batch, low, high, l2, ksize):
    config = PipelineConfig(low, high, l2, ksize)
    results = CupyBackend(device=HostDevice(harness, after_launch=_identity_luts)).process(batch, config, True)
    for image, result in zip(batch, results, strict=True):
        blurred = cpu_reference.gaussian_blur(image, ksize)
        assert np.array_equal(result.edges, cpu_reference.canny(blurred, low, high, l2)), image.shape


@pytest.mark.parametrize("shape", [*ODD_SHAPES, (33, 65), (31, 3)], ids=str)
@pytest.mark.parametrize("ksize", BLUR_SIZES)
def test_odd_shapes_on_the_cpu(harness, shape, ksize):
    rng = np.random.default_rng(sum(shape) * ksize)
    batch = [rng.integers(0, 256, shape, np.uint8), rng.integers(0, 256, (*shape, 3), np.uint8)]
    for config in (PipelineConfig(20, 60, False, ksize), PipelineConfig(60, 20, True, ksize)):
        backend = CupyBackend(device=HostDevice(harness))
        assert_same_as_reference(backend.process(batch, config, keep_images=True), batch, config)


@pytest.mark.parametrize("block", [(32, 8, 1), (5, 3, 1), (1, 7, 1)], ids=str)
def test_block_shape_and_barriers_on_real_threads(harness, block):
    """Every block's threads run concurrently: strided loops and __syncthreads must be right."""
    rng = np.random.default_rng(7)
    smooth = np.add.outer(np.arange(45), 3 * np.arange(70)).astype(np.uint8)
    batch = [rng.integers(0, 256, (45, 70, 3), np.uint8), smooth, np.full((3, 40), 9, np.uint8)]
    config = PipelineConfig(30, 90, False, 5)
    backend = CupyBackend(device=HostDevice(harness, block=block))
    assert_same_as_reference(backend.process(batch, config, keep_images=True), batch, config)


def test_grids_smaller_than_the_work_loop_over_it(harness, monkeypatch):
    """Grid-stride loops: tile rows past gridDim.y (blur), pixels past the flat grid, tiles past the hysteresis grid."""
    monkeypatch.setattr(cupy_gpu, "MAX_GRID_Y", 1)
    monkeypatch.setattr(cupy_gpu, "MAX_BLOCKS_PER_IMAGE", 1)
    rng = np.random.default_rng(2)
    batch = [rng.integers(0, 256, (100, 40, 3), np.uint8), (np.arange(4000) % 253).astype(np.uint8).reshape(100, 40)]
    config = PipelineConfig(20, 70, False, 3)
    device = HostDevice(harness, block=(8, 4, 1))
    assert_same_as_reference(CupyBackend(device=device).process(batch, config, True), batch, config)
    assert {launch.grid[:2] for launch in device.launches if launch.kernel.startswith("blur")} == {(2, 1)}


def test_mixed_shapes_keep_their_order_and_images_are_optional(harness):
    rng = np.random.default_rng(3)
    batch = [rng.integers(0, 256, shape, np.uint8) for shape in
             [(20, 30), (7, 9, 3), (20, 30), (1, 1), (7, 9, 3), (20, 30), (64, 64, 3)]]
    config = PipelineConfig()
    device = HostDevice(harness)
    backend = CupyBackend(device=device)
    assert_same_as_reference(backend.process(batch, config, keep_images=False), batch, config, keep_images=False)
    # One sub-batch per shape, each launch covering all images of that shape.
    counts = [launch.grid[2] for launch in device.launches if launch.kernel == "gray_histogram"]
    assert counts == [3, 2, 1, 1]
    assert len(backend.process([], config)) == 0


def test_small_budget_many_sub_batches_two_slots_reused_arenas(harness, monkeypatch):
    budget = 3 * cupy_gpu.device_bytes_per_image((24, 40, 3), True) + cupy_gpu.LAYOUT_OVERHEAD_BYTES
    monkeypatch.setattr(cupy_gpu, "SUB_BATCH_TARGET_BYTES", budget)
    rng = np.random.default_rng(11)
    batch = [rng.integers(0, 256, (24, 40, 3), np.uint8) for _ in range(14)]
    config = PipelineConfig(40, 100, True, 7)
    device = HostDevice(harness)
    backend = CupyBackend(device=device)
    for _ in range(2):  # the second call reuses the arenas of the first
        assert_same_as_reference(backend.process(batch, config, keep_images=True), batch, config)
    sub_batches = [launch.grid[2] for launch in device.launches if launch.kernel == "gray_histogram"]
    assert sub_batches == [2, 3, 3, 3, 3] * 2
    assert device.allocations == 4  # a device and a pinned arena per slot, kept across sub-batches and calls
    backend.close()
    assert device.released == 1


def test_out_of_memory_halves_the_sub_batches(harness, monkeypatch):
    monkeypatch.setattr(cupy_gpu, "ARENA_GRANULE", 256)
    rng = np.random.default_rng(5)
    batch = [rng.integers(0, 256, (30, 50), np.uint8) for _ in range(9)]
    config = PipelineConfig()
    one = BatchLayout.plan(1, (30, 50), False)
    # Room for both slots' arenas of about two images each, while free_bytes() claims far more.
    device = HostDevice(harness, memory=4 * (one.device_bytes + one.host_bytes))
    device.free_bytes = lambda: 2**30
    backend = CupyBackend(device=device)
    assert_same_as_reference(backend.process(batch, config), batch, config, keep_images=False)
    assert device.failed_allocations >= 1 and device.released >= 1
    assert max(launch.grid[2] for launch in device.launches if launch.kernel == "gray_histogram") < len(batch)


def test_an_image_too_large_for_the_device_is_a_clear_error(harness, monkeypatch):
    monkeypatch.setattr(cupy_gpu, "ARENA_GRANULE", 256)
    device = HostDevice(harness, memory=2**16)
    backend = CupyBackend(device=device)
    with pytest.raises(GpuOutOfMemory, match=r"one 300x400x3 image needs .* MiB of device memory"):
        backend.process([np.zeros((300, 400, 3), np.uint8)], PipelineConfig())
    # The backend stays usable for images that fit.
    small = [np.arange(64, dtype=np.uint8).reshape(8, 8)]
    assert_same_as_reference(backend.process(small, PipelineConfig()), small, PipelineConfig(), keep_images=False)


def test_hysteresis_needs_several_rounds_and_still_converges(harness):
    """States injected after NMS: a weak chain that runs against the order the blocks are visited."""
    height, width = 70, 6 * TILE_SIDE
    states = np.zeros((height, width), np.uint8)
    for row in range(0, height - 2, 4):  # rows of weak pixels joined at alternating ends: one long path
        states[row, :] = 1
        column = width - 1 if row // 4 % 2 == 0 else 0
        states[row:row + 5, column] = 1
    last_row = (height - 3) // 4 * 4
    states[last_row, -1 if last_row // 4 % 2 else 0] = 2  # the only strong pixel, at the path's far end
    states[last_row + 1:, :] = 0

    def inject(device, launch):
        if launch.kernel.startswith("blur_sobel_nms"):
            address = int(launch.args[8])
            ctypes.memmove(address, states.ctypes.data, states.nbytes)

    device = HostDevice(harness, after_launch=inject)
    backend = CupyBackend(device=device)
    result = backend.process([np.zeros((height, width), np.uint8)], PipelineConfig(), keep_images=True)[0]
    expected = reference_hysteresis(states == 2, states == 1)
    assert np.array_equal(result.edges, np.where(expected, 255, 0).astype(np.uint8))
    assert result.edge_count == int(expected.sum()) > height * width // 5
    rounds = sum(launch.kernel == "finalize_edges" for launch in device.launches)
    # a round: one synchronisation; a finish on the host past the round bound: one more
    assert rounds > 1 and device.syncs == rounds + backend.host_finishes
    assert rounds <= cupy_gpu.HYSTERESIS_MAX_ROUNDS + backend.host_finishes


def serpentine(side: int) -> np.ndarray:
    """Rows of weak pixels joined at alternating ends (half of them against any block order), one
    background row between them, and the only strong pixel at the far end of the path."""
    states = np.zeros((side, side), np.uint8)
    for row in range(0, side, 2):
        states[row, :] = 1
        if row + 1 < side:
            states[row + 1, side - 1 if row // 2 % 2 == 0 else 0] = 1
    last = (side - 1) // 2 * 2
    states[last, -1 if last // 2 % 2 else 0] = 2
    return states


def states_injector(planes: np.ndarray):
    """An after_launch hook that replaces the Canny state planes NMS wrote by ``planes``."""
    def inject(device, launch):
        if launch.kernel.startswith("blur_sobel_nms"):
            ctypes.memmove(int(launch.args[8]), planes.ctypes.data, planes.nbytes)

    return inject


@pytest.mark.parametrize("order", ["reverse", "random"])
@pytest.mark.parametrize("pattern", [serpentine, spiral])
@pytest.mark.parametrize("side", [64, 256])
def test_hysteresis_launches_are_bounded_with_launch_start_halos(harness, order, pattern, side):
    """Issue #14 item 2: blocks in reverse or random order, reading halos as of launch start, as a
    GPU may; chains through every tile still end after at most HYSTERESIS_MAX_ROUNDS rounds (then
    the host finishes), byte-equal to the reference."""
    chain = pattern(side)
    planes = np.stack([chain, chain[::-1, ::-1], chain.T]).copy()
    device = HostDevice(harness, after_launch=states_injector(planes), block_order=order)
    backend = CupyBackend(device=device)
    batch = [np.zeros((side, side), np.uint8)] * len(planes)
    results = backend.process(batch, PipelineConfig(), keep_images=True)
    for plane, result in zip(planes, results):
        expected = reference_hysteresis(plane == 2, plane == 1)
        assert expected.sum() == (plane != 0).sum()  # the whole chain is an edge
        assert np.array_equal(result.edges, np.where(expected, 255, 0).astype(np.uint8))
        assert result.edge_count == int(expected.sum())
    launches = sum(launch.kernel == "hysteresis" for launch in device.launches)
    assert launches <= cupy_gpu.HYSTERESIS_MAX_ROUNDS * HYSTERESIS_LAUNCHES_PER_ROUND
    assert device.syncs <= cupy_gpu.HYSTERESIS_MAX_ROUNDS + 2  # the rounds, then the host's copy back
    assert backend.host_finishes == 1  # these chains need far more launches than the bound


def test_staging_capacity_doubles_up_to_the_batch_limit():
    granule = cupy_gpu.ARENA_GRANULE
    assert staging_capacity(8 * granule, 5 * granule, 64 * granule) == 8 * granule  # fits: kept
    assert staging_capacity(0, 1, 64 * granule) == granule
    assert staging_capacity(4 * granule, 5 * granule, 64 * granule) == 8 * granule  # doubles
    assert staging_capacity(4 * granule, 5 * granule, 6 * granule) == 6 * granule  # up to the limit
    assert staging_capacity(4 * granule, 9 * granule, 6 * granule) == 9 * granule  # what is needed, always
    sizes, size = [], 0  # a batch growing one granule at a time regrows a few times only
    for needed in range(1, 65):
        grown = staging_capacity(size, needed * granule, 64 * granule)
        if grown != size:
            sizes.append(grown)
        size = grown
    assert len(sizes) == 7 and size == 64 * granule


def test_pinned_memory_held_is_only_the_staging_in_use_across_growing_batches(harness, monkeypatch):
    """Issue #14 item 3: old staging buffers must not stay locked in CuPy's pinned pool."""
    monkeypatch.setattr(cupy_gpu, "ARENA_GRANULE", 256)
    device = HostDevice(harness)
    backend = CupyBackend(device=device)
    rng = np.random.default_rng(19)
    config = PipelineConfig()
    pinned_allocations = []
    allocate = device.alloc_pinned
    device.alloc_pinned = lambda nbytes: pinned_allocations.append(nbytes) or allocate(nbytes)
    for count in range(1, 25):  # a batch one image larger each time
        batch = [rng.integers(0, 256, (10, 9, 3), np.uint8) for _ in range(count)]
        assert_same_as_reference(backend.process(batch, config, keep_images=True), batch, config)
        in_use = sum(slot.staging_bytes for slot in backend._slots)
        assert device.pinned_locked == in_use, f"batch of {count}: {device.pinned_locked} locked, {in_use} in use"
    assert len(pinned_allocations) <= 2 * 6, pinned_allocations  # each slot doubles: log2(24) + 1 times


@pytest.mark.parametrize("failing_kernel", ["gray_histogram", "hysteresis", "finalize_edges"])
def test_a_one_off_error_leaves_the_backend_usable(harness, monkeypatch, failing_kernel):
    """Issue #14 item 1: after any failure inside process() the next calls give the reference's bytes.
    Small arenas make several sub-batches, so the failure leaves work queued on the other slot."""
    monkeypatch.setattr(cupy_gpu, "ARENA_GRANULE", 256)
    rng = np.random.default_rng(17)
    batch = [rng.integers(0, 256, (20, 30, 3), np.uint8) for _ in range(5)] + [rng.integers(0, 256, (9, 7), np.uint8)]
    config = PipelineConfig(low_threshold=40, high_threshold=120)
    failures = []

    def fail_once(device, launch):  # in the second sub-batch, while the first one is still queued
        second_sub_batch = sum(done.kernel == "gray_histogram" for done in device.launches) == 2
        if launch.kernel == failing_kernel and second_sub_batch and not failures:
            failures.append(launch)
            raise RuntimeError("injected one-off failure")

    device = HostDevice(harness, after_launch=fail_once)
    monkeypatch.setattr(cupy_gpu, "sub_batch_budget", lambda free, held: 2 * BatchLayout.plan(1, (20, 30, 3), True).device_bytes)
    backend = CupyBackend(device=device)
    with pytest.raises(RuntimeError, match="injected"):
        backend.process(batch, config, keep_images=True)
    assert failures
    # A smaller batch first: results of a sub-batch left queued would land on indices it lacks.
    assert_same_as_reference(backend.process(batch[-1:], config), batch[-1:], config, keep_images=False)
    for keep in (True, False):
        assert_same_as_reference(backend.process(batch, config, keep_images=keep), batch, config, keep_images=keep)


def test_process_binds_the_gpu_in_the_thread_that_runs_it(harness):
    """Issue #14 item 4: the engine calls process() on its compute thread, not the one that built
    the backend; the fake device fails any call made outside bind() in the calling thread."""
    from concurrent.futures import ThreadPoolExecutor

    device = HostDevice(harness)
    backend = CupyBackend(device=device)
    batch = [np.arange(80, dtype=np.uint8).reshape(8, 10)]
    with ThreadPoolExecutor(1) as compute_thread:
        results = compute_thread.submit(backend.process, batch, PipelineConfig(), True).result()
        compute_thread.submit(backend.close).result()
    assert_same_as_reference(results, batch, PipelineConfig())
    assert device.syncs >= 1


def test_threads_sharing_one_backend_each_get_their_own_results(harness):
    """The Python API hands one backend to every thread that asks for it: concurrent calls share its
    slots and arenas, so they take turns (without that, a call collected another's results)."""
    from concurrent.futures import ThreadPoolExecutor

    import time

    # A pause after each launch lets the other threads in, as a GPU's asynchronous launches do.
    backend = CupyBackend(device=HostDevice(harness, after_launch=lambda device, launch: time.sleep(0.001)))
    rng = np.random.default_rng(7)
    batches = [[rng.integers(0, 256, (6 + k % 3, 9, 3) if k % 2 else (7, 5 + k % 4), np.uint8)
                for _ in range(1 + k % 3)] for k in range(8)]
    config = PipelineConfig(40, 120)
    with ThreadPoolExecutor(4) as threads:
        results = list(threads.map(lambda batch: backend.process(batch, config, True), batches))
    for batch, result in zip(batches, results):
        assert_same_as_reference(result, batch, config)


def test_close_releases_the_memory_pools(harness):
    device = HostDevice(harness)
    backend = CupyBackend(device=device)
    backend.process([np.zeros((5, 5), np.uint8)], PipelineConfig())
    with backend:
        pass
    assert device.released == 1
    assert all(slot.arena is None and slot.staging is None for slot in backend._slots)


# --- on a real GPU ------------------------------------------------------------------------------------

gpu_configs = [PipelineConfig(50, 150, l2, k) for l2 in (False, True) for k in BLUR_SIZES] + [
    PipelineConfig(150, 50, False, 5), PipelineConfig(0, 0, True, 3), PipelineConfig(10, 2**31 - 1, False, 5)]


@pytest.fixture(scope="module")
def gpu_backend():
    reason = CupyBackend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with CupyBackend() as backend:
        yield backend


@pytest.mark.gpu
@pytest.mark.parametrize("config", gpu_configs, ids=str)
def test_gpu_bundled_data_matches_the_reference(gpu_backend, bundled_data_dir, config):
    batch = _decoded(bundled_data_dir)
    assert batch
    assert_same_as_reference(gpu_backend.process(batch, config, keep_images=True), batch, config)


@pytest.mark.gpu
@pytest.mark.parametrize("l2", [False, True])
def test_gpu_shared_data_matches_the_reference(gpu_backend, shared_data_dir, l2):
    batch = _decoded(shared_data_dir)
    config = PipelineConfig(l2_gradient=l2)
    assert_same_as_reference(gpu_backend.process(batch, config, keep_images=True), batch, config)


@pytest.mark.gpu
@settings(max_examples=examples(40), deadline=None)
@given(st.lists(images(max_side=300), min_size=1, max_size=12), configs)
def test_gpu_random_mixed_batches_match_the_reference(gpu_backend, batch, config):
    assert_same_as_reference(gpu_backend.process(batch, config, keep_images=True), batch, config)


@pytest.mark.gpu
@pytest.mark.parametrize(("shape", "l2"), [((1, 1), False), ((1, 5000), True), ((5000, 1), False),
                                           ((1023, 1025, 3), True), ((1531, 2049), False), ((2000, 1500, 3), True)],
                         ids=str)
def test_gpu_large_and_odd_shapes(gpu_backend, shape, l2):
    rng = np.random.default_rng(sum(shape))
    noise = rng.integers(0, 256, shape, np.uint8)
    smooth = (np.add.outer(np.arange(shape[0]) // 7, np.arange(shape[1]) // 5) % 256).astype(np.uint8)
    batch = [noise, smooth, noise[..., 0].copy() if noise.ndim == 3 else noise[::-1].copy()]
    config = PipelineConfig(20, 80, l2, 7 if l2 else 3)
    assert_same_as_reference(gpu_backend.process(batch, config, keep_images=True), batch, config)


@pytest.mark.gpu
def test_gpu_many_sub_batches_overlap_and_give_the_same_bytes(gpu_backend, monkeypatch):
    rng = np.random.default_rng(1)
    batch = [rng.integers(0, 256, (256, 384, 3), np.uint8) for _ in range(24)]
    config = PipelineConfig()
    whole = gpu_backend.process(batch, config, keep_images=True)
    monkeypatch.setattr(cupy_gpu, "SUB_BATCH_TARGET_BYTES", 2 * cupy_gpu.device_bytes_per_image((256, 384, 3), True))
    pieces = gpu_backend.process(batch, config, keep_images=True)
    for a, b in zip(whole, pieces, strict=True):
        assert np.array_equal(a.histogram, b.histogram) and a.edge_count == b.edge_count
        assert np.array_equal(a.equalized, b.equalized) and np.array_equal(a.edges, b.edges)
    assert_same_as_reference(pieces[:4], batch[:4], config)


@pytest.mark.gpu
@settings(max_examples=examples(15), deadline=None)
@given(st.lists(images(max_side=200), min_size=1, max_size=8), configs)
def test_gpu_matches_the_numba_cuda_backend(gpu_backend, batch, config):
    reason = registry.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"numba.cuda backend unavailable: {reason}")
    other = registry.create("cuda")
    try:
        theirs = other.process(batch, config, keep_images=True)
    finally:
        other.close()
    ours = gpu_backend.process(batch, config, keep_images=True)
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(a.histogram, b.histogram) and a.edge_count == b.edge_count
        assert np.array_equal(a.equalized, b.equalized) and np.array_equal(a.edges, b.edges)


# --- the integer CNN label model on the device ---------------------------------------------------------


def _cnn_model(size: int, widths: tuple[int, ...], seed: int = 0):
    return model_of(random_network(np.random.default_rng(seed), size, widths))


@settings(max_examples=examples(6), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(images(max_side=24), min_size=1, max_size=4), widths=st.sampled_from([(3,), (4, 5), (2, 3, 6)]),
       block=st.sampled_from([(1, 1, 1), (7, 1, 1)]))
def test_cnn_on_the_device_gives_the_reference_sums(harness, batch, widths, block):
    """cnn_resample, cnn_block and cnn_sums (run on the CPU) against the NumPy reference, through
    the backend: sub-batches by shape, ping-pong buffers, the sums copied back with the results."""
    from cpu_reference import cnn as reference

    model = _cnn_model(8, widths)
    backend = CupyBackend(device=HostDevice(harness, block=block))
    assert backend.attach_label_model(model)
    results = backend.process(batch, PipelineConfig())
    inputs = np.stack([reference.resample(image, 8) for image in batch])
    assert np.array_equal(model.scores(results.label_features), reference.scores(model.network, inputs))
    assert model.labels(batch, None, None, results.label_features) == model.labels(batch, None, None)
    assert_same_as_reference(results, batch, PipelineConfig(), keep_images=False)  # the contract unchanged


def test_the_shipped_cnn_needs_4_kb_of_activations_per_image():
    """docs/backends.md: the two activation buffers cost 2 x 4 KB per image for eurosat-cnn."""
    from gpu_pipeline.labels.model import load_model

    model = load_model("eurosat-cnn")
    assert CnnShape(model.size, model.widths).activation_bytes == 16 * 16 * 16


def test_cnn_only_when_attached_and_other_models_are_declined(harness):
    from gpu_pipeline.labels.model import load_model

    backend = CupyBackend(device=HostDevice(harness))
    assert backend.process([np.zeros((4, 4), np.uint8)], PipelineConfig()).label_features is None
    assert not backend.attach_label_model(load_model("eurosat"))  # the softmax model labels on the host
    assert not any(launch.kernel.startswith("cnn") for launch in backend._device.launches)


def test_run_and_verify_label_on_the_device(harness, bundled_data_dir, monkeypatch, tmp_path):
    """``run --model eurosat-cnn`` and ``verify`` with the cupy backend (its kernels on the CPU) use
    the device's pooled sums, and give the labels of the numba path."""
    import json

    from typer.testing import CliRunner

    from gpu_pipeline.api import process
    from gpu_pipeline.cli import app
    from gpu_pipeline.config import DecodeOptions
    from gpu_pipeline.engine import job
    from gpu_pipeline.inputs.decode import decode_image

    devices, original = [], registry.create

    def create(name, threads=None, device=None):
        if name != "cupy":
            return original(name, threads=threads)
        devices.append(HostDevice(harness, block=(64, 1, 1)))
        return CupyBackend(device=devices[-1])

    available = registry.unavailable_reason
    monkeypatch.setattr(registry, "create", create)
    monkeypatch.setattr(registry, "unavailable_reason", lambda name: None if name == "cupy" else available(name))
    monkeypatch.setattr(job, "create", create)
    from gpu_pipeline.labels.cnn import CnnModel

    resampled_on_host, resample = [], CnnModel.resample
    monkeypatch.setattr(CnnModel, "resample", lambda model, images: (
        resampled_on_host.extend(image.shape for image in images), resample(model, images))[1])
    tiles = bundled_data_dir / "eurosat" / "Forest"
    result = CliRunner().invoke(app, ["run", str(tiles), "--out", str(tmp_path / "r.jsonl"), "--backend", "cupy",
                                      "--model", "eurosat-cnn", "--quiet"])
    assert result.exit_code == 0, result.output
    assert any(launch.kernel == "cnn_sums" for launch in devices[-1].launches)
    assert (64, 64, 3) not in resampled_on_host  # only the warm-up's tiny images: the tiles were labelled on the device
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    decoded = [decode_image(r["path"], DecodeOptions()) for r in records]
    assert [r["label"] for r in records] == process(decoded, backend="numba", model="eurosat-cnn").labels

    resampled_on_host.clear()
    result = CliRunner().invoke(app, ["verify", str(tiles), "--backends", "cupy", "--model", "eurosat-cnn"])
    assert result.exit_code == 0, result.output
    assert "identical" in result.output
    assert any(launch.kernel == "cnn_sums" for launch in devices[-1].launches)
    # The reference's labels come from the host (each tile resampled once), cupy's from the device.
    assert resampled_on_host.count((64, 64, 3)) == len(records)


@pytest.mark.gpu
def test_gpu_cnn_sums_match_the_reference(bundled_data_dir):
    """The CNN kernels on a real GPU: pooled sums of the bundled images (tiles, scenes, formats) and
    of random odd shapes equal the NumPy reference's."""
    reason = CupyBackend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from cpu_reference import cnn as reference
    from gpu_pipeline.labels.model import load_model

    model = load_model("eurosat-cnn")
    rng = np.random.default_rng(11)
    batch = _decoded(bundled_data_dir) + [rng.integers(0, 256, shape, np.uint8) for shape in ODD_SHAPES]
    with CupyBackend() as backend:
        assert backend.attach_label_model(model)
        results = backend.process(batch, PipelineConfig())
    inputs = np.stack([reference.resample(image, model.size) for image in batch])
    assert np.array_equal(model.scores(results.label_features), reference.scores(model.network, inputs))
