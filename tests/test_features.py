"""Label features (gpu_pipeline.labels.features): a hand-worked tile, a plain-NumPy oracle, gray = three bands.

The oracle below computes every feature of one image the obvious way (NumPy arrays, Python's
colorsys for the hue sector), independently of the numba kernel's branch-free integer sums.
"""

from __future__ import annotations

import colorsys
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cpu_reference
from gpu_pipeline.labels.features import COARSE_STEP, ENTROPY_TABLE_SIZE, FEATURE_BOUND, FEATURE_NAMES, batch_features
from tests.strategies import examples, images


def gray_of(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cpu_reference.gray(image)


def histogram_of(image: np.ndarray) -> np.ndarray:
    return np.bincount(gray_of(image).ravel(), minlength=256).astype(np.int64)


def hue_sector(r: int, g: int, b: int) -> int:
    """Sector of 60 degrees of the HSV hue, by the standard library."""
    hue, _, _ = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    return min(int(hue * 6 + 1e-9), 5)


def oracle(image: np.ndarray, histogram: np.ndarray, edge_count: int) -> dict[str, float]:
    """Every feature of one image, computed plainly."""
    bands = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
    bands = bands.astype(np.int64)
    height, width = image.shape[:2]
    n = height * width
    shares = histogram[histogram > 0] / n
    cumulative = np.cumsum(histogram)
    features = {
        "edge_density": edge_count / n,
        "gray_entropy": float(-np.sum(shares * np.log2(shares))),
        "gray_p10": int(np.argmax(cumulative * 10 >= n)),
        "gray_p50": int(np.argmax(cumulative * 2 >= n)),
        "gray_p90": int(np.argmax(cumulative * 10 >= 9 * n)),
    }
    for k, name in enumerate(("red", "green", "blue")):
        features[f"{name}_mean"] = float(bands[..., k].mean())
    for k, name in enumerate(("red", "green", "blue")):
        features[f"{name}_std"] = float(bands[..., k].std())
    chroma = bands.max(axis=2) - bands.min(axis=2)
    features["chroma_mean"] = float(chroma.mean())
    features["chroma_std"] = float(chroma.std())
    by_sector = np.zeros(6)
    for (y, x), c in np.ndenumerate(chroma):
        if c:
            by_sector[hue_sector(*bands[y, x])] += c
    sectors = ("red_yellow", "yellow_green", "green_cyan", "cyan_blue", "blue_magenta", "magenta_red")
    for k, name in enumerate(sectors):
        features[f"hue_{name}"] = by_sector[k] / chroma.sum() if chroma.sum() else 0.0
    gray = gray_of(image).astype(np.int64)
    dx = (gray[:-1, 1:] - gray[:-1, :-1]).ravel()
    dy = (gray[1:, :-1] - gray[:-1, :-1]).ravel()
    magnitude = np.abs(dx) + np.abs(dy)
    edges = [0, 2, 4, 8, 16, 32, 10**9]
    names = ["0_1", "2_3", "4_7", "8_15", "16_31", "32_up"]
    for low, high, name in zip(edges, edges[1:], names):
        features[f"gradient_{name}"] = np.mean((magnitude >= low) & (magnitude < high)) if len(magnitude) else 0.0
    horizontal = np.abs(dx) > 2 * np.abs(dy)
    vertical = np.abs(dy) > 2 * np.abs(dx)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx > 0) == (dy > 0)
    orientation = sorted([magnitude[horizontal].sum(), magnitude[vertical].sum(),
                          magnitude[diagonal & same_sign].sum(), magnitude[diagonal & ~same_sign].sum()],
                         reverse=True)
    for k, name in enumerate(("1st", "2nd", "3rd", "4th")):
        features[f"orientation_{name}"] = orientation[k] / magnitude.sum() if magnitude.sum() else 0.0
    features["gradient_mean"] = float(magnitude.mean()) if len(magnitude) else 0.0
    s = COARSE_STEP
    across = np.abs(gray[:, s:] - gray[:, :-s]) if width > s else np.zeros(0)
    down = np.abs(gray[s:, :] - gray[:-s, :]) if height > s else np.zeros(0)
    pairs = across.size + down.size
    features["coarse_contrast"] = (across.sum() + down.sum()) / pairs if pairs else 0.0
    return features


def test_feature_names_are_what_the_oracle_computes():
    image = np.zeros((3, 3), np.uint8)
    assert list(oracle(image, histogram_of(image), 0)) == list(FEATURE_NAMES)


def test_a_tile_worked_out_by_hand():
    # Row 0: pure red, green, blue 200; row 1: gray 10. Gray levels by the contract's BT.601:
    # red 200 -> (9798*200 + 16384) >> 15 = 60, green 200 -> 117, blue 200 -> 23, gray 10 -> 10.
    image = np.array([[(200, 0, 0), (0, 200, 0), (0, 0, 200)], [(10, 10, 10)] * 3], np.uint8)
    histogram = np.zeros(256, np.int64)
    histogram[[10, 23, 60, 117]] = [3, 1, 1, 1]
    assert np.array_equal(histogram, histogram_of(image))
    got = dict(zip(FEATURE_NAMES, batch_features([image], histogram[None], np.array([3]))[0]))
    expected = {
        "edge_density": 0.5,
        "gray_entropy": 0.5 + 0.5 * math.log2(6),  # shares 1/2, 1/6, 1/6, 1/6
        "gray_p10": 10, "gray_p50": 10, "gray_p90": 117,
        "red_mean": 230 / 6, "green_mean": 230 / 6, "blue_mean": 230 / 6,  # 200 + 3 * 10
        "chroma_mean": 100.0, "chroma_std": 100.0,  # chroma 200, 200, 200, 0, 0, 0
        "hue_red_yellow": 1 / 3, "hue_yellow_green": 0.0, "hue_green_cyan": 1 / 3,
        "hue_cyan_blue": 0.0, "hue_blue_magenta": 1 / 3, "hue_magenta_red": 0.0,
        # two gradient positions: (dx, dy) = (117 - 60, 10 - 60) = (57, -50), magnitude 107, falling
        # diagonal; (23 - 117, 10 - 117) = (-94, -107), magnitude 201, rising diagonal
        "gradient_0_1": 0.0, "gradient_2_3": 0.0, "gradient_4_7": 0.0, "gradient_8_15": 0.0,
        "gradient_16_31": 0.0, "gradient_32_up": 1.0,
        "orientation_1st": 201 / 308, "orientation_2nd": 107 / 308, "orientation_3rd": 0.0, "orientation_4th": 0.0,
        "gradient_mean": 154.0,
        "coarse_contrast": 0.0,  # nothing 4 pixels apart in a 2 x 3 tile
    }
    red_std = math.sqrt(np.var([200, 0, 0, 10, 10, 10]))
    expected |= {"red_std": red_std, "green_std": red_std, "blue_std": red_std}
    for name in FEATURE_NAMES:
        assert got[name] == pytest.approx(expected[name], rel=1e-14, abs=1e-14), name


def test_hue_sectors_follow_colorsys_including_ties():
    levels = [0, 1, 100, 254, 255]
    pixels = np.array([p for p in itertools.product(levels, repeat=3) if max(p) > min(p)], np.uint8)
    for pixel in pixels:
        image = pixel.reshape(1, 1, 3)
        got = batch_features([image], histogram_of(image)[None], np.array([0]))[0]
        sectors = got[FEATURE_NAMES.index("hue_red_yellow"):FEATURE_NAMES.index("hue_magenta_red") + 1]
        assert list(sectors) == [float(k == hue_sector(*pixel)) for k in range(6)], pixel


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(images(max_side=40), min_size=1, max_size=5), st.data())
def test_batch_features_match_the_plain_oracle(batch, data):
    histograms = np.stack([histogram_of(image) for image in batch])
    edge_counts = np.array([data.draw(st.integers(0, image.shape[0] * image.shape[1])) for image in batch])
    got = batch_features(batch, histograms, edge_counts)
    assert got.shape == (len(batch), len(FEATURE_NAMES)) and got.dtype == np.float64
    assert np.all((got >= 0) & (got <= FEATURE_BOUND))  # what a model's score bound relies on
    for row, image, histogram, edges in zip(got, batch, histograms, edge_counts):
        expected = oracle(image, histogram, int(edges))
        for name, value in zip(FEATURE_NAMES, row):
            assert value == pytest.approx(expected[name], rel=1e-12, abs=1e-12), (name, image.shape)
        # a batch is only a convenience: each image alone gives the same bytes, and so does
        # reading it in strips of any number of rows
        alone = batch_features([image], histogram[None], np.array([edges]))[0]
        assert alone.tobytes() == row.tobytes()
        strips = data.draw(st.sampled_from([1, 5, 64, 200]))
        assert batch_features([image], histogram[None], np.array([edges]), strip_pixels=strips).tobytes() == \
            row.tobytes()


@settings(max_examples=examples(30), deadline=None)
@given(images(max_side=40, rgb=False))
def test_a_gray_image_counts_as_three_equal_bands(image):
    histogram = histogram_of(image)[None]
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    gray_features = batch_features([image], histogram, np.array([1]))
    assert gray_features.tobytes() == batch_features([rgb], histogram, np.array([1])).tobytes()
    chroma = FEATURE_NAMES.index("chroma_mean")
    assert not np.any(gray_features[0, chroma:chroma + 8])  # no chroma, no hue


def test_the_feature_bound_is_reached_and_never_passed():
    """A model's scores are bounded, when it is loaded, with every feature in 0..FEATURE_BOUND: a
    checkerboard of 0 and 255 has the steepest gradients there are, and reaches it exactly."""
    board = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    batch = [board, np.dstack([board, 255 - board, board]), np.full((3, 3, 3), 255, np.uint8)]
    histograms = np.stack([histogram_of(image) for image in batch])
    got = batch_features(batch, histograms, np.array([16 * 16, 16 * 16, 9]))
    assert got.min() >= 0 and got.max() == FEATURE_BOUND
    assert got[0, FEATURE_NAMES.index("gradient_mean")] == FEATURE_BOUND


@pytest.mark.parametrize("seed, darkest, rows", [(5, 200, 3), (6, 250, 2)], ids=["mid-gray", "near-white"])
def test_long_rows_are_summed_exactly(seed, darkest, rows):
    """Sums run in int32 stretches; a row far longer than a stretch must still be exact. A stretch of
    16,384 pixels keeps its sums of squares in int32 (255^2 * 16384 < 2^31); 33,026 pixels of 255
    would not. A row of 40,000 near-white pixels (one strip) overflows any stretch longer than about
    33,700 of them: the mid-gray row only from about 41,500."""
    image = np.random.default_rng(seed).integers(darkest, 256, (rows, 40_000, 3), dtype=np.uint8)
    got = dict(zip(FEATURE_NAMES, batch_features([image], histogram_of(image)[None], np.array([0]))[0]))
    expected = oracle(image, histogram_of(image), 0)
    for name in FEATURE_NAMES:
        assert got[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name


def test_entropy_of_counts_on_both_sides_of_the_lookup_table():
    """c * log2(c) is looked up for small bin counts and computed for large ones: both must be right."""
    size = ENTROPY_TABLE_SIZE
    counts = [1, 2, size - 1, size, size + 1, 3 * size]
    image = np.repeat(np.arange(len(counts), dtype=np.uint8) * 40, counts)[None, :]
    histogram = histogram_of(image)
    assert sorted(histogram[histogram > 0]) == counts
    got = batch_features([image], histogram[None], np.array([0]))[0, FEATURE_NAMES.index("gray_entropy")]
    assert got == pytest.approx(oracle(image, histogram, 0)["gray_entropy"], rel=1e-13)


def test_empty_batch():
    assert batch_features([], np.zeros((0, 256), np.int64), np.zeros(0, np.int64)).shape == (0, len(FEATURE_NAMES))


def test_the_serial_kernel_gives_the_same_bytes(monkeypatch):
    """Used where the threading layer must not be entered from two Python threads at once."""
    from gpu_pipeline.backends import _numba_setup

    rng = np.random.default_rng(3)
    batch = [rng.integers(0, 256, (13, 9, 3), dtype=np.uint8) for _ in range(4)] + [np.full((5, 70), 9, np.uint8)]
    histograms = np.stack([histogram_of(image) for image in batch])
    edge_counts = np.arange(len(batch))
    parallel = batch_features(batch, histograms, edge_counts)
    monkeypatch.setattr(_numba_setup, "threading_layer_is_threadsafe", lambda: False)
    assert batch_features(batch, histograms, edge_counts).tobytes() == parallel.tobytes()


@pytest.mark.parametrize("requested, loadable, safe", [
    ("default", {"omp"}, True), ("threadsafe", {"omp"}, True), ("safe", {"tbb"}, True), ("omp", {"omp"}, True),
    ("safe", {"omp"}, False),  # numba's "safe" is tbb alone
    ("tbb", {"omp"}, False), ("omp", {"tbb"}, False),  # (a Mac with tbb installed, not libomp: omp asked for)
    ("omp", set(), False), ("threadsafe", set(), False), ("default", set(), False),
    ("workqueue", {"omp", "tbb"}, False)])
def test_a_requested_layer_counts_as_thread_safe_only_when_it_can_load(requested, loadable, safe, monkeypatch):
    """A layer that cannot load (numba's macOS wheels without libomp, a Linux without libtbb) would
    make numba raise at the first prange kernel; the serial twins run instead."""
    import numba

    from gpu_pipeline.backends import _numba_setup

    monkeypatch.setattr(_numba_setup, "_launched_layer", lambda: None)
    monkeypatch.setattr(_numba_setup, "_layer_loads", lambda name: name in loadable)
    monkeypatch.setattr(numba.config, "THREADING_LAYER", requested)
    assert _numba_setup.threading_layer_is_threadsafe() is safe


# numba's omp and tbb pools made unloadable, as on a Mac without libomp: the layer asked for cannot start.
_WITHOUT_THREADSAFE_LAYERS = """
import importlib.abc, sys
import numpy as np

class NoLibrary(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("numba.np.ufunc.omppool", "numba.np.ufunc.tbbpool"):
            raise ImportError("no libomp, no libtbb")

sys.meta_path.insert(0, NoLibrary())
from gpu_pipeline.labels.features import batch_features
rng = np.random.default_rng(3)
batch = [rng.integers(0, 256, (13, 9, 3), dtype=np.uint8) for _ in range(4)]
histograms = np.stack([np.bincount(image.reshape(-1), minlength=256) for image in batch])
sys.stdout.write(batch_features(batch, histograms, np.arange(4)).tobytes().hex())
"""


@pytest.mark.parametrize("layer", ["omp", "safe"])
def test_a_requested_layer_that_cannot_load_gives_the_same_bytes(layer):
    """NUMBA_THREADING_LAYER=omp on a Mac without libomp, or =safe (tbb) without libtbb, ended the
    run with numba's 'No threading layer could be loaded' traceback at the first model label."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_THREADING_LAYER": layer}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_THREADSAFE_LAYERS], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rng = np.random.default_rng(3)
    batch = [rng.integers(0, 256, (13, 9, 3), dtype=np.uint8) for _ in range(4)]
    histograms = np.stack([np.bincount(image.reshape(-1), minlength=256) for image in batch])
    assert bytes.fromhex(done.stdout) == batch_features(batch, histograms, np.arange(4)).tobytes()


@pytest.mark.parametrize("width, bound", [(64, 1.1e6), (4096, 1.1e6), (16384, 3e6), (65536, 3e6)])
def test_the_scratch_memory_is_bounded_whatever_the_height(width, bound, monkeypatch):
    """labels.md: the kernel reads an image in strips of whole rows, so its scratch arrays stay about
    1 MB up to 4,096 pixels wide and under 3 MB up to 65,536, however tall the image. The strip is
    what batch_features hands the kernel; the arrays are the ones the kernel makes for it."""
    from gpu_pipeline.backends import _numba_setup
    from gpu_pipeline.labels import features

    scratch = []

    def recording(images, histograms, edge_counts, strip_rows, c_log2_c, out):
        _, height, image_width, _ = images.shape
        arrays = features._scratch(image_width, features._strip_rows(height, strip_rows))
        scratch.append(sum(array.nbytes for array in arrays))
        features._stack_features_serial(images, histograms, edge_counts, strip_rows, c_log2_c, out)

    monkeypatch.setattr(_numba_setup, "parallel_or_serial", lambda parallel, serial: recording)
    height = max(8, (1 << 20) // width)  # many strips tall (a 1-MP gray image)
    image = np.zeros((height, width), np.uint8)
    batch_features([image], histogram_of(image)[None], np.array([0]))
    assert len(scratch) == 1 and scratch[0] < bound


def test_a_lone_image_of_its_shape_is_not_copied():
    """labels.md: a large scene alone in its shape goes to the kernel as it is (a copy would double
    its memory); images that share a shape are stacked."""
    from gpu_pipeline.labels.features import _stacked

    scene = np.zeros((300, 200, 3), np.uint8)
    assert np.shares_memory(_stacked([scene]), scene) and _stacked([scene]).shape == (1, 300, 200, 3)
    gray = np.zeros((30, 20), np.uint8)
    assert np.shares_memory(_stacked([gray]), gray) and _stacked([gray]).shape == (1, 30, 20, 1)
    pair = _stacked([gray, gray + 1])
    assert pair.shape == (2, 30, 20, 1) and pair[1].max() == 1
