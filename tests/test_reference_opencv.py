"""The NumPy reference (cpu_reference) is byte-equal to OpenCV, stage by stage (docs/contract.md).

OpenCV is the oracle: every stage is compared with the cv2 call that defines it, on the sample data,
on hypothesis images (odd shapes, constant, two-level, noise) and on threshold corner cases.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cpu_reference as ref
from cpu_reference.stages import canny_thresholds, hysteresis, reflect101
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.inputs.decode import decode_image
from gpu_pipeline.inputs.discover import discover
from tests.strategies import examples, images, ODD_SHAPES

# --- the oracle: each stage as the OpenCV call that defines it --------------------------------


def cv_gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def cv_histogram(gray: np.ndarray) -> np.ndarray:
    return cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.int64)


def cv_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    return cv2.GaussianBlur(image, (ksize, ksize), 0)


def cv_sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return tuple(
        cv2.Sobel(image, cv2.CV_16S, dx, dy, ksize=3, borderType=cv2.BORDER_REPLICATE).astype(np.int32)
        for dx, dy in ((1, 0), (0, 1))
    )


def cv_canny(image: np.ndarray, low: float, high: float, l2_gradient: bool) -> np.ndarray:
    """OpenCV's own Canny, without IPP (IPP rounds some fractional thresholds otherwise: see
    docs/contract.md and ``test_opencv_paths_agree``). The switch holds for the calling thread."""
    cv2.ipp.setUseIPP(False)
    return cv2.Canny(image, low, high, apertureSize=3, L2gradient=l2_gradient)


def cv_pipeline(image: np.ndarray, config: PipelineConfig) -> ref.PipelineStages:
    """The contract as chained cv2 calls."""
    gray = cv_gray(image)
    equalized = cv2.equalizeHist(gray)
    blurred = cv_blur(equalized, config.blur_ksize)
    edges = cv_canny(blurred, config.low_threshold, config.high_threshold, config.l2_gradient)
    return ref.PipelineStages(gray, cv_histogram(gray), equalized, blurred, edges, cv2.countNonZero(edges))


def difference(ours, theirs) -> str | None:
    """None when byte-equal (dtype and shape included), else a short description."""
    if isinstance(theirs, int):
        return None if type(ours) is int and ours == theirs else f"{ours!r} != {theirs!r}"
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return f"{ours.dtype}{ours.shape} != {theirs.dtype}{theirs.shape}"
    differ = np.argwhere(ours != theirs)
    if differ.size == 0:
        return None
    first = tuple(int(i) for i in differ[0])
    return f"{len(differ)} of {ours.size} differ, first at {first}: {ours[first]} != {theirs[first]}"


def assert_same(ours, theirs, what: str = "") -> None:
    problem = difference(ours, theirs)
    assert problem is None, f"{what}: {problem}"


def pipeline_differences(image: np.ndarray, config: PipelineConfig) -> list[str]:
    """Every stage of process_image that is not byte-equal to the chained cv2 calls."""
    ours, theirs = ref.process_image(image, config), cv_pipeline(image, config)
    problems = [f"{stage}: {difference(a, b)}" for stage, a, b in zip(ours._fields, ours, theirs)
                if difference(a, b) is not None]
    for axis, a, b in zip("xy", ref.sobel(theirs.blurred), cv_sobel(theirs.blurred)):
        if difference(a, b) is not None:
            problems.append(f"sobel d{axis}: {difference(a, b)}")
    return problems


#: Configurations every sample image runs through: each blur size, both norms, a swap, a tie.
CONFIGS = [
    PipelineConfig(),
    PipelineConfig(low_threshold=30, high_threshold=90, l2_gradient=True, blur_ksize=3),
    PipelineConfig(low_threshold=120, high_threshold=40.5, blur_ksize=7),
    PipelineConfig(low_threshold=70.7, high_threshold=70.7, l2_gradient=True, blur_ksize=5),
]


# --- (a) the sample data ----------------------------------------------------------------------


def corpus_differences(root: Path) -> tuple[list[Path], list[str]]:
    paths = discover([root])
    problems = []
    for path in paths:
        image = decode_image(path, DecodeOptions())
        for config in CONFIGS:
            problems += [f"{path.relative_to(root)} {config}: {p}" for p in pipeline_differences(image, config)]
    return paths, problems


def test_bundled_data_matches_opencv(bundled_data_dir):
    if not bundled_data_dir.is_dir() or not discover([bundled_data_dir]):
        pytest.skip(f"no images under {bundled_data_dir} yet")
    paths, problems = corpus_differences(bundled_data_dir)
    assert not problems, f"{len(problems)} mismatches over {len(paths)} images:\n" + "\n".join(problems[:20])


def test_shared_data_matches_opencv(shared_data_dir):
    paths, problems = corpus_differences(shared_data_dir)
    assert len(paths) >= 1000, f"expected the 1026 sample files, found {len(paths)}"
    assert not problems, f"{len(problems)} mismatches over {len(paths)} images:\n" + "\n".join(problems[:20])


# --- (b) hypothesis images and the odd shapes -------------------------------------------------

THRESHOLDS = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 50.0, 255.0, 1020.0, 1442.0, 2040.0, 2041.0, 32767.0, 40000.0]),
    st.floats(0, 2100, allow_nan=False),
)
BLUR_SIZES = st.sampled_from([3, 5, 7])


@settings(max_examples=examples(60), deadline=None)
@given(images(rgb=True))
def test_gray_matches_opencv(image):
    assert_same(ref.gray(image), cv_gray(image), "gray")


@settings(max_examples=examples(10), deadline=None)
@given(images(rgb=False))
def test_gray_image_passes_through(image):
    assert_same(ref.gray(image), image, "gray of gray")


@pytest.mark.parametrize("shape", [(4096, 4096), (2**24, 1)], ids=["wide", "one-pixel-wide"])
def test_gray_matches_opencv_on_every_colour(shape):
    """contract.md: in wide images (OpenCV's SIMD path) and in 1-pixel-wide ones (its scalar tails)."""
    every = np.arange(2**24, dtype=np.uint32)
    rgb = np.stack([every >> 16, (every >> 8) & 255, every & 255], axis=-1).astype(np.uint8)
    rgb = rgb.reshape(*shape, 3)
    assert_same(ref.gray(rgb), cv_gray(rgb), f"gray over all 2**24 colours, {shape}")


def test_the_contracts_worked_numbers():
    """docs/contract.md: the 14-bit gray of OpenCV 4 (and DESIGN.md) differs from the contract's on
    43,864 of the 2^24 colours, by +-1; L2 with low = 31.9 compares ``m > 1017``."""
    every = np.arange(2**24, dtype=np.int64)
    red, green, blue = every >> 16, (every >> 8) & 255, every & 255
    rgb = np.stack([red, green, blue], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    ours = ref.gray(rgb).astype(np.int64).ravel()
    opencv4 = (4899 * red + 9617 * green + 1868 * blue + 8192) >> 14
    assert (np.count_nonzero(ours != opencv4), int(np.abs(ours - opencv4).max())) == (43_864, 1)
    assert canny_thresholds(31.9, 64.5, True) == (1017, 4160)


@settings(max_examples=examples(60), deadline=None)
@given(images(rgb=False))
def test_histogram_and_equalize_match_opencv(gray):
    assert_same(ref.histogram(gray), cv_histogram(gray), "histogram")
    assert_same(ref.equalize(gray), cv2.equalizeHist(gray), "equalize")


@pytest.mark.parametrize("counted, half", [(14, 7), (82, 41), (126, 63), (202, 101)])
def test_equalize_rounds_in_float32(counted, half):
    """``half * 255 / counted`` is exactly 127.5: exact arithmetic rounds it to 128, OpenCV's float32
    scale lands just below and gives 127. One pixel at 0 (the first bin), then two levels."""
    gray = np.array([[0] + [10] * half + [20] * (counted - half)], np.uint8)
    assert int(np.rint(half * 255 / counted)) != cv2.equalizeHist(gray)[0, 1]  # the case still bites
    assert_same(ref.equalize(gray), cv2.equalizeHist(gray), "equalize")


def test_equalize_matches_opencv_beyond_float32_exact_counts():
    # More than 2**24 pixels: the running sum no longer converts to float32 exactly.
    rng = np.random.default_rng(20240801)
    gray = np.minimum(rng.geometric(0.02, (4500, 4500)), 255).astype(np.uint8)
    assert_same(ref.equalize(gray), cv2.equalizeHist(gray), "equalize of 20 Mpx")


@settings(max_examples=examples(60), deadline=None)
@given(images(rgb=False), BLUR_SIZES)
def test_gaussian_blur_matches_opencv(image, ksize):
    assert_same(ref.gaussian_blur(image, ksize), cv_blur(image, ksize), f"blur {ksize}")


@settings(max_examples=examples(60), deadline=None)
@given(images(rgb=False))
def test_sobel_matches_opencv(image):
    for axis, ours, theirs in zip("xy", ref.sobel(image), cv_sobel(image)):
        assert_same(ours, theirs, f"sobel d{axis}")


@settings(max_examples=examples(100), deadline=None)
@given(images(rgb=False), BLUR_SIZES, THRESHOLDS, THRESHOLDS, st.booleans())
def test_canny_matches_opencv(image, ksize, low, high, l2_gradient):
    blurred = cv_blur(image, ksize)  # hypothesis images are often noise; blurred ones have real edges
    for source in (image, blurred):
        assert_same(ref.canny(source, low, high, l2_gradient), cv_canny(source, low, high, l2_gradient),
                    f"canny({low}, {high}, l2={l2_gradient})")


@settings(max_examples=examples(60), deadline=None)
@given(images(), BLUR_SIZES, THRESHOLDS, THRESHOLDS, st.booleans())
def test_process_image_matches_chained_opencv(image, ksize, low, high, l2_gradient):
    config = PipelineConfig(low, high, l2_gradient, ksize)
    assert pipeline_differences(image, config) == []


def odd_image(shape: tuple[int, int], kind: str) -> np.ndarray:
    rng = np.random.default_rng(sum(shape))
    if kind == "constant":
        return np.full(shape, 200, np.uint8)
    if kind == "two-level":
        return np.where(rng.random(shape) < 0.5, 10, 240).astype(np.uint8)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", sorted(set(ODD_SHAPES) | {(1, 2), (2, 1), (2, 3), (4, 4), (6, 6)}))
@pytest.mark.parametrize("kind", ["noise", "constant", "two-level"])
def test_odd_shapes_match_opencv(shape, kind):
    image = odd_image(shape, kind)
    for config in CONFIGS:
        assert pipeline_differences(image, config) == [], config
        for ksize in (3, 5, 7):  # the raw image too, not only the equalized one
            assert_same(ref.gaussian_blur(image, ksize), cv_blur(image, ksize), f"blur {ksize}")
        assert_same(ref.canny(image, config.low_threshold, config.high_threshold, config.l2_gradient),
                    cv_canny(image, config.low_threshold, config.high_threshold, config.l2_gradient), "canny")


def test_blur_matches_opencv_on_every_small_shape():
    """contract.md: reflect-101 applied repeatedly on images smaller than the kernel, "checked for
    every shape from 1x1 to 11x11 ... and all three k"; k = 7 on a 2-pixel-wide row reads columns
    ``1 0 1 0 1 0 1`` around column 0."""
    rng = np.random.default_rng(3)
    for height in range(1, 12):
        for width in range(1, 12):
            image = rng.integers(0, 256, (height, width), dtype=np.uint8)
            for ksize in (3, 5, 7):
                assert_same(ref.gaussian_blur(image, ksize), cv_blur(image, ksize), f"blur {ksize}, {height}x{width}")
    assert reflect101(np.arange(-3, 4), 2).tolist() == [1, 0, 1, 0, 1, 0, 1]


# --- (c) thresholds -----------------------------------------------------------------------------


def scene(height: int = 96, width: int = 128) -> np.ndarray:
    """A synthetic gray scene: shaded background, rectangles, a disc, a line and noise, blurred."""
    rng = np.random.default_rng(7)
    rows, cols = np.mgrid[0:height, 0:width]
    image = (rows + cols).astype(np.float64)
    image[20:60, 15:50] = 200
    image[50:90, 70:120] = 40
    image[(rows - 30) ** 2 + (cols - 95) ** 2 < 15**2] = 150
    image[np.abs(rows - 0.6 * cols - 10) < 1] = 250
    image += rng.normal(0, 6, image.shape)
    return cv_blur(np.clip(image, 0, 255).astype(np.uint8), 3)


#: (low, high) pairs at the corners of cv2.Canny's threshold handling.
THRESHOLD_CASES = {
    "typical": (50, 150),
    "equal": (80, 80),
    "low above high (swapped)": (150, 50),
    "zero": (0, 0),
    "zero low": (0, 100),
    "fractional": (31.9, 64.5),
    "fractional, floor decides": (40.999, 41.0),
    "fractional, float32 would round up": (163.999999999, 193.999999999),
    "fractional, L2 square just above an integer": (111.08555261599052, 114.08555261599052),
    "above the largest L1 gradient": (2041, 3000),
    "at the largest L1 gradient": (2039, 2040),
    "above the largest L2 gradient": (1443, 1500),
    "above the L2 clamp": (32767.5, 40000),
    # unclamped, 46341 ** 2 is past 2**31 - 1: an int overflow that would make every peak strong
    "far above the L2 clamp": (20, 46341),
}


@pytest.mark.parametrize("case", THRESHOLD_CASES)
@pytest.mark.parametrize("l2_gradient", [False, True])
@pytest.mark.parametrize("ksize", [3, 5, 7])
def test_thresholds_match_opencv(case, l2_gradient, ksize):
    low, high = THRESHOLD_CASES[case]
    config = PipelineConfig(low, high, l2_gradient, ksize)
    for image in (scene(), odd_image((40, 50), "noise")):
        assert pipeline_differences(image, config) == [], config


@pytest.mark.parametrize("low, high", [(10, 2.0**31), (1e12, 1e12), (-1, 10), (float("nan"), 10)])
def test_config_refuses_thresholds_outside_the_contract(low, high):
    with pytest.raises(ValueError, match="threshold must be between 0 and"):
        PipelineConfig(low, high)


def test_scene_has_edges_to_compare():
    """Guards the threshold tests against comparing two empty edge maps."""
    edges = cv_canny(scene(), 50, 150, False)
    assert 0.01 < np.count_nonzero(edges) / edges.size < 0.3


def test_long_weak_chain_is_followed_from_its_strong_end():
    """Hysteresis along a spiral line whose contrast fades from +120 to +10: a few dozen strong
    pixels at the centre, hundreds of weak ones along the arms."""
    image = np.full((160, 160), 100, np.uint8)
    angles = np.linspace(0, 8 * np.pi, 3000)
    radius = 4 + 2.8 * angles
    points = np.stack([80 + radius * np.cos(angles), 80 + radius * np.sin(angles)], axis=1).round()
    for i, (start, end) in enumerate(zip(points[:-1].astype(int), points[1:].astype(int))):
        cv2.line(image, tuple(map(int, start)), tuple(map(int, end)), 220 - 110 * i // len(points), 1)
    for l2_gradient, (low, high) in ((False, (30, 600)), (True, (30, 400))):
        ours, theirs = ref.canny(image, low, high, l2_gradient), cv_canny(image, low, high, l2_gradient)
        assert_same(ours, theirs, f"spiral, l2={l2_gradient}")
        assert np.count_nonzero(theirs) > 200  # the flood really travelled


def test_hysteresis_is_reachability():
    path = np.zeros((7, 9), bool)
    path[1, 1:8] = path[1:6, 7] = True  # an L-shaped weak path
    blob = np.zeros_like(path)
    blob[5, 1:3] = True  # weak, but touching neither the path nor the strong pixel
    strong = np.zeros_like(path)
    strong[0, 0] = True  # diagonal to the path's end only
    assert_same(hysteresis(strong, path | blob), strong | path, "reachability")


FRACTIONAL = [PipelineConfig(*THRESHOLD_CASES["fractional, float32 would round up"]),
              PipelineConfig(*THRESHOLD_CASES["fractional, L2 square just above an integer"], l2_gradient=True)]


def test_opencv_paths_agree():
    """The oracle (OpenCV without IPP) is the same single- and multi-threaded, fractional
    thresholds included: the parity tests do not depend on the machine's cores."""
    images = [scene(), odd_image((64, 65), "noise"), odd_image((5, 7), "two-level"), odd_image((30, 34), "noise")]
    threads = cv2.getNumThreads()
    try:
        outputs = []
        for count in (1, 4):
            cv2.setNumThreads(count)
            outputs.append([cv_pipeline(image, config) for image in images for config in CONFIGS + FRACTIONAL])
    finally:
        cv2.setNumThreads(threads)
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            for stage, x, y in zip(a._fields, a, b):
                assert difference(x, y) is None, stage
