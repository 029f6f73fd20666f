"""The numba CPU backend is byte-identical to the reference, whatever the batch and the threads.

The reference (cpu_reference) is itself held byte-equal to OpenCV 5 by test_reference_opencv.py.
Kernels compile once per session (and load from numba's cache on reruns).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpu_reference as ref
from gpu_pipeline.backends import _numba_setup, numba_cpu, registry
from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend
from gpu_pipeline.backends.reference import ReferenceBackend
from gpu_pipeline.config import MAX_THRESHOLD, DecodeOptions, PipelineConfig
from gpu_pipeline.inputs.decode import decode_image
from gpu_pipeline.inputs.discover import discover
from tests.strategies import examples, images, ODD_SHAPES

REPO = Path(__file__).resolve().parent.parent

#: Thresholds where off-by-one mistakes show: 0, equal, swapped, fractional, around the L1
#: maximum of 2040, the L2 clamp at 32767 and the largest the config accepts.
THRESHOLDS = [0.0, 0.5, 1.0, 31.9, 50.0, 100.0, 150.0, 2039.0, 2040.0, 2041.0, 32767.0, 40000.0,
              float(MAX_THRESHOLD)]

configs = st.builds(
    PipelineConfig,
    low_threshold=st.one_of(st.sampled_from(THRESHOLDS), st.floats(0, 400)),
    high_threshold=st.one_of(st.sampled_from(THRESHOLDS), st.floats(0, 800)),
    l2_gradient=st.booleans(),
    blur_ksize=st.sampled_from([3, 5, 7]),
)


@pytest.fixture(scope="module")
def backend() -> NumbaCpuBackend:
    numba_backend = NumbaCpuBackend()
    numba_backend.warm_up()
    return numba_backend


def assert_matches_reference(images: list[np.ndarray], config: PipelineConfig, results, names=None) -> None:
    """Every result byte-equal to the reference: histogram, equalized, edges and edge count."""
    assert len(results) == len(images)
    for index, (image, result) in enumerate(zip(images, results)):
        name = names[index] if names else f"image {index} {image.shape}"
        expected = ref.process_image(image, config)
        assert result.histogram.dtype == np.int64, name
        assert np.array_equal(result.histogram, expected.histogram), f"{name}: histogram"
        for stage in ("equalized", "edges"):
            ours, theirs = getattr(result, stage), getattr(expected, stage)
            assert ours.dtype == np.uint8 and ours.shape == theirs.shape, f"{name}: {stage} {ours.shape}"
            differ = np.argwhere(ours != theirs)
            assert differ.size == 0, f"{name}: {stage}: {len(differ)} pixels differ, first at {differ[0]}"
        assert type(result.edge_count) is int and result.edge_count == expected.edge_count, name


def decode_all(root: Path) -> tuple[list[np.ndarray], list[str]]:
    images, names = [], []
    for path in discover([root]):
        images.append(decode_image(path, DecodeOptions()))  # a decode error fails the test: every sample decodes
        names.append(str(path.relative_to(root)))
    return images, names


# --- parity on real data -------------------------------------------------------------------------


@pytest.mark.parametrize("config", [PipelineConfig(), PipelineConfig(30, 90, l2_gradient=True, blur_ksize=3)],
                         ids=["default", "l2-k3"])
def test_shared_data_matches_reference(backend, shared_data_dir, config):
    images, names = decode_all(shared_data_dir)
    assert len(images) >= 1026
    assert_matches_reference(images, config, backend.process(images, config, keep_images=True), names)


@pytest.mark.parametrize("config", [PipelineConfig(), PipelineConfig(20, 60, blur_ksize=7)], ids=["default", "k7"])
def test_bundled_data_matches_reference(backend, bundled_data_dir, config):
    images, names = decode_all(bundled_data_dir)
    assert images, f"no decodable image under {bundled_data_dir}"
    assert_matches_reference(images, config, backend.process(images, config, keep_images=True), names)


# --- parity on generated images ------------------------------------------------------------------


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(images(), min_size=1, max_size=4), config=configs)
def test_random_batches_match_reference(backend, batch, config):
    assert_matches_reference(batch, config, backend.process(batch, config, keep_images=True))


@pytest.mark.parametrize("ksize", [3, 5, 7])
@pytest.mark.parametrize("l2", [False, True], ids=["L1", "L2"])
def test_odd_shapes_match_reference(backend, ksize, l2):
    rng = np.random.default_rng(ksize + 10 * l2)
    batch = [rng.integers(0, 256, shape + channels, dtype=np.uint8)
             for shape in ODD_SHAPES for channels in ((), (3,))]
    config = PipelineConfig(10, 40, l2_gradient=l2, blur_ksize=ksize)
    assert_matches_reference(batch, config, backend.process(batch, config, keep_images=True))


def smooth_noise(rng: np.random.Generator, height: int, width: int, channels: tuple = ()) -> np.ndarray:
    """Blocky noise, upsampled: real edges of every direction, with plateaus and ties."""
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2) + channels)
    return np.ascontiguousarray(np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:height, :width].astype(np.uint8))


def test_mixed_batch_in_one_call(backend):
    """Gray and RGB, large and tiny, read-only and strided, in one call: results in order, matching."""
    rng = np.random.default_rng(7)
    read_only = smooth_noise(rng, 90, 70, (3,))
    read_only.flags.writeable = False
    batch = [smooth_noise(rng, 700, 900, (3,)), np.full((1, 1), 9, np.uint8), smooth_noise(rng, 64, 64),
             rng.integers(0, 256, (1, 5, 3), dtype=np.uint8), smooth_noise(rng, 517, 333),
             rng.integers(0, 256, (3, 1), dtype=np.uint8), smooth_noise(rng, 64, 64, (3,)),
             smooth_noise(rng, 17, 1000, (3,)), read_only, smooth_noise(rng, 80, 90)[::2, ::3]]
    config = PipelineConfig(40, 120)
    assert_matches_reference(batch, config, backend.process(batch, config, keep_images=True))


@contextmanager
def short_bands(items_per_thread: int):
    """Cut images into more, shorter bands (down to one row) than the backend normally would."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_cpu, "MIN_BAND_ROWS", 1)
        patch.setattr(numba_cpu, "ITEMS_PER_THREAD", items_per_thread)
        yield


@settings(max_examples=examples(60), deadline=None)
@given(image=images(max_side=80), config=configs, items_per_thread=st.sampled_from([3, 64]))
def test_row_bands_give_the_same_bytes(backend, image, config, items_per_thread):
    """Images cut into many row bands (down to one row each) still give the reference's bytes.

    This exercises the halo rows each band recomputes and the flood across band seams.
    """
    with short_bands(items_per_thread):
        bands = numba_cpu.plan_bands(np.array([image.shape[0]]), np.array([image.shape[1]]), backend.threads)
        assert bands[0] >= min(image.shape[0], items_per_thread * backend.threads)
        results = backend.process([image], config, keep_images=True)
    assert_matches_reference([image], config, results)


@pytest.mark.parametrize("upwards", [False, True], ids=["down", "up"])
def test_edges_crossing_many_seams(backend, upwards):
    """A weak edge running through every band, strong only at one end: hysteresis must carry it
    across each seam, down from the top or up from the bottom, to the image's last or first row.
    (The reference checks the premise: no strong gradient beyond 12 rows from the strong end, yet
    edges in the row at the other end.)"""
    image = np.zeros((120, 64), np.uint8)
    image[:, 34:] = np.linspace(60, 255, 30).astype(np.uint8)  # a gentle ramp shapes the LUT
    image[:, 30:34] = 40  # the weak step ...
    image[:6, 30:34] = 200  # ... strong at the top only
    if upwards:  # ... or at the bottom only: the seam join's flood must also climb to row 0
        image = np.ascontiguousarray(image[::-1])
    config = PipelineConfig(20, 100, blur_ksize=5)
    expected = ref.process_image(image, config)
    dx, dy = ref.sobel(expected.blurred)
    strong_rows = np.nonzero(np.abs(dx) + np.abs(dy) > 100)[0]
    from_strong_end = len(image) - 1 - strong_rows if upwards else strong_rows
    assert (from_strong_end < 12).all() and expected.edges[0 if upwards else -1].any()
    with short_bands(items_per_thread=16):
        results = backend.process([image], config, keep_images=True)
    assert_matches_reference([image], config, results)


@settings(max_examples=examples(30), deadline=None)
@given(image=images())
def test_histogram_equals_bincount_of_gray(backend, image):
    (result,) = backend.process([image], PipelineConfig())
    assert result.histogram.dtype == np.int64 and result.histogram.shape == (256,)
    assert np.array_equal(result.histogram, np.bincount(ref.gray(image).ravel(), minlength=256))
    assert result.equalized is None and result.edges is None


@settings(max_examples=examples(200), deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), min_size=1, max_size=30),
       threads=st.integers(1, 64))
def test_work_items_cover_every_row_once(shapes, threads):
    heights = np.array([h for h, _ in shapes], np.int64)
    widths = np.array([w for _, w in shapes], np.int64)
    items = numba_cpu.plan_items(heights, widths, threads)
    for i, height in enumerate(heights):
        mine = np.arange(items.first[i], items.first[i] + items.bands[i])
        assert (items.image[mine] == i).all()
        assert items.r0[mine[0]] == 0 and items.r1[mine[-1]] == height
        assert (items.r0[mine[1:]] == items.r1[mine[:-1]]).all() and (items.r1[mine] > items.r0[mine]).all()
        assert items.bands[i] == 1 or (items.r1[mine] - items.r0[mine]).min() >= numba_cpu.MIN_BAND_ROWS
    assert sorted(items.order.tolist()) == list(range(len(items.image)))
    sizes = ((items.r1 - items.r0) * widths[items.image])[items.order]
    assert (np.diff(sizes) <= 0).all()


# --- threads -------------------------------------------------------------------------------------


def test_a_numba_that_cannot_be_imported_is_one_whole_line(monkeypatch):
    """backends.md: numba is unavailable only when it cannot be imported, said in one line: the first
    line of the error, the sentence kept whole (cut at the error's first newline it lost its bracket)."""
    import builtins

    real_import = builtins.__import__

    def broken_llvmlite(name, *args, **kwargs):
        if name == "numba":
            raise OSError("libllvmlite.so: cannot open shared object file\n(a second line)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken_llvmlite)
    assert NumbaCpuBackend.unavailable_reason() == \
        "numba cannot be imported (OSError: libllvmlite.so: cannot open shared object file)"


def test_threads_argument(backend):
    most = numba.config.NUMBA_NUM_THREADS
    assert backend.threads == most
    assert NumbaCpuBackend(threads=1).threads == 1
    assert NumbaCpuBackend(threads=most + 5).threads == most
    with pytest.raises(ValueError):
        NumbaCpuBackend(threads=0)

    rng = np.random.default_rng(3)
    batch = [smooth_noise(rng, 300, 200, (3,)), smooth_noise(rng, 64, 64)]
    one = NumbaCpuBackend(threads=1)
    single = one.process(batch, PipelineConfig(), keep_images=True)
    everyone = backend.process(batch, PipelineConfig(), keep_images=True)
    for a, b in zip(single, everyone):
        assert np.array_equal(a.edges, b.edges) and np.array_equal(a.histogram, b.histogram)


def test_concurrent_calls_from_python_threads(backend):
    """Four Python threads calling at once (two backends, several batches) get identical results."""
    rng = np.random.default_rng(11)
    batches = [[smooth_noise(rng, 256, 300, (3,)), smooth_noise(rng, 64, 64)],
               [smooth_noise(rng, 64, 64, (3,)) for _ in range(40)],
               [smooth_noise(rng, 640, 480)],
               [rng.integers(0, 256, (33, 47, 3), dtype=np.uint8) for _ in range(10)]]
    config = PipelineConfig(30, 90)
    expected = [backend.process(batch, config, keep_images=True) for batch in batches]
    other = NumbaCpuBackend(threads=1)

    def run(job: int):
        worker = backend if job % 2 else other
        return [worker.process(batches[job % 4], config, keep_images=True) for _ in range(3)]

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(run, range(8)))
    for job, repeats in enumerate(outcomes):
        for results in repeats:
            for got, want in zip(results, expected[job % 4]):
                assert got.edge_count == want.edge_count
                assert np.array_equal(got.edges, want.edges) and np.array_equal(got.equalized, want.equalized)
                assert np.array_equal(got.histogram, want.histogram)


# --- environment: registry, threading layer, cache directory -------------------------------------


def test_registered_and_available():
    assert NumbaCpuBackend.unavailable_reason() is None
    assert registry.unavailable_reason("numba") is None
    created = registry.create("numba", threads=1)
    assert isinstance(created, NumbaCpuBackend) and created.threads == 1


def test_the_backend_needs_no_numba_threading_layer():
    """Its threads are Python threads running nogil kernels: numba's layer (OpenMP, TBB,
    workqueue) is never started, so nothing spins on the cores or aborts on concurrent calls."""
    code = textwrap.dedent("""
        import numba, numpy as np
        from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend
        from gpu_pipeline.config import PipelineConfig
        NumbaCpuBackend(threads=2).process([np.zeros((300, 200, 3), np.uint8)] * 3, PipelineConfig())
        try:
            print(numba.threading_layer())
        except ValueError:
            print("no layer started")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "no layer started", done.stderr


def _blocked(tmp_path: Path) -> Path:
    """A path nothing can be created under, even as root: its parent is a regular file."""
    wall = tmp_path / "wall"
    wall.write_text("not a directory")
    return wall / "inside"


def test_cache_dir_falls_back_when_nothing_usual_is_writable(tmp_path, monkeypatch):
    package = tmp_path / "package"
    package.mkdir()
    (package / "__pycache__").write_text("a file where numba wants a folder")
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(_blocked(tmp_path)))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    chosen = _numba_setup.choose_cache_dir(package)
    assert chosen is not None and Path(chosen).parent == tmp_path / "tmp"
    assert numba.config.CACHE_DIR == chosen

    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr("tempfile.tempdir", str(_blocked(tmp_path)))
    assert _numba_setup.choose_cache_dir(package) is None  # then kernels compile without a cache

    def no_temp_folder():  # what tempfile says when TMPDIR, /tmp, /var/tmp and "." are all read-only
        raise FileNotFoundError(2, "No usable temporary directory found")

    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr("tempfile.gettempdir", no_temp_folder)
    assert _numba_setup.choose_cache_dir(package) is None  # it raised: "numba cannot be imported", a traceback


def test_cache_dir_keeps_the_users_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "mine"))
    assert _numba_setup.choose_cache_dir(tmp_path) == str(tmp_path / "mine")


@pytest.mark.slow
def test_read_only_install_compiles_into_a_writable_cache(tmp_path):
    """The package in a folder numba cannot write to, and a home without a cache: it still runs,
    caches its kernels in the fallback folder, and a second process loads them from there."""
    install = tmp_path / "install"
    for package in ("gpu_pipeline", "cpu_reference"):
        shutil.copytree(REPO / package, install / package, ignore=shutil.ignore_patterns("__pycache__"))
    (install / "gpu_pipeline" / "backends" / "__pycache__").write_text("read-only install")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("NUMBA_")}
    env.update(PYTHONPATH=str(install), HOME=str(_blocked(tmp_path)), TMPDIR=str(temp),
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("XDG_CACHE_HOME", None)
    script = textwrap.dedent("""
        import numba, numpy as np
        import cpu_reference as ref
        from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend
        from gpu_pipeline.config import PipelineConfig
        image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
        (result,) = NumbaCpuBackend().process([image], PipelineConfig(), keep_images=True)
        assert np.array_equal(result.edges, ref.process_image(image, PipelineConfig()).edges)
        print(numba.config.CACHE_DIR)
    """)
    runs = [subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=300, check=False) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    cache_dir = Path(runs[0].stdout.strip())
    assert cache_dir.parent.parent == temp and cache_dir.name.startswith("kernels-"), runs[0].stdout
    assert list(cache_dir.rglob("*.nbi")), "no kernel was cached"


def test_views_that_are_not_c_contiguous_give_the_reference_results():
    """The kernels read the images' raw memory: a strided view must not be read as if dense."""
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    views = [base[::2, ::3], base[:, :, 1][:, ::-1], np.asfortranarray(base[:, :, 0])]
    config = PipelineConfig()
    got = NumbaCpuBackend().process(views, config, keep_images=True)
    want = ReferenceBackend().process([np.ascontiguousarray(v) for v in views], config, keep_images=True)
    assert np.array_equal(got.histograms, want.histograms) and np.array_equal(got.edge_counts, want.edge_counts)
    assert all(np.array_equal(a, b) for a, b in zip(got.edges, want.edges))


def test_compiles_on_warm_up_says_whether_the_cache_holds_the_kernels(backend, monkeypatch):
    """The command line announces a compile before it starts; it must not announce one that won't come."""
    backend.warm_up()
    assert backend.compiles_on_warm_up() is False
    cache_file = type(backend._kernels.edge_maps._cache._cache_file)
    monkeypatch.setattr(cache_file, "_load_index", lambda self: {})  # what numba reads for a stale or empty cache
    assert backend.compiles_on_warm_up() is True


def test_a_call_gives_every_thread_enough_tiles():
    """1 MP a call up to 4 threads; beyond, 64 tiles' worth a thread (16 threads: 4 MP, 1,024 tiles)."""
    from gpu_pipeline.backends import numba_cpu

    backend = numba_cpu.NumbaCpuBackend(threads=2)
    try:
        assert backend.batch_pixels() == 1 << 20
        backend.threads = 16  # the rule, without starting 16 threads on a 2-core machine
        assert backend.batch_pixels() == 16 * 256 * 1024
    finally:
        backend.close()


def test_close_ends_the_helper_threads():
    """backends.md: the backend keeps threads - 1 helper threads, and close() ends them."""
    import threading

    from gpu_pipeline.backends import numba_cpu

    def helpers() -> set[threading.Thread]:
        return {thread for thread in threading.enumerate() if thread.name.startswith("numba")}

    before = helpers()
    backend = numba_cpu.NumbaCpuBackend(threads=2)
    backend.process([np.zeros((64, 64), np.uint8)] * 8, PipelineConfig())
    started = helpers() - before
    assert len(started) == 1
    backend.close()
    for thread in started:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_calls_that_reuse_the_last_calls_memory_give_the_reference_bytes():
    """The gray images and Canny maps of a call live in memory the backend keeps for the next call:
    a smaller batch after a larger one (a prefix of it, old bytes beyond), then a larger one (grown),
    with and without the images kept, all byte-equal to the reference."""
    rng = np.random.default_rng(5)
    backend = NumbaCpuBackend(threads=2)
    large = [smooth_noise(rng, 300, 200, (3,)), smooth_noise(rng, 64, 64)] + [
        rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(6)]
    small = [smooth_noise(rng, 30, 20, (3,)), np.full((7, 9), 200, np.uint8)]
    larger = large + [smooth_noise(rng, 500, 400, (3,))]
    config = PipelineConfig(30, 90)
    for batch in (large, small, larger, small, large):
        assert_matches_reference(batch, config, backend.process(batch, config, keep_images=True))
        counted = backend.process(batch, config)
        want = [ref.process_image(image, config) for image in batch]
        assert [result.edge_count for result in counted] == [w.edge_count for w in want]
        assert all(np.array_equal(result.histogram, w.histogram) for result, w in zip(counted, want))
    assert len(backend._spare) == 1  # one call at a time: one set of kept arrays


def test_numba_disable_jit_makes_the_backend_unavailable_saying_why(monkeypatch):
    """With it set, the kernels ran as Python and a run died in an 86-line traceback; auto passes it over."""
    from gpu_pipeline.backends import registry

    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    assert "NUMBA_DISABLE_JIT is set" in registry.unavailable_reason("numba")
    monkeypatch.setattr(numba.config, "DISABLE_JIT", False)
    assert registry.unavailable_reason("numba") is None


def test_a_ctrl_c_while_helpers_work_waits_for_them_then_is_raised():
    """The helpers write into scratch buffers that go back to the spare pool once the call ends: a
    Ctrl-C that ended the wait early would let the next call share them with a helper still at work."""
    import threading
    import time

    from gpu_pipeline.backends import numba_cpu

    finished = threading.Event()

    class InterruptedOnce:  # a helper's future, whose first wait a Ctrl-C ends
        def __init__(self, future):
            self.future, self.waits = future, 0

        def exception(self):
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt
            return self.future.exception()

        def result(self):
            return self.future.result()

    with ThreadPoolExecutor(1) as pool:
        helper = InterruptedOnce(pool.submit(lambda: (time.sleep(0.3), finished.set())))
        with pytest.raises(KeyboardInterrupt):
            numba_cpu._wait_for_all([helper])
        assert finished.is_set()


def test_offsets_of_packed_arrays_start_at_zero_and_add_the_sizes_before():
    """_exclusive_cumsum places each image's gray pixels and Canny map after the ones before it: a
    wrong offset makes images share memory (a planted one hung the kernels until pytest's timeout)."""
    assert numba_cpu._exclusive_cumsum(np.array([3, 5, 2], np.int64)).tolist() == [0, 3, 8]
    assert numba_cpu._exclusive_cumsum(np.array([7], np.int64)).tolist() == [0]
    assert numba_cpu._exclusive_cumsum(np.zeros(0, np.int64)).tolist() == []


def test_bands_aim_at_a_share_of_the_batch_no_larger():
    """backends.md: items of about 1 / (4 x threads) of the batch's pixels. Worked by hand: 1,100 rows
    of one pixel on 2 threads aim at 1100 // 8 = 137 pixels an item, so the 1,000-row image needs
    ceil(1000 / 137) = 8 bands (7 would make them 143 rows: a thread short of work at the end), and
    the 100-row image stays whole (it is also under 2 x MIN_BAND_ROWS)."""
    assert numba_cpu.plan_bands(np.array([1000, 100]), np.array([1, 1]), threads=2).tolist() == [8, 1]


def test_an_image_cut_in_two_bands_carries_edges_across_its_one_seam(backend):
    """128 rows are two bands of MIN_BAND_ROWS on any thread count: the seam join must run for an image
    cut in two as for one cut in many (test_edges_crossing_many_seams cuts in 16). A weak edge
    strong in its first rows only must reach the second band."""
    image = np.zeros((2 * numba_cpu.MIN_BAND_ROWS, 64), np.uint8)
    image[:, 34:] = np.linspace(60, 255, 30).astype(np.uint8)
    image[:, 30:34] = 40
    image[:6, 30:34] = 200
    config = PipelineConfig(20, 100, blur_ksize=5)
    assert numba_cpu.plan_bands(np.array([image.shape[0]]), np.array([image.shape[1]]), backend.threads).tolist() == [2]
    expected = ref.process_image(image, config)
    assert expected.edges[numba_cpu.MIN_BAND_ROWS:].any()  # the premise: edges in the second band
    assert_matches_reference([image], config, backend.process([image], config, keep_images=True))


def test_scratch_arrays_have_the_size_asked_for():
    """The kernels write every element of the arrays they are given: memory kept from the last call is
    reused only when it holds them all (one element short, they wrote past its end)."""
    scratch = numba_cpu.Scratch()
    first = scratch.array("gray", 10, np.uint8)
    smaller = scratch.array("gray", 4, np.uint8)
    assert first.size == 10 and smaller.size == 4 and np.shares_memory(first, smaller)
    grown = scratch.array("gray", 11, np.uint8)
    assert grown.size == 11 and grown.dtype == np.uint8
    assert scratch.array("maps", 3, np.uint8).size == 3 and not np.shares_memory(grown, scratch.array("maps", 3, np.uint8))


def test_a_helpers_failure_is_raised_after_every_helper_is_done():
    """A kernel that failed on a helper thread fails the call (it was swallowed: a batch with the
    helper's share of its images never computed), and only once the other helpers are done."""
    import threading
    import time

    finished = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        failing = pool.submit(lambda: 1 // 0)
        slow = pool.submit(lambda: (time.sleep(0.3), finished.set()))
        with pytest.raises(ZeroDivisionError):
            numba_cpu._wait_for_all([failing, slow])
        assert finished.is_set()


def test_a_calls_own_interruption_is_not_replaced_by_a_helpers_failure():
    """A SIGTERM raised in the calling thread as numba loaded the kernels left a module half imported;
    the helper that imported it next failed ("duplicate registration"), and that failure, raised
    while waiting for the helpers, replaced the signal's: a traceback and exit 1 instead of 143."""
    import threading

    backend = numba_cpu.NumbaCpuBackend(threads=2)
    caller = threading.current_thread()
    helper_failed = threading.Event()

    def kernel(claimed):
        if threading.current_thread() is caller:
            helper_failed.wait(10)
            raise KeyboardInterrupt
        helper_failed.set()
        raise KeyError("duplicate registration for NPDatetime")

    try:
        with pytest.raises(KeyboardInterrupt):
            backend._on_workers(kernel, 2, (), ())
    finally:
        backend.close()


def test_warm_up_loads_the_seam_join_too():
    """backends.md: warm_up() loads every kernel, the band-seam join too, which the base class's tiny
    images never reach: compiled in the middle of a run, it would stall it (12-15 s on two cores)."""
    code = textwrap.dedent("""
        from gpu_pipeline.backends import _numba_kernels as k
        from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend
        NumbaCpuBackend(threads=1).warm_up()
        print(len(k.gray_histograms.signatures), len(k.edge_maps.signatures), len(k.join_bands.signatures))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [int(n) >= 1 for n in done.stdout.split()] == [True] * 3, done.stdout


def test_images_the_backend_cannot_take_are_refused_with_a_value_error(backend):
    """The kernels read raw memory: an image that is not uint8 gray or RGB (a float32 one gave numbers
    from its bytes) is a ValueError before they read a byte, from a list or a batch. An empty image is
    refused by the same checks (the kernels never end on a width of 0: checked without calling them)."""
    from gpu_pipeline.backends.base import check_images
    from gpu_pipeline.images import ImageBatch

    tile, pixels, one = np.zeros((4, 4), np.uint8), np.zeros(64, np.uint8), np.ones(1, np.int64)
    for inputs, message in [([tile, np.zeros((4, 4), np.float32)], "expected a uint8 array, got float32"),
                            ([np.zeros((4, 4, 4), np.uint8)], r"got shape \(4, 4, 4\)"),
                            ([tile, np.zeros((4, 0), np.uint8)], r"empty image of shape \(4, 0\)")]:
        with pytest.raises(ValueError, match=message):  # the reference backend too
            ReferenceBackend().process(inputs, PipelineConfig())
    for inputs, message in [([tile, np.zeros((4, 4), np.float32)], "expected a uint8 array, got float32"),
                            ([tile, np.zeros((4, 4, 4), np.uint8)], r"RGB \(H, W, 3\) image, got shape \(4, 4, 4\)"),
                            (ImageBatch.packed(pixels, np.array([(4, 4, 0, 0), (4, 4, 2, 16)])), "other channel counts"),
                            (ImageBatch.packed(pixels, np.array([(4, 4, 1, 16)])), "other channel counts"),
                            (ImageBatch([pixels[::2]], one * 0, one * 0, one * 4, one * 4, one * 0), "C-contiguous buffers"),
                            (ImageBatch([pixels.view(np.int32)], one * 0, one * 0, one * 4, one * 4, one * 0),
                             "expected uint8 images")]:
        with pytest.raises(ValueError, match=message):
            backend.process(inputs, PipelineConfig())
    for inputs, message in [([tile, np.zeros((4, 0), np.uint8)], r"empty image of shape \(4, 0\)"),
                            ([np.zeros((0, 4, 3), np.uint8)], r"empty image of shape \(0, 4, 3\)"),
                            (ImageBatch.packed(pixels, np.array([(4, 4, 0, 0), (4, 0, 0, 16)])), r"shape \(4, 0\)"),
                            (ImageBatch.packed(pixels, np.array([(0, 4, 3, 16)])), r"shape \(0, 4, 3\)")]:
        with pytest.raises(ValueError, match=message):
            check_images(inputs)


def test_the_helper_threads_are_kept_from_call_to_call():
    """backends.md: the calling thread plus threads - 1 helper threads the backend keeps: every call
    runs on the same one here (a pool made again for each call started a thread a call)."""
    import threading

    def helpers() -> set[threading.Thread]:
        return {thread for thread in threading.enumerate() if thread.name.startswith("numba")}

    before = helpers()
    backend = NumbaCpuBackend(threads=2)
    seen = set()  # (the threads themselves: an ended thread's ident may be given to the next one)
    try:
        for _ in range(3):
            backend.process([np.zeros((64, 64), np.uint8)] * 8, PipelineConfig())
            seen |= helpers() - before
    finally:
        backend.close()
    assert len(seen) == 1
