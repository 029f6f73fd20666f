"""Discovery, decoding and normalisation (gpu_pipeline.inputs.decode).

Expected stretched values come from an independent oracle written here with exact rational
arithmetic (``fractions.Fraction``) and numpy's own percentile, not from the module's code.
"""

from __future__ import annotations

import builtins
import fnmatch
import io
import json
import math
import re
import stat
import struct
import zlib
from fractions import Fraction
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from gpu_pipeline.inputs import decode as gpu_io
from gpu_pipeline.inputs import tiff as tiff_io
from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.inputs.discover import IMAGE_EXTENSIONS, ListedPath, discover, find_files, folders_under
from gpu_pipeline.inputs.decode import DecodeError, decode_image
from gpu_pipeline.errors import UsageError
from tests.strategies import examples, images

DEFAULT = DecodeOptions()
FIXTURES = Path(__file__).parent / "fixtures"
HYPOTHESIS = settings(
    max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("io")


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def assert_one_line(error: DecodeError, stage: str) -> None:
    assert error.stage == stage
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message
    assert "<" not in message, f"object repr in message: {message}"


# --------------------------------------------------------------------------------------------
# The oracle: the module docstring's rule, written independently


def oracle_band(
    band: np.ndarray, valid: np.ndarray, stretch: str, where: np.ndarray | None = None
) -> np.ndarray:
    """Statistics over the valid samples; outputs for the valid ones (only those in ``where``)."""
    values = band[valid]
    out = np.zeros(band.shape, np.uint8)
    if values.size == 0:
        return out
    if stretch == "minmax":
        lo, hi = values.min(), values.max()
    else:
        lo = np.percentile(values, 2, method="lower")
        hi = np.percentile(values, 98, method="higher")
    for index in map(tuple, np.argwhere(valid if where is None else valid & where)):
        x = band[index]
        if lo == hi:
            out[index] = 255 if x > hi else 0
            continue
        c = min(max(x, lo), hi)
        if band.dtype.kind == "f":  # defined by float64 operations, done here one scalar at a time
            out[index] = math.floor((float(c) - float(lo)) / (float(hi) - float(lo)) * 255.0 + 0.5)
        else:  # exact: 255 (c - lo) / (hi - lo), halves rounded up
            out[index] = math.floor(Fraction(255 * (int(c) - int(lo)), int(hi) - int(lo)) + Fraction(1, 2))
    return out


def oracle(bands: np.ndarray, stretch: str = "percentile", nodata: float | None = None) -> np.ndarray:
    """(H, W, C) samples, already band-selected, to the expected uint8 (H, W) or (H, W, C)."""
    if bands.dtype == np.uint8:
        out = bands
    else:
        out = np.empty(bands.shape, np.uint8)
        for i in range(bands.shape[2]):
            band = bands[:, :, i]
            valid = np.isfinite(band) if band.dtype.kind == "f" else np.ones(band.shape, bool)
            if nodata is not None:
                valid &= band != nodata
            out[:, :, i] = oracle_band(band, valid, stretch)
    return out[:, :, 0] if out.shape[2] == 1 else out


# --------------------------------------------------------------------------------------------
# Discovery


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in [
        "b/2.png",
        "b/10.JPG",
        "a/x.tif",
        "a/y.TIFF",
        "a/z.jpeg",
        "a/w.bmp",
        "a/v.gif",
        "a/u.webp",
        "a/notes.txt",
        "a/raw.npy",
        "a/.hidden.png",
        ".cache/c.png",
        "a/sub/deep.png",
        "a-b/q.png",
    ]:
        touch(tmp_path / name)
    return tmp_path


def test_discover_walks_folders_recursively_sorted_by_path_components(tree: Path) -> None:
    found = [p.relative_to(tree).as_posix() for p in discover([tree])]
    assert found == [
        "a/sub/deep.png",
        "a/u.webp",
        "a/v.gif",
        "a/w.bmp",
        "a/x.tif",
        "a/y.TIFF",
        "a/z.jpeg",
        "a-b/q.png",
        "b/10.JPG",
        "b/2.png",
    ]


def test_discover_skips_hidden_files_and_folders_and_unknown_extensions(tree: Path) -> None:
    names = {p.name for p in discover([tree])}
    assert not names & {".hidden.png", "c.png", "notes.txt", "raw.npy"}


def test_known_extensions() -> None:
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".jp2", ".j2k", ".j2c"}


def test_explicit_file_is_taken_whatever_its_extension(tree: Path) -> None:
    assert discover([tree / "a/notes.txt"]) == [tree / "a/notes.txt"]


def test_discover_deduplicates_overlapping_arguments(tree: Path, monkeypatch) -> None:
    monkeypatch.chdir(tree)
    found = discover(["a", "./a", "a/x.tif", tree / "a" / "sub", "a/../a/sub/deep.png"])
    assert sorted(p.as_posix() for p in found) == sorted(p.as_posix() for p in discover(["a"]))
    assert len(found) == 7


def test_several_folders_are_ordered_by_path_components(tree: Path) -> None:
    """Among several arguments, a/x.tif comes before a-b/q.png, as pathlib orders them ('a' < 'a-b'),
    though '-' sorts before '/' in a plain string."""
    found = discover([tree / "a-b", tree / "a"])
    assert found == sorted(discover([tree / "a"]) + discover([tree / "a-b"]), key=lambda p: p.parts)
    assert [p.parent.name for p in found] == ["sub"] + ["a"] * 6 + ["a-b"]  # (a/sub/deep.png: 'sub' < 'u.webp')


def test_glob_matches_the_file_name_case_insensitively(tree: Path) -> None:
    assert [p.name for p in discover([tree], glob="*.tif")] == ["x.tif"]
    assert [p.name for p in discover([tree], glob="*.TIF*")] == ["x.tif", "y.TIFF"]


def test_glob_without_a_slash_matches_files_in_subfolders_by_their_name(tmp_path: Path) -> None:
    """``forest_*`` takes Forest_2.jpg in a subfolder too: matched against the path relative to the
    folder given (sub/Forest_2.jpg), it took only the files at the top."""
    for name in ["Forest_1.jpg", "sub/Forest_2.jpg", "sub/River_1.jpg", "forest/Sea_1.jpg"]:
        touch(tmp_path / name)
    assert [p.relative_to(tmp_path).as_posix() for p in discover([tmp_path], glob="forest_*")] == [
        "Forest_1.jpg", "sub/Forest_2.jpg"]


def test_glob_with_a_slash_matches_the_path_relative_to_the_folder(tree: Path) -> None:
    assert [p.name for p in discover([tree], glob="a/*.png")] == ["deep.png"]  # * crosses /
    assert [p.name for p in discover([tree], glob="b/*")] == ["10.JPG", "2.png"]


def test_glob_does_not_filter_explicit_files(tree: Path) -> None:
    assert discover([tree / "b/2.png"], glob="*.tif") == [tree / "b/2.png"]


def test_missing_path_is_a_usage_error(tree: Path) -> None:
    with pytest.raises(UsageError, match="no such file or folder") as info:
        discover([tree / "a", tree / "nope"])
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and "nope" in str(info.value)


@pytest.mark.parametrize("alone", [True, False])
def test_a_path_that_cannot_be_reached_is_a_usage_error_saying_why(tree: Path, alone: bool) -> None:
    """Named alone (a folder's fast path) or among others, never an OSError from ``Path.is_dir``."""
    (tree / "loop").symlink_to(tree / "loop")
    (tree / "broken").symlink_to(tree / "nowhere")
    cases = {tree / "loop": "a symbolic link loop", tree / "broken": "a broken symbolic link",
             tree / "b/2.png/x": "no such file or folder", tree / ("x" * 300): "cannot read .*File name too long"}
    for path, why in cases.items():
        with pytest.raises(UsageError, match=f"{why}"):
            discover([path] if alone else [tree / "a", path])


def test_symlinked_folders_are_not_followed(tree: Path) -> None:
    before = discover([tree])
    (tree / "a" / "loop").symlink_to(tree, target_is_directory=True)
    (tree / "a" / "scans.png").symlink_to(tree, target_is_directory=True)  # named like an image: still a folder
    assert len(before) == 10 and discover([tree]) == before


def test_bundled_data_is_discovered_and_the_five_band_sample_is_outside_it(bundled_data_dir: Path) -> None:
    found = discover([bundled_data_dir])
    assert len(found) >= 60
    assert not any(p.name == "SOURCES.md" for p in found)
    assert len({p.parent.name for p in discover([bundled_data_dir / "eurosat"])}) == 10
    assert (FIXTURES / "five_band_uint16.tif").is_file()


# --------------------------------------------------------------------------------------------
# Pillow formats


def save(image: np.ndarray | Image.Image, path: Path, **params) -> Path:
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **params)
    return path


@HYPOTHESIS
@given(image=images(max_side=40), fmt=st.sampled_from(["png", "bmp", "webp"]))
def test_lossless_formats_round_trip_gray_and_rgb(scratch: Path, image: np.ndarray, fmt: str) -> None:
    params = {"lossless": True, "quality": 100} if fmt == "webp" else {}
    decoded = decode_image(save(image, scratch / f"round.{fmt}", **params), DEFAULT)
    assert decoded.dtype == np.uint8 and decoded.flags.c_contiguous and decoded.flags.writeable
    if fmt == "webp" and image.ndim == 2:  # WebP stores gray as RGB
        image = np.repeat(image[:, :, None], 3, axis=2)
    assert np.array_equal(decoded, image)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1)])
def test_tiny_images(scratch: Path, shape) -> None:
    image = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape) * 20
    assert np.array_equal(decode_image(save(image, scratch / "tiny.png"), DEFAULT), image)
    tifffile.imwrite(scratch / "tiny.tif", image)
    assert np.array_equal(decode_image(scratch / "tiny.tif", DEFAULT), image)


def test_alpha_is_dropped(scratch: Path) -> None:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    assert np.array_equal(decode_image(save(rgba, scratch / "rgba.png"), DEFAULT), rgba[:, :, :3])
    gray_alpha = Image.fromarray(rgba[:, :, :2].copy(), "LA")
    assert np.array_equal(decode_image(save(gray_alpha, scratch / "la.png"), DEFAULT), rgba[:, :, 0])


@pytest.mark.parametrize("fmt", ["gif", "png", "bmp"])
def test_palette_becomes_rgb(scratch: Path, fmt: str) -> None:
    rng = np.random.default_rng(2)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    indices = rng.integers(0, 16, (6, 11), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.ravel().tolist())
    decoded = decode_image(save(image, scratch / f"palette.{fmt}"), DEFAULT)
    assert np.array_equal(decoded, palette[indices])


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_a_palette_with_a_transparent_colour_has_an_alpha_band(scratch: Path, fmt: str) -> None:
    """A palette image with a transparent entry (PNG's tRNS, GIF's transparency index) is RGBA: band
    4 is 0 where that entry is used and 255 elsewhere, and without --bands it is RGB."""
    rng = np.random.default_rng(4)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    indices = rng.integers(0, 16, (6, 11), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.ravel().tolist())
    path = save(image, scratch / f"transparent.{fmt}", transparency=5)
    assert np.array_equal(decode_image(path, DecodeOptions(bands=(4,))), np.where(indices == 5, 0, 255))
    assert np.array_equal(decode_image(path, DEFAULT), palette[indices])


def test_gif_first_frame_only(scratch: Path) -> None:
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(scratch / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.array_equal(decode_image(scratch / "anim.gif", DEFAULT), np.full((4, 4, 3), 10, np.uint8))


def test_one_bit_becomes_0_or_255(scratch: Path) -> None:
    bits = np.random.default_rng(3).random((5, 9)) < 0.5
    decoded = decode_image(save(Image.fromarray(bits), scratch / "bits.png"), DEFAULT)
    assert np.array_equal(decoded, np.where(bits, 255, 0).astype(np.uint8))


@HYPOTHESIS
@given(data=hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12)))
def test_16_bit_png_is_stretched(scratch: Path, data: np.ndarray) -> None:
    decoded = decode_image(save(Image.fromarray(data), scratch / "gray16.png"), DEFAULT)
    assert np.array_equal(decoded, oracle(data[:, :, None]))


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_16_bit_colour_png_keeps_all_16_bits_and_is_stretched(scratch: Path, channels: int) -> None:
    """Pillow reads these as 8-bit, keeping the high byte (3 to 5 here: a band of three levels)."""
    data = np.random.default_rng(8).integers(1000, 1300, (9, 11, channels), dtype=np.uint16)
    path = scratch / f"wide{channels}.png"
    if channels == 2:  # gray + alpha: OpenCV writes no such PNG
        imagecodecs = pytest.importorskip("imagecodecs")
        path.write_bytes(imagecodecs.png_encode(data))
    else:
        cv2 = pytest.importorskip("cv2")
        cv2.imwrite(str(path), data[:, :, [2, 1, 0, 3][:channels]])  # OpenCV writes BGR(A)
    assert path.read_bytes()[24] == 16  # the IHDR bit depth
    expected = oracle(data[:, :, :1] if channels == 2 else data[:, :, :3])  # gray + alpha is gray
    assert np.array_equal(decode_image(path, DEFAULT), expected)


#: Adam7's passes: (first column, first row, column step, row step).
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def interlaced_16_bit_png(data: np.ndarray) -> bytes:
    """A 16-bit RGB or RGBA PNG with Adam7 interlacing, written by hand (neither Pillow, OpenCV nor
    imagecodecs writes one): each pass's rows, each with filter type 0 (none)."""
    height, width, channels = data.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes()
                    for x, y, dx, dy in ADAM7 for row in data[y::dy, x::dx] if row.size)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 4])
def test_an_interlaced_16_bit_colour_png_decodes_as_its_plain_twin_and_prints_nothing(scratch: Path, channels):
    """libpng (through imagecodecs, which logs it) warned "Interlace handling should be turned on
    when using png_read_image" for every such file: on the command line's stderr and, through
    logging's last resort, on a Python caller's. The pixels were right; the warning was noise."""
    import subprocess

    pytest.importorskip("imagecodecs")
    cv2 = pytest.importorskip("cv2")
    data = np.random.default_rng(9).integers(0, 65536, (21, 30, channels), dtype=np.uint16)
    interlaced = scratch / "interlaced.png"
    interlaced.write_bytes(interlaced_16_bit_png(data))
    assert interlaced.read_bytes()[28] == 1  # the IHDR's interlace method: Adam7
    plain = scratch / "plain.png"
    cv2.imwrite(str(plain), data[:, :, [2, 1, 0, 3][:channels]])  # OpenCV writes BGR(A), not interlaced
    code = ("import sys, numpy as np\nfrom gpu_pipeline.config import DecodeOptions\n"
            "from gpu_pipeline.inputs.decode import decode_image\n"
            "a, b = (decode_image(path, DecodeOptions()) for path in sys.argv[1:])\n"
            "print(a.shape, np.array_equal(a, b))")
    done = subprocess.run([sys.executable, "-c", code, str(interlaced), str(plain)], capture_output=True, text=True,
                          timeout=120)
    assert (done.stdout, done.stderr) == ("(21, 30, 3) True\n", "")
    command = [sys.executable, "-m", "gpu_pipeline.cli", "run", str(interlaced), "--out", "-", "--quiet",
               "--backend", "reference"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "" and '"width":30' in done.stdout


# --------------------------------------------------------------------------------------------
# JPEG 2000 (Sentinel-2 and Pleiades ship as JP2). The oracle: the samples a lossless file holds.


def jpeg2000(data: np.ndarray, bits: int | None = None, kind: str = "jp2") -> bytes:
    """``data`` as a lossless (reversible) JPEG 2000 file, JP2 or a bare codestream (j2k)."""
    imagecodecs = pytest.importorskip("imagecodecs")
    return bytes(imagecodecs.jpeg2k_encode(data, level=0, bitspersample=bits, codecformat=kind))


def siz_at(data: bytes) -> int:
    """Where a codestream's SIZ marker segment starts (after SOC): component k's (Ssiz, XRsiz,
    YRsiz) are at +40 + 3k."""
    return data.index(b"\xff\x4f\xff\x51") + 2


@pytest.mark.parametrize("kind, extension", [("jp2", "jp2"), ("j2k", "j2k"), ("j2k", "j2c")])
@pytest.mark.parametrize("stretch", ["percentile", "bitdepth"])
def test_jpeg_2000_decodes_to_the_samples_it_holds_and_stretches_them(scratch: Path, kind, extension, stretch):
    """12-bit RGB (uint16 samples of 12 bits: the bitdepth stretch takes x >> 4, not the high byte)."""
    data = np.random.default_rng(13).integers(0, 4096, (21, 17, 3), dtype=np.uint16)
    path = scratch / f"rgb12.{extension}"
    path.write_bytes(jpeg2000(data, bits=12, kind=kind))
    expected = (data >> 4).astype(np.uint8) if stretch == "bitdepth" else oracle(data, stretch)
    assert np.array_equal(decode_image(path, DecodeOptions(stretch=stretch)), expected)
    assert discover([scratch]).count(path) == 1


@pytest.mark.parametrize("dtype, bits", [(np.uint8, 8), (np.uint8, 4), (np.uint8, 1), (np.int16, 16), (np.uint16, 16)])
def test_jpeg_2000_gray_of_each_sample_type(scratch: Path, dtype, bits):
    """8-bit gray as it is; fewer bits onto 0..255 as PNG's (4-bit: 17 x, 1-bit: 255 x); wider ones stretched."""
    info = np.iinfo(dtype)
    data = np.random.default_rng(bits).integers(max(info.min, -3000), min(info.max, (1 << bits) - 1) + 1, (9, 14),
                                                dtype=dtype)
    path = scratch / f"gray{bits}{np.dtype(dtype).char}.jp2"
    path.write_bytes(jpeg2000(data, bits=bits))
    expected = {4: data * 17, 1: data * 255}.get(bits, oracle(data[:, :, None]))
    assert np.array_equal(decode_image(path, DEFAULT), expected)


def test_bitdepth_of_a_signed_12_bit_jpeg_2000_is_its_bits_not_its_containers(scratch: Path):
    """Signed b-bit samples give (2 max(x, 0)) >> (b - 8): 12-bit ones >> 4, as the SIZ marker's
    Ssiz says (its top bit is the sign, not a bit of depth), not the int16 container's >> 8."""
    data = np.array([[-2048, -1, 0, 1, 100, 2047]], np.int16)
    path = scratch / "signed12.j2k"
    path.write_bytes(jpeg2000(data, bits=12, kind="j2k"))
    assert decode_image(path, DecodeOptions(stretch="bitdepth")).tolist() == [[0, 0, 0, 0, 12, 255]]


def test_jpeg_2000_that_opencv_wrote_decodes_as_opencv_reads_it(scratch: Path):
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("imagecodecs")
    data = np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # (OpenCV: 32 x 32 at least)
    path = scratch / "opencv.jp2"
    assert cv2.imwrite(str(path), data)  # BGR, lossless by default
    assert np.array_equal(decode_image(path, DEFAULT), cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:, :, ::-1])


def _refusal(scratch: Path, data: bytes, options: DecodeOptions = DEFAULT) -> DecodeError:
    path = scratch / "refused.jp2"
    path.write_bytes(data)
    with pytest.raises(DecodeError) as refused:
        decode_image(path, options)
    assert refused.value.stage == "decode"
    return refused.value


def test_jpeg_2000_cut_short_or_zero_filled_is_refused(scratch: Path):
    """OpenJPEG decodes one zero-filled to its full size (a download that preallocates its file)
    into made-up pixels, without an error."""
    whole = jpeg2000(np.random.default_rng(6).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    half = len(whole) // 2
    for cut in (whole[:half] + bytes(len(whole) - half), whole[:-1], whole[:half]):
        assert "truncated JPEG 2000 file" in str(_refusal(scratch, cut))


def tile_parts(codestream: bytes) -> list[tuple[int, int]]:
    """(start, length) of each tile-part (SOT marker, Psot) of a codestream that ends with EOC."""
    parts, i = [], codestream.index(b"\xff\x90")
    while codestream[i:i + 2] == b"\xff\x90":
        parts.append((i, int.from_bytes(codestream[i + 6:i + 10], "big")))
        i += parts[-1][1]
    return parts


def test_jpeg_2000_with_a_tile_no_tile_part_holds_is_refused(scratch: Path):
    """OpenJPEG leaves such a tile black, without an error: a tile-part lost, or a SIZ marker whose
    tile grid was damaged (XTsiz 16 read as 8: four tiles where one tile-part holds one)."""
    tiles = io.BytesIO()
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        tiles, "JPEG2000", tile_size=(16, 16), no_jp2=True)  # (a bare codestream of 4 tiles)
    codestream = tiles.getvalue()
    assert gpu_io.decode_data(codestream, DEFAULT).shape == (32, 32, 3)
    start, length = tile_parts(codestream)[2]
    assert "damaged JPEG 2000 file: tile 3 of 4 is missing" in str(
        _refusal(scratch, codestream[:start] + codestream[start + length:]))
    damaged = bytearray(jpeg2000(np.random.default_rng(9).integers(0, 256, (16, 16), dtype=np.uint8)))
    damaged[siz_at(damaged) + 22:siz_at(damaged) + 26] = (8).to_bytes(4, "big")  # XTsiz
    assert "damaged JPEG 2000 file: tile 2 of 2 is missing" in str(_refusal(scratch, bytes(damaged)))


def test_jpeg_2000_whose_edge_tile_no_tile_part_holds_is_refused(scratch: Path):
    """A tile grid that does not divide the image has partial tiles at its right and bottom edges
    (40 x 40 pixels in tiles of 16: 3 x 3 tiles), and the last of them, lost, is missing too."""
    tiles = io.BytesIO()
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
        tiles, "JPEG2000", tile_size=(16, 16), no_jp2=True)
    codestream = tiles.getvalue()
    parts = tile_parts(codestream)
    assert len(parts) == 9 and gpu_io.decode_data(codestream, DEFAULT).shape == (40, 40, 3)
    start, length = parts[8]
    assert "damaged JPEG 2000 file: tile 9 of 9 is missing" in str(
        _refusal(scratch, codestream[:start] + codestream[start + length:]))


def test_jpeg_2000_whose_tile_grid_starts_off_the_origin_decodes(scratch: Path):
    """Tiles are counted from the tile grid's origin (XTOsiz, YTOsiz; T.800 B.3): 32 x 32 pixels at
    (8, 8) in tiles of 16 from (8, 8) are 2 x 2 tiles, all held. Counted from 0 they were 3 x 3,
    and a good file was refused for a 'missing' tile."""
    image = np.random.default_rng(8).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    tiles = io.BytesIO()
    Image.fromarray(image).save(tiles, "JPEG2000", tile_size=(16, 16), offset=(8, 8), tile_offset=(8, 8),
                                no_jp2=True)  # (lossless: reversible by default)
    path = scratch / "tile-origin.j2k"
    path.write_bytes(tiles.getvalue())
    assert len(tile_parts(tiles.getvalue())) == 4
    assert np.array_equal(decode_image(path, DEFAULT), image)


def test_jpeg_2000_is_refused_from_its_header_over_the_pixel_limit(scratch: Path, monkeypatch):
    """From the SIZ marker, before any sample is decoded: a 100-byte file may declare gigapixels."""
    data = bytearray(jpeg2000(np.zeros((10, 10), np.uint8)))
    siz = siz_at(data)
    data[siz + 6:siz + 14] = (50_000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    monkeypatch.setattr(gpu_io, "jpeg2k_decode", lambda *a, **k: pytest.fail("decoded past the limit"))
    assert "50000 x 50000 = 2,500,000,000 pixels is over the limit" in str(_refusal(scratch, bytes(data)))
    many = bytearray(jpeg2000(np.zeros((10, 10, 3), np.uint8)))
    many[siz_at(many) + 38:siz_at(many) + 40] = (17).to_bytes(2, "big")  # Csiz: 17 components
    message = str(_refusal(scratch, bytes(many), DecodeOptions(max_pixels=100)))
    assert "10 x 10 pixels of 17 samples: 1,700 samples is over the limit of 1,600" in message


def test_jpeg_2000_tiles_count_against_the_samples_limit(scratch: Path, monkeypatch):
    """OpenJPEG keeps about 8 KB a tile and 1 KB a tile and component, before it decodes any: 65535
    tiles of 1 x 1 pixels and 16 components, in a 0.9 MB file, took 1.7 GB (64 components: 4.9 GB),
    far more than their samples. Bytes count as samples of 4 bytes: 100 tiles of 1 x 1 pixels, each
    with one code-block and one precinct, are 100 x (9216 + 408 + 160) / 4 = 244,600 samples."""
    codestream = bytearray(jpeg2000(np.zeros((10, 10), np.uint8), kind="j2k"))
    codestream[siz_at(codestream) + 22:siz_at(codestream) + 30] = (1).to_bytes(4, "big") * 2  # XTsiz, YTsiz
    header = bytes(codestream[:codestream.index(b"\xff\x90")])
    empty_tile_parts = b"".join(b"\xff\x90\0\x0a" + tile.to_bytes(2, "big") + (14).to_bytes(4, "big") + b"\0\x01\xff\x93"
                                for tile in range(100))  # (SOT: Lsot, Isot, Psot, TPsot, TNsot; SOD)
    monkeypatch.setattr(gpu_io, "jpeg2k_decode", lambda *a, **k: pytest.fail("decoded past the limit"))
    message = str(_refusal(scratch, header + empty_tile_parts + b"\xff\xd9", DecodeOptions(max_pixels=100)))
    assert message == ("10 x 10 pixels in 100 tiles of 1 component, 100 code-blocks and 100 precincts: OpenJPEG "
                       "allocates for them, before it decodes a sample, as much as 244,600 samples, over the limit of "
                       "1,600 (16 per pixel of the limit; decompression-bomb guard)")


def j2k_segment(marker: int, parameters: bytes) -> bytes:
    return bytes([0xFF, marker]) + (2 + len(parameters)).to_bytes(2, "big") + parameters


def coding_style(precincts: int | None, component: int | None = None) -> bytes:
    """A COD marker segment (a COC for ``component``): 5 decomposition levels, 64 x 64 code-blocks,
    precincts of 2^precincts x 2^precincts at every resolution level (None: none) (T.800 A.6.1-2)."""
    spcod = bytes([5, 4, 4, 0, 1]) + (bytes([precincts * 0x11] * 6) if precincts is not None else b"")
    scod = bytes([precincts is not None])
    if component is None:
        return j2k_segment(0x52, scod + b"\0\0\x01\0" + spcod)  # SGcod: LRCP, 1 layer, no colour transform
    return j2k_segment(0x53, bytes([component]) + scod + spcod)


def empty_codestream(size: int, main: bytes, tile_part: bytes = b"") -> bytes:
    """A hand-made codestream of size x size gray pixels in one tile of one empty packet: SIZ,
    ``main`` (its COD and COCs), QCD, then one tile-part with ``tile_part`` in its header."""
    siz = j2k_segment(0x51, b"\0\0" + size.to_bytes(4, "big") * 2 + bytes(8) + size.to_bytes(4, "big") * 2 + bytes(8)
                      + b"\0\x01\x07\x01\x01")
    qcd = j2k_segment(0x5C, b"\x40" * 17)  # no quantization: 1 + 3 x 5 exponents
    sot = b"\xff\x90\0\x0a\0\0" + (15 + len(tile_part)).to_bytes(4, "big") + b"\0\x01"  # Isot 0, Psot, TPsot, TNsot
    return b"\xff\x4f" + siz + main + qcd + sot + tile_part + b"\xff\x93\0\xff\xd9"


@pytest.mark.parametrize("main, tile_part", [
    (coding_style(1), b""),
    (coding_style(None) + coding_style(1, component=0), b""),
    (coding_style(None), coding_style(1)),
    (coding_style(None), coding_style(None, component=0) + coding_style(1)),  # (a later COD wins in OpenJPEG)
    (coding_style(None), coding_style(1, component=0)),
], ids=["main COD", "main COC", "tile-part COD", "tile-part COD after a COC", "tile-part COC"])
@pytest.mark.parametrize("kind", ["j2k", "jp2"])
def test_jpeg_2000_code_blocks_and_precincts_count_against_the_samples_limit(scratch: Path, monkeypatch, main,
                                                                              tile_part, kind):
    """OpenJPEG allocates about 408 bytes a code-block and 160 a precinct in each band before it
    decodes any, and a code-block is cut to its precinct: a 103-byte codestream of 2048 x 2048
    pixels with 2 x 2 precincts (so 1 x 1 code-blocks) took 2.3 GB. Its coding style may be in the
    main header or a tile-part header, in a COD or in a COC."""
    codestream = empty_codestream(2048, main, tile_part)
    data = codestream if kind == "j2k" else jp2_file(codestream, 2048, 2048)
    monkeypatch.setattr(gpu_io, "jpeg2k_decode", lambda *a, **k: pytest.fail("decoded past the limit"))
    message = str(_refusal(scratch, data, DecodeOptions(max_pixels=2048 * 2048)))
    assert message == ("2048 x 2048 pixels in 1 tile of 1 component, 4,191,232 code-blocks and 4,191,232 precincts: "
                       "OpenJPEG allocates for them, before it decodes a sample, as much as 595,157,248 samples, over "
                       "the limit of 67,108,864 (16 per pixel of the limit; decompression-bomb guard)")


def test_jpeg_2000_structures_many_times_the_image_are_refused_under_the_default_limit(scratch: Path, monkeypatch):
    """The default limit (a gigapixel, 16 G samples) let the 103-byte bomb above take 2.3 GB: what
    OpenJPEG allocates for a codestream's structures may also be at most 16 samples a sample of the
    image itself (usual coding styles cost under 1, 4 x 4 code-blocks about 6.4, 16 x 16 tiles
    with them 14.5), or 16 Mi samples for a small image. 2 x 2 precincts cost 142 samples a
    sample, 4 x 4 ones 35: refused; 8 x 8 ones 8.9: decoded, at 37 M samples."""
    monkeypatch.setattr(gpu_io, "jpeg2k_decode", lambda *a, **k: pytest.fail("decoded a bomb"))
    for precincts, message in [(1, "as much as 595,157,248 samples, 141.9 times the image's 4,194,304"),
                               (2, "as much as 148,791,040 samples, 35.5 times the image's 4,194,304")]:
        assert str(_refusal(scratch, empty_codestream(2048, coding_style(precincts)))) == (
            f"2048 x 2048 pixels in 1 tile of 1 component, {4_191_232 // 4 ** (precincts - 1):,} code-blocks and "
            f"{4_191_232 // 4 ** (precincts - 1):,} precincts: OpenJPEG allocates for them, before it decodes a "
            f"sample, {message} (at most 16 times, or 16,777,216 samples; decompression-bomb guard)")
    monkeypatch.undo()
    imagecodecs = pytest.importorskip("imagecodecs")
    codestream = empty_codestream(2048, coding_style(3))
    path = scratch / "precincts-of-8.j2k"
    path.write_bytes(codestream)
    assert np.array_equal(decode_image(path, DEFAULT), imagecodecs.jpeg2k_decode(codestream))


def test_jpeg_2000_structures_many_times_the_image_are_refused_in_colour_too(scratch: Path, monkeypatch):
    """The bound is 16 samples of structures a sample of the image, all components counted once:
    3 components with 4 x 4 precincts cost 35.5 a sample, as one does (not 16 x 3 a pixel)."""
    monkeypatch.setattr(gpu_io, "jpeg2k_decode", lambda *a, **k: pytest.fail("decoded a bomb"))
    gray = empty_codestream(2048, coding_style(2))
    siz = gray.index(b"\xff\x51")
    colour = bytearray(gray)
    colour[siz + 2:siz + 4] = (38 + 3 * 3).to_bytes(2, "big")  # Lsiz: 38 bytes, and 3 a component
    colour[siz + 38:siz + 40] = (3).to_bytes(2, "big")  # Csiz; then each component's Ssiz, XRsiz, YRsiz
    colour[siz + 43:siz + 43] = b"\x07\x01\x01" * 2
    message = str(_refusal(scratch, bytes(colour)))
    assert message.startswith("2048 x 2048 pixels in 1 tile of 3 components, ")
    assert re.search(r", 35\.\d times the image's 12,582,912 \(at most 16 times, or 16,777,216 samples; "
                     r"decompression-bomb guard\)$", message), message


def test_jpeg_2000_code_blocks_and_precincts_up_to_the_samples_limit_decode(scratch: Path):
    """64 x 64 pixels with 2 x 2 precincts: 4,093 code-blocks and as many precincts, 2,304 (its
    tile) + 4,093 x (408 + 160) / 4 = 583,510 samples, 36,470 pixels of the limit (less a bit)."""
    imagecodecs = pytest.importorskip("imagecodecs")
    codestream = empty_codestream(64, coding_style(1))
    path = scratch / "small-precincts.j2k"
    path.write_bytes(codestream)
    assert np.array_equal(decode_image(path, DecodeOptions(max_pixels=36_470)), imagecodecs.jpeg2k_decode(codestream))
    assert "as much as 583,510 samples, over the limit of 583,504 " in str(
        _refusal(scratch, codestream, DecodeOptions(max_pixels=36_469)))


@pytest.mark.parametrize("options", [{}, {"codeblock_size": (32, 32), "precinct_size": (128, 128)},
                                     {"codeblock_size": (16, 16)}])
def test_jpeg_2000_of_usual_code_blocks_and_precincts_decodes_at_its_own_size_limit(scratch: Path, options):
    """As OpenJPEG's encoder writes them (opj_compress -b, -c: 64 x 64 code-blocks and no precincts
    by default): their charge is far under 16 samples a pixel."""
    data = np.random.default_rng(10).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    path = scratch / "usual.j2k"
    Image.fromarray(data).save(path, "JPEG2000", no_jp2=True, **options)
    assert np.array_equal(decode_image(path, DecodeOptions(max_pixels=200 * 300)), data)


def jp2_box(kind: bytes, contents: bytes) -> bytes:
    return (8 + len(contents)).to_bytes(4, "big") + kind + contents


def jp2_file(codestream: bytes, height: int, width: int, header: bytes = b"", after_header: bytes = b"") -> bytes:
    """A hand-made JP2 file of one gray codestream: signature, file type, header box (image header,
    greyscale colr, then ``header``), ``after_header`` at the top level, codestream box."""
    ihdr = jp2_box(b"ihdr", height.to_bytes(4, "big") + width.to_bytes(4, "big") + b"\0\x01\x07\x07\0\0")
    colr = jp2_box(b"colr", b"\x01\0\0" + (17).to_bytes(4, "big"))
    return (jp2_box(b"jP  ", b"\r\n\x87\n") + jp2_box(b"ftyp", b"jp2 \0\0\0\0jp2 ")
            + jp2_box(b"jp2h", ihdr + colr + header) + after_header + jp2_box(b"jp2c", codestream))


@pytest.mark.parametrize("length", [0, 1], ids=["0: to the end", "1: in 8 bytes after"])
def test_a_jp2_codestream_box_of_either_special_length_decodes(scratch: Path, length: int) -> None:
    """A box's length may be 0, running to the end of the file (a writer that streams the
    codestream), or 1, the length following in 8 bytes (for a codestream over 4 GiB) (T.800 I.4)."""
    data = np.random.default_rng(14).integers(0, 256, (12, 9), dtype=np.uint8)
    codestream = jpeg2000(data, kind="j2k")
    plain = jp2_file(codestream, 12, 9)
    box = {0: bytes(4) + b"jp2c", 1: (1).to_bytes(4, "big") + b"jp2c" + (16 + len(codestream)).to_bytes(8, "big")}
    path = scratch / "special.jp2"
    path.write_bytes(plain[:-len(codestream) - 8] + box[length] + codestream)
    assert np.array_equal(decode_image(path, DEFAULT), data)


def jp2_palette(columns: int, entries: int = 2) -> bytes:
    """A palette box of 8-bit ``columns`` and the component mapping box that applies it."""
    pclr = entries.to_bytes(2, "big") + bytes([columns]) + bytes([7] * columns) + bytes(range(entries)) * columns
    cmap = b"".join(b"\0\0\x01" + bytes([column]) for column in range(columns))
    return jp2_box(b"pclr", pclr) + jp2_box(b"cmap", cmap)


@pytest.mark.parametrize("where", ["header box", "second header box", "top level"])
def test_jpeg_2000_palette_columns_count_against_the_samples_limit(scratch: Path, monkeypatch, where):
    """OpenJPEG expands a 1-component codestream to one plane per palette column (up to 255): a
    small file would decode to 255 samples a pixel. It reads a palette in any header box before
    the codestream, or at the top level after the first (a misplaced one)."""
    codestream = jpeg2000(np.zeros((10, 10), np.uint8), kind="j2k")
    palette = jp2_palette(17)
    data = {"header box": jp2_file(codestream, 10, 10, header=palette),
            "second header box": jp2_file(codestream, 10, 10, after_header=jp2_box(b"jp2h", palette)),
            "top level": jp2_file(codestream, 10, 10, after_header=palette)}[where]
    monkeypatch.setattr(gpu_io, "jpeg2k_decode", lambda *a, **k: pytest.fail("decoded past the limit"))
    message = str(_refusal(scratch, data, DecodeOptions(max_pixels=100)))
    assert "10 x 10 pixels of 17 samples: 1,700 samples is over the limit of 1,600" in message


def test_jpeg_2000_palette_is_applied_and_one_without_its_component_mapping_refused(scratch: Path):
    """A palette (pclr) needs its component mapping box (cmap); without one OpenJPEG drops the palette
    and gives the indices as gray samples, without an error."""
    indices = np.array([[0, 1, 1], [1, 0, 1]], np.uint8)
    colours = np.array([[10, 20, 30], [200, 150, 100]], np.uint8)
    pclr = jp2_box(b"pclr", b"\0\x02\x03\x07\x07\x07" + colours.tobytes())
    cmap = jp2_box(b"cmap", b"\0\0\x01\x00\0\0\x01\x01\0\0\x01\x02")
    codestream = jpeg2000(indices, kind="j2k")
    path = scratch / "palette.jp2"
    path.write_bytes(jp2_file(codestream, 2, 3, header=pclr + cmap))
    assert np.array_equal(decode_image(path, DEFAULT), colours[indices])
    message = str(_refusal(scratch, jp2_file(codestream, 2, 3, header=pclr)))
    assert message == "damaged JPEG 2000 file: a palette box (pclr) without its component mapping box (cmap)"


@pytest.mark.parametrize("depth", [4, 12])
def test_jpeg_2000_palette_samples_of_few_or_many_bits_are_brought_to_8_as_others(scratch: Path, depth):
    """A palette's entries of 4 bits span 0..255 (17 x), as 4-bit samples do; of 12 bits, the bitdepth
    stretch takes x >> 4, as for 12-bit samples. They came as 0..15, and as x >> 8."""
    indices = np.array([[0, 1, 1], [1, 0, 1]], np.uint8)
    colours = np.array([[1, 2, 3], [15, 9, 0]] if depth == 4 else [[100, 2000, 4095], [7, 3000, 16]], np.uint16)
    entries = colours.astype(np.uint8).tobytes() if depth == 4 else colours.astype(">u2").tobytes()
    pclr = jp2_box(b"pclr", b"\0\x02\x03" + bytes([depth - 1] * 3) + entries)
    cmap = jp2_box(b"cmap", b"\0\0\x01\x00\0\0\x01\x01\0\0\x01\x02")
    path = scratch / f"palette{depth}.jp2"
    path.write_bytes(jp2_file(jpeg2000(indices, kind="j2k"), 2, 3, header=pclr + cmap))
    expected = colours * 17 if depth == 4 else colours >> 4
    assert np.array_equal(decode_image(path, DecodeOptions(stretch="bitdepth")), expected[indices])


@pytest.mark.parametrize("patch, message", [
    (lambda data, siz: data.__setitem__(siz + 40 + 3 + 1, 2), "subsampled components"),  # component 1's XRsiz
    (lambda data, siz: data.__setitem__(siz + 40 + 6, 11), "components of different sample types"),  # 12-bit
    (lambda data, siz: data.__setitem__(slice(data.index(b"colr") + 7, data.index(b"colr") + 11),
                                        (18).to_bytes(4, "big")), "JPEG 2000 with colour space sYCC"),
    (lambda data, siz: data.__setitem__(data.index(b"colr") + 4, 2), "JPEG 2000 with an ICC colour profile"),
    (lambda data, siz: data.__setitem__(slice(data.index(b"colr"), data.index(b"colr") + 4), b"xxxx"),
     "damaged JPEG 2000 file: no colour specification box (colr)"),
    (lambda data, siz: data.__setitem__(slice(data.index(b"jp2c"), data.index(b"jp2c") + 4), b"junk"),
     "damaged JPEG 2000 file: no codestream box"),
])
def test_jpeg_2000_that_would_need_a_conversion_or_is_damaged_is_refused(scratch: Path, patch, message):
    data = bytearray(jpeg2000(np.zeros((8, 8, 3), np.uint8)))
    patch(data, siz_at(data))
    assert message in str(_refusal(scratch, bytes(data)))


def test_jpeg_2000_without_imagecodecs_names_the_package(scratch: Path, monkeypatch):
    data = jpeg2000(np.zeros((8, 8), np.uint8))
    monkeypatch.setattr(gpu_io, "jpeg2k_decode", None)
    assert "JPEG 2000 files need the imagecodecs package" in str(_refusal(scratch, data))


def test_jpeg_2000_files_are_processed_end_to_end_in_decode_processes(scratch: Path):
    """``gpu-pipeline run`` on a folder of JP2 and J2K files (decode processes: the default on Linux)."""
    import subprocess

    folder = scratch / "jpeg2000"
    folder.mkdir()
    data = np.random.default_rng(7).integers(0, 4096, (32, 24, 3), dtype=np.uint16)
    (folder / "a.jp2").write_bytes(jpeg2000(data, bits=12))
    (folder / "b.j2k").write_bytes(jpeg2000(data, bits=12, kind="j2k"))
    (folder / "c.jp2").write_bytes(jpeg2000(data, bits=12)[:-40])
    save(Image.fromarray(oracle(data)), folder / "d.png")  # the pixels a.jp2 and b.j2k decode to
    done = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", "-", "--quiet",
                           "--backend", "reference", "--decode", "processes"], capture_output=True, text=True,
                          timeout=120)
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1 and done.stderr == "", done.stderr  # (1: an image failed)
    assert [Path(r["path"]).name for r in records] == ["a.jp2", "b.j2k", "c.jp2", "d.png"]
    a, b, cut, png = records
    outputs = [{key: r[key] for key in ("width", "height", "bands", "histogram", "edge_count")} for r in (a, b, png)]
    assert outputs[0] == outputs[1] == outputs[2]
    assert cut["stage"] == "decode" and "truncated JPEG 2000 file" in cut["error"]


def test_jpeg_decodes_as_pillow_does(bundled_data_dir: Path) -> None:
    for path in discover([bundled_data_dir / "eurosat"])[:10]:
        assert np.array_equal(decode_image(path, DEFAULT), np.asarray(Image.open(path)))


def test_bundled_data_all_decodes(bundled_data_dir: Path) -> None:
    for path in discover([bundled_data_dir]):
        image = decode_image(path, DEFAULT)
        assert image.dtype == np.uint8 and image.flags.c_contiguous
        assert image.ndim == 2 or image.shape[2] == 3


def test_bundled_formats_decode_to_their_sources(bundled_data_dir: Path) -> None:
    formats = bundled_data_dir / "formats"
    rgb = decode_image(bundled_data_dir / "eurosat/Residential/Residential_1045.jpg", DEFAULT)
    for name in ["rgb.bmp", "lossless.webp", "rgba.png", "four_band_planar.tif"]:
        assert np.array_equal(decode_image(formats / name, DEFAULT), rgb), name
    scene = tifffile.imread(bundled_data_dir / "multiband/rio-tiler_rgb.tif")
    assert np.array_equal(decode_image(formats / "gray16.png", DEFAULT), oracle(scene[:, :, :1]))


# --------------------------------------------------------------------------------------------
# TIFF


def write_tiff(path: Path, bands: np.ndarray, planar: str = "contig", **kwargs) -> Path:
    """Write (H, W, C) ``bands`` interleaved, or as (C, H, W) planes when ``planar='separate'``."""
    data = bands[:, :, 0] if bands.shape[2] == 1 else bands
    if planar == "separate" and bands.shape[2] > 1:
        data = np.ascontiguousarray(bands.transpose(2, 0, 1))
    tifffile.imwrite(
        path,
        data,
        photometric="minisblack",
        planarconfig=planar if bands.shape[2] > 1 else None,
        metadata=None,
        **kwargs,
    )
    return path


def default_selection(bands: np.ndarray) -> np.ndarray:
    return bands[:, :, :1] if bands.shape[2] <= 2 else bands[:, :, :3]


def tiff_arrays(dtype) -> st.SearchStrategy[np.ndarray]:
    if np.dtype(dtype).kind == "f":
        width = np.dtype(dtype).itemsize * 8
        elements = st.floats(-6e4, 6e4, width=width) | st.sampled_from([np.nan, np.inf, -np.inf])
    else:
        elements = None
    shape = st.tuples(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 2, 3, 4]))
    return hnp.arrays(dtype, shape, elements=elements)


@HYPOTHESIS
@given(
    data=st.sampled_from([np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float16, np.float32]).flatmap(
        tiff_arrays
    ),
    planar=st.sampled_from(["contig", "separate"]),
    stretch=st.sampled_from(["percentile", "minmax"]),
)
def test_tiff_round_trip_matches_the_oracle(
    scratch: Path, data: np.ndarray, planar: str, stretch: str
) -> None:
    path = write_tiff(scratch / "round.tif", data, planar)
    decoded = decode_image(path, DecodeOptions(stretch=stretch))
    assert decoded.flags.c_contiguous
    assert np.array_equal(decoded, oracle(default_selection(data), stretch))


@pytest.mark.parametrize("planar", ["contig", "separate"])
@pytest.mark.parametrize("compression", [None, "zlib", "lzw"])
@pytest.mark.parametrize("tiled", [False, True])
def test_tiff_layouts(scratch: Path, planar: str, compression: str | None, tiled: bool) -> None:
    if compression == "lzw":
        pytest.importorskip("imagecodecs", reason="LZW needs the imagecodecs package")
    rng = np.random.default_rng(4)
    bands = rng.integers(0, 4000, (40, 37, 3), dtype=np.uint16)
    path = write_tiff(
        scratch / "layout.tif", bands, planar, compression=compression, tile=(16, 16) if tiled else None
    )
    assert np.array_equal(decode_image(path, DEFAULT), oracle(bands))


def test_planar_samples_axis_is_read_from_the_metadata_not_guessed(scratch: Path) -> None:
    # 3 x 3 x 3: sizes cannot tell planes from interleaved samples
    bands = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)
    for planar in ["contig", "separate"]:
        assert np.array_equal(decode_image(write_tiff(scratch / "cube.tif", bands, planar), DEFAULT), bands)


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_each_band_of_a_two_band_tiff_is_its_own_whatever_its_planar_configuration(scratch: Path, planar) -> None:
    """Two bands (gray + alpha, or two measurements): by default the first is gray, and --bands 2
    gives the second; two separate planes must not be taken as one."""
    bands = np.random.default_rng(15).integers(0, 256, (5, 7, 2), dtype=np.uint8)
    path = write_tiff(scratch / f"two-{planar}.tif", bands, planar)
    assert np.array_equal(decode_image(path, DEFAULT), bands[:, :, 0])
    assert np.array_equal(decode_image(path, DecodeOptions(bands=(2,))), bands[:, :, 1])


def test_only_the_first_page_is_read(scratch: Path) -> None:
    with tifffile.TiffWriter(scratch / "pyramid.tif") as tif:
        tif.write(np.full((8, 8), 7, np.uint8), subifds=1)
        tif.write(np.full((4, 4), 99, np.uint8), subfiletype=1)  # an overview
        tif.write(np.full((8, 8), 200, np.uint8))  # a second page
    assert np.array_equal(decode_image(scratch / "pyramid.tif", DEFAULT), np.full((8, 8), 7, np.uint8))


@pytest.mark.parametrize("photometric", ["palette", "miniswhite", "bilevel"])
def test_tiff_photometric_agrees_with_pillow(scratch: Path, photometric: str) -> None:
    rng = np.random.default_rng(5)
    path = scratch / f"{photometric}.tif"
    if photometric == "palette":
        colormap = rng.integers(0, 65536, (3, 256), dtype=np.uint16)
        tifffile.imwrite(
            path, rng.integers(0, 256, (6, 7), dtype=np.uint8), photometric="palette", colormap=colormap
        )
    elif photometric == "miniswhite":
        tifffile.imwrite(path, rng.integers(0, 256, (6, 7), dtype=np.uint8), photometric="miniswhite")
    else:
        tifffile.imwrite(path, rng.random((6, 7)) < 0.5)  # tifffile writes bool as min-is-white
    with Image.open(path) as expected:
        wanted = np.asarray(expected.convert("RGB" if photometric == "palette" else "L"))
    assert np.array_equal(decode_image(path, DEFAULT), wanted)


@pytest.mark.parametrize("kind, options", [("PNG", {}), ("WEBP", {"quality": 80}), ("WEBP", {"lossless": True})])
def test_a_png_or_webp_cut_short_and_zero_filled_is_refused_and_one_padded_after_its_end_is_not(
        scratch: Path, kind: str, options: dict) -> None:
    """Pillow decoded the zeros as pixels (about half the rows made up, no error): a result record
    that no resume would redo, as for the JPEGs refused before."""
    picture = np.array(Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
                       .resize((200, 150)))
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, kind, **options)
    whole = buffer.getvalue()
    for fraction in (0.5, 0.95):
        cut = int(len(whole) * fraction)
        path = scratch / f"cut.{kind.lower()}"
        path.write_bytes(whole[:cut] + bytes(len(whole) - cut))
        with pytest.raises(DecodeError, match="zero bytes where its image data should end"):
            decode_image(path, DEFAULT)
    (scratch / "whole").write_bytes(whole)
    for padding in (100, 70_000):  # zeros after a complete image: fine (more than 64 KiB was refused)
        (scratch / "padded").write_bytes(whole + bytes(padding))
        assert np.array_equal(decode_image(scratch / "padded", DEFAULT), decode_image(scratch / "whole", DEFAULT))


def test_a_png_whose_last_byte_alone_is_zero_filled_is_refused(scratch: Path) -> None:
    """The test for zeros reads the file's very last byte: a PNG written but for its last byte (its IEND
    chunk's CRC), zero-filled, is refused as one zero-filled from further back is."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(buffer, "PNG")
    whole = buffer.getvalue()
    assert whole[-2] != 0
    path = scratch / "last-byte.png"
    path.write_bytes(whole[:-1] + b"\0")
    with pytest.raises(DecodeError, match="truncated PNG file: zero bytes where its image data should end"):
        decode_image(path, DEFAULT)


def test_a_webp_whose_exif_ends_in_zeros_is_no_cut_file(scratch: Path) -> None:
    """Only its image data's end counts: EXIF padded with zeros, after the image, was refused."""
    exif = Image.Exif()
    exif[0x10F] = "Camera"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(scratch / "x.webp", "WEBP",
                                                              exif=exif.tobytes() + bytes(200))
    assert decode_image(scratch / "x.webp", DEFAULT).shape == (64, 64, 3)


def test_a_webp_cut_short_after_an_odd_sized_chunk_is_refused(scratch: Path) -> None:
    """RIFF pads a chunk of odd size with a byte: an ICC profile of 3 bytes comes before the image
    data, and a walk that missed the pad never found the image data, so the zero-filled file passed."""
    picture = np.array(Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
                       .resize((200, 150)))
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "WEBP", quality=80, icc_profile=b"odd")
    whole = buffer.getvalue()
    assert whole[12:16] == b"VP8X" and b"ICCP\x03\0\0\0odd\0VP8 " in whole
    cut = int(len(whole) * 0.95)
    path = scratch / "cut-after-icc.webp"
    path.write_bytes(whole[:cut] + bytes(len(whole) - cut))
    with pytest.raises(DecodeError, match="truncated WebP file: zero bytes where its image data should end"):
        decode_image(path, DEFAULT)
    path.write_bytes(whole + bytes(100))  # zeros after a complete one: fine
    assert decode_image(path, DEFAULT).shape == (150, 200, 3)


@pytest.mark.parametrize("layout", [{"rowsperstrip": 96}, {"rowsperstrip": 16}, {"tile": (64, 64)}])
@pytest.mark.parametrize("damage", ["zero-filled", "short"])
def test_a_jpeg_tiff_whose_last_segment_is_cut_short_is_refused(scratch: Path, layout: dict, damage: str) -> None:
    """libjpeg filled in the missing end of a JPEG strip or tile (5,487 made-up pixels of a single-strip
    tile, no error), where other compressions, and JPEG files, are refused so."""
    picture = np.array(Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
                       .resize((128, 96)))
    whole = scratch / "whole.tif"
    tifffile.imwrite(whole, picture, compression="jpeg", photometric="rgb", **layout)
    data = bytearray(whole.read_bytes())
    with tifffile.TiffFile(whole) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[-1], page.databytecounts[-1]
        counts = page.tags[325 if page.is_tiled else 279]
        width = 2 if counts.dtype == 3 else 4  # SHORT or LONG
        count_at = counts.valueoffset + width * (len(page.dataoffsets) - 1)
    cut = offset + count * 6 // 10
    if damage == "zero-filled":
        data[cut:offset + count] = bytes(offset + count - cut)
    else:  # its byte count cut too (the long at the tag's last entry)
        data[count_at:count_at + width] = (cut - offset).to_bytes(width, "little")
    (scratch / "cut.tif").write_bytes(data)
    with pytest.raises(DecodeError, match="JPEG data does not end with its end-of-image marker"):
        decode_image(scratch / "cut.tif", DEFAULT)
    assert decode_image(whole, DEFAULT).shape == (96, 128, 3)


@pytest.mark.parametrize("layout", [{"rowsperstrip": 96}, {"rowsperstrip": 32}, {"tile": (64, 64)}])
def test_a_webp_tiff_whose_last_segment_is_zero_filled_is_refused(scratch: Path, layout: dict) -> None:
    """libwebp filled in a WebP strip or tile whose end was zero-filled (a download that preallocates
    its file), with made-up pixels and no error, where a WebP file so damaged is refused."""
    pytest.importorskip("imagecodecs")
    picture = np.array(Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
                       .resize((128, 96)))
    whole = scratch / "whole.tif"
    tifffile.imwrite(whole, picture, compression="webp", photometric="rgb", **layout)
    with tifffile.TiffFile(whole) as tif:
        offset, count = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    data = bytearray(whole.read_bytes())
    cut = offset + count * 6 // 10
    data[cut:offset + count] = bytes(offset + count - cut)
    (scratch / "cut.tif").write_bytes(data)
    with pytest.raises(DecodeError, match=r"(strip|tile) \d+'s WebP image data ends in zeros"):
        decode_image(scratch / "cut.tif", DEFAULT)
    assert decode_image(whole, DEFAULT).shape == (96, 128, 3)


def test_an_ndpi_style_jpeg_tiff_cut_at_its_restart_markers_decodes(scratch: Path) -> None:
    """NDPI's McuStarts cut one JPEG stream into segments at its restart markers: only the last ends
    with the end-of-image marker (tifffile adds it), so every such file was refused as cut short."""
    import struct

    cv2 = pytest.importorskip("cv2")
    picture = (np.add.outer(np.arange(64), np.arange(64)) * 2 % 256).astype(np.uint8)
    stream = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_RST_INTERVAL, 8])[1].tobytes()
    at = 2
    while True:  # to the start of the scan's data
        marker, length = struct.unpack(">HH", stream[at:at + 4])
        if marker == 0xFFDA:
            scan = at + 2 + length
            break
        at += 2 + length
    starts = [scan] + [k + 2 for k in range(scan, len(stream) - 1) if stream[k] == 0xFF and 0xD0 <= stream[k + 1] <= 0xD7]
    path = scratch / "slide.ndpi.tif"
    tifffile.imwrite(path, data=iter([stream]), shape=(64, 64), dtype=np.uint8, compression=7,
                     photometric="minisblack", rowsperstrip=64,
                     extratags=[(65420, "I", 1, 1, True), (65426, "I", len(starts), starts, True),
                                (271, "s", 0, "Hamamatsu", True)])
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].jpegheader and len(tif.pages[0].dataoffsets) > 1  # read as NDPI, in pieces
    assert np.array_equal(decode_image(path, DEFAULT), cv2.imdecode(np.frombuffer(stream, np.uint8), 0))


@pytest.mark.parametrize("dtype, nodata", [(np.int16, -9999), (np.float32, -9999.5), (np.uint16, 65000)])
def test_min_is_white_keeps_its_gdal_nodata_pixels_out_of_the_stretch(scratch: Path, dtype, nodata) -> None:
    """Inverted, the samples no longer matched the nodata value (-9999 became 9998): the nodata
    block counted as data, dominated the stretch, and came out white."""
    samples = (np.add.outer(np.arange(64), np.arange(64)) * 10).astype(dtype)
    samples[:16, :16] = nodata
    tag = [(42113, "s", 0, str(nodata), True)]
    tifffile.imwrite(scratch / "white.tif", samples, photometric="miniswhite", extratags=tag)
    white = decode_image(scratch / "white.tif", DEFAULT)
    tifffile.imwrite(scratch / "black.tif", samples, photometric="minisblack", extratags=tag)
    black = decode_image(scratch / "black.tif", DEFAULT)
    assert (white[:16, :16] == 0).all()
    valid = np.ones(white.shape, bool)
    valid[:16, :16] = False
    assert np.array_equal(white[valid].astype(int), 255 - black[valid].astype(int))  # the same stretch, mirrored


@pytest.mark.parametrize("photometric", ["miniswhite", "minisblack"])
def test_a_1_bit_tiff_with_a_gdal_nodata_value_decodes_as_pillow_reads_it(scratch: Path, photometric: str) -> None:
    """1-bit samples take no nodata (they become 0/255 as they are); min-is-white ones with the tag
    were refused as "damaged TIFF file: Invalid integer data type 'b'." (its inversion asked numpy
    for the range of a bool)."""
    path = scratch / f"mask-{photometric}.tif"
    tifffile.imwrite(path, np.random.default_rng(12).random((6, 7)) < 0.5, photometric=photometric,
                     extratags=[(42113, "s", 0, "0", True)])
    with Image.open(path) as expected:
        wanted = np.asarray(expected.convert("L"))
    assert np.array_equal(decode_image(path, DEFAULT), wanted)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("photometric", ["minisblack", "miniswhite"])
def test_tiff_samples_of_fewer_than_8_bits_agree_with_pillow(scratch: Path, bits: int, photometric: str) -> None:
    """2- and 4-bit gray TIFFs were read as their raw 0..3 / 0..15 (near black, where the same
    picture as a PNG spans 0..255), and min-is-white ones inverted as 255 - x (almost all white)."""
    samples = np.random.default_rng(bits).integers(0, 1 << bits, (5, 9)).astype(np.uint8)
    path = scratch / f"{photometric}{bits}.tif"
    if bits == 1:
        tifffile.imwrite(path, samples.astype(bool), photometric=photometric)
    else:
        tifffile.imwrite(path, samples, bitspersample=bits, photometric=photometric)
    with Image.open(path) as expected:
        wanted = np.asarray(expected.convert("L"))
    assert np.array_equal(decode_image(path, DEFAULT), wanted)
    top = (1 << bits) - 1  # and by the docstring's words, independently of Pillow
    values = top - samples if photometric == "miniswhite" else samples
    assert np.array_equal(decode_image(path, DEFAULT), values.astype(np.uint16) * 255 // top)


@pytest.mark.parametrize("bits, expected", [(3, [0, 36, 73, 109, 146, 182, 219, 255]),
                                            (5, [0, 8, 16, 25, 33, 41, 49, 58])])
def test_tiff_samples_of_3_or_5_bits_are_rounded_onto_0_to_255(scratch: Path, bits: int, expected: list) -> None:
    """255 x / (2^b - 1) rounded to nearest, as PNG and Pillow scale: for 1, 2 and 4 bits the division
    is exact, so only an odd depth shows the rounding (3-bit 2 is 72.86: 73, not 72)."""
    samples = np.arange(8, dtype=np.uint8).reshape(2, 4)
    path = scratch / f"gray{bits}.tif"
    tifffile.imwrite(path, samples, bitspersample=bits, photometric="minisblack")
    assert decode_image(path, DEFAULT).ravel().tolist() == expected


@pytest.mark.parametrize("bits, expected", [(6, [0, 4, 125, 130, 251, 255]), (7, [0, 2, 126, 129, 253, 255])])
def test_tiff_samples_of_6_or_7_bits_are_brought_onto_0_to_255_too(scratch: Path, bits: int, expected: list) -> None:
    """Every depth under 8 is scaled, 7 included (by hand: 6-bit 32 is 129.52, 7-bit 64 is 128.50: 130, 129)."""
    top = (1 << bits) - 1
    samples = np.array([[0, 1, top // 2], [top // 2 + 1, top - 1, top]], np.uint8)
    path = scratch / f"gray{bits}.tif"
    tifffile.imwrite(path, samples, bitspersample=bits, photometric="minisblack")
    assert decode_image(path, DEFAULT).ravel().tolist() == expected


@pytest.mark.parametrize("photometric, expected", [("minisblack", [0, 255, 255, 255, 119, 136]),
                                                   ("miniswhite", [255, 0, 0, 0, 136, 119])])
def test_tiff_samples_beyond_their_bits_per_sample_count_as_the_largest(scratch: Path, photometric, expected):
    """A PNG-compressed strip sizes its own samples: one whose TIFF says 4 bits while its PNG holds 8
    (a damaged file) gives samples past 15, which count as 15 (white, black inverted), not as bytes
    wrapped around (16 x 17 = 272 gave 16)."""
    pytest.importorskip("imagecodecs")
    samples = np.array([[0, 15, 16, 200, 7, 8]], np.uint8)
    path = scratch / f"beyond-{photometric}.tif"
    path.write_bytes(_tiff_with_tag_value(samples, 258, 4, compression="png", photometric=photometric))
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.bitspersample == 4 and tif.pages.first.asarray().tolist() == samples.tolist()
    assert decode_image(path, DEFAULT).ravel().tolist() == expected


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32])
def test_min_is_white_signed_and_float_samples_are_inverted(scratch: Path, dtype) -> None:
    """They were used as stored: the brightest sample stayed the brightest."""
    values = (np.random.default_rng(7).random((6, 8)) * 200 - 50).astype(dtype)
    path = scratch / "white.tif"
    tifffile.imwrite(path, values, photometric="miniswhite")
    black = scratch / "black.tif"
    tifffile.imwrite(black, -values if dtype().dtype.kind == "f" else ~values, photometric="minisblack")
    for stretch in ("minmax", "percentile"):
        got = decode_image(path, DecodeOptions(stretch=stretch))
        assert got.ravel()[values.argmax()] == 0 and got.ravel()[values.argmin()] == 255
        if dtype().dtype.kind == "i":  # -1 - x: the same as the min-is-black file of ~x
            assert np.array_equal(got, decode_image(black, DecodeOptions(stretch=stretch)))


def test_bitdepth_of_signed_samples_of_fewer_than_8_bits_is_that_of_int8() -> None:
    from gpu_pipeline.inputs.normalise import fixed_depth

    assert fixed_depth(np.array([-8, 0, 3, 7, 127], np.int8), 4).tolist() == [0, 0, 6, 14, 254]  # (it raised)


def test_bitdepth_of_a_12_bit_tiff_is_its_bits_not_its_containers(scratch: Path) -> None:
    """12-bit samples come as uint16: the stretch took their high byte (0..15), not x >> 4."""
    path = scratch / "twelve.tif"
    tifffile.imwrite(path, np.array([[0, 100, 4095, 2048]], np.uint16), bitspersample=12, photometric="minisblack")
    assert decode_image(path, DecodeOptions(stretch="bitdepth")).tolist() == [[0, 6, 255, 128]]
    tifffile.imwrite(path, np.array([[0, 100, 4095, 2048]], np.uint16), bitspersample=12, photometric="miniswhite")
    assert decode_image(path, DecodeOptions(stretch="bitdepth")).tolist() == [[255, 249, 0, 127]]


def test_bitdepth_of_12_bit_samples_beyond_12_bits_is_255(scratch: Path) -> None:
    """A PNG-compressed strip sizes its own samples: a TIFF saying 12 bits whose PNG holds 16 (a
    damaged file) gives samples past 4095, which give 255, not x >> 4 wrapped around (4096: 0)."""
    pytest.importorskip("imagecodecs")
    samples = np.array([[0, 4095, 4096, 40000]], np.uint16)
    path = scratch / "beyond-12.tif"
    path.write_bytes(_tiff_with_tag_value(samples, 258, 12, compression="png", photometric="minisblack"))
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.bitspersample == 12 and tif.pages.first.asarray().tolist() == samples.tolist()
    assert decode_image(path, DecodeOptions(stretch="bitdepth")).tolist() == [[0, 255, 255, 255]]


def test_bitdepth_of_a_min_is_white_float_tiff_is_that_of_1_minus_x(scratch: Path) -> None:
    """Floats are taken as [0, 1]: min-is-white x is 1 - x, so 0.25 gives floor(0.75 * 255 + 0.5) = 191
    (-x, which the statistical stretches cannot tell from 1 - x, made every such sample 0)."""
    path = scratch / "white-float.tif"
    tifffile.imwrite(path, np.array([[0.0, 0.25, 0.5, 1.0]], np.float32), photometric="miniswhite")
    assert decode_image(path, DecodeOptions(stretch="bitdepth")).tolist() == [[255, 191, 128, 0]]


@pytest.mark.parametrize(
    "dtype, nodata", [(np.uint16, 65000), (np.int16, -9999), (np.int32, -9999), (np.float32, -9999.5)]
)
def test_gdal_nodata_is_excluded_from_the_stretch_and_becomes_0(scratch: Path, dtype, nodata) -> None:
    rng = np.random.default_rng(6)
    bands = rng.integers(1000, 3000, (20, 20, 3)).astype(dtype)
    bands[:5] = nodata  # a border far outside the data: it would dominate the stretch
    path = write_tiff(scratch / "nodata.tif", bands, extratags=[(42113, "s", 0, str(nodata), True)])
    for stretch in ["minmax", "percentile"]:
        decoded = decode_image(path, DecodeOptions(stretch=stretch))
        assert np.array_equal(decoded, oracle(bands, stretch, nodata=nodata))
        assert (decoded[:5] == 0).all() and (decoded[5:].max(axis=(0, 1)) == 255).all()


@pytest.mark.parametrize("dtype, nodata", [(np.uint16, 0), (np.int16, -9999)])
@pytest.mark.parametrize("stretch", ["minmax", "percentile"])
def test_a_band_that_is_all_nodata_becomes_0(scratch: Path, dtype, nodata, stretch) -> None:
    """A tile at a scene's edge: one band holds nothing but the nodata value, so no sample is left
    for its stretch; that band is 0, the others stretch as usual (the minmax stretch failed)."""
    bands = np.random.default_rng(7).integers(1000, 3000, (12, 10, 3)).astype(dtype)
    bands[:, :, 1] = nodata
    path = write_tiff(scratch / "edge.tif", bands, extratags=[(42113, "s", 0, str(nodata), True)])
    decoded = decode_image(path, DecodeOptions(stretch=stretch))
    assert np.array_equal(decoded, oracle(bands, stretch, nodata=nodata))
    assert not decoded[:, :, 1].any() and decoded[:, :, 0].max() == 255


@pytest.mark.parametrize("dtype, nodata", [(np.uint16, -9999), (np.int16, 2500.5), (np.int32, 1e12)])
def test_a_gdal_nodata_value_no_sample_can_equal_marks_no_pixel(scratch: Path, dtype, nodata) -> None:
    """-9999 on uint16 samples (a file converted from signed data, nodata kept), a fraction on
    integers: no sample equals it, so every sample is data, as GDAL compares them; the file is
    not an error for it."""
    bands = np.random.default_rng(11).integers(0, 250, (12, 10, 1)).astype(dtype)
    bands[0, 0] = 2500  # (what 2500.5 truncated would mark)
    path = write_tiff(scratch / "nodata-out-of-range.tif", bands, extratags=[(42113, "s", 0, str(nodata), True)])
    for stretch in ["minmax", "percentile"]:
        assert np.array_equal(decode_image(path, DecodeOptions(stretch=stretch)), oracle(bands, stretch))


@pytest.mark.parametrize("text", ["none", "", "1e"])
def test_a_gdal_nodata_tag_that_is_no_number_marks_no_pixel(scratch: Path, text: str) -> None:
    """A malformed tag is not a damaged image: every sample is data (it was refused as "damaged
    TIFF file: could not convert string to float")."""
    bands = np.random.default_rng(18).integers(0, 4000, (12, 10, 1)).astype(np.uint16)
    path = write_tiff(scratch / "nodata-text.tif", bands, extratags=[(42113, "s", 0, text, True)])
    assert np.array_equal(decode_image(path, DEFAULT), oracle(bands))


def test_bundled_uint16_geotiff_matches_the_oracle_with_its_nodata(bundled_data_dir: Path) -> None:
    path = bundled_data_dir / "multiband/rio-tiler_rgb.tif"
    scene = tifffile.imread(path)
    with tifffile.TiffFile(path) as tif:
        nodata = float(tif.pages[0].tags[42113].value)
    decoded = decode_image(path, DEFAULT)
    window = (slice(90, 130), slice(0, 40))  # the per-pixel oracle is slow: a window with data and nodata
    for band in range(3):
        samples = scene[:, :, band]
        valid = samples != nodata
        assert 0 < valid[window].sum() < valid[window].size
        in_window = np.zeros(samples.shape, bool)
        in_window[window] = True
        expected = oracle_band(samples, valid, "percentile", where=in_window)
        assert np.array_equal(decoded[window][:, :, band], expected[window])


# --------------------------------------------------------------------------------------------
# Stretch rules


def decode_values(scratch: Path, values, stretch: str = "percentile", dtype=np.uint16) -> np.ndarray:
    data = np.asarray(values, dtype=dtype).reshape(1, -1, 1)
    return decode_image(write_tiff(scratch / "values.tif", data), DecodeOptions(stretch=stretch))[0]


def test_minmax_hand_example(scratch: Path) -> None:
    # lo 100, hi 300: 255*50/200 = 63.75 -> 64; 255*100/200 = 127.5 -> 128 (halves up)
    assert decode_values(scratch, [100, 150, 200, 300], "minmax").tolist() == [0, 64, 128, 255]


def test_percentile_hand_example(scratch: Path) -> None:
    # 101 values 0..100: k = 2*100 // 100 = 2, lo = 2, hi = 98; 50 -> 255*48/96 = 127.5 -> 128
    out = decode_values(scratch, np.arange(101)[::-1])[::-1]
    assert out[[0, 1, 2, 3, 50, 97, 98, 99, 100]].tolist() == [0, 0, 0, 3, 128, 252, 255, 255, 255]


@pytest.mark.parametrize("n", [1, 2, 3, 49, 50, 51, 99, 100, 101, 150, 151, 1000])
def test_percentile_index_rule_at_every_boundary(scratch: Path, n: int) -> None:
    # k = 2 (n - 1) // 100 steps at n = 51, 101, 151: numpy's "lower"/"higher" percentiles agree
    values = np.random.default_rng(n).permutation(n) * 3
    assert np.array_equal(
        decode_values(scratch, values), oracle(values.reshape(1, -1, 1).astype(np.uint16))[0]
    )


def test_constant_band_is_0_and_a_step_when_lo_equals_hi(scratch: Path) -> None:
    assert decode_values(scratch, [500] * 6).tolist() == [0] * 6
    values = [7] * 99 + [9000]  # the 98th percentile is still 7
    assert decode_values(scratch, values).tolist() == [0] * 99 + [255]


def test_a_16_bit_image_taller_than_wide_is_stretched_over_all_its_rows(scratch: Path):
    """The histogram is counted a megapixel of rows at a time: every row of a 2100 x 500 band counts,
    the last row's 1000 included (minmax: 500 gives 128, 1000 gives 255)."""
    band = np.zeros((2100, 500), np.uint16)
    band[:10] = 500
    band[-1] = 1000
    path = write_tiff(scratch / "tall16.tif", band[:, :, None])
    decoded = decode_image(path, DecodeOptions(stretch="minmax"))
    assert decoded[0, 0] == 128 and decoded[-1, 0] == 255 and decoded[1000, 0] == 0


def test_bitdepth(scratch: Path) -> None:
    assert decode_values(scratch, [0, 255, 256, 65535], "bitdepth").tolist() == [0, 0, 1, 255]
    assert decode_values(scratch, [-5, 0, 127, 128, 32767], "bitdepth", np.int16).tolist() == [
        0,
        0,
        0,
        1,
        255,
    ]
    floats = [-1.0, 0.0, 0.5, 0.002, 1.0, 7.0, np.nan]
    assert decode_values(scratch, floats, "bitdepth", np.float32).tolist() == [0, 0, 128, 1, 255, 255, 0]


def test_nan_and_inf_are_nodata(scratch: Path) -> None:
    out = decode_values(scratch, [np.nan, 1.0, np.inf, 3.0, -np.inf, 2.0], "minmax", np.float32)
    assert out.tolist() == [0, 0, 0, 255, 0, 128]


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_64_bit_integer_samples_are_refused(scratch: Path, dtype) -> None:
    """Documented: the exact map's (c - lo) x 255 overflows int64 for such samples (a span of 2^62
    gave wrapped, made-up pixels), so they are refused, not stretched."""
    path = write_tiff(scratch / "wide64.tif", np.array([[0, 1 << 62, 3 << 61]], dtype)[:, :, None])
    with pytest.raises(DecodeError, match=f"^{np.dtype(dtype).name} samples are not supported$") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "normalise")


@pytest.mark.parametrize("stretch", ["minmax", "percentile", "bitdepth"])
def test_nan_reaches_no_arithmetic_and_warns_of_nothing(scratch: Path, stretch: str) -> None:
    """NaN samples are set aside before the map: cast to uint8 they gave numpy's "invalid value
    encountered in cast" on stderr (the product's stderr carries only its own messages), though
    they became 0 after."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_values(scratch, [np.nan, 0.25, np.inf, 0.75, -np.inf, 0.5], stretch, np.float32)
    assert out[0] == out[2] == out[4] == 0


@HYPOTHESIS
@given(
    values=st.sampled_from([np.int8, np.uint16, np.int16, np.int32, np.float32]).flatmap(
        lambda dtype: hnp.arrays(
            dtype,
            st.integers(1, 300),
            elements=st.floats(-1e5, 1e5, width=32) if dtype == np.float32 else None,
        )
    ),
    stretch=st.sampled_from(["percentile", "minmax"]),
)
def test_stretch_is_monotone_and_maps_lo_to_0_and_hi_to_255(scratch: Path, values, stretch: str) -> None:
    out = decode_values(scratch, values, stretch, values.dtype)
    order = np.argsort(values, kind="stable")
    assert (np.diff(out[order].astype(int)) >= 0).all()
    if stretch == "minmax":
        lo, hi = values.min(), values.max()
    else:
        lo, hi = np.percentile(values, 2, method="lower"), np.percentile(values, 98, method="higher")
    assert (out[values <= lo] == 0).all()
    if lo < hi:
        assert (out[values >= hi] == 255).all()


# --------------------------------------------------------------------------------------------
# Bands


def test_bands_pick_by_1_based_number(scratch: Path) -> None:
    rng = np.random.default_rng(7)
    bands = rng.integers(0, 256, (5, 6, 5), dtype=np.uint8)
    path = write_tiff(scratch / "five.tif", bands)
    assert np.array_equal(decode_image(path, DecodeOptions(bands=(5, 3, 1))), bands[:, :, [4, 2, 0]])
    assert np.array_equal(decode_image(path, DecodeOptions(bands=(4,))), bands[:, :, 3])


def test_bands_apply_to_pillow_images_alpha_included(scratch: Path) -> None:
    rgba = np.random.default_rng(8).integers(0, 256, (4, 3, 4), dtype=np.uint8)
    path = save(rgba, scratch / "bands.png")
    assert np.array_equal(decode_image(path, DecodeOptions(bands=(4,))), rgba[:, :, 3])
    assert np.array_equal(decode_image(path, DecodeOptions(bands=(3, 2, 1))), rgba[:, :, 2::-1])


def test_two_bands_give_gray_and_four_give_rgb(scratch: Path) -> None:
    bands = np.random.default_rng(9).integers(0, 256, (4, 3, 4), dtype=np.uint8)
    assert np.array_equal(
        decode_image(write_tiff(scratch / "two.tif", bands[:, :, :2]), DEFAULT), bands[:, :, 0]
    )
    assert np.array_equal(decode_image(write_tiff(scratch / "four.tif", bands), DEFAULT), bands[:, :, :3])


def test_five_band_fixture_needs_bands() -> None:
    path = FIXTURES / "five_band_uint16.tif"
    with pytest.raises(DecodeError, match="5 bands.*--bands") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "normalise")
    data = tifffile.imread(path)
    assert np.array_equal(decode_image(path, DecodeOptions(bands=(5, 4, 1))), oracle(data[:, :, [4, 3, 0]]))


def test_band_out_of_range_names_the_band_count(scratch: Path) -> None:
    path = save(np.zeros((3, 3, 3), np.uint8), scratch / "rgb.png")
    with pytest.raises(DecodeError, match="has 3 bands") as info:
        decode_image(path, DecodeOptions(bands=(4, 3, 2)))
    assert_one_line(info.value, "normalise")


# --------------------------------------------------------------------------------------------
# Errors


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG (8-bit gray) claiming a size, with a few bytes of pixel data instead of all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(100)))


def tiff_claiming(path: Path, width: int, height: int) -> Path:
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8))
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        for name, value in [("ImageWidth", width), ("ImageLength", height)]:
            raw[tags[name].valueoffset : tags[name].valueoffset + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(raw))
    return path


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(10).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def test_empty_file_is_a_read_error(scratch: Path) -> None:
    with pytest.raises(DecodeError, match="empty") as info:
        decode_image(touch(scratch / "empty.png", b""), DEFAULT)
    assert_one_line(info.value, "read")


@pytest.mark.filterwarnings("ignore:.*writing zero-size array:UserWarning")  # tifffile, writing the test file
@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (4, 0), (0, 3, 3)])
def test_a_tiff_without_pixels_is_a_decode_error(scratch: Path, shape) -> None:
    """Not a compute failure of whichever backend meets it (verify counted it against the reference)."""
    path = scratch / f"empty-{'x'.join(map(str, shape))}.tif"
    tifffile.imwrite(path, np.zeros(shape, np.uint8))
    with pytest.raises(DecodeError, match=r"the image has no pixels \(\d+x\d+\)") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "decode")


@pytest.mark.parametrize("tag", ["ImageLength", "ImageWidth"])
def test_a_tiff_whose_tags_declare_no_rows_or_no_columns_is_a_decode_error(scratch: Path, tag: str) -> None:
    """tifffile writes any empty array as 0 x 0, so the test above never met one side empty: a TIFF
    whose tags say 5 x 0 or 0 x 4 (hand-made, or damaged) must not reach a backend either."""
    path = scratch / f"no-{tag}.tif"
    tifffile.imwrite(path, np.full((4, 5), 7, np.uint8))
    with tifffile.TiffFile(path) as tif:
        where = tif.pages.first.tags[tag].valueoffset
    data = bytearray(path.read_bytes())
    data[where:where + 4] = bytes(4)  # (a LONG, as tifffile writes it)
    path.write_bytes(data)
    with pytest.raises(DecodeError, match=r"^the image has no pixels \((5x0|0x4)\)$") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "decode")


def test_unreadable_files_are_read_errors(scratch: Path, monkeypatch) -> None:
    folder = scratch / "folder.png"
    folder.mkdir(exist_ok=True)
    with pytest.raises(DecodeError, match="cannot read") as info:
        decode_image(folder, DEFAULT)
    assert_one_line(info.value, "read")
    with pytest.raises(DecodeError) as info:
        decode_image(scratch / "does-not-exist.png", DEFAULT)
    assert_one_line(info.value, "read")

    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file).endswith("secret.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    path = touch(scratch / "secret.png", encoded("PNG"))
    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(DecodeError, match="Permission denied") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "read")


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("truncated.png", encoded("PNG")[:200], "truncated"),
        ("truncated.jpg", encoded("JPEG")[:300], "truncated"),
        ("truncated.gif", encoded("GIF")[:100], "damaged GIF"),
        ("truncated.webp", encoded("WEBP")[:60], None),
        ("corrupt.png", encoded("PNG")[:40] + bytes(range(256)) * 4, "damaged PNG"),
        ("corrupt.webp", encoded("WEBP")[:12] + bytes(range(256)) * 4, "damaged WebP"),
        (
            "garbage.jpg",
            bytes(np.random.default_rng(11).integers(0, 256, 999, dtype=np.uint8)),
            "not a supported",
        ),
        ("text.png", b"this is not an image\n" * 10, "not a supported image"),
        ("truncated.tif", None, None),
    ],
    ids=lambda value: value if isinstance(value, str) and "." in value else "",
)
def test_damaged_or_foreign_files_are_decode_errors(
    scratch: Path, name: str, content: bytes | None, says: str | None
) -> None:
    if content is None:
        noise = np.random.default_rng(12).integers(0, 65536, (64, 64, 3), dtype=np.uint16)
        content = write_tiff(scratch / "whole.tif", noise, compression="zlib").read_bytes()
        content = content[: len(content) // 2]
    with pytest.raises(DecodeError, match=says) as info:
        decode_image(touch(scratch / name, content), DEFAULT)
    assert_one_line(info.value, "decode")


@pytest.mark.filterwarnings("error")  # Pillow's DecompressionBombWarning must not escape
def test_decompression_bomb_is_refused_from_the_header(scratch: Path) -> None:
    # The headers claim 20000 x 20000 (or 100000 x 100000) pixels and carry no data: a refusal
    # naming the size proves the check ran before any pixel was decoded.
    png = touch(scratch / "bomb.png", png_header(20000, 20000))
    tif = tiff_claiming(scratch / "bomb.tif", 100000, 100000)
    for path, limit in [(png, 10**8), (tif, 10**9)]:
        with pytest.raises(DecodeError, match="over the limit") as info:
            decode_image(path, DecodeOptions(max_pixels=limit))
        assert_one_line(info.value, "decode")
    # Above Pillow's own limits but within ours: no Pillow error or warning, just missing data.
    with pytest.raises(DecodeError) as info:
        decode_image(png, DEFAULT)
    assert "over the limit" not in str(info.value)
    assert_one_line(info.value, "decode")


def test_the_pixel_limits_refusal_names_width_by_height(scratch: Path) -> None:
    """The size as the image is described everywhere, columns first: 300 x 200 = 60,000 (not 200 x 300)."""
    path = tiff_claiming(scratch / "wide.tif", 300, 200)
    with pytest.raises(DecodeError, match=r"^300 x 200 = 60,000 pixels is over the limit of 59,999 ") as info:
        decode_image(path, DecodeOptions(max_pixels=59_999))
    assert_one_line(info.value, "decode")


@pytest.mark.parametrize("samples, refused", [(16, False), (17, True)])
def test_a_tiff_may_hold_16_samples_a_pixel_of_the_limit_and_not_one_more(scratch: Path, samples, refused):
    """One pixel at a limit of one: 16 samples are exactly the 16 a pixel of the limit, 17 one over."""
    path = write_tiff(scratch / f"samples-{samples}.tif", np.arange(samples, dtype=np.uint8).reshape(1, 1, samples))
    options = DecodeOptions(max_pixels=1, bands=(3,))
    if refused:
        with pytest.raises(DecodeError, match=r"^1 x 1 pixels of 17 samples: 17 samples is over the limit of 16 "):
            decode_image(path, options)
    else:
        assert decode_image(path, options).tolist() == [[2]]


def test_small_limit_refuses_a_real_image(scratch: Path) -> None:
    path = save(np.zeros((10, 10), np.uint8), scratch / "hundred.png")
    assert decode_image(path, DecodeOptions(max_pixels=100)).shape == (10, 10)
    with pytest.raises(DecodeError, match="10 x 10 = 100 pixels"):
        decode_image(path, DecodeOptions(max_pixels=99))


def test_a_cmyk_tiff_is_converted_as_pillow_converts_it(scratch: Path) -> None:
    """Its samples are not R, G, B: they were read as such (inverted colours, K dropped)."""
    cmyk = np.random.default_rng(12).integers(0, 256, (9, 13, 4), dtype=np.uint8)
    path = scratch / "cmyk.tif"
    tifffile.imwrite(path, cmyk, photometric="separated")
    with Image.open(path) as expected:  # Pillow's own TIFF reader: an independent decode
        assert expected.mode == "CMYK"
        wanted = np.asarray(expected.convert("RGB"))
    assert np.array_equal(decode_image(path, DEFAULT), wanted)
    tifffile.imwrite(path, cmyk.astype(np.uint16) * 257, photometric="separated")
    with pytest.raises(DecodeError, match="only 8-bit CMYK TIFFs are supported") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "decode")


def test_a_cmyk_tiff_with_an_extra_sample_is_converted_from_its_first_four(scratch: Path) -> None:
    """CMYK + alpha (or another extra sample): the fifth is dropped, the four converted as Pillow
    converts the same CMYK without it (five samples a pixel read as four gave shifted colours)."""
    cmyk = np.random.default_rng(16).integers(0, 256, (9, 13, 4), dtype=np.uint8)
    extra = np.random.default_rng(17).integers(0, 256, (9, 13, 1), dtype=np.uint8)
    four = scratch / "cmyk-four.tif"
    tifffile.imwrite(four, cmyk, photometric="separated")
    with Image.open(four) as expected:
        wanted = np.asarray(expected.convert("RGB"))
    five = scratch / "cmyk-five.tif"
    tifffile.imwrite(five, np.concatenate([cmyk, extra], axis=2), photometric="separated", extrasamples=[2])
    with tifffile.TiffFile(five) as tif:
        assert tif.pages.first.samplesperpixel == 5
    assert np.array_equal(decode_image(five, DEFAULT), wanted)


def test_jpeg_compressed_ycbcr_tiff_is_rgb_and_other_colour_models_are_refused(scratch: Path) -> None:
    rgb = np.random.default_rng(13).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    tifffile.imwrite(scratch / "jpeg.tif", rgb, photometric="rgb", compression="jpeg")  # stored as YCbCr
    with tifffile.TiffFile(scratch / "jpeg.tif") as tif:
        assert tif.pages.first.photometric == tifffile.PHOTOMETRIC.YCBCR
    with Image.open(scratch / "jpeg.tif") as expected:
        assert np.array_equal(decode_image(scratch / "jpeg.tif", DEFAULT), np.asarray(expected.convert("RGB")))
    for photometric, extra in [("ycbcr", {"subsampling": (1, 1)}), ("cielab", {})]:
        path = scratch / f"{photometric}.tif"
        tifffile.imwrite(path, rgb, photometric=photometric, **extra)  # uncompressed: samples as written
        with pytest.raises(DecodeError, match=f"TIFF colour model {photometric.upper()} is not supported") as info:
            decode_image(path, DEFAULT)
        assert_one_line(info.value, "decode")


def test_a_thumbnail_before_the_image_is_skipped(scratch: Path) -> None:
    with tifffile.TiffWriter(scratch / "thumbnail_first.tif") as tif:
        tif.write(np.full((4, 4), 99, np.uint8), subfiletype=1)  # a reduced-resolution copy
        tif.write(np.full((8, 6), 7, np.uint8))
    assert np.array_equal(decode_image(scratch / "thumbnail_first.tif", DEFAULT), np.full((8, 6), 7, np.uint8))


@pytest.mark.parametrize("what", ["samples", "tile"])
def test_a_tiff_declaring_many_samples_or_a_huge_tile_is_refused_before_decoding(scratch: Path, monkeypatch,
                                                                                  what: str) -> None:
    """Small files that decode to far more memory than their pixels say (575 and 444 MB peak)."""
    path = scratch / f"bomb-{what}.tif"
    if what == "samples":
        tifffile.imwrite(path, np.zeros((16, 16, 300), np.uint8), photometric="minisblack", planarconfig="contig",
                         compression="zlib")
        options, message = DecodeOptions(max_pixels=1000, bands=(1,)), "16 x 16 pixels of 300 samples: 76,800"
        # 13 bands at the limit still decode (a Sentinel-2 tile with --max-pixels its size)
        thirteen = write_tiff(scratch / "thirteen.tif", np.zeros((8, 8, 13), np.uint16))
        assert decode_image(thirteen, DecodeOptions(max_pixels=64, bands=(4, 3, 2))).shape == (8, 8, 3)
    else:
        tifffile.imwrite(path, np.zeros((16, 16), np.uint8), tile=(1024, 1024), compression="zlib")
        options, message = DecodeOptions(max_pixels=1000), "16 x 16 pixels of 1 sample in tiles of 1024 x 1024"
    assert path.stat().st_size < 20_000
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(DecodeError, match=f"{message}.* samples is over the limit of 16,000") as info:
        decode_image(path, options)
    assert_one_line(info.value, "decode")
    monkeypatch.undo()
    assert decode_image(path, DecodeOptions(max_pixels=1_000_000, bands=options.bands)).shape == (16, 16)


@pytest.mark.parametrize("depth", [2, 3])
def test_a_volumetric_tiff_is_refused_from_its_tags(scratch: Path, monkeypatch, depth: int) -> None:
    """An SGI volume (ImageDepth) holds depth x the pixels its width and height say: the limits count
    width x height, so it is refused before it is decoded, from a depth of 2."""
    path = scratch / "volume.tif"
    tifffile.imwrite(path, np.zeros((depth, 16, 16), np.uint8), volumetric=True, tile=(16, 16),
                     photometric="minisblack")
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(DecodeError, match=rf"^volumetric TIFF images \(depth {depth}\) are not supported$") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "decode")


def patch_jpeg_frame(path: Path, segment: int, width: int, height: int) -> Path:
    """Rewrite the size in a JPEG-compressed TIFF segment's frame header (the hostile test's bomb:
    636 bytes that decoded 1.6 gigapixels, a normal record)."""
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages.first.dataoffsets[segment]
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0", offset)
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(data)
    return path


def refused_before_decoding(path: Path, monkeypatch, message: str) -> None:
    """``path`` gives a one-line decode error saying ``message``, read whole or from its path, and
    no segment is decoded."""
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(DecodeError, match=message) as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "decode")
    assert list(gpu_io.decode_each([path], DEFAULT)) == [("decode", str(info.value))]


@pytest.mark.parametrize("tiled", [False, True])
def test_a_jpeg_tiff_segment_declaring_more_pixels_than_its_strip_or_tile_is_refused(scratch: Path, monkeypatch,
                                                                                    tiled: bool) -> None:
    pytest.importorskip("imagecodecs")
    path = scratch / f"jpeg-bomb-{tiled}.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="jpeg", tile=(32, 32) if tiled else None)
    patch_jpeg_frame(path, 3 if tiled else 0, 40000, 40000)
    assert path.stat().st_size < 3000
    where = "tile 4 declares 40000 x 40000 pixels, but a tile holds 32 x 32" if tiled else \
        "strip 1 declares 40000 x 40000 pixels, but a strip holds 64 x 64"
    refused_before_decoding(path, monkeypatch, f"^TIFF JPEG {where} \\(decompression-bomb guard\\)$")


def test_a_jpeg_strip_declaring_more_rows_than_its_strip_is_refused(scratch: Path, monkeypatch) -> None:
    """A strip holds RowsPerStrip rows, not the image's: a 16-row strip declaring the whole 64 x 64
    image passed, and each strip could decode to the whole image."""
    pytest.importorskip("imagecodecs")
    path = scratch / "jpeg-strip-rows.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="jpeg", rowsperstrip=16)
    patch_jpeg_frame(path, 1, 64, 64)
    refused_before_decoding(path, monkeypatch, "^TIFF JPEG strip 2 declares 64 x 64 pixels, but a strip holds "
                                               "64 x 16 ")



@pytest.mark.parametrize("tiled, width, height, holds", [(True, 33, 32, "a tile holds 32 x 32"),
                                                         (True, 32, 33, "a tile holds 32 x 32"),
                                                         (False, 65, 16, "a strip holds 64 x 16"),
                                                         (False, 64, 17, "a strip holds 64 x 16")])
def test_a_jpeg_segment_one_pixel_larger_than_its_strip_or_tile_is_refused(scratch: Path, monkeypatch, tiled: bool,
                                                                           width: int, height: int, holds: str):
    """The bound is the strip's or tile's own size, to the pixel: a tolerance of a column or a row
    went unseen by the tests of segments declaring far more."""
    pytest.importorskip("imagecodecs")
    path = scratch / f"jpeg-one-more-{tiled}-{width}x{height}.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="jpeg",
                     **({"tile": (32, 32)} if tiled else {"rowsperstrip": 16}))
    patch_jpeg_frame(path, 1, width, height)
    kind = "tile" if tiled else "strip"
    refused_before_decoding(path, monkeypatch, f"^TIFF JPEG {kind} 2 declares {width} x {height} pixels, but {holds} ")

def test_a_jpeg_tiffs_shared_tables_declaring_more_pixels_than_a_strip_are_refused(scratch: Path, monkeypatch):
    """libjpeg reads a frame header in JPEGTables (old JPEG) as one in the segment: tables saying
    40000 x 40000 must be refused as a strip saying so is."""
    pytest.importorskip("imagecodecs")
    frame = b"\xff\xc0\0\x0b\x08" + (40000).to_bytes(2, "big") * 2 + b"\x01\x01\x11\x00"  # SOF0: 1 component
    path = scratch / "jpeg-tables-bomb.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="jpeg", rowsperstrip=64,
                     extratags=[(347, 7, None, b"\xff\xd8" + frame + b"\xff\xd9", False)])
    refused_before_decoding(path, monkeypatch, "^TIFF JPEG strips' shared header declares 40000 x 40000 pixels, "
                                               "but a strip holds 64 x 64 ")


def test_a_jpeg_strip_without_a_frame_header_is_refused_though_its_tiff_has_jpeg_tables(scratch: Path, monkeypatch):
    """libtiff's JPEGTables hold the quantisation and Huffman tables, no frame header: they size
    nothing, so a strip whose own frame header cannot be read is refused as one without tables is
    (the tables were taken as a header read, and such a strip went to the codec unchecked)."""
    pytest.importorskip("imagecodecs")
    path = scratch / "jpeg-tables-headerless.tif"
    image = np.random.default_rng(14).integers(0, 256, (37, 41, 3), dtype=np.uint8)
    Image.fromarray(image).save(path, compression="tiff_jpeg", quality=90, strip_size=512)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        assert page.jpegtables and b"\xff\xc0" not in page.jpegtables and len(page.dataoffsets) > 2
        offset = page.dataoffsets[1]
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0", offset)
    data[sof + 1] = 0xFE  # the frame header becomes a comment: strip 2 declares no size
    path.write_bytes(bytes(data))
    refused_before_decoding(path, monkeypatch, "^damaged TIFF file: strip 2 has no JPEG header that can be checked ")


def segment_of_200_by_100(codec: str) -> tuple[bytes, int]:
    """A 200 x 100 image as its codec's encoder writes it (the header the check must read), and its
    samples a pixel."""
    imagecodecs = pytest.importorskip("imagecodecs")
    gray, rgb, rgba = (np.full((100, 200, n)[:2 + (n > 1)], 9, np.uint8) for n in (1, 3, 4))
    if codec.startswith("webp") and not imagecodecs.WEBP.available:
        pytest.skip("no WebP codec")
    return {
        "jpeg": lambda: (imagecodecs.jpeg8_encode(gray), 1),
        "png": lambda: (imagecodecs.png_encode(gray), 1),
        "webp-lossless": lambda: (imagecodecs.webp_encode(rgb, lossless=True), 3),  # VP8L
        "webp-lossy": lambda: (imagecodecs.webp_encode(rgb, level=50, lossless=False), 3),  # VP8
        "webp-alpha": lambda: (imagecodecs.webp_encode(rgba, level=50, lossless=False), 4),  # VP8X, ALPH, VP8
        "jpeg2000": lambda: (imagecodecs.jpeg2k_encode(gray, codecformat="J2K"), 1),
        "jp2": lambda: (imagecodecs.jpeg2k_encode(gray, codecformat="JP2"), 1),
    }[codec]()


@pytest.mark.parametrize("codec", ["jpeg", "png", "webp-lossless", "webp-lossy", "webp-alpha", "jpeg2000", "jp2"])
def test_a_tiff_segment_whose_codec_header_is_larger_than_its_strip_is_refused(scratch: Path, monkeypatch,
                                                                              codec: str) -> None:
    """Each codec that sizes itself, with its own encoder's header: a 200 x 100 segment in a 64 x 64
    strip (a 10 KB WebP strip decoded 16000 x 16000, 1.06 GB)."""
    segment, samples = segment_of_200_by_100(codec)
    compression = {"jp2": "jpeg2000", "jpeg2000": "jpeg2000"}.get(codec, codec.split("-")[0])
    path = scratch / f"{codec}-bomb.tif"
    tifffile.imwrite(path, iter([segment]), shape=(64, 64, samples) if samples > 1 else (64, 64), dtype=np.uint8,
                     compression=compression, photometric="rgb" if samples > 1 else "minisblack", rowsperstrip=64,
                     extrasamples=(2,) if samples == 4 else None)
    name = {"jpeg": "JPEG", "png": "PNG", "jpeg2000": "JPEG 2000", "jp2": "JPEG 2000"}.get(codec, "WebP")
    refused_before_decoding(path, monkeypatch, f"^TIFF {name} strip 1 declares 200 x 100 pixels, but a strip "
                                               "holds 64 x 64 ")


def test_a_webp_tiff_segment_that_is_an_animation_is_refused(scratch: Path, monkeypatch) -> None:
    """libwebp would decode every frame of an animated segment: its size cannot be checked from its
    first chunk, so the file is refused."""
    imagecodecs = pytest.importorskip("imagecodecs")
    if not imagecodecs.WEBP.available:
        pytest.skip("no WebP codec")
    frames = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    path = scratch / "webp-animated.tif"
    tifffile.imwrite(path, iter([buffer.getvalue()]), shape=(64, 64, 3), dtype=np.uint8, compression="webp",
                     photometric="rgb", rowsperstrip=64)
    refused_before_decoding(path, monkeypatch, "^damaged TIFF file: strip 1 has no WebP header that can be "
                                               r"checked \(or is animated\)$")


def test_a_jp2_tiff_segment_whose_palette_has_more_columns_than_samples_is_refused(scratch: Path, monkeypatch):
    """OpenJPEG decodes a palette JP2 segment to one plane per palette column (up to 255) whatever its
    codestream's components: 17 here, in a 1-sample strip."""
    segment = jp2_file(jpeg2000(np.zeros((64, 64), np.uint8), kind="j2k"), 64, 64, header=jp2_palette(17))
    path = scratch / "jp2-palette-bomb.tif"
    tifffile.imwrite(path, iter([segment]), shape=(64, 64), dtype=np.uint8, compression="jpeg2000", rowsperstrip=64)
    refused_before_decoding(path, monkeypatch, "^TIFF JPEG 2000 strip 1 declares 17 components, but a strip holds "
                                               "1 sample a pixel ")


def test_a_jp2_tiff_segment_without_its_codestream_box_is_refused(scratch: Path, monkeypatch):
    """A JP2 segment that ends before its codestream box (jp2c) declares no size that can be checked:
    refused, as a segment of another codec without a header is."""
    whole = jp2_file(jpeg2000(np.zeros((64, 64), np.uint8), kind="j2k"), 64, 64)
    segment = whole[:whole.index(b"jp2c") - 4]
    path = scratch / "jp2-no-codestream.tif"
    tifffile.imwrite(path, iter([segment]), shape=(64, 64), dtype=np.uint8, compression="jpeg2000", rowsperstrip=64)
    refused_before_decoding(path, monkeypatch, "^damaged TIFF file: strip 1 has no JPEG 2000 header that can be "
                                               r"checked \(or is animated\)$")


@pytest.mark.parametrize("kind", ["j2k", "jp2"])
def test_a_jpeg_2000_tiff_segment_whose_structures_are_many_times_its_samples_is_refused(scratch: Path, monkeypatch,
                                                                                        kind: str) -> None:
    """OpenJPEG allocates a segment's code-blocks and precincts before it decodes a sample, as it does
    a file's: a 359-byte TIFF of one 2048 x 2048 strip with 2 x 2 precincts took 2.3 GB (the bound
    on a JPEG 2000 file's structures was not applied to a TIFF's segments)."""
    codestream = empty_codestream(2048, coding_style(1))
    segment = codestream if kind == "j2k" else jp2_file(codestream, 2048, 2048)
    path = scratch / f"jpeg2000-structures-{kind}.tif"
    tifffile.imwrite(path, iter([segment]), shape=(2048, 2048), dtype=np.uint8, compression="jpeg2000",
                     rowsperstrip=2048)
    assert path.stat().st_size < 1000
    refused_before_decoding(path, monkeypatch, "^TIFF JPEG 2000 strip 1: 2048 x 2048 pixels in 1 tile of 1 component, "
                                               "4,191,232 code-blocks and 4,191,232 precincts: OpenJPEG allocates for "
                                               "them, before it decodes a sample, as much as 595,157,248 samples, "
                                               "141.9 times the segment's 4,194,304 \\(at most 16 times")


@pytest.mark.parametrize("columns, planes", [(5, 1), (8, 8)])
def test_a_jp2_tiff_segment_of_more_than_4_components_per_sample_is_refused(scratch: Path, monkeypatch, columns,
                                                                           planes) -> None:
    """A segment may declare up to 4 components (RGBA) whatever its samples, no more: 5 palette
    columns in a 1-sample strip; 8 in a strip of one plane of 8 (planar separate: a strip holds one
    sample a pixel, not the page's 8)."""
    segment = jp2_file(jpeg2000(np.zeros((64, 64), np.uint8), kind="j2k"), 64, 64, header=jp2_palette(columns))
    path = scratch / f"jp2-palette-{columns}-{planes}.tif"
    tifffile.imwrite(path, iter([segment] * planes), shape=(planes, 64, 64) if planes > 1 else (64, 64),
                     dtype=np.uint8, compression="jpeg2000", photometric="minisblack", rowsperstrip=64,
                     planarconfig="separate" if planes > 1 else None)
    refused_before_decoding(path, monkeypatch, f"^TIFF JPEG 2000 strip 1 declares {columns} components, but a "
                                               "strip holds 1 sample a pixel ")


def test_a_jpeg_2000_tiff_segment_whose_image_starts_off_the_origin_decodes(scratch: Path):
    """A codestream's image is its area from (XOsiz, YOsiz) to (Xsiz, Ysiz): 64 x 64 pixels at (8, 8)
    fit a 64 x 64 strip (Xsiz 72 is not its width)."""
    imagecodecs = pytest.importorskip("imagecodecs")
    pixels = np.random.default_rng(12).integers(0, 256, (64, 64), dtype=np.uint8)
    segment = io.BytesIO()
    Image.fromarray(pixels).save(segment, "JPEG2000", offset=(8, 8), tile_size=(64, 64), tile_offset=(8, 8),
                                 no_jp2=True)
    path = scratch / "jpeg2000-offset-strip.tif"
    tifffile.imwrite(path, iter([segment.getvalue()]), shape=(64, 64), dtype=np.uint8, compression="jpeg2000",
                     rowsperstrip=64)
    assert np.array_equal(decode_image(path, DEFAULT), pixels)


@pytest.mark.parametrize("compression", ["jpegxl", "lerc"])
def test_tiff_compressions_whose_segment_sizes_are_not_checked_still_decode(scratch: Path, compression) -> None:
    """Their headers are not read (documented), and the files are not refused for it: LERC is common in
    elevation GeoTIFFs."""
    imagecodecs = pytest.importorskip("imagecodecs")
    if not getattr(imagecodecs, compression.upper()).available:
        pytest.skip(f"no {compression} codec")
    path = scratch / f"{compression}.tif"
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tifffile.imwrite(path, pixels, compression=compression)
    assert np.array_equal(decode_image(path, DEFAULT), pixels)


@pytest.mark.parametrize("writer, compression, samples", [
    ("tifffile", "jpeg", 1), ("tifffile", "jpeg", 3), ("tifffile", "webp", 3), ("tifffile", "webp", 4),
    ("tifffile", "png", 1), ("tifffile", "png", 3), ("tifffile", "jpeg2000", 1), ("tifffile", "jpeg2000", 3),
    ("pillow", "jpeg", 1), ("pillow", "jpeg", 3)])
@pytest.mark.parametrize("tiled", [False, True])
def test_ordinary_self_sizing_tiffs_decode_as_tifffile_decodes_them(scratch: Path, monkeypatch, writer: str,
                                                                      compression: str, samples: int,
                                                                      tiled: bool) -> None:
    """Every segment's header is read and fits its strip or tile (a short last strip, edge tiles,
    libtiff's JPEGTables, YCbCr), and the pixels are tifffile's own."""
    imagecodecs = pytest.importorskip("imagecodecs")
    if compression == "webp" and not imagecodecs.WEBP.available:
        pytest.skip("no WebP codec")
    if writer == "pillow" and tiled:
        pytest.skip("Pillow writes strips only")
    image = np.random.default_rng(samples).integers(0, 256, (37, 41, samples)[:2 + (samples > 1)], dtype=np.uint8)
    path = scratch / f"{writer}-{compression}-{samples}-{tiled}.tif"
    if writer == "pillow":  # libtiff: JPEGTables, RGB
        Image.fromarray(image).save(path, compression="tiff_jpeg", quality=90, strip_size=512)
    else:  # tifffile: RGB JPEG as YCbCr
        tifffile.imwrite(path, image, compression=compression, photometric="rgb" if samples > 1 else "minisblack",
                         tile=(16, 32) if tiled else None, rowsperstrip=16, extrasamples=(2,) if samples == 4 else None)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        expected, segments = page.asarray(), len(page.dataoffsets)
        width, height = (page.tilewidth, page.tilelength) if page.is_tiled else (page.imagewidth, page.rowsperstrip)
    assert segments > 1
    declared = []
    read_size = tiff_io._segment_size
    monkeypatch.setattr(tiff_io, "_segment_size", lambda *a: declared.append(read_size(*a)) or declared[-1])
    decoded = decode_image(path, DecodeOptions(bands=(1, 2, 3)[:min(samples, 3)]))
    assert len(declared) == segments and all(w <= width and h <= height for w, h, _ in declared)
    assert np.array_equal(decoded, expected[..., :3] if samples > 1 else expected)


@pytest.mark.parametrize("comment_bytes, side", [(2000, 64), (1100, 8)])
def test_a_jpeg_tiff_segment_whose_frame_header_is_past_its_first_kilobyte_decodes(scratch: Path, comment_bytes,
                                                                                   side) -> None:
    """A segment's header is looked for in its first 1024 bytes, then in all of it: an APP segment of
    2 KB before the frame header (an ICC profile, a comment) is no reason to refuse the file, nor a
    comment of 1 KB in a segment of under 2 (all of the rest read, not another kilobyte's worth)."""
    imagecodecs = pytest.importorskip("imagecodecs")
    pixels = np.random.default_rng(5).integers(0, 256, (side, side), dtype=np.uint8)
    stream = bytes(imagecodecs.jpeg8_encode(pixels, level=90))
    comment = b"\xff\xfe" + (2 + comment_bytes).to_bytes(2, "big") + b"c" * comment_bytes  # COM, right after SOI
    segment = stream[:2] + comment + stream[2:]
    assert segment.index(b"\xff\xc0") > 1024 and (side == 64 or len(segment) < 2048)
    path = scratch / "jpeg-late-frame.tif"
    tifffile.imwrite(path, iter([segment]), shape=(side, side), dtype=np.uint8, compression="jpeg",
                     rowsperstrip=side)
    assert np.array_equal(decode_image(path, DEFAULT), imagecodecs.jpeg8_decode(stream))


def test_a_jpeg_tiff_segment_padded_with_zeros_after_its_end_of_image_marker_decodes(scratch: Path) -> None:
    """Zeros after a strip's end-of-image marker (a writer that pads its segments) are no cut
    stream: the file decodes as the stream it holds."""
    imagecodecs = pytest.importorskip("imagecodecs")
    pixels = np.random.default_rng(19).integers(0, 256, (16, 16), dtype=np.uint8)
    stream = bytes(imagecodecs.jpeg8_encode(pixels, level=90))
    path = scratch / "jpeg-padded.tif"
    tifffile.imwrite(path, iter([stream + b"\0" * 4]), shape=(16, 16), dtype=np.uint8, compression="jpeg",
                     rowsperstrip=16)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.databytecounts == (len(stream) + 4,)
    assert np.array_equal(decode_image(path, DEFAULT), imagecodecs.jpeg8_decode(stream))


@pytest.mark.parametrize("content, message", [(b"II*\x00", "damaged TIFF file: unpack requires"),
                                              (b"II*\x00\x08\x00\x00\x00", "damaged TIFF file: no image in it")])
def test_a_damaged_tiff_header_says_so(scratch: Path, content: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message) as info:
        decode_image(touch(scratch / "damaged.tif", content), DEFAULT)
    assert_one_line(info.value, "decode")


def test_a_file_rewritten_while_it_is_decoded_is_an_error_not_a_mix(scratch: Path, monkeypatch) -> None:
    """A large file is read piece by piece as it decodes: a sync rewriting it in place gave an edge
    count matching neither version, exit 0."""
    path = write_tiff(scratch / "rewritten.tif", np.zeros((64, 64, 1), np.uint8))
    os.utime(path, ns=(0, 0))  # a kernel with coarse timestamps would give the rewrite the same tick
    read_tiff = gpu_io.read_tiff

    def read_while_rewritten(fh, max_pixels):
        with open(path, "r+b") as writer:  # in place, the same size: only the bytes and times change
            writer.seek(-1, os.SEEK_END)
            writer.write(b"\x01")
        return read_tiff(fh, max_pixels)

    monkeypatch.setattr(gpu_io, "read_tiff", read_while_rewritten)
    with pytest.raises(DecodeError, match="the file changed while it was read") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "read")
    monkeypatch.undo()
    assert decode_image(path, DEFAULT).shape == (64, 64)  # left alone, it decodes


def test_a_file_rewritten_with_its_modification_time_put_back_is_an_error_not_a_mix(scratch: Path, monkeypatch):
    """A writer that puts the modification time back (``rsync --inplace``, ``touch -r``) leaves the
    size and mtime as they were: only the change time says the bytes changed under the decoder."""
    path = write_tiff(scratch / "rewritten-same-times.tif", np.zeros((64, 64, 1), np.uint8))
    os.utime(path, ns=(0, 0))
    read_tiff = gpu_io.read_tiff

    def read_while_rewritten(fh, max_pixels):
        before = os.stat(path).st_ctime_ns
        while os.stat(path).st_ctime_ns == before:  # (a coarse clock: until the rewrite gets a later tick)
            time.sleep(0.01)
            with open(path, "r+b") as writer:
                writer.seek(-1, os.SEEK_END)
                writer.write(b"\x01")
            os.utime(path, ns=(0, 0))
        assert os.stat(path).st_mtime_ns == 0
        return read_tiff(fh, max_pixels)

    monkeypatch.setattr(gpu_io, "read_tiff", read_while_rewritten)
    with pytest.raises(DecodeError, match="the file changed while it was read") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "read")


def test_missing_tiff_codec_says_which_package(scratch: Path, monkeypatch) -> None:
    path = write_tiff(scratch / "codec.tif", np.zeros((4, 4, 1), np.uint8))

    def needs_codec(*args, **kwargs):  # what tifffile raises for LZW without imagecodecs
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", needs_codec)
    with pytest.raises(DecodeError, match="needs the imagecodecs package") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "decode")


def test_unknown_tiff_compression_is_a_decode_error(scratch: Path) -> None:
    path = write_tiff(scratch / "unknown.tif", np.zeros((4, 4, 1), np.uint8))
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].tags["Compression"].valueoffset
    raw[offset : offset + 2] = struct.pack("<H", 65000)
    path.write_bytes(bytes(raw))
    with pytest.raises(DecodeError) as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "decode")


@pytest.mark.parametrize("where", ["header", "pixels"])
def test_a_tiff_that_runs_out_of_memory_says_so_not_that_it_is_damaged(scratch: Path, monkeypatch, where) -> None:
    """A MemoryError while tifffile reads the header or the pixels is the machine's, not the file's."""
    path = write_tiff(scratch / "memory.tif", np.zeros((4, 4, 1), np.uint8))

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(tifffile.TiffFile if where == "header" else tifffile.TiffPage,
                        "__init__" if where == "header" else "asarray", no_memory)
    with pytest.raises(DecodeError, match="^not enough memory to decode the image$") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "decode")


def test_an_io_error_while_a_tiffs_pixels_are_read_is_told_as_any_formats(scratch: Path, monkeypatch) -> None:
    """An OSError (EIO) from tifffile while it reads the strips is the decoders' common case, told
    in the same words as the same error from Pillow's decoder, not called a damaged TIFF."""
    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")

    tiff = write_tiff(scratch / "eio.tif", np.zeros((4, 4, 1), np.uint8))
    png = save(np.zeros((4, 4), np.uint8), scratch / "eio.png")
    monkeypatch.setattr(tifffile.TiffPage, "asarray", failing)
    monkeypatch.setattr(Image.Image, "load", failing)
    with pytest.raises(DecodeError) as from_tiff:
        decode_image(tiff, DEFAULT)
    with pytest.raises(DecodeError) as from_pillow:
        decode_image(png, DEFAULT)
    assert "Input/output error" in str(from_tiff.value) and str(from_tiff.value) == str(from_pillow.value)
    assert_one_line(from_tiff.value, from_pillow.value.stage)


def test_a_system_error_while_the_pixels_are_read_is_a_read_error_not_damage(scratch: Path, monkeypatch) -> None:
    """A file decoded from its path is read as it decodes: an EIO there (a failing disk, an NFS server
    gone) was called "decode: damaged or truncated image data: [Errno 5] ...", while the same error on
    a small file read whole is "read: cannot read the file: ...". An OSError with no errno is the
    decoder's own (Pillow's "image file is truncated"): damage, as before."""
    png = save(np.zeros((4, 4), np.uint8), scratch / "eio.png")

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Image.Image, "load", failing)
    with pytest.raises(DecodeError) as info:
        decode_image(png, DEFAULT)
    assert (info.value.stage, str(info.value)) == ("read", "cannot read the file: Input/output error")

    def truncated(*args, **kwargs):
        raise OSError("image file is truncated (2 bytes not processed)")

    monkeypatch.setattr(Image.Image, "load", truncated)
    with pytest.raises(DecodeError) as info:
        decode_image(png, DEFAULT)
    assert info.value.stage == "decode" and str(info.value).startswith("damaged or truncated image data: image file")


def test_unexpected_decoder_exceptions_become_decode_errors(scratch: Path, monkeypatch) -> None:
    path = save(np.zeros((3, 3), np.uint8), scratch / "fine.png")

    def broken(self, *args, **kwargs):
        raise RuntimeError("decoder exploded\nwith a second line")

    monkeypatch.setattr(Image.Image, "load", broken)
    with pytest.raises(DecodeError, match="decoder exploded with a second line") as info:
        decode_image(path, DEFAULT)
    assert_one_line(info.value, "decode")


# --------------------------------------------------------------------------------------------
# The shared real imagery (beside the checkout in CI)


def test_all_shared_data_decodes(shared_data_dir: Path) -> None:
    try:
        import imagecodecs  # noqa: F401

        has_codecs = True
    except ImportError:
        has_codecs = False
    paths = discover([shared_data_dir])
    assert len(paths) >= 1026
    for path in paths:
        if path.name == "rio-color_rgb16.tif" and not has_codecs:  # LZW
            with pytest.raises(DecodeError, match="imagecodecs"):
                decode_image(path, DEFAULT)
            continue
        image = decode_image(path, DEFAULT)
        assert image.dtype == np.uint8 and image.flags.c_contiguous and image.shape[-1] == 3
    cog = decode_image(shared_data_dir / "multiband/rio-tiler_mosaic_cog1.tif", DEFAULT)
    assert cog.shape == (790, 779, 3)  # the full-resolution page, not an overview


# ---------------------------------------------------------------- the fast JPEG path


def _pillow_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


@settings(max_examples=examples(60), deadline=None)
@given(
    shape=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    gray=st.booleans(),
    quality=st.integers(5, 100),
    subsampling=st.sampled_from([0, 1, 2]),
    progressive=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fast_jpeg_path_gives_pillows_pixels(tmp_path_factory, shape, gray, quality, subsampling, progressive,
                                             seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, shape if gray else (*shape, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive)
    path = tmp_path_factory.mktemp("jpeg") / "x.jpg"
    path.write_bytes(buffer.getvalue())
    assert gpu_io.jpeg8_decode is not None
    decoded = decode_image(path, DecodeOptions())
    assert np.array_equal(decoded, _pillow_pixels(buffer.getvalue()))


def test_truncated_jpeg_is_refused_not_filled_in(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    for cut in (len(data) // 2, len(data) - 2):
        path = tmp_path / f"cut{cut}.jpg"
        path.write_bytes(data[:cut])
        with pytest.raises(DecodeError) as error:
            decode_image(path, DecodeOptions())
        assert error.value.stage == "decode" and "truncated" in str(error.value)


@pytest.mark.parametrize("layout", [{"tile": (16, 16)}, {"compression": "lzw"}, {"rowsperstrip": 8}])
def test_a_cut_tiff_is_refused_not_filled_in(tmp_path, layout):
    """tifffile 2026.11.16 (Python 3.12 and later) pads a truncated strip or tile with zeros and logs
    an error, where earlier versions raised: a cut file became a normal record of made-up pixels."""
    pixels = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, pixels, **layout)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size * 2 // 3])
    assert np.array_equal(decode_image(whole, DecodeOptions()), pixels)
    with pytest.raises(DecodeError) as error:
        decode_image(cut, DecodeOptions())
    assert error.value.stage in ("read", "decode")
    import logging  # a caller who silenced tifffile's logger: its "padded" error never comes (review)

    silenced = logging.getLogger("tifffile")
    level = silenced.level
    silenced.setLevel(logging.CRITICAL)
    try:
        with pytest.raises(DecodeError, match=r"truncated TIFF file: (strip|tile) \d+ ends at byte \d+ of a \d+-byte file"):
            decode_image(cut, DecodeOptions())
    finally:
        silenced.setLevel(level)


def test_a_tiff_cut_by_its_last_byte_is_refused_naming_where_its_strip_ends(tmp_path, monkeypatch):
    """The bound is the file's size, to the byte: the last strip (tifffile writes the pixels last)
    ending one byte past the end is a cut file, whatever tifffile then logs."""
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, (np.arange(48 * 32) % 251).astype(np.uint8).reshape(48, 32), rowsperstrip=10)
    size = whole.stat().st_size
    with tifffile.TiffFile(whole) as tif:
        assert tif.pages.first.dataoffsets[-1] + tif.pages.first.databytecounts[-1] == size
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[:-1])
    refused_before_decoding(cut, monkeypatch, f"^truncated TIFF file: strip 5 ends at byte {size} of a "
                                              f"{size - 1}-byte file$")


def test_an_error_tifffile_logs_while_decoding_a_page_makes_it_a_decode_error(tmp_path, monkeypatch):
    """Whatever tifffile's version does with a damaged segment, an error it reports while it decodes
    the page (its log, at ERROR) is that image's error, not a record of what it filled in."""
    import logging

    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    original = tifffile.TiffPage.asarray

    def padding(self, *args, **kwargs):
        logging.getLogger("tifffile").error(f"{self!r} truncated strip @ (0, 0, 0, 0, 0) (32 < 64 samples) padded")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", padding)
    with pytest.raises(DecodeError, match=r"\Adamaged TIFF file: truncated strip @ \(0, 0, 0, 0, 0\) "
                                          r"\(32 < 64 samples\)\Z") as error:
        decode_image(path, DecodeOptions())
    assert error.value.stage == "decode"
    monkeypatch.setattr(tifffile.TiffPage, "asarray", original)
    assert decode_image(path, DecodeOptions()).shape == (8, 8)  # (nothing left over for the next image)

    def warning(self, *args, **kwargs):  # a warning is no error: the pixels are what the file holds
        logging.getLogger("tifffile").warning(f"{self!r} a tag of no consequence")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "asarray", warning)
    assert decode_image(path, DecodeOptions()).shape == (8, 8)


def test_the_python_api_leaves_tifffiles_messages_as_they_were():
    """The handler that catches tifffile's errors while it decodes kept logging's last resort from
    printing its messages for a caller with no logging set up (review)."""
    import subprocess
    import sys

    code = "import logging\nimport gpu_pipeline.inputs.decode\nlogging.getLogger('tifffile').warning('a tifffile warning')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr == "a tifffile warning\n"


def test_the_codecs_messages_are_kept_off_the_command_lines_stderr():
    """tifffile 2026.11 logs at ERROR what it logged at WARNING ("invalid offset to first page"):
    the level the command line set let them through to stderr. imagecodecs logs libpng's warnings."""
    import subprocess
    import sys

    code = ("import logging\nlogging.basicConfig()  # a handler on the root logger (a sitecustomize's, a library's)\n"
            "from gpu_pipeline.inputs.decode import quiet_codecs\nquiet_codecs()\n"
            "logging.getLogger('tifffile').error('invalid offset to first page 8')\n"
            "logging.getLogger('tifffile').warning('a warning')\n"
            "logging.getLogger('imagecodecs').warning('PNG warning: iCCP: known incorrect sRGB profile')\n"
            "print('done')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout == "done\n" and done.stderr == ""


def test_the_codecs_are_quieted_with_one_handler_however_many_runs():
    """The command line called in one process (a scheduler's, a test's CliRunner) quiets the codecs
    at every run: each run added one more handler to tifffile's and imagecodecs' loggers, for the
    life of the process (leak soak)."""
    import subprocess
    import sys

    code = ("import logging\nfrom gpu_pipeline.inputs.decode import quiet_codecs\n"
            "counts = []\nfor _ in range(3):\n    quiet_codecs()\n"
            "    counts.append([len(logging.getLogger(name).handlers) for name in ('tifffile', 'imagecodecs')])\n"
            "print(counts)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    counts = json.loads(done.stdout)
    assert counts[0] == counts[1] == counts[2], done.stderr


def test_cmyk_jpeg_goes_through_pillow(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(np.full((8, 9, 4), 40, np.uint8), "CMYK").save(path, "JPEG")
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(decode_image(path, DecodeOptions()), expected)


def _jpeg_with_a_marker_before_its_scan() -> bytes:
    """A JPEG whose comment segment holds a whole small JPEG, end-of-image marker included, as an
    EXIF thumbnail does."""
    def jpeg(size: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            buffer, "JPEG")
        return buffer.getvalue()

    thumbnail, image = jpeg(8), jpeg(48)
    return image[:2] + b"\xff\xfe" + struct.pack(">H", len(thumbnail) + 2) + thumbnail + image[2:]


@pytest.mark.parametrize("kept", [0.3, 0.6, 0.9])
def test_a_jpeg_cut_short_and_zero_filled_is_a_decode_error_not_noise(tmp_path, kept):
    """A download that preallocates its file: libjpeg decoded the zeros as pixels, a result record
    that no resume would redo once the download finished."""
    whole = _jpeg_with_a_marker_before_its_scan()
    assert np.array_equal(decode_image(touch(tmp_path / "whole.jpg", whole), DEFAULT),
                          np.asarray(Image.open(io.BytesIO(whole))))
    assert decode_image(touch(tmp_path / "tail.jpg", whole + b"more after the end"), DEFAULT).shape == (48, 48, 3)
    scan = whole.rindex(b"\xff\xda")  # the image's (baseline: one scan), after the thumbnail's
    cut = scan + int((len(whole) - scan) * kept)
    with pytest.raises(DecodeError, match="truncated JPEG file: zero bytes where its image data should end") as info:
        decode_image(touch(tmp_path / "partial.jpg", whole[:cut] + bytes(len(whole) - cut)), DEFAULT)
    assert_one_line(info.value, "decode")


def test_a_12_bit_jpeg_is_called_unsupported_not_damaged(tmp_path):
    imagecodecs = pytest.importorskip("imagecodecs")
    path = tmp_path / "twelve.jpg"
    path.write_bytes(imagecodecs.jpeg8_encode(np.full((8, 9), 3000, np.uint16), bitspersample=12))
    with pytest.raises(DecodeError, match="^12-bit JPEG is not supported") as info:
        decode_image(path, DecodeOptions())
    assert_one_line(info.value, "decode")


def test_fast_jpeg_path_matches_pillow_on_real_tiles(shared_data_dir):
    for path in sorted(shared_data_dir.rglob("*.jpg"))[::7]:
        assert np.array_equal(decode_image(path, DecodeOptions()), _pillow_pixels(path.read_bytes())), path


def test_discovery_matches_pathlib_ordering(tmp_path, monkeypatch):
    """find_files names and orders files as Path objects sorted by their parts would, relative or not."""
    for name in ["b/2.png", "a/z/1.png", "a-c/3.png", "a.b/4.PNG", "A/5.jpg", "a/.hidden/6.png", "7.tif", "8.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    oracle = sorted((Path(root, name) for root, dirs, names in os.walk(tmp_path)
                     if "/." not in root for name in names
                     if Path(name).suffix.lower() in {".png", ".jpg", ".tif"} and not name.startswith(".")),
                    key=lambda path: path.parts)
    assert discover([tmp_path]) == oracle
    assert find_files([tmp_path]) == [str(path.absolute()) for path in oracle]
    assert find_files([tmp_path / "b", tmp_path / "a"]) == [str(tmp_path / "a/z/1.png"), str(tmp_path / "b/2.png")]
    monkeypatch.chdir(tmp_path)  # relative names: discover keeps them, find_files makes them absolute
    for given in (["."], ["a"], ["b", "a"]):
        expected = [path for path in oracle if path.relative_to(tmp_path).parts[0] in given or given == ["."]]
        assert discover(given) == [path.relative_to(tmp_path) for path in expected]
        assert find_files(given) == [str(path) for path in expected]


_NAMED_FILES = ("e.png", "a/b.png", "a/c/d.jpg", "a-b/f.tif", "a.b/g.JPG", "A/h.gif")


@HYPOTHESIS
@given(spellings=st.lists(st.tuples(st.sampled_from(_NAMED_FILES), st.booleans(),
                                    st.sampled_from(["", "./", "a/../", "a/c/../../", ".//"]),
                                    st.sampled_from(["", "//", "/./"])), min_size=1, max_size=12))
def test_files_named_one_by_one_are_named_and_ordered_as_pathlib_would(tmp_path_factory, monkeypatch, spellings):
    """Files named one by one (a shell glob, a notebook's list) are named, de-duplicated and sorted as
    ``Path`` objects sorted by their parts, however they are spelt (names as a glob gives them take a
    path without ``Path``): the oracle is pathlib's and ``os.path``'s, on a tree with no links."""
    root = tmp_path_factory.mktemp("named")
    for name in _NAMED_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    monkeypatch.chdir(root)
    given = []
    for name, absolute, before, inner in spellings:
        folder, _, file = name.rpartition("/")
        spelt = before + (folder + inner + file if folder and inner else name)  # a//b.png, a/./b.png
        given.append(os.path.join(str(root), spelt) if absolute else spelt)
    first: dict[str, Path] = {}  # by absolute name, the first spelling
    for spelt in given:
        first.setdefault(os.path.abspath(spelt), Path(spelt))
    ordered = sorted(first.items(), key=lambda item: item[1].parts)
    assert discover(given) == [path for _, path in ordered]
    assert find_files(given) == [name for name, _ in ordered]


def test_a_tree_deeper_than_pythons_recursion_limit_is_walked_in_order(tmp_path):
    """Discovery recursed once per folder: a tree about 1,000 folders deep ended the run with a
    RecursionError traceback. Order still follows the path components: in the folder 500 deep, the
    subfolder ``d`` sorts before ``m.png``, so everything below it comes first."""
    depth = sys.getrecursionlimit() + 100
    folder = str(tmp_path)
    try:
        for level in range(depth):
            folder = os.path.join(folder, "d")
            os.mkdir(folder)  # (Path.mkdir(parents=True) recurses too)
            if level == 499:
                middle = folder
        for name in (os.path.join(str(tmp_path), "0.png"), os.path.join(middle, "m.png"),
                     os.path.join(folder, "z.png"), os.path.join(str(tmp_path), "e.png")):
            open(name, "wb").close()
        os.symlink(str(tmp_path), os.path.join(folder, "loop"))  # a link to a folder is not followed
        assert find_files([tmp_path]) == [os.path.join(str(tmp_path), "0.png"), os.path.join(folder, "z.png"),
                                          os.path.join(middle, "m.png"), os.path.join(str(tmp_path), "e.png")]
        walked = dict(folders_under(tmp_path))  # what the sweep of a killed run's edge maps walks
        assert len(walked) == depth + 1 and sorted(walked[folder]) == ["loop", "z.png"]
    finally:  # pytest's clean-up (shutil.rmtree) recurses too: it would fail on this tree later
        while folder != str(tmp_path):
            if os.path.isdir(folder):  # (not when the mkdir of this one failed)
                for name in os.listdir(folder):
                    os.unlink(os.path.join(folder, name))
                os.rmdir(folder)
            folder = os.path.dirname(folder)


def test_find_files_names_a_file_one_way_whatever_the_spelling(tmp_path, monkeypatch):
    """No ``.`` or ``..`` in the names records keep; a ``..`` after a symbolic link names the file it reaches."""
    (tmp_path / "data/sub").mkdir(parents=True)
    (tmp_path / "data/a.png").write_bytes(b"")
    (tmp_path / "data/sub/b.png").write_bytes(b"")
    (tmp_path / "deep/inner").mkdir(parents=True)
    (tmp_path / "deep/inner/c.png").write_bytes(b"")
    (tmp_path / "data/link").symlink_to(tmp_path / "deep/inner")  # data/link/.. is deep, not data
    monkeypatch.chdir(tmp_path / "data/sub")
    names = [str(tmp_path / "data/a.png"), str(tmp_path / "data/sub/b.png")]
    for spelling in (["../"], [".."], ["../sub/.."], [str(tmp_path / "data/./sub/..")]):
        assert find_files(spelling) == names, spelling
    assert find_files(["..", "."]) == names  # one record per file, however many spellings name it
    assert find_files(["../a.png", "b.png"]) == names
    assert find_files(["../link/.."]) == [str(tmp_path / "deep/inner/c.png")]
    assert find_files(["../link/../inner/c.png", "../link/c.png"]) == [
        str(tmp_path / "deep/inner/c.png"), str(tmp_path / "data/link/c.png")]
    assert discover(["../sub/.."]) == [Path("../sub/../a.png"), Path("../sub/../sub/b.png")]  # as given


def test_a_file_named_with_a_trailing_slash_is_taken_as_path_reads_it(tmp_path, monkeypatch):
    """``Path`` reads ``e.png/`` and ``e.png/.`` as ``e.png``, and so did discovery (and the command
    line still does: its arguments are Path objects). When files named one by one stopped taking a
    Path, such a name, given in a list (the Python API), was stat'ed as spelt: the system refuses a
    file name ending in ``/`` (ENOTDIR), and the run ended in a UsageError "no such file or folder"
    for a file that is there. An empty name is still refused (``Path("")`` walked the current folder)."""
    touch(tmp_path / "e.png")
    touch(tmp_path / "a/b.png")
    (tmp_path / "link.png").symlink_to("e.png")
    monkeypatch.chdir(tmp_path)
    for given in (["e.png/"], ["e.png/."], [f"{tmp_path}/e.png/"], ["a/b.png/", "e.png"], ["a//b.png/./", "a"],
                  ["link.png/", "a/b.png"], [f"//{tmp_path}/a/./b.png/"]):
        as_path = [str(Path(name)) for name in given]
        assert discover(given) == discover(as_path), given
        assert find_files(given) == find_files(as_path), given
    assert find_files(["e.png/"]) == [str(tmp_path / "e.png")]
    assert discover(["a/b.png/", "e.png/."]) == [Path("a/b.png"), Path("e.png")]
    for given in ([""], ["", "e.png"], ["missing.png/"]):
        with pytest.raises(UsageError):
            find_files(given)


# Names a walk must tell apart: hidden ones, extensions in any case (a Kelvin sign lowers to "k"),
# no dot, a dot alone, names not in UTF-8 (surrogate escapes) or with a newline.
_ODD_NAMES = ("a", "B", "a.png", "A.PNG", "b.JPEG", "c.jpeg", "d.Jpg", "e.tif", "f.TIFF", "g.j2\u212a", "noext",
              ".png", ".h.jpg", ".hid", "x.", "y.txt", "z.png.txt", "t.tar.gif", os.fsdecode(b"\xff.png"),
              "new\nline.webp", "\u00e9.bmp", "a-b", "a.b", "sp ace.jp2", "locked", "locked.png")
_LOCKED = ("locked", "locked.png")  # folders of these names cannot be listed (the locked fixture)
_ENTRY_KINDS = st.sampled_from(["file", "file", "link to a folder", "link to a file", "broken link", "link loop"])
_TREES = st.recursive(st.dictionaries(st.sampled_from(_ODD_NAMES), _ENTRY_KINDS, max_size=6),
                      lambda folders: st.dictionaries(st.sampled_from(_ODD_NAMES), _ENTRY_KINDS | folders, max_size=6),
                      max_leaves=30)


def _make_tree(folder: str, tree: dict, outside: str, made: list[str]) -> None:
    """Lays ``tree`` out under ``folder`` (a dict is a folder), appending each path made to ``made``;
    links lead to ``outside``, a folder holding ``image.png``."""
    os.mkdir(folder)
    for name, kind in tree.items():
        path = os.path.join(folder, name)
        made.append(path)
        if isinstance(kind, dict):
            _make_tree(path, kind, outside, made)
        elif kind == "file":
            open(path, "wb").close()
        else:
            target = {"link to a folder": outside, "link to a file": os.path.join(outside, "image.png"),
                      "broken link": "nowhere", "link loop": name}[kind]
            os.symlink(target, path)


def _walked(top: str, glob: str | None) -> tuple[list[str], list[tuple[str, str]]]:
    """The oracle: ``(files, folders that could not be listed)`` under ``top`` by ``os.walk``, which
    follows no link to a folder; hidden names and other extensions left out, as the docs say."""
    files, unlisted = [], []
    for root, folders, names in os.walk(top, onerror=lambda exc: unlisted.append((exc.filename, exc.strerror))):
        folders[:] = sorted(name for name in folders if not name.startswith("."))  # (the order unlisted come in)
        for name in names:
            relative = os.path.join(root, name)[len(top) + 1:]
            subject = relative if glob and "/" in glob else name
            if (not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
                    and (glob is None or fnmatch.fnmatchcase(subject.lower(), glob.lower()))):
                files.append(os.path.join(root, name))
    return files, unlisted


@HYPOTHESIS
@given(tree=_TREES, picks=st.lists(st.integers(0, 1000), max_size=4),
       glob=st.sampled_from([None, "*.png", "*.PNG", "a*", "*/*", "a/*.png", "b/*", "*\n*", "[ab]*", "?.tif"]))
def test_discovery_matches_an_os_walk_oracle_on_trees_of_odd_names(tmp_path_factory, monkeypatch, locked, tree, glob,
                                                                   picks):
    """Every file :func:`find_files` takes, in its order, and every folder it cannot list, are those of
    a plain ``os.walk`` sorted by path components, for one folder and for folders and files given
    together (files named explicitly are taken whatever their name, each file once)."""
    for name in _LOCKED:
        locked(name)
    base = str(tmp_path_factory.mktemp("odd"))
    outside = os.path.join(base, "outside")
    os.mkdir(outside)
    open(os.path.join(outside, "image.png"), "wb").close()
    top, made = os.path.join(base, "top"), []
    _make_tree(top, tree, outside, made)
    by_parts = lambda name: Path(name).parts  # noqa: E731

    unlisted: list[tuple[str, str]] = []
    files, walk_unlisted = _walked(top, glob)
    assert find_files([top], glob, unlisted) == sorted(files, key=by_parts)
    assert unlisted == walk_unlisted
    monkeypatch.chdir(top)  # a relative folder: names relative to it
    assert discover(["."], glob) == sorted((Path(name[len(top) + 1:]) for name in files), key=lambda path: path.parts)

    reachable = [path for path in made if os.path.exists(path)]  # (not a broken link or a loop)
    given = [reachable[pick % len(reachable)] for pick in picks if reachable] + [top]  # the top last
    expected, walk_unlisted = set(), []
    for path in given:
        if os.path.isdir(path):
            walked, unreached = _walked(path, glob)
            expected.update(walked)
            walk_unlisted += unreached
        else:
            expected.add(path)
    unlisted = []
    assert find_files(given, glob, unlisted) == sorted(expected, key=by_parts)
    assert unlisted == walk_unlisted


# Paths of a list, and what each is in the tree below (created once a module).
_LISTED_CANDIDATES = ("e.png", "a.png", ".hidden.png", "noext", os.fsdecode(b"\xff.png"), "sp ace.png", "a", "a/b.png",
                      "a/c", "a/c/d.jpg", "a/x.png", "a/x.png/inner.png", "a/.h", "a/.h/h.png",
                      os.fsdecode(b"a/\xfe.jpg"), "a-b", "a-b/f.tif", "A/g.gif", "sub", "sub/s.png", "", "link_dir",
                      "link_dir/b.png", "link.png", "fifo.png", "broken.png", "loop.png", "missing.png", "a/gone.jpg",
                      "nodir/m.png", "a/b.png/x")
_UNREACHED = ("broken.png", "loop.png", "missing.png", "a/gone.jpg", "nodir/m.png", "a/b.png/x")


@pytest.fixture(scope="module")
def listed_tree(tmp_path_factory) -> str:
    """A tree of files, folders (one named ``x.png``, one hidden), links of every kind, a FIFO and
    names not in UTF-8; ``missing.png``, ``a/gone.jpg``, ``nodir/m.png`` and ``a/b.png/x`` are not there."""
    root = str(tmp_path_factory.mktemp("listed"))
    for name in ("e.png", "a.png", ".hidden.png", "noext", os.fsdecode(b"\xff.png"), "sp ace.png", "a/b.png",
                 "a/c/d.jpg", "a/x.png/inner.png", "a/.h/h.png", os.fsdecode(b"a/\xfe.jpg"), "a/z.PNG", "a-b/f.tif",
                 "A/g.gif", "sub/s.png"):
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        open(os.path.join(root, name), "wb").close()
    for name, target in (("link_dir", "a"), ("link.png", "e.png"), ("broken.png", "nowhere"), ("loop.png", "loop.png"),
                         ("a/up", "..")):
        os.symlink(target, os.path.join(root, name))
    os.mkfifo(os.path.join(root, "fifo.png"))
    return root


def _spelt(root: str, cwd: str, target: str, absolute: bool, change: str) -> str:
    """``target`` (relative to ``root``) spelt from the current folder ``cwd`` (relative to ``root``):
    absolute or relative (plain below ``cwd``, else through ``..``), changed by ``change``: ``./`` or
    ``a/../`` ahead of it, ``//`` or ``/./`` at its last ``/``, ``/`` or ``/.`` at its end."""
    if absolute:
        base = root
    elif target == cwd or target.startswith(cwd + "/") or not cwd:
        base, target = ".", target[len(cwd) + 1 if cwd else 0:]
    else:
        base = os.path.relpath(root, os.path.join(root, cwd))
    folder, slash, name = target.rpartition("/")
    if change in ("//", "/./") and slash:
        target = folder + change + name
    spelt = (base + "/" if base != "." else "") + (change if change in ("./", "a/../") else "") + target
    return (spelt or ".") + (change if change in ("/", "/.") else "")


def _resolved_where_lexical_misleads(name: str) -> str:
    """The absolute name a record keeps (``absolute_name``'s rule): lexical, unless a ``..`` part that
    follows a link makes its folder another one: then that folder resolved and its own name. (A broken
    link, ``a/../broken.png``, was named as its target: a file never listed.)"""
    lexical, path = os.path.abspath(name), Path(name)
    if ".." not in path.parts or os.path.exists(lexical) and os.path.exists(name) and os.path.samefile(lexical, name):
        return lexical
    if os.path.exists(path.parent) and os.path.samefile(os.path.dirname(lexical), path.parent):
        return lexical
    return os.path.join(os.path.realpath(path.parent), path.name)


def test_a_broken_link_reached_through_dot_dot_keeps_its_own_name(tmp_path, monkeypatch):
    """``a/../broken.png`` (``a`` a plain folder) was recorded as the link's target, ``nowhere.png``:
    an error record for a file never listed, and a second name for a file listed plainly elsewhere.
    Through a linked folder, its folder is resolved and its own name kept."""
    (tmp_path / "a").mkdir()
    (tmp_path / "far" / "deep").mkdir(parents=True)
    (tmp_path / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "far" / "broken.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "into").symlink_to(tmp_path / "far" / "deep")
    (tmp_path / "e.png").write_bytes(b"")  # (a list none of whose paths can be reached is refused)
    monkeypatch.chdir(tmp_path)
    listed = [ListedPath("a/../broken.png"), ListedPath("into/../broken.png"), ListedPath("e.png")]
    assert find_files(listed) == [str(tmp_path / "broken.png"), str(tmp_path / "e.png"),
                                  str(tmp_path / "far" / "broken.png")]


def test_a_listed_path_that_ends_in_dot_dot_and_leads_nowhere_keeps_its_dot_dot(tmp_path, monkeypatch):
    """``gone/..`` (no ``gone``) was recorded as ``.``'s folder, resolved: an error record "no such
    file" named after a folder that is there, and one never listed. It keeps its ``..``, below its
    folder resolved, as any name whose ``..`` the lexical name misreads."""
    (tmp_path / "a").mkdir()
    (tmp_path / "e.png").write_bytes(b"")  # (a list none of whose paths can be reached is refused)
    monkeypatch.chdir(tmp_path / "a")
    listed = [ListedPath("gone/.."), ListedPath("gone/deeper/../"), ListedPath("../e.png")]
    assert find_files(listed) == [str(tmp_path / "e.png"), str(tmp_path / "a" / "gone" / ".."),
                                  str(tmp_path / "a" / "gone" / "deeper" / "..")]


def test_a_listed_path_that_ends_in_dot_dot_after_a_missing_folder_and_dot_dot_keeps_them(tmp_path, monkeypatch):
    """``gone/../..`` and ``gone/../b/..`` lead nowhere, as ``gone/..`` does, and were recorded as
    ``a/..`` and ``a/b/..``, folders that are there (an error record "Is a directory"): the folder
    above their last ``..`` was resolved by ``os.path.realpath``, which takes ``gone/..`` for ``.``."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "e.png").write_bytes(b"")  # (a list none of whose paths can be reached is refused)
    monkeypatch.chdir(tmp_path / "a")
    listed = [ListedPath("gone/../.."), ListedPath("gone/../b/.."), ListedPath("../e.png")]
    named = find_files(listed)
    assert named == [str(tmp_path / "e.png"), str(tmp_path / "a" / "gone" / ".." / ".."),
                     str(tmp_path / "a" / "gone" / ".." / "b" / "..")]
    assert [os.path.exists(name) for name in named] == [True, False, False]


def test_a_listed_path_that_leads_nowhere_below_a_linked_folder_keeps_its_lexical_name(tmp_path, monkeypatch):
    """A missing file whose folder is a link reached after a ``..`` (``a/../into/gone.png``), or with
    no ``..`` at all (``./into/nodir/m.png``), is named as listed, not through the link's target: its
    lexical name is the file it names. Only a ``..`` that follows a link resolves its folder."""
    (tmp_path / "a").mkdir()
    (tmp_path / "far" / "deep").mkdir(parents=True)
    (tmp_path / "into").symlink_to(tmp_path / "far" / "deep")
    (tmp_path / "e.png").write_bytes(b"")  # (a list none of whose paths can be reached is refused)
    monkeypatch.chdir(tmp_path)
    listed = [ListedPath("a/../into/gone.png"), ListedPath("./into/nodir/m.png"), ListedPath("e.png")]
    assert find_files(listed) == [str(tmp_path / "into" / "gone.png"), str(tmp_path / "e.png"),
                                  str(tmp_path / "into" / "nodir" / "m.png")]  # (sorted as spelt)


def _oracle(given: list[str], glob: str | None) -> tuple[list[str], list[Path]] | str:
    """What discovery of ``given`` gives by ``pathlib`` and ``os.walk``: ``(find_files, discover)``, or
    the first path that cannot be reached where that refuses the run (an argument that cannot be
    reached, or a list none of whose paths can be)."""
    first: dict[str, Path] = {}  # by absolute name, the first spelling
    unreached = []
    for name in given:
        path = Path(name)
        try:
            folder = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError:
            if not isinstance(name, ListedPath):
                return str(path)
            unreached.append(str(path))
            folder = False
        if not folder:
            first.setdefault(_resolved_where_lexical_misleads(str(path)), path)
            continue
        top = _resolved_where_lexical_misleads(str(path))  # (the folder's rule, its files below it)
        for file in _walked(str(path), glob)[0]:
            first.setdefault(os.path.join(top, file[len(str(path)) + 1:]), Path(file))
    if unreached and len(unreached) == len(given):
        return unreached[0]
    ordered = sorted(first.items(), key=lambda item: item[1].parts)
    return [name for name, _ in ordered], [path for _, path in ordered]


@st.composite
def _listings(draw) -> list[tuple[str, bool, str]]:
    """Entries ``(target, absolute, change)`` (:func:`_spelt`) of a few targets, each likely named more than once."""
    targets = draw(st.lists(st.sampled_from(_LISTED_CANDIDATES), min_size=1, max_size=5, unique=True))
    changes = st.sampled_from(["", "", "", "", "", "./", "a/../", "//", "/./", "/", "/."])  # (plain: the usual)
    return draw(st.lists(st.tuples(st.sampled_from(targets), st.booleans(), changes), min_size=1, max_size=12))


@settings(HYPOTHESIS, max_examples=examples(150))  # (many combinations; 10 ms an example)
@given(entries=_listings(), listed=st.booleans(), unreached_only=st.booleans(),
       cwd=st.sampled_from(["", "", "sub", "a", "a/c"]), glob=st.sampled_from([None, "*.png"]))
@example(entries=[("a.png", False, ""), ("a/b.png", False, ""), ("a-b/f.tif", False, "")], listed=True,
         unreached_only=False, cwd="", glob=None)  # (names that sort otherwise than their parts do)
@example(entries=[("a", False, ""), ("a", False, "a/../")], listed=True, unreached_only=False, cwd="a",
         glob=None)  # (``a/../`` from ``a``, no ``a/a``: a name that ends in ``..`` and leads nowhere)
def test_discovery_of_many_paths_matches_a_pathlib_oracle(listed_tree, monkeypatch, entries, listed, unreached_only,
                                                          cwd, glob):
    """Paths given together, as a ``--files-from`` list has them (``ListedPath``) or as arguments, spelt
    every way (absolute and relative, ``./``, ``a/../``, ``//``, a ``/`` at the end), files, folders,
    links, a FIFO, names not in UTF-8, some not there, some twice: the files are those of ``Path``
    and ``os.walk``, named as ``Path`` spells them, each once (its first spelling), sorted by parts;
    a path that cannot be reached refuses the run (naming it) unless listed, and so does a list
    none of whose paths can be reached. The oracle is independent of discovery's code."""
    root = listed_tree
    monkeypatch.chdir(os.path.join(root, cwd))
    if unreached_only:  # (a list none of whose paths can be reached is refused)
        entries = [(_UNREACHED[_LISTED_CANDIDATES.index(target) % len(_UNREACHED)], *spelling)
                   for target, *spelling in entries]
    given = [_spelt(root, cwd, target, *spelling) for target, *spelling in entries]
    given = [ListedPath(name) for name in given] if listed else given
    expected = _oracle(given, glob)
    if isinstance(expected, str):
        with pytest.raises(UsageError) as refusal:
            find_files(given, glob)
        assert expected in str(refusal.value)
        with pytest.raises(UsageError):
            discover(given, glob)
    else:
        assert find_files(given, glob) == expected[0]
        assert discover(given, glob) == expected[1]


# --------------------------------------------------------------------------------------------
# decode_each: files read a group at a time, then decoded from memory


def _same_outcome(ours, theirs) -> bool:
    if isinstance(ours, np.ndarray) or isinstance(theirs, np.ndarray):
        return (isinstance(ours, np.ndarray) and isinstance(theirs, np.ndarray) and ours.dtype == theirs.dtype
                and ours.shape == theirs.shape and ours.tobytes() == theirs.tobytes()
                and ours.flags.c_contiguous)
    return ours == theirs


@pytest.fixture(scope="module")
def awkward_files(scratch: Path) -> list[Path]:
    """Files of every kind a run meets, good and bad, in one list."""
    folder = scratch / "awkward"
    folder.mkdir()
    noise = np.random.default_rng(12).integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    tiff = write_tiff(folder / "whole.tif", noise, compression="zlib").read_bytes()
    files = [
        touch(folder / "empty.png", b""),
        touch(folder / "truncated.jpg", encoded("JPEG")[:300]),
        touch(folder / "truncated.png", encoded("PNG")[:200]),
        touch(folder / "truncated.tif", tiff[: len(tiff) // 2]),
        touch(folder / "text.png", b"this is not an image\n" * 10),
        touch(folder / "bomb.png", png_header(20000, 20000)),
        folder / "missing.jpg",
        folder,  # a folder named as a file
        Path("/dev/null"),
        Path("bad\0name.png"),
    ]
    fifo = folder / "pipe.png"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
        files.append(fifo)
    return files


def _every_kind_of_file(awkward_files, bundled_data_dir) -> list[Path]:
    good = sorted(p for p in bundled_data_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    good += sorted(p for p in FIXTURES.glob("*") if p.is_file())
    mixed = []
    for index, path in enumerate(good):  # the bad ones among the good, so that groups hold both
        mixed.append(path)
        if index < len(awkward_files):
            mixed.append(awkward_files[index])
    return mixed + awkward_files[len(good):]


@pytest.mark.parametrize("small, group", [(gpu_io.SMALL_FILE_BYTES, gpu_io.READ_AHEAD_FILES), (0, 32), (4096, 3)],
                         ids=["as shipped", "every file from its path", "small groups, some from their path"])
def test_decode_each_gives_what_decode_image_gives(awkward_files, bundled_data_dir, monkeypatch, small, group):
    options = DecodeOptions(max_pixels=10**8)
    files = _every_kind_of_file(awkward_files, bundled_data_dir)
    expected = [gpu_io.decode_or_error(path, options) for path in files]
    assert sum(isinstance(e, tuple) for e in expected) >= 10 and sum(isinstance(e, np.ndarray) for e in expected) >= 20
    monkeypatch.setattr(gpu_io, "SMALL_FILE_BYTES", small)
    monkeypatch.setattr(gpu_io, "READ_AHEAD_FILES", group)
    got = list(gpu_io.decode_each(files, options))
    assert len(got) == len(files)
    for path, ours, theirs in zip(files, got, expected):
        assert _same_outcome(ours, theirs), path


def test_decode_each_on_the_shared_samples(shared_data_dir):
    """Every shared sample file (tiles, scenes, multiband TIFFs) as decode_image gives it."""
    files = sorted(p for p in shared_data_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    got = list(gpu_io.decode_each(files, DEFAULT))
    for path, ours in zip(files, got, strict=True):
        assert _same_outcome(ours, gpu_io.decode_or_error(path, DEFAULT)), path


def _jpeg(image: np.ndarray, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", **params)
    return buffer.getvalue()


def _jpeg_variants() -> dict[str, bytes]:
    """JPEGs the short path must take (plain) or leave to the full one (the rest)."""
    rng = np.random.default_rng(21)
    rgb, gray = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), rng.integers(0, 256, (29, 31), dtype=np.uint8)
    whole = _jpeg(rgb)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated; pixels are used as stored
    return {
        "plain rgb 4:2:0": whole,
        "plain rgb 4:4:4": _jpeg(rgb, subsampling=0, quality=95),
        "plain gray": _jpeg(gray),
        "plain progressive": _jpeg(rgb, progressive=True, optimize=True),
        "plain 1x1": _jpeg(rgb[:1, :1]),
        "plain 1xN gray": _jpeg(gray[:1]),
        "plain with EXIF orientation": _jpeg(rgb, exif=exif.tobytes()),
        "plain with zeros after the end": whole + b"\0" * 7,
        "cmyk": cmyk.getvalue(),
        "truncated": whole[: len(whole) * 2 // 3],
        "truncated to the header": whole[:200],
        "garbage after the header": whole[:400] + bytes(rng.integers(0, 256, 600, dtype=np.uint8)) + b"\xff\xd9",
        "not a jpeg": b"\x89PNG\r\n\x1a\n" + whole[8:],
    }


@pytest.mark.parametrize("options", [DEFAULT, DecodeOptions(bands=(1,)), DecodeOptions(max_pixels=36 * 52)],
                         ids=["default", "bands 1", "pixel limit"])
def test_the_short_jpeg_path_gives_what_decode_data_gives(options):
    """decode_each's short path for plain JPEGs (_plain_jpeg) gives decode_data's pixels, or
    leaves the file to decode_data: CMYK, truncated, damaged, a band choice, over the limit."""
    taken = []
    for name, data in _jpeg_variants().items():
        short = gpu_io._plain_jpeg(data, options)
        if short is not None:
            taken.append(name)
            assert _same_outcome(short, gpu_io._or_error(gpu_io.decode_data, data, options)), name
    plain = [name for name in _jpeg_variants() if name.startswith("plain")]
    if options.bands is not None:
        assert taken == []
    elif options.max_pixels < 37 * 53:
        assert taken == [name for name in plain if "rgb" not in name and "EXIF" not in name
                         and "progressive" not in name and "zeros" not in name]
    else:
        assert taken == plain


def test_the_short_jpeg_path_decodes_into_the_array_it_is_given():
    """What a decode process does with its shared memory: a plain JPEG is decoded straight into
    the array ``into`` gives for its shape (here at an odd offset of a larger buffer), with
    decode_data's pixels; when ``into`` says None, into a fresh array."""
    arena = np.full(1 << 16, 7, np.uint8)
    for name, data in _jpeg_variants().items():
        expected = gpu_io._or_error(gpu_io.decode_data, data, DEFAULT)
        asked = []
        in_arena = gpu_io._plain_jpeg(data, DEFAULT, lambda shape: asked.append(shape) or
                                      arena[3:3 + int(np.prod(shape))].reshape(shape))
        fresh = gpu_io._plain_jpeg(data, DEFAULT, lambda shape: None)
        if not name.startswith("plain"):
            assert in_arena is None and fresh is None, name
            continue
        assert asked == [expected.shape], name
        assert np.shares_memory(in_arena, arena) and not np.shares_memory(fresh, arena), name
        assert _same_outcome(in_arena, expected) and _same_outcome(fresh, expected), name


def test_decode_each_reads_a_group_before_it_decodes(scratch, monkeypatch):
    folder = scratch / "group"
    folder.mkdir()
    paths = [save(np.full((4, 4), i, np.uint8), folder / f"{i:02d}.png") for i in range(7)]
    events = []
    real_read, real_decode = gpu_io._read_small_file, gpu_io.decode_data

    def read(path):
        events.append(("read", Path(path).name))
        return real_read(path)

    def decode(data, options):
        events.append(("decode", None))
        return real_decode(data, options)

    monkeypatch.setattr(gpu_io, "_read_small_file", read)
    monkeypatch.setattr(gpu_io, "decode_data", decode)
    monkeypatch.setattr(gpu_io, "READ_AHEAD_FILES", 3)
    images = list(gpu_io.decode_each(paths, DEFAULT))
    assert [int(image[0, 0]) for image in images] == list(range(7))
    kinds = "".join(kind[0] for kind, _ in events)
    assert kinds == "rrrdddrrrdddrd"
    assert [name for kind, name in events if kind == "read"] == [p.name for p in paths]


def test_decode_each_tells_working_each_files_position_in_every_group(scratch: Path, monkeypatch) -> None:
    """``working`` gets a file's position in ``paths`` before it is read and before it is decoded,
    in the later groups too: a decode process under a time limit blames the file it names."""
    folder = scratch / "positions"
    folder.mkdir(exist_ok=True)
    paths = [save(np.full((4, 4), i, np.uint8), folder / f"{i:02d}.png") for i in range(7)]
    monkeypatch.setattr(gpu_io, "READ_AHEAD_FILES", 3)
    positions = []
    images = list(gpu_io.decode_each(paths, DEFAULT, working=positions.append))
    assert [int(image[0, 0]) for image in images] == list(range(7))
    assert positions == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 6]


def test_decode_each_stops_a_group_at_its_byte_budget(scratch, monkeypatch):
    folder = scratch / "budget"
    paths = [touch(folder / f"{i}.png", encoded("PNG")) for i in range(5)]
    monkeypatch.setattr(gpu_io, "READ_AHEAD_BYTES", 2 * len(encoded("PNG")))
    reads = []
    real_read = gpu_io._read_small_file
    monkeypatch.setattr(gpu_io, "_read_small_file", lambda path: reads.append(path) or real_read(path))
    outcomes = gpu_io.decode_each(paths, DEFAULT)
    next(outcomes)
    assert len(reads) == 2  # the group ended at the budget: the first image came after two reads
    assert all(isinstance(o, np.ndarray) for o in outcomes) and len(reads) == 5


def test_a_file_that_grows_while_read_is_read_whole(scratch, monkeypatch):
    path = save(np.arange(64, dtype=np.uint8).reshape(8, 8), scratch / "growing.png")
    data = path.read_bytes()
    real_fstat = os.fstat

    def stale_fstat(fd):  # the size of the file before its last half was written
        info = real_fstat(fd)
        return os.stat_result((*info[:6], len(data) // 2, *info[7:]))

    monkeypatch.setattr(gpu_io.os, "fstat", stale_fstat)
    assert gpu_io._read_small_file(path) == data


def test_files_above_the_small_size_are_decoded_from_their_path(scratch, monkeypatch):
    folder = scratch / "sizes"
    folder.mkdir()
    small = save(np.zeros((2, 2), np.uint8), folder / "small.png")
    large = save(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8), folder / "large.png")
    monkeypatch.setattr(gpu_io, "SMALL_FILE_BYTES", small.stat().st_size)
    from_path, real = [], gpu_io.decode_or_error
    monkeypatch.setattr(gpu_io, "decode_or_error", lambda path, options: from_path.append(path) or real(path, options))
    outcomes = list(gpu_io.decode_each([small, large], DEFAULT))
    assert from_path == [large]
    assert [o.shape for o in outcomes] == [(2, 2), (64, 64)]


@pytest.mark.parametrize("kind", ["jpeg", "png", "tiff", "jp2"])
def test_large_images_ask_the_decoding_budget_before_their_pixels_are_decoded(scratch: Path, monkeypatch, kind):
    """Every reader asks the run's decoding budget (``decode.budgeted``) for an image whose decoding
    holds :data:`decode.BUDGETED_FROM_BYTES` or more, with what it holds (its file's bytes at least,
    and more than its 8-bit pixels), before it decodes it (the decode pool waits there); a tile
    never asks. A JPEG read whole (a small file) takes libjpeg-turbo's path, a large one the file's."""
    import threading

    asked: list[int] = []
    decoded = threading.Event()
    for name in ("jpeg8_decode", "jpeg2k_decode"):
        real = getattr(gpu_io, name)
        monkeypatch.setattr(gpu_io, name, lambda *a, _real=real, **k: (decoded.set(), _real(*a, **k))[1])
    monkeypatch.setattr(Image.Image, "load", lambda self, _real=Image.Image.load: (decoded.set(), _real(self))[1])
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda self, *a, _real=tifffile.TiffPage.asarray, **k:
                        (decoded.set(), _real(self, *a, **k))[1])

    def ask(charge: int) -> None:
        assert not decoded.is_set(), "decoded before it asked"
        asked.append(charge)

    for height, large in [(2048, True), (64, False)]:
        data = np.zeros((height, 2048), np.uint8)
        path = scratch / f"big-{height}.{kind}"
        if kind == "jp2":
            path.write_bytes(jpeg2000(data))
        elif kind == "tiff":
            tifffile.imwrite(path, data)
        else:
            Image.fromarray(data).save(path, {"jpeg": "JPEG", "png": "PNG"}[kind])
        for decode in (lambda: decode_image(path, DEFAULT), lambda: list(gpu_io.decode_each([path], DEFAULT))):
            asked.clear()
            decoded.clear()
            with gpu_io.budgeted(ask):
                assert decode() is not None
            if large:
                assert len(asked) == 1 and asked[0] >= max(path.stat().st_size + data.size, gpu_io.BUDGETED_FROM_BYTES)
            else:
                assert asked == []
    asked.clear()
    decode_image(path, DEFAULT)  # outside budgeted(): nothing asks
    assert asked == []


@pytest.mark.parametrize("kind, side, a_pixel", [
    ("gray", 1024, (2 * 1 + 1) * 1 + 3),  # TIFF_COPIES of 1 sample, 1 chosen, 1 byte each; the result
    ("rgb16", 512, (2 * 3 + 3) * 2 + 3),  # 3 samples of 2 bytes, 3 chosen
    ("13-bands", 512, (2 * 13 + 3) * 2 + 3),  # 13 samples of 2 bytes, 3 chosen (docs/nightly.md: 70 measured)
    ("float", 512, (2 * 1 + 1) * 4 + 8 + 3),  # float32, and the stretch's float64 band
    ("palette", 512, 1 + 2 * 6 + 3),  # the index, its colours as 16-bit samples twice, the result
    ("cmyk", 512, 5 * 4 + 3),  # CMYK_COPIES of 4 samples through Pillow, the result
])
def test_a_large_tiff_asks_the_budget_its_file_and_its_bytes_a_pixel(scratch: Path, kind, side, a_pixel):
    """What a TIFF asks, by hand from limits.py's constants: its file's bytes, and its pixels times
    what its decoding holds a pixel for its samples, their size and its colour model."""
    pixels = np.zeros((side, side), np.uint8)
    path = scratch / f"budget-{kind}.tif"
    if kind == "gray":
        tifffile.imwrite(path, pixels)
    elif kind == "rgb16":
        tifffile.imwrite(path, np.zeros((side, side, 3), np.uint16), photometric="rgb")
    elif kind == "13-bands":
        write_tiff(path, np.zeros((side, side, 13), np.uint16), compression="zlib")
    elif kind == "float":
        tifffile.imwrite(path, np.zeros((side, side), np.float32), photometric="minisblack")
    elif kind == "palette":
        tifffile.imwrite(path, pixels, photometric="palette", colormap=np.zeros((3, 256), np.uint16))
    else:
        tifffile.imwrite(path, np.zeros((side, side, 4), np.uint8), photometric="separated")
    asked: list[int] = []
    with gpu_io.budgeted(asked.append):
        decode_image(path, DecodeOptions(bands=(1, 2, 3) if kind == "13-bands" else None))
    assert asked == [path.stat().st_size + side * side * a_pixel]


def test_the_decoding_budget_is_asked_from_4_mib_exactly():
    """An image whose decoding holds 4 MiB (4,194,304 bytes) asks; one byte less never waits for it."""
    from gpu_pipeline.inputs.limits import ask_budget

    asked: list[int] = []
    with gpu_io.budgeted(asked.append):
        ask_budget(4_194_303)
        ask_budget(4_194_304)
    assert asked == [4_194_304]


def test_a_damaged_large_jpeg_read_whole_asks_the_decoding_budget_once(scratch: Path):
    """A large JPEG read whole takes libjpeg-turbo's short path, which asks the budget
    and then fails on a damaged file; decode_data then explains the failure. It asked the budget
    again: the one image held twice its pixels until the engine took its record."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((2048, 2048), np.uint8)).save(buffer, "JPEG")
    damaged = buffer.getvalue().replace(b"\xff\xc4", b"\xff\xc4\x00\x03\xff", 1)  # a bogus Huffman table length
    path = scratch / "damaged.jpg"
    path.write_bytes(damaged)
    asked: list[int] = []
    with gpu_io.budgeted(asked.append):
        (outcome,) = gpu_io.decode_each([path], DEFAULT)
    assert outcome == ("decode", "cannot decode the image: Bogus marker length")
    assert len(asked) == 1 and asked[0] >= 2048 * 2048


def _tiff_with_tag_value(image: np.ndarray, code: int, value: int, field: str = "value", **kwargs) -> bytes:
    """A little-endian TIFF of ``image`` whose tag ``code`` has ``value`` written into its ``field``
    (the value itself, a short or long in place, or its ``count``)."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, **kwargs)
    data = bytearray(buffer.getvalue())
    tag = tifffile.TiffFile(io.BytesIO(bytes(data))).pages.first.tags[code]
    where, size = (tag.offset + 4, 4) if field == "count" else (tag.valueoffset, 2 if tag.dtype == 3 else 4)
    data[where:where + size] = value.to_bytes(size, "little")
    return bytes(data)


@pytest.mark.parametrize("tiled", [False, True])
def test_a_tiff_listing_fewer_strips_or_tiles_than_its_image_needs_is_refused(tmp_path, tiled: bool) -> None:
    """tifffile decodes the segments it is given and leaves the rest of the image zeros (or whatever
    memory held): a StripOffsets and StripByteCounts of 3 strips where 5 are needed gave rows of
    made-up pixels as a normal result."""
    image = (np.arange(48 * 32) % 251).astype(np.uint8).reshape(48, 32)
    layout = {"tile": (16, 16)} if tiled else {"rowsperstrip": 10}
    codes = (324, 325) if tiled else (273, 279)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, **layout)
    data = bytearray(buffer.getvalue())
    for code in codes:
        tag = tifffile.TiffFile(io.BytesIO(bytes(data))).pages.first.tags[code]
        data[tag.offset + 4:tag.offset + 8] = (3).to_bytes(4, "little")
    path = tmp_path / "short.tif"
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match=r"damaged TIFF file: it lists 3 (strips|tiles), but its image needs "
                                          r"(5|6)") as refused:
        decode_image(path, DecodeOptions())
    assert refused.value.stage == "decode"


@pytest.mark.parametrize("layout, codes, needed", [
    ({"rowsperstrip": 10}, (273, 279), 5),  # 48 rows: 4 strips of 10 and one of 8
    ({"rowsperstrip": 10}, (279,), 5),  # every offset, one byte count short
    ({"rowsperstrip": 10, "planarconfig": "separate"}, (273, 279), 15),  # 5 strips a plane, 3 planes
    ({"tile": (16, 32)}, (324, 325), 3),  # 48 x 20 in tiles 16 rows high, 32 wide: 3 down, 1 (part) across
])
def test_a_tiff_listing_one_strip_or_tile_fewer_than_its_image_needs_is_refused(tmp_path, layout, codes, needed):
    """The count to the segment, by hand: the last strip and the edge tiles partly outside the image
    count (not floor division), a tile's rows are its TileLength (not its width), each separate plane
    has its own strips, and offsets and byte counts must both be there; the whole file decodes."""
    rgb = "planarconfig" in layout
    image = (np.arange(48 * 20 * 3) % 251).astype(np.uint8).reshape(48, 20, 3)[..., :3 if rgb else 1]
    buffer = io.BytesIO()
    written = np.ascontiguousarray(image.transpose(2, 0, 1)) if rgb else image[..., 0]  # (planes, rows, columns)
    tifffile.imwrite(buffer, written, photometric="rgb" if rgb else None, **layout)
    whole = tmp_path / "whole.tif"
    whole.write_bytes(buffer.getvalue())
    assert np.array_equal(decode_image(whole, DecodeOptions()), image if rgb else image[..., 0])
    data = bytearray(buffer.getvalue())
    for code in codes:
        tag = tifffile.TiffFile(io.BytesIO(bytes(data))).pages.first.tags[code]
        assert tag.count == needed
        data[tag.offset + 4:tag.offset + 8] = (needed - 1).to_bytes(4, "little")
    path = tmp_path / "one-short.tif"
    path.write_bytes(bytes(data))
    kind = "tiles" if "tile" in layout else "strips"
    with pytest.raises(DecodeError, match=f"^damaged TIFF file: it lists {needed - 1} {kind}, but its image needs "
                                          f"{needed}$") as refused:
        decode_image(path, DecodeOptions())
    assert refused.value.stage == "decode"


def test_a_sparse_jpeg_tiff_decodes_its_missing_tiles_as_zeros(tmp_path) -> None:
    """GDAL's sparse files list a tile never written with offset 0 and byte count 0: there is no
    header to check, and tifffile fills it in with zeros (such a file was refused for it)."""
    pytest.importorskip("imagecodecs")
    image = np.random.default_rng(20).integers(1, 256, (64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, compression="jpeg", tile=(32, 32))
    data = bytearray(buffer.getvalue())
    page = tifffile.TiffFile(io.BytesIO(bytes(data))).pages.first
    expected = page.asarray()
    for code in (324, 325):  # TileOffsets, TileByteCounts: the second tile's is 0
        tag = page.tags[code]
        size = {3: 2, 4: 4}[int(tag.dtype)]
        data[tag.valueoffset + size:tag.valueoffset + 2 * size] = bytes(size)
    path = tmp_path / "sparse.tif"
    path.write_bytes(bytes(data))
    expected[:32, 32:] = 0
    assert np.array_equal(decode_image(path, DecodeOptions()), expected)


@pytest.mark.parametrize("planar", [0, 3, 65535])
def test_a_tiff_whose_planar_configuration_is_neither_1_nor_2_is_refused(tmp_path, planar: int) -> None:
    """tifffile then shapes the image as separate planes but keeps the strips of one: two thirds of
    the image was uninitialised memory, different pixels at each decode of the same file."""
    image = (np.arange(3 * 37 * 45) % 251).astype(np.uint8).reshape(3, 37, 45)
    path = tmp_path / "planar.tif"
    path.write_bytes(_tiff_with_tag_value(image, 284, planar, planarconfig="separate", photometric="rgb",
                                          rowsperstrip=9))
    with pytest.raises(DecodeError, match=f"damaged TIFF file: PlanarConfiguration {planar} ") as refused:
        decode_image(path, DecodeOptions())
    assert refused.value.stage == "decode"


@pytest.mark.parametrize("code, value, field, says", [
    (256, 0, "count", "its ImageWidth tag holds no single number"),  # (tifffile gives it as (): a TypeError)
    (278, 0, "value", "damaged TIFF file: "),  # RowsPerStrip 0: tifffile divides by it
    (262, 3, "value", "damaged TIFF file: "),  # a palette image without its ColorMap
])
def test_a_tiff_whose_tags_are_damaged_says_damaged_tiff_file(tmp_path, code, value, field, says) -> None:
    """A tag of no value, or of a value tifffile cannot use, gave the bare Python error of the code
    that tripped on it ("cannot decode the image: '>' not supported between instances of 'tuple'
    and 'int'", "... division by zero"), which says nothing of the file."""
    path = tmp_path / "damaged.tif"
    path.write_bytes(_tiff_with_tag_value((np.arange(37 * 45) % 251).astype(np.uint8).reshape(37, 45), code, value,
                                          field, rowsperstrip=8))
    with pytest.raises(DecodeError) as refused:
        decode_image(path, DecodeOptions())
    assert refused.value.stage == "decode"
    assert str(refused.value).startswith("damaged TIFF file: ") and says in str(refused.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(height=st.integers(1, 300), width=st.integers(1, 300), gray=st.booleans(), progressive=st.booleans(),
       comment=st.binary(max_size=300), exif=st.booleans(), fill=st.integers(0, 3))
def test_the_jpeg_frame_is_read_as_the_encoder_wrote_it(height, width, gray, progressive, comment, exif, fill):
    """The frame header every JPEG tile is sized by (before libjpeg allocates), held to what Pillow
    was asked to encode: behind APP segments, a comment of any bytes, and fill bytes before a marker."""
    from gpu_pipeline.inputs.headers import jpeg_frame

    picture = Image.new("L" if gray else "RGB", (width, height), 128)
    described = Image.Exif()
    described[0x010E] = "x" * 40  # ImageDescription
    stream = io.BytesIO()
    picture.save(stream, "JPEG", progressive=progressive, comment=comment, **({"exif": described} if exif else {}))
    data = stream.getvalue()
    assert data[2:4] == b"\xff\xe0"  # JFIF's APP0 first: fill bytes before the marker after it
    at = 4 + int.from_bytes(data[4:6], "big")
    data = data[:at] + b"\xff" * fill + data[at:]
    assert jpeg_frame(data) == (8, height, width, 1 if gray else 3)
    assert jpeg_frame(data[:at]) is None  # cut before the frame header


def test_the_jpeg_frame_by_hand_for_every_start_of_frame_marker():
    """FF D8, then a frame header FF Cn of length 17: precision 8, 16 rows, 32 columns, 3 components.
    Every SOFn carries the size (lossless C3, hierarchical C5, arithmetic C9, ...), not C4 (DHT), C8
    (JPG) or CC (DAC), which are other segments; a header cut at its last byte is no frame (it raised
    IndexError), nor a frame header after the start of scan."""
    from gpu_pipeline.inputs.headers import jpeg_frame

    def header(marker: int) -> bytes:
        return b"\xff\xd8\xff" + bytes([marker]) + b"\x00\x11\x08\x00\x10\x00\x20\x03"

    for marker in range(0xC0, 0xD0):
        assert jpeg_frame(header(marker)) == (None if marker in (0xC4, 0xC8, 0xCC) else (8, 16, 32, 3)), hex(marker)
    assert jpeg_frame(header(0xC0)[:-1]) is None
    assert jpeg_frame(b"\xff\xd8" + b"\xff\xda\x00\x02" + header(0xC0)[2:]) is None  # SOS (parameters left out) first


def test_the_png_header_by_hand():
    """Its IHDR chunk must come first and be whole (through its bit depth, byte 24)."""
    from gpu_pipeline.inputs.headers import png_header

    head = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + (200).to_bytes(4, "big") + (100).to_bytes(4, "big")
    head += b"\x10"  # bit depth 16
    assert png_header(head) == (200, 100, 16)
    assert png_header(head[:24]) is None  # (it raised IndexError)
    assert png_header(head.replace(b"IHDR", b"tEXt")) is None


def test_a_webp_zero_filled_by_hand():
    """RIFF chunks made by hand: the image data (VP8 or VP8L) is zero-filled when its last 64 bytes
    are zeros, or all of it when it is shorter (not the chunk's own header); 63 zeros are not enough;
    an empty chunk has nothing zero-filled (libwebp refuses it as it is)."""
    from gpu_pipeline.inputs.headers import webp_zero_filled

    def riff(*chunks: tuple[bytes, bytes]) -> bytes:
        body = b"WEBP" + b"".join(kind + len(data).to_bytes(4, "little") + data + bytes(len(data) & 1)
                                  for kind, data in chunks)
        return b"RIFF" + len(body).to_bytes(4, "little") + body

    coded = b"\x2f" + bytes(range(1, 101))
    assert webp_zero_filled(riff((b"VP8L", coded + bytes(64))))
    assert not webp_zero_filled(riff((b"VP8L", coded + bytes(63))))
    assert webp_zero_filled(riff((b"VP8 ", bytes(60))))
    assert not webp_zero_filled(riff((b"VP8L", b"")))
    assert not webp_zero_filled(riff((b"VP8 ", coded), (b"EXIF", bytes(100))))
