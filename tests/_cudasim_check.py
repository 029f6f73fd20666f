"""The numba.cuda backend under the CUDA simulator, byte-equal to the reference.

Not collected by the main test run (no ``test_`` prefix): tests/test_numba_cuda.py runs it in a
subprocess with NUMBA_ENABLE_CUDASIM=1 and GPU_PIPELINE_CUDA_SMALL_TILES=1, so that the
simulator never leaks into the rest of the suite. The small-tile geometry (8x8 tiles) makes these
tiny images span several tiles: halos, tile edges and hysteresis across tiles are exercised.
The simulator runs every CUDA thread as a Python thread (about a millisecond each per barrier),
hence the tiny images and few hypothesis examples.
"""

from __future__ import annotations

import sys

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpu_reference
from cpu_reference.stages import hysteresis as reference_hysteresis
from gpu_pipeline.backends import _cuda_kernels as kernels
from gpu_pipeline.backends import registry
from gpu_pipeline.backends.base import BackendUnavailable
from gpu_pipeline.config import BLUR_SIZES, PipelineConfig
from gpu_pipeline.images import ImageBatch
from tests.chains import spiral
from tests.strategies import examples, images, packed_batch

if not (numba.config.ENABLE_CUDASIM and kernels.SMALL_TILES):
    pytest.skip("run by tests/test_numba_cuda.py with NUMBA_ENABLE_CUDASIM=1 and "
                "GPU_PIPELINE_CUDA_SMALL_TILES=1", allow_module_level=True)

from numba import cuda  # after the skip: the simulator's module here

from gpu_pipeline.backends._cuda_plan import GpuOutOfMemory
from gpu_pipeline.backends.numba_cuda import NumbaCudaBackend

# The simulator's barriers wait for thread switches; the default 5 ms interval makes them crawl.
sys.setswitchinterval(5e-4)

#: Odd shapes: single pixels, single rows and columns, smaller than every blur kernel, several
#: tiles wide or high, and repeated shapes so that one launch holds several images (grid z > 1).
SHAPES = [(1, 1), (1, 5), (5, 1), (2, 2), (3, 3, 3), (7, 13), (7, 13, 3), (7, 13, 3), (13, 7),
          (17, 9, 3), (1, 19), (20, 24), (20, 24)]


def scene(shape: tuple[int, ...], rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "noise":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "constant":
        return np.full(shape, rng.integers(0, 256), np.uint8)
    if kind == "two-level":
        return np.where(rng.random(shape) < 0.5, 40, 210).astype(np.uint8)
    # blocks: long straight edges that cross tile borders
    h, w = shape[:2]
    blocks = (np.add.outer(np.arange(h) // 5, np.arange(w) // 6) % 2 * 180 + 30).astype(np.uint8)
    return np.repeat(blocks[:, :, None], 3, axis=2) if len(shape) == 3 else blocks


def mixed_batch(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    kinds = ["noise", "constant", "two-level", "blocks"]
    return [scene(shape, rng, kinds[i % len(kinds)]) for i, shape in enumerate(SHAPES)]


def assert_matches_reference(images_: list[np.ndarray], results, config: PipelineConfig, keep_images: bool):
    assert len(results) == len(images_)
    for number, (image, result) in enumerate(zip(images_, results)):
        expected = cpu_reference.process_image(image, config)
        where = f"image {number} of shape {image.shape}, {config}"
        assert result.histogram.dtype == np.int64 and result.histogram.shape == (256,), where
        assert np.array_equal(result.histogram, expected.histogram), where
        assert result.edge_count == expected.edge_count, where
        if keep_images:
            assert result.equalized.dtype == np.uint8 and result.edges.dtype == np.uint8, where
            assert np.array_equal(result.equalized, expected.equalized), where
            assert np.array_equal(result.edges, expected.edges), where
        else:
            assert result.equalized is None and result.edges is None, where


@pytest.fixture(scope="module")
def backend():
    with NumbaCudaBackend(allow_simulator=True) as instance:
        yield instance


def test_the_simulator_is_never_chosen_without_opting_in():
    assert "simulator" in NumbaCudaBackend.unavailable_reason()
    assert registry.unavailable_reason("cuda") is not None
    assert registry.resolve("auto") != "cuda"
    with pytest.raises(BackendUnavailable, match="simulator"):
        NumbaCudaBackend()


def test_creating_and_calling_the_backend_switch_off_low_occupancy_warnings(monkeypatch):
    """numba-cuda's "Grid size N will likely result in GPU under-utilization" is off while the backend
    runs (the simulator never warns; tests/test_numba_cuda.py checks the switch on the real launch)."""
    monkeypatch.delenv("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", raising=False)
    monkeypatch.setattr(numba.config, "CUDA_LOW_OCCUPANCY_WARNINGS", 1)
    with NumbaCudaBackend(allow_simulator=True) as backend:
        assert numba.config.CUDA_LOW_OCCUPANCY_WARNINGS == 0
        numba.config.CUDA_LOW_OCCUPANCY_WARNINGS = 1  # as numba's reload from the environment would
        backend.process([np.zeros((3, 3), np.uint8)], PipelineConfig())
        assert numba.config.CUDA_LOW_OCCUPANCY_WARNINGS == 0


def test_mixed_batch_with_default_settings(backend):
    batch = mixed_batch(seed=1)
    config = PipelineConfig(low_threshold=40, high_threshold=120)
    assert_matches_reference(batch, backend.process(batch, config, keep_images=True), config, True)


@pytest.mark.parametrize("config", [
    PipelineConfig(low_threshold=20.5, high_threshold=60.7, l2_gradient=True, blur_ksize=3),
    PipelineConfig(low_threshold=90, high_threshold=15, l2_gradient=False, blur_ksize=7),  # swapped
    PipelineConfig(low_threshold=31.9, high_threshold=31.9, l2_gradient=True, blur_ksize=5),
    PipelineConfig(low_threshold=0, high_threshold=2**31 - 1, l2_gradient=False, blur_ksize=3),
], ids=["k3-l2-fractional", "k7-swapped", "l2-equal", "huge-high"])
def test_threshold_and_blur_settings(backend, config):
    rng = np.random.default_rng(7)
    batch = [scene((9, 14, 3), rng, "blocks"), scene((9, 14, 3), rng, "noise"),
             scene((16, 11), rng, "two-level"), scene((1, 6), rng, "noise")]
    assert_matches_reference(batch, backend.process(batch, config, keep_images=True), config, True)


def test_equalize_rounds_half_to_even_in_float32(backend):
    """255/6 * (1, 3, 5) are exact float32 halves (42.5 -> 42, 127.5 -> 128, 212.5 -> 212); in the
    contract's example 7 * (255/14) is just below 127.5 in float32, so 127."""
    halves = np.arange(7, dtype=np.uint8)[None, :]
    below_half = np.array([0] + [10] * 7 + [20] * 7, np.uint8).reshape(3, 5)
    batch = [halves, below_half, halves.T.copy()]
    config = PipelineConfig()
    results = backend.process(batch, config, keep_images=True)
    assert_matches_reference(batch, results, config, True)
    assert results[0].equalized.tolist() == [[0, 42, 85, 128, 170, 212, 255]]
    assert results[1].equalized[0, 1] == 127


def test_results_without_images(backend):
    batch = mixed_batch(seed=2)[4:9]
    config = PipelineConfig(low_threshold=30, high_threshold=90, blur_ksize=3)
    assert_matches_reference(batch, backend.process(batch, config), config, False)


@settings(max_examples=examples(5), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=images(max_side=16).filter(lambda a: a.shape[0] * a.shape[1] <= 300), blur=st.sampled_from(BLUR_SIZES), l2=st.booleans(),
       thresholds=st.tuples(st.integers(0, 300), st.integers(0, 300)))
def test_random_images(backend, image, blur, l2, thresholds):
    config = PipelineConfig(low_threshold=thresholds[0], high_threshold=thresholds[1], l2_gradient=l2,
                            blur_ksize=blur)
    assert_matches_reference([image], backend.process([image], config, keep_images=True), config, True)


def serpentine(height: int, width: int) -> np.ndarray:
    """A weak path that snakes through every other row (against the block order half of the
    time), with one strong pixel at its far end."""
    state = np.zeros((height, width), np.uint8)
    for row in range(0, height, 2):
        state[row, :] = kernels.WEAK
        link_column = width - 1 if row // 2 % 2 == 0 else 0
        if row + 1 < height:
            state[row + 1, link_column] = kernels.WEAK
    state[height - 1 if height % 2 else height - 2, -1 if (height - 1) // 2 % 2 else 0] = kernels.STRONG
    return state


def random_states(count: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    draw = rng.random((count, *shape))
    return np.where(draw < 0.02, kernels.STRONG, np.where(draw < 0.6, kernels.WEAK, kernels.NOT_EDGE)).astype(np.uint8)


def test_hysteresis_across_tiles_reaches_the_fixed_point(backend):
    rng = np.random.default_rng(3)
    states = np.concatenate([serpentine(21, 23)[None], random_states(2, (21, 23), rng)])
    device_states = cuda.to_device(states)
    launches = backend._hysteresis(backend._slots[0], device_states)
    result = device_states.copy_to_host()
    for before, after in zip(states, result):
        expected = reference_hysteresis(before == kernels.STRONG, before == kernels.WEAK)
        assert np.array_equal(after == kernels.STRONG, expected)
        assert set(np.unique(after)) <= {kernels.NOT_EDGE, kernels.WEAK, kernels.STRONG}
    assert (result[0] == kernels.STRONG).sum() == (states[0] != kernels.NOT_EDGE).sum()  # whole snake
    assert launches > 2  # the snake needs launches beyond the first chunk


def test_buffers_are_reused_across_batches():
    allocations: list[int] = []
    with NumbaCudaBackend(allow_simulator=True) as backend:
        def counting(count, dtype):
            allocations.append(count)
            return cuda.device_array(count, dtype)

        backend._device_array = counting
        config = PipelineConfig(low_threshold=40, high_threshold=120)
        rng = np.random.default_rng(5)
        for count, shape in [(2, (6, 6)), (5, (12, 10, 3)), (3, (4, 9)), (4, (12, 10, 3))]:
            allocated_before = len(allocations)
            batch = [scene(shape, rng, "two-level") for _ in range(count)]
            assert_matches_reference(batch, backend.process(batch, config, keep_images=True), config, True)
            if count in (3, 4):  # fits in what the 5-image RGB batch allocated
                assert len(allocations) == allocated_before, "a batch that fits must not allocate"
            else:
                assert len(allocations) > allocated_before, "a larger batch grows the buffers"


def test_large_sub_batches_are_staged_over_threads(backend):
    rng = np.random.default_rng(9)
    batch = [rng.integers(0, 256, (100, 1000, 3), dtype=np.uint8) for _ in range(64)]  # 19 MB
    indices = tuple(range(63, -1, -2))
    staged = np.zeros((len(indices), 100, 1000, 3), np.uint8)
    assert staged.nbytes >= 8 * 2**20
    backend._stage(batch, indices, staged)
    assert np.array_equal(staged, np.stack([batch[i] for i in indices]))


def test_a_packed_batch_gives_the_bytes_of_its_images(backend):
    """Grouped and staged from the batch's arrays (a run of packed images in one copy)."""
    batch = mixed_batch(seed=4)
    config = PipelineConfig(low_threshold=40, high_threshold=120)
    gaps = [4 * (i % 3) for i in range(len(batch))]
    for packed in (ImageBatch.of(batch), packed_batch(batch, gaps)):
        assert_matches_reference(batch, backend.process(packed, config, keep_images=True), config, True)


def test_a_large_packed_sub_batch_is_staged_over_threads(backend):
    stack = np.random.default_rng(10).integers(0, 256, (64, 100, 1000, 3), dtype=np.uint8)
    indices = tuple(range(5, 64))
    staged = np.zeros((len(indices), 100, 1000, 3), np.uint8)
    assert staged.nbytes >= 8 * 2**20
    backend._stage(ImageBatch.stacked(stack), indices, staged)
    assert np.array_equal(staged, stack[5:])


def _out_of_memory() -> Exception:
    from numba.cuda.cudadrv.driver import CudaAPIError

    error = CudaAPIError("CUDA_ERROR_OUT_OF_MEMORY")
    error.code = 2  # what the real driver's error carries (CUresult.CUDA_ERROR_OUT_OF_MEMORY)
    return error


def _backend_with_device_memory(limit_bytes: int, failures: list[int]) -> NumbaCudaBackend:
    """A simulated backend whose allocations beyond ``limit_bytes`` fail as CUDA's would."""
    backend = NumbaCudaBackend(allow_simulator=True)

    def device_array(count, dtype):
        if count * np.dtype(dtype).itemsize > limit_bytes:
            failures.append(count)
            raise _out_of_memory()
        return cuda.device_array(count, dtype)

    backend._device_array = device_array
    return backend


def test_out_of_memory_retries_with_halves_then_says_why():
    stats_bytes = 4 * kernels.STATS_WIDTH  # the largest per-image buffer of an 8x8 image
    rng = np.random.default_rng(11)
    batch = [scene((8, 8, 3), rng, "blocks") for _ in range(8)]
    config = PipelineConfig(low_threshold=40, high_threshold=120)

    failures: list[int] = []
    with _backend_with_device_memory(3 * stats_bytes, failures) as backend:
        # sub-batches of 8, then 4 images fail; 2 fit
        assert_matches_reference(batch, backend.process(batch, config), config, False)
    assert len(failures) == 2

    with (_backend_with_device_memory(stats_bytes - 1, []) as backend,  # not even one image fits
          pytest.raises(GpuOutOfMemory, match=r"shape \(8, 8, 3\)")):
        backend.process(batch[:2], config)


def test_out_of_memory_after_some_sub_batches_keeps_each_image_in_its_place():
    """The retry plans only the images not done yet, each under its own index: a mix of shapes
    whose first sub-batch is done before the third one fails."""
    stats_bytes = 4 * kernels.STATS_WIDTH
    rng = np.random.default_rng(12)
    shapes = [(4, 4), (4, 4), (5, 6), (5, 6)] + [(8, 8, 3)] * 8
    batch = [scene(shape, rng, ["noise", "two-level"][i % 2]) for i, shape in enumerate(shapes)]
    config = PipelineConfig(low_threshold=40, high_threshold=120)
    for handed in (batch, ImageBatch.of(batch)):
        failures: list[int] = []
        with _backend_with_device_memory(3 * stats_bytes, failures) as backend:
            assert_matches_reference(batch, backend.process(handed, config), config, False)
        assert failures


@pytest.mark.parametrize("failing_step", ["_hysteresis", "_stage", "_collect"])
def test_a_one_off_error_leaves_the_backend_usable(failing_step):
    """Issue #14 item 1: any failure inside process() (not just out-of-memory) must leave no
    sub-batch behind; the engine retries on the same backend, so later calls must be right."""
    rng = np.random.default_rng(13)
    batch = [scene((12, 10, 3), rng, "blocks"), scene((12, 10, 3), rng, "two-level"), scene((9, 7), rng, "noise")]
    config = PipelineConfig(low_threshold=40, high_threshold=120)
    with NumbaCudaBackend(allow_simulator=True) as backend:
        original = getattr(backend, failing_step)
        calls = []

        def fails_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected one-off failure")
            return original(*args, **kwargs)

        setattr(backend, failing_step, fails_once)
        with pytest.raises(RuntimeError, match="injected"):
            backend.process(batch, config, keep_images=True)
        for keep in (True, False):
            assert_matches_reference(batch, backend.process(batch, config, keep_images=keep), config, keep)
        assert_matches_reference(batch[2:], backend.process(batch[2:], config), config, False)


def test_device_index_is_checked_against_the_visible_gpus():
    with pytest.raises(BackendUnavailable, match=r"--device 1: no such GPU here \(1 visible; --device 0\)"):
        NumbaCudaBackend(allow_simulator=True, device_index=1)


def test_process_binds_the_gpu_in_the_thread_that_runs_it():
    """Issue #14 item 4: the engine's compute thread, not the one that built the backend, must
    have the backend's device current while process() runs."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    class RecordingGpus:
        def __init__(self, gpus):
            self.gpus, self.bound = gpus, []

        def __getitem__(self, index):
            manager, bound = self.gpus[index], self.bound

            class Binding:
                def __enter__(self):
                    bound.append((threading.get_ident(), index))
                    return manager.__enter__()

                def __exit__(self, *exc):
                    return manager.__exit__(*exc)

            return Binding()

    class CudaProxy:
        def __init__(self, module):
            self._module, self.gpus = module, RecordingGpus(module.gpus)

        def __getattr__(self, name):
            return getattr(self._module, name)

    rng = np.random.default_rng(23)
    batch = [scene((9, 10), rng, "blocks")]
    config = PipelineConfig()
    with NumbaCudaBackend(allow_simulator=True, device_index=0) as backend:
        backend._cuda = proxy = CudaProxy(cuda)
        with ThreadPoolExecutor(1) as compute_thread:
            results = compute_thread.submit(backend.process, batch, config, True).result()
            worker = compute_thread.submit(threading.get_ident).result()
        assert_matches_reference(batch, results, config, True)
        assert proxy.gpus.bound == [(worker, 0)]


def launch_start_halos(backend: NumbaCudaBackend) -> None:
    """Emulate a GPU whose hysteresis blocks all read their halos before any block writes: each
    launch reads a copy of the states taken at its start (the simulator runs blocks in order, so
    rightward and downward chains would otherwise cross every tile in one launch)."""
    def snapshot(slot, state):
        copy = cuda.device_array_like(state)
        copy.copy_to_device(state, stream=slot.stream)
        return copy

    backend._halo_source = snapshot


@pytest.mark.parametrize("pattern, side, bound", [
    ("serpentine", 16, None), ("spiral", 16, None), ("serpentine", 32, 4), ("spiral", 32, 4)])
def test_hysteresis_launches_are_bounded_with_launch_start_halos(pattern, side, bound, monkeypatch):
    """Issue #14 item 2: whatever the weak chains, at most HYSTERESIS_MAX_LAUNCHES launches, then
    the host finishes; the result is the reference's reachability either way."""
    import gpu_pipeline.backends.numba_cuda as numba_cuda

    if bound is not None:
        monkeypatch.setattr(numba_cuda, "HYSTERESIS_MAX_LAUNCHES", bound)
    limit = numba_cuda.HYSTERESIS_MAX_LAUNCHES
    chain = serpentine(side, side) if pattern == "serpentine" else spiral(side)
    states = np.stack([chain, chain[::-1, ::-1].copy(), chain.T.copy()])
    with NumbaCudaBackend(allow_simulator=True) as backend:
        launch_start_halos(backend)
        device_states = cuda.to_device(states)
        launches = backend._hysteresis(backend._slots[0], device_states)
        result = device_states.copy_to_host()
        finished_on_host = backend.device_times.host_finishes
    for before, after in zip(states, result):
        expected = reference_hysteresis(before == kernels.STRONG, before == kernels.WEAK)
        assert np.array_equal(after == kernels.STRONG, expected)
        assert (after == kernels.STRONG).sum() == (before != kernels.NOT_EDGE).sum()  # the whole chain
    assert launches <= limit
    print(f"{pattern} {side}x{side}, bound {limit}: {launches} launches, host finish: {finished_on_host}")
    if bound is not None:
        assert finished_on_host == 1  # these chains need more than 4 launches with launch-start halos


def test_threads_sharing_one_backend_each_get_their_own_results(backend):
    """The Python API hands one backend to every thread that asks for it: concurrent calls share its
    slots and buffers, so they take turns (without that, a call read another's results)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(11)
    shapes = [(6, 9), (7, 5, 3), (9, 9)]
    batches = [[scene(shapes[k % 3], rng, "noise") for _ in range(1 + k % 2)] for k in range(6)]
    config = PipelineConfig(low_threshold=40, high_threshold=120)
    with ThreadPoolExecutor(3) as threads:
        results = list(threads.map(lambda batch: backend.process(batch, config, True), batches))
    for batch, result in zip(batches, results):
        assert_matches_reference(batch, result, config, True)
