"""Images over a megapixel, checked against independent oracles (OpenCV itself, NumPy's percentiles).

Work on such images is split in blocks of rows (about a megapixel each) in several places; an
image of one block cannot show a bug in how the blocks are combined.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import tifffile

from gpu_pipeline.backends import registry
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.inputs.decode import decode_image

MEGAPIXEL = 1 << 20


def percentile_stretch(band: np.ndarray, stretch: str) -> np.ndarray:
    """inputs/normalise.py's documented stretch, written from its docstring with NumPy's own percentiles."""
    if stretch == "minmax":
        lo, hi = int(band.min()), int(band.max())
    else:
        lo = int(np.percentile(band, 2, method="lower"))
        hi = int(np.percentile(band, 98, method="higher"))
    c = np.clip(band.astype(np.int64), lo, hi)
    return ((c - lo) * 255 + (hi - lo) // 2) // (hi - lo)


def two_part_uint16(height: int = 1100, width: int = 1000) -> np.ndarray:
    """Most rows span a wide range; the last rows (the last block of rows) a narrow, low one."""
    rng = np.random.default_rng(16)
    band = rng.integers(1000, 60000, (height, width), dtype=np.uint16)
    band[-60:] = rng.integers(0, 500, (60, width), dtype=np.uint16)
    return band


@pytest.mark.parametrize("stretch", ["percentile", "minmax"])
def test_uint16_stretch_of_a_large_image_counts_every_row(tmp_path, stretch):
    band = two_part_uint16()
    assert band.size > MEGAPIXEL
    path = tmp_path / "large.tif"
    tifffile.imwrite(path, band)
    decoded = decode_image(path, DecodeOptions(stretch=stretch))
    expected = percentile_stretch(band, stretch).astype(np.uint8)
    assert decoded.dtype == np.uint8 and decoded.shape == band.shape
    assert np.array_equal(decoded, expected), f"{np.count_nonzero(decoded != expected)} pixels differ"


def opencv_pipeline(image: np.ndarray, config: PipelineConfig):
    """The contract's cv2 calls, chained."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    histogram = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    equalized = cv2.equalizeHist(gray)
    blurred = cv2.GaussianBlur(equalized, (config.blur_ksize, config.blur_ksize), 0)
    edges = cv2.Canny(blurred, config.low_threshold, config.high_threshold, apertureSize=3,
                      L2gradient=config.l2_gradient)
    return histogram, equalized, edges, cv2.countNonZero(edges)


def large_images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    rows, cols = np.mgrid[0:1024, 0:1280]
    scene = ((rows // 7 + cols // 11) % 256).astype(np.uint8)  # stripes: many edges, some texture
    rgb = np.stack([scene, scene[::-1], rng.integers(0, 256, scene.shape, dtype=np.uint8)], axis=2)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (1100, 1000), dtype=np.uint8), (31, 31), 0)
    stretched = percentile_stretch(two_part_uint16(), "percentile").astype(np.uint8)
    return [np.ascontiguousarray(rgb), smooth, stretched]


@pytest.mark.parametrize("name", ["numba", "reference"])
def test_large_images_match_opencv_itself(name):
    reason = registry.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    backend = registry.create(name)
    config = PipelineConfig()
    images = large_images()[:1] if name == "reference" else large_images()  # the reference is slow
    for index, (image, result) in enumerate(zip(images, backend.process(images, config, keep_images=True))):
        assert image.shape[0] * image.shape[1] > MEGAPIXEL
        histogram, equalized, edges, edge_count = opencv_pipeline(image, config)
        assert np.array_equal(result.histogram, histogram), f"image {index}: histogram"
        assert np.array_equal(result.equalized, equalized), f"image {index}: equalized"
        assert np.array_equal(result.edges, edges), f"image {index}: edges"
        assert result.edge_count == edge_count > 100, f"image {index}: edge_count"


def _decoding_memory_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "decoding_memory.py"
    spec = importlib.util.spec_from_file_location("decoding_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: One kind of each reader and of each of its branches that changes what it holds (docs/nightly.md, "Memory").
BUDGET_KINDS = ["jpeg-rgb", "jpeg-gray", "png-rgba", "png-palette", "webp-rgb", "jp2-rgb", "jp2-gray16",
                "tiff-gray-float32", "tiff-palette", "tiff-cmyk", "tiff-rgb16-zlib-tiled", "tiff-13band16-zlib",
                "tiff-13band-float32-zlib"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc (Linux)")
@pytest.mark.parametrize("kind", BUDGET_KINDS)
def test_what_a_large_image_asks_the_decoding_budget_covers_what_its_decoding_holds(tmp_path, kind):
    """The decoding budget bounds the memory of large images only if each asks at least what its
    decoding holds at its peak: 16 bytes a pixel for every image let a 13-band 16-bit TIFF (70 a
    pixel) take 4.4 times its share. Measured as ``scripts/decoding_memory.py`` measures it (the
    high-water mark of a fresh process), on 2-MP images whose files do not compress."""
    script = _decoding_memory_script()
    figures = script.measure(kind, tmp_path, 1448)
    assert figures["charged"] >= figures["peak"], figures
