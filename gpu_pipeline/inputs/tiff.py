"""TIFF and BigTIFF (tifffile): the bands of the first full-resolution page, and the checks made
before tifffile decodes it (:mod:`gpu_pipeline.inputs.decode`, "Decoding" and "Errors"): its colour
model, the pixel and samples limits, the header of each JPEG-, PNG-, WebP- or JPEG 2000-compressed
strip or tile, segments that end past the end of the file, and the errors tifffile only logs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image

from gpu_pipeline.inputs import jpeg2000
from gpu_pipeline.inputs.headers import jpeg_frame, png_header, webp_zero_filled, zero_ended
from gpu_pipeline.inputs.limits import (CMYK_COPIES, FLOAT_STRETCH_BYTES, RESULT_BYTES, TIFF_COPIES, TIFF_PALETTE_BYTES,
                                        DecodeError, ask_budget, check_samples, check_size, check_structures, text_of)
from gpu_pipeline.inputs.normalise import as_sample, full_range, native_order

#: The first four bytes of a TIFF and of a BigTIFF, little- or big-endian.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: GDAL's nodata value, as text (GeoTIFF).
_GDAL_NODATA_TAG = 42113


class _TiffErrors(logging.Handler):
    """The ERROR records tifffile logs in a thread while it decodes a page there (``maxworkers=1``).
    Since 2026.11.16 tifffile pads a truncated or short strip or tile with zeros and logs an error
    (earlier versions raised): a cut file would become a normal record of made-up pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        caught = getattr(self.local, "caught", None)
        if caught is not None and record.levelno >= logging.ERROR:
            caught.append(record.getMessage())
        elif self._alone() and logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)  # as if this handler were not there: the caller's logging as it was

    def _alone(self) -> bool:
        """Whether no other handler would see tifffile's records (then logging's last resort prints them)."""
        logger = logging.getLogger("tifffile")
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return False
            if not logger.propagate:
                return True
            logger = logger.parent
        return True

    def decoded(self, page: tifffile.TiffPage) -> np.ndarray:
        """``page.asarray()`` in this thread; DecodeError when tifffile reported an error meanwhile."""
        self.local.caught = caught = []
        try:
            data = page.asarray(maxworkers=1)  # one thread per image: the engine decodes many at once
        finally:
            self.local.caught = None
        if caught:
            raise DecodeError("decode", f"damaged TIFF file: {text_of(ValueError(caught[0].removesuffix(' padded')))}")
        return data


_TIFF_ERRORS = _TiffErrors()
logging.getLogger("tifffile").addHandler(_TIFF_ERRORS)


#: TIFF colour models whose samples are not R, G, B or gray: refused rather than read as such.
#: (JPEG-compressed YCbCr is decoded to RGB by libjpeg, and CMYK is converted: both are read.)
_TIFF_FOREIGN_COLOURS = frozenset(tifffile.PHOTOMETRIC) - {
    tifffile.PHOTOMETRIC.MINISWHITE, tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB,
    tifffile.PHOTOMETRIC.PALETTE, tifffile.PHOTOMETRIC.SEPARATED, tifffile.PHOTOMETRIC.YCBCR}


def read_tiff(fh: BinaryIO, max_pixels: int) -> tuple[np.ndarray, float | None, int]:
    """Bands (H, W, C) of a TIFF's first full-resolution page, its GDAL nodata value if any, and its
    bits per sample (12 for 12-bit samples, which tifffile gives as uint16)."""
    try:
        tif = tifffile.TiffFile(fh)
    except MemoryError:
        raise
    except Exception as exc:  # tifffile's errors for a damaged header are struct, value and index errors
        raise DecodeError("decode", f"damaged TIFF file: {text_of(exc)}") from None
    with tif:
        try:
            return _read_page(tif, max_pixels)
        except (DecodeError, MemoryError, OSError):
            raise
        except Exception as exc:  # a damaged tag or segment: the error of the code that tripped on it
            raise DecodeError("decode", f"damaged TIFF file: {text_of(exc)}") from None


def _read_page(tif: tifffile.TiffFile, max_pixels: int) -> tuple[np.ndarray, float | None, int]:
    """:func:`read_tiff` of the open file ``tif``."""
    page = _full_resolution_page(tif)
    _check_tiff_size(page, max_pixels)
    _check_tiff_segments(tif.filehandle, page)
    ask_budget(tif.filehandle.size + _tiff_pixels(page) * _tiff_bytes_a_pixel(page))
    try:
        data = _TIFF_ERRORS.decoded(page)
    except ValueError as exc:
        if "imagecodecs" in str(exc):
            raise DecodeError(
                "decode",
                f"TIFF compression {page.compression.name} needs the imagecodecs package "
                "(pip install imagecodecs)",
            ) from None
        raise
    # ``shaped`` is (separate samples, depth, height, width, contiguous samples): it says
    # where the bands are, planar or interleaved, whatever the sizes.
    separate, _, height, width, contiguous = page.shaped
    data = data.reshape(separate, height, width, contiguous)
    bands = np.moveaxis(data[..., 0], 0, -1) if separate > 1 else data[0]
    bits, nodata = page.bitspersample, _gdal_nodata(page)
    if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
        return (page.colormap[:, bands[..., 0]] >> 8).astype(np.uint8).transpose(1, 2, 0), None, 8
    if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        bands = _inverted(native_order(bands), bits)
        nodata = _inverted_nodata(nodata, bands.dtype, bits)
    elif page.photometric == tifffile.PHOTOMETRIC.SEPARATED:
        bands = _cmyk_to_rgb(bands)
    if bands.dtype == np.uint8 and bits < 8:
        bands, bits = full_range(bands, bits), 8
    return native_order(bands), nodata, bits


def _inverted(bands: np.ndarray, bits: int) -> np.ndarray:
    """Min-is-white samples as min-is-black: unsigned ``b``-bit ``x`` gives ``2**b - 1 - x`` (4-bit:
    ``15 - x``, where ``~x`` gave ``255 - x``), signed ``~x`` (``-1 - x``, in range), floats ``1 - x``
    (the [0, 1] of the ``bitdepth`` stretch), 1-bit ``not x``. Signed and float samples were left as
    they were, the brightest sample staying the brightest."""
    if bands.dtype.kind in "bi":
        return ~bands
    if bands.dtype.kind == "u":
        top = bands.dtype.type((1 << bits) - 1) if bits < bands.dtype.itemsize * 8 else np.iinfo(bands.dtype).max
        return top - np.minimum(bands, top)
    return bands.dtype.type(1) - bands


def _inverted_nodata(nodata: float | None, dtype: np.dtype, bits: int) -> float | None:
    """The GDAL nodata value of min-is-white samples, inverted as :func:`_inverted` inverts them (in
    their own type), so that it still marks the same pixels: left as it was, -9999 matched none of
    the inverted samples (9998), and the nodata block dominated the stretch as data."""
    if dtype.kind == "b":  # (before as_sample: a bool has no integer range to compare it in)
        return nodata  # 1-bit samples take no nodata: they become 0/255 as they are
    sample = as_sample(dtype, nodata)
    if sample is None:
        return nodata
    return float(_inverted(np.array([sample], dtype), bits)[0])


#: The tags that size the image and its segments, which tifffile gives as read, a number or not.
_NUMBER_TAGS = ("ImageWidth", "ImageLength", "SamplesPerPixel", "RowsPerStrip", "TileWidth", "TileLength")


def _full_resolution_page(tif: tifffile.TiffFile) -> tifffile.TiffPage:
    """The first page that is not a reduced-resolution copy (NewSubfileType bit 0): a thumbnail
    may come first. Its colour model must be one we read (see :data:`_TIFF_FOREIGN_COLOURS`)."""
    if not tif.pages:
        raise DecodeError("decode", "damaged TIFF file: no image in it")
    page = tif.pages.first
    if page.subfiletype & 1:
        page = next((p for p in tif.pages if not p.subfiletype & 1), page)
    for name in _NUMBER_TAGS:  # (a tag of count 0 is (), one of type ASCII a str: TypeErrors further on)
        if not isinstance(getattr(page, name.lower()), (int, np.integer)):
            raise DecodeError("decode", f"damaged TIFF file: its {name} tag holds no single number")
    photometric = page.photometric
    if photometric in _TIFF_FOREIGN_COLOURS or (
            photometric == tifffile.PHOTOMETRIC.YCBCR and page.compression != tifffile.COMPRESSION.JPEG):
        name = getattr(photometric, "name", photometric)
        raise DecodeError("decode", f"TIFF colour model {name} is not supported (only gray, RGB, palette, "
                                    "CMYK and JPEG-compressed YCbCr are)")
    return page


def _check_tiff_size(page: tifffile.TiffPage, max_pixels: int) -> None:
    """The pixel limit, and the samples it allows (:data:`SAMPLES_PER_LIMIT_PIXEL` a pixel),
    counted over the image or over one tile where a tile is larger: a small file may declare
    thousands of bands or one huge tile, which decode to far more memory than its pixels say."""
    check_size(page.imagewidth, page.imagelength, max_pixels)
    if page.imagedepth != 1:
        raise DecodeError("decode", f"volumetric TIFF images (depth {page.imagedepth}) are not supported")
    samples = page.samplesperpixel * _tiff_pixels(page)
    tile = f" in tiles of {page.tilewidth} x {page.tilelength}" if page.is_tiled else ""
    check_samples(page.imagewidth, page.imagelength, page.samplesperpixel, samples, max_pixels, tile)


def _tiff_pixels(page: tifffile.TiffPage) -> int:
    """The pixels tifffile decodes the page to: the image's, or one tile's where a tile is larger."""
    return max(page.imagewidth * page.imagelength, page.tilewidth * page.tilelength)


def _tiff_bytes_a_pixel(page: tifffile.TiffPage) -> int:
    """What decoding the page holds a pixel, its file aside (:data:`TIFF_COPIES`)."""
    if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
        return TIFF_PALETTE_BYTES
    if page.photometric == tifffile.PHOTOMETRIC.SEPARATED:
        return CMYK_COPIES * page.samplesperpixel + RESULT_BYTES
    dtype = page.dtype if page.dtype is not None else np.dtype(np.uint64)  # (refused by tifffile later)
    stretch = FLOAT_STRETCH_BYTES if dtype.kind == "f" else 0
    chosen = min(3, page.samplesperpixel)
    return (TIFF_COPIES * page.samplesperpixel + chosen) * dtype.itemsize + stretch + RESULT_BYTES


# Segment headers. tifffile gives these codecs a strip's or tile's bytes and takes whatever size
# their own header states (then crops it to the segment): a 636-byte JPEG strip saying 40000 x 40000
# decoded 1.6 gigapixels. So each segment's header is read first and checked against its segment,
# as libtiff does for JPEG ("JPEG strip/tile size exceeds expected dimensions").

#: Bytes of a segment read for its header; a header further in (large boxes or markers before it)
#: is looked for in the whole segment.
_SEGMENT_HEAD_BYTES = 1024


def _jpeg_segment_size(head: bytes) -> tuple[int, int, int] | None:
    frame = jpeg_frame(head) if head.startswith(b"\xff\xd8") else None
    return None if frame is None else (frame[2], frame[1], frame[3])


def _png_segment_size(head: bytes) -> tuple[int, int, int] | None:
    header = png_header(head)
    return None if header is None else (header[0], header[1], 1)  # (at most 4 channels)


def _webp_segment_size(head: bytes) -> tuple[int, int, int] | None:
    """A still WebP's size from its first chunk (VP8X's canvas: libwebp refuses a still image of
    another size). None for an animation: every frame would be decoded."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    kind, data = head[12:16], head[20:30]
    if kind == b"VP8 " and data[3:6] == b"\x9d\x01\x2a":
        return int.from_bytes(data[6:8], "little") & 0x3FFF, int.from_bytes(data[8:10], "little") & 0x3FFF, 1
    if kind == b"VP8L" and data[0] == 0x2F:
        bits = int.from_bytes(data[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 1
    if kind == b"VP8X" and not data[0] & 0x02:  # 0x02: animation
        return int.from_bytes(data[4:7], "little") + 1, int.from_bytes(data[7:10], "little") + 1, 1
    return None


#: TIFF compressions whose codec sizes its output from the segment's own header, and how to read
#: that header: (width, height, components), or None when it cannot be read.
_SEGMENT_HEADERS: dict[int, tuple[str, Callable[[bytes], tuple[int, int, int] | None]]] = {
    **dict.fromkeys((6, 7, 33007, 34892), ("JPEG", _jpeg_segment_size)),  # old, new, ALT, DNG lossy
    34933: ("PNG", _png_segment_size),
    **dict.fromkeys((50001, 34927), ("WebP", _webp_segment_size)),
    **dict.fromkeys((33003, 33004, 33005, 34712), ("JPEG 2000", jpeg2000.segment_size)),
}


def _check_tiff_segments(fh: tifffile.FileHandle, page: tifffile.TiffPage) -> None:
    """Refuse the page when a segment's own header declares more than its strip or tile holds
    (:mod:`gpu_pipeline.inputs.decode`, "Errors"): each header is read before any segment is decoded.
    And when a segment ends past the end of the file (a file cut short): tifffile 2026.11 pads such a
    segment with zeros, and its error, which :class:`_TiffErrors` turns into this image's, is lost where
    the caller has silenced tifffile's logger."""
    size, kind = fh.size, "tile" if page.is_tiled else "strip"
    if page.samplesperpixel > 1 and page.planarconfig not in (1, 2):  # (tifffile counts its strips as 1's)
        raise DecodeError("decode", f"damaged TIFF file: PlanarConfiguration {page.planarconfig!r} "
                                    "(1: interleaved samples, 2: separate planes)")
    listed, needed = min(len(page.dataoffsets), len(page.databytecounts)), _segments_needed(page)
    if listed < needed:  # tifffile leaves the pixels of the missing ones as zeros, or as memory held them
        raise DecodeError("decode", f"damaged TIFF file: it lists {listed} {kind}s, but its image needs {needed}")
    for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
        if offset and count and offset + count > size:
            raise DecodeError("decode", f"truncated TIFF file: {kind} {index + 1} ends at byte {offset + count} "
                                        f"of a {size}-byte file")
    if page.compression not in _SEGMENT_HEADERS:
        return
    codec, read_size = _SEGMENT_HEADERS[page.compression]
    # libjpeg reads a frame header from JPEGTables (old JPEG) or NDPI's header as from the segment.
    shared = [read_size(t) for t in (page.jpegtables, page.jpegheader) if t] if codec == "JPEG" else []
    for declared in filter(None, shared):
        _check_segment(page, codec, f"{kind}s' shared header", declared)
    for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
        if not offset or not count:
            continue  # a missing segment: tifffile fills it in
        declared = _segment_size(fh, offset, count, read_size)
        if declared is None and not any(shared):
            raise DecodeError("decode", f"damaged TIFF file: {kind} {index + 1} has no {codec} header that can "
                                        "be checked (or is animated)")
        if declared is not None:
            _check_segment(page, codec, f"{kind} {index + 1}", declared)
        if codec == "JPEG 2000" and declared is not None:
            _check_jpeg2000_segment(fh, offset, count, declared, f"{kind} {index + 1}")
        if page.compression == 7 and not page.jpegheader and not _ends_with_its_eoi(fh, offset, count):
            # (NDPI's segments are pieces of one JPEG stream, cut at its restart markers)
            raise DecodeError("decode", f"truncated TIFF file: {kind} {index + 1}'s JPEG data does not end with "
                                        "its end-of-image marker (cut short, or zero-filled: a download still "
                                        "being written?)")
        if codec == "WebP" and _webp_segment_zero_filled(fh, offset, count):
            raise DecodeError("decode", f"truncated TIFF file: {kind} {index + 1}'s WebP image data ends in zeros "
                                        "(zero-filled: a download still being written?)")


def _segments_needed(page: tifffile.TiffPage) -> int:
    """How many strips or tiles (StripOffsets or TileOffsets entries) the page's image takes: one a
    band where the bands are separate planes."""
    separate, _, height, width, _ = page.shaped
    if page.is_tiled:
        return separate * -(-height // max(page.tilelength, 1)) * -(-width // max(page.tilewidth, 1))
    return separate * -(-height // max(min(page.rowsperstrip, height), 1))


def _check_jpeg2000_segment(fh: tifffile.FileHandle, offset: int, count: int, declared: tuple[int, int, int],
                            where: str) -> None:
    """Refuse a JPEG 2000 strip or tile whose structures OpenJPEG would allocate at many times its
    own samples, as for a JPEG 2000 file (:func:`check_structures`): a 359-byte TIFF of one 2048 x
    2048 strip with 2 x 2 precincts took 2.3 GB."""
    fh.seek(offset)
    data = fh.read(max(0, min(count, fh.size - offset)))
    found = jpeg2000.codestream(data)  # (a bare one, or in a JP2 file)
    if found is None:
        return  # (OpenJPEG refuses it)
    _, start, end = found
    data = data[:end]
    frame = jpeg2000.frame(data[start:start + jpeg2000.SIZ_BYTES])
    if frame is None:
        return
    width, height, components = frame
    try:
        check_structures(data, start, jpeg2000.tile_parts(data, start, len(data)), (width, height, len(components)),
                         width * height * declared[2], "segment's")
    except DecodeError as refused:
        raise DecodeError("decode", f"TIFF JPEG 2000 {where}: {refused}") from None


def _ends_with_its_eoi(fh: tifffile.FileHandle, offset: int, count: int) -> bool:
    """Whether a JPEG strip or tile (a whole JPEG stream, TIFF compression 7) ends with its
    end-of-image marker, zeros after it allowed. libjpeg fills in a stream cut short, or one whose
    end was zero-filled, with made-up pixels and no error, as it does for a JPEG file (``_read_jpeg``)."""
    end = min(offset + count, fh.size)
    fh.seek(max(offset, end - _SEGMENT_HEAD_BYTES))
    return fh.read(end - fh.tell()).rstrip(b"\0").endswith(b"\xff\xd9")


def _webp_segment_zero_filled(fh: tifffile.FileHandle, offset: int, count: int) -> bool:
    """Whether a WebP strip or tile (a whole WebP file) ends in zeros where its image data should:
    libwebp fills it in with made-up pixels, as it does a WebP file's (``decode._zero_filled``)."""
    data = zero_ended(fh, offset, min(offset + count, fh.size))
    return data is not None and webp_zero_filled(data)


def _check_segment(page: tifffile.TiffPage, codec: str, where: str, declared: tuple[int, int, int]) -> None:
    """Refuse a segment larger than its strip or tile in either direction (libtiff allows the last
    strip a full strip's rows, as does the strip height here), or of more components than samples
    (up to 4: RGBA; JPEG allows 255 components, JPEG 2000 16384)."""
    height, width = (page.tilelength, page.tilewidth) if page.is_tiled else \
        (min(page.rowsperstrip, page.imagelength), page.imagewidth)
    samples = page.samplesperpixel if page.planarconfig == 1 else 1
    kind = "tile" if page.is_tiled else "strip"
    if declared[0] > width or declared[1] > height:
        raise DecodeError("decode", f"TIFF {codec} {where} declares {declared[0]} x {declared[1]} pixels, but a "
                                    f"{kind} holds {width} x {height} (decompression-bomb guard)")
    if declared[2] > max(samples, 4):
        raise DecodeError("decode", f"TIFF {codec} {where} declares {declared[2]} components, but a {kind} holds "
                                    f"{samples} sample{'s' if samples > 1 else ''} a pixel (decompression-bomb guard)")


def _segment_size(fh: tifffile.FileHandle, offset: int, count: int,
                  read_size: Callable[[bytes], tuple[int, int, int] | None]) -> tuple[int, int, int] | None:
    """The size a segment's header declares, from its first bytes or, failing that, all of them."""
    count = max(0, min(count, fh.size - offset))  # a count past the end must not size the read
    fh.seek(offset)
    head = fh.read(min(count, _SEGMENT_HEAD_BYTES))
    declared = read_size(head)
    if declared is None and count > len(head):
        declared = read_size(head + fh.read(count - len(head)))
    return declared


def _cmyk_to_rgb(bands: np.ndarray) -> np.ndarray:
    """8-bit CMYK (and any extra samples after it, dropped) as RGB, converted as Pillow converts a
    CMYK JPEG, so that the same picture gives the same pixels in either format."""
    if bands.shape[2] < 4 or bands.dtype != np.uint8:
        raise DecodeError("decode", f"only 8-bit CMYK TIFFs are supported (this one: {bands.shape[2]} "
                                    f"{bands.dtype} samples)")
    height, width = bands.shape[:2]
    cmyk = Image.frombytes("CMYK", (width, height), np.ascontiguousarray(bands[:, :, :4]).tobytes())
    return np.array(cmyk.convert("RGB"))


def _gdal_nodata(page: tifffile.TiffPage) -> float | None:
    tag = page.tags.get(_GDAL_NODATA_TAG)
    if tag is None:
        return None
    try:
        return float(str(tag.value).strip("\x00 "))
    except ValueError:
        return None  # a malformed tag: use every pixel
