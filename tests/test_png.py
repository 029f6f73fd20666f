"""The edge maps' PNG writer (gpu_pipeline.outputs.png): what Pillow and OpenCV read back from it.

The oracles are the two readers, independent of the writer: each file must decode to the very
pixels written, with the text chunks ``png_texts`` reads, whatever the shape.
"""

import zlib

import cv2
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from gpu_pipeline.outputs import png
from gpu_pipeline.outputs.files import png_texts
from gpu_pipeline.outputs.png import gray_png


def read_back(path):
    """(Pillow's pixels, OpenCV's pixels, Pillow's mode) of the PNG at ``path``."""
    with Image.open(path) as image:
        image.load()
        mode, pillow = image.mode, np.asarray(image)
    return pillow, cv2.imread(str(path), cv2.IMREAD_UNCHANGED), mode


shapes = st.tuples(st.integers(1, 40), st.integers(1, 40)) | st.sampled_from([(1, 1), (1, 300), (300, 1)])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shape=shapes)
def test_any_gray_image_reads_back_as_written_in_pillow_and_opencv(tmp_path_factory, data, shape):
    pixels = data.draw(arrays(np.uint8, shape) | st.just(np.full(shape, 255, np.uint8)))
    path = tmp_path_factory.mktemp("png") / "map.png"
    path.write_bytes(gray_png(pixels))
    pillow, opencv, mode = read_back(path)
    assert mode == "L" and pillow.dtype == np.uint8 and np.array_equal(pillow, pixels)
    assert opencv.dtype == np.uint8 and np.array_equal(opencv, pixels)


def test_text_chunks_come_before_the_pixels_and_read_back(tmp_path):
    """``png_texts`` reads the chunks before the pixels: Software (tEXt) and a Source outside Latin-1 (iTXt)."""
    source = "/data/Ωmega/路径 x.jpg"
    path = tmp_path / "map.png"
    path.write_bytes(gray_png(np.eye(5, dtype=np.uint8) * 255, text={"Software": "gpu-pipeline 9"},
                              international={"Source": source}))
    assert png_texts(path) == {"Software": "gpu-pipeline 9", "Source": source}
    data = path.read_bytes()
    assert data.index(b"tEXt") < data.index(b"iTXt") < data.index(b"IDAT") < data.index(b"IEND")


def test_every_chunk_has_its_length_and_crc(tmp_path):
    """Walk the chunks as a strict reader does: each CRC is the one of its type and data."""
    data = gray_png(np.arange(60, dtype=np.uint8).reshape(6, 10), text={"Software": "x"}, international={"Source": "y"})
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, kinds = 8, []
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        assert int.from_bytes(data[at + 8 + length:at + 12 + length], "big") == zlib.crc32(kind + body)
        kinds.append(kind)
        at += 12 + length
    assert at == len(data) and kinds == [b"IHDR", b"tEXt", b"iTXt", b"IDAT", b"IEND"]


def test_pixels_split_over_several_idat_chunks_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(png, "IDAT_BYTES", 7)
    pixels = np.random.default_rng(3).integers(0, 256, (23, 31), dtype=np.uint8)
    data = gray_png(pixels)
    assert data.count(b"IDAT") > 3
    path = tmp_path / "map.png"
    path.write_bytes(data)
    pillow, opencv, _ = read_back(path)
    assert np.array_equal(pillow, pixels) and np.array_equal(opencv, pixels)


@pytest.mark.parametrize("pixels", [np.zeros((0, 4), np.uint8), np.zeros((4, 0), np.uint8), np.zeros((3, 3, 3), np.uint8),
                                    np.zeros((3, 3), np.uint16), np.zeros(5, np.uint8)])
def test_anything_but_a_non_empty_gray_uint8_image_is_refused(pixels):
    with pytest.raises(ValueError, match="non-empty 2-D uint8"):
        gray_png(pixels)


@pytest.mark.parametrize("keyword", ["", "x" * 80, "a\0b", "Ω", " Source", "Source ", "So  urce"])
def test_a_keyword_png_cannot_hold_is_refused(keyword):
    with pytest.raises(ValueError):
        gray_png(np.zeros((2, 2), np.uint8), text={keyword: "v"})
    gray_png(np.zeros((2, 2), np.uint8), text={"x" * 79: "v", "So urce": "v"})  # the longest, a single space


@pytest.mark.parametrize("text, international", [({"Software": "a\0b"}, {}), ({}, {"Source": "a\0b"}),
                                                 ({"Software": "Ω"}, {})])
def test_a_text_png_cannot_hold_is_refused(text, international):
    with pytest.raises(ValueError):
        gray_png(np.zeros((2, 2), np.uint8), text=text, international=international)
