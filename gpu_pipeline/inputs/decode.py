"""Decode image files and normalise them to the uint8 arrays every backend takes.

Normalisation happens here, once, on the host, so all backends see the same bytes.

Decoding
--------
The first bytes choose the decoder, not the extension: TIFF and BigTIFF go to tifffile, which reads
the first full-resolution page only (the image of a COG, never an overview or a later page; a
thumbnail stored first is skipped). Gray, RGB, palette and JPEG-compressed YCbCr TIFFs are read as
such, 8-bit CMYK is converted to RGB as Pillow converts a CMYK JPEG, and other colour models
(CIELab, uncompressed YCbCr, ...) are refused rather than read as RGB. PNG, JPEG, BMP, GIF (first
frame) and WebP go to Pillow. JPEG 2000 (a JP2 file or a bare codestream, by its first bytes)
goes to OpenJPEG through imagecodecs (``_read_jpeg2000``: gray or sRGB samples only, its image
header checked first, a codestream without its end marker refused). Complete 8-bit gray or
three-channel JPEGs take a faster path through imagecodecs' libjpeg-turbo (``jpeg8_decode``),
which gives the same pixels as Pillow (both run libjpeg with its default, accurate IDCT) at about
twice the speed on small tiles; a JPEG that does not end with its EOI marker (truncated), or any
other JPEG, goes to Pillow, which refuses truncated data where libjpeg alone would fill it in;
one cut short and zero-filled to its full size (a download that preallocates its file) is refused
before, as Pillow would decode the zeros as pixels, and so is such a PNG or WebP (``_zero_filled``).
Pixels are used as stored (no EXIF rotation, no ``Image.draft``). LZW and other non-zlib TIFF
compressions need the ``imagecodecs`` package; without it the error says so. 16-bit RGB, RGBA and
gray + alpha PNGs go to libpng (imagecodecs' ``png_decode``), since Pillow keeps only their high
byte; 16-bit gray PNGs stay with Pillow, which keeps all 16 bits. Both are stretched as below.

Bands
-----
An image is a stack of bands. Palette images are first expanded to RGB (RGBA when they carry
transparency), 1-bit images to 0/255, TIFF and JPEG 2000 samples of 2 to 7 bits onto 0..255 as PNG's are
(4-bit: ``17 x``), and TIFF "min-is-white" data is inverted within its bits per sample (4-bit:
``15 - x``; signed: ``-1 - x``; floats: ``1 - x``). ``--bands``
picks bands by 1-based number, alpha included (1 band gives gray, 3 give RGB). Without it:
1 band is gray, 2 bands (gray + alpha) give gray, 3 are RGB, 4 (RGB + alpha, or a 4th band such as
near infrared) give RGB from the first three, and more than 4 is an error asking for ``--bands``.

Bringing data wider than 8 bits to uint8
----------------------------------------
uint8 samples are used as they are and bool samples become 0/255. Every other sample type
(uint16, int16, int32, uint32, float32, float64, ...) is mapped to uint8 band by band, each
selected band on its own (as QGIS's default cumulative-cut stretch does), by
``DecodeOptions.stretch``:

* ``percentile`` (default): of the ``n`` valid samples of the band sorted as
  ``v[0] <= ... <= v[n-1]``, with ``k = (2 * (n - 1)) // 100``, ``lo = v[k]`` and
  ``hi = v[n - 1 - k]`` (numpy's ``percentile(..., 2, method="lower")`` and
  ``percentile(..., 98, method="higher")``: exact sample values, never interpolated);
* ``minmax``: ``lo = v[0]``, ``hi = v[n - 1]``;
* ``bitdepth``: no statistics; unsigned ``b``-bit integers give ``x >> (b - 8)`` (``b``: a TIFF's
  or JPEG 2000's bits per sample, else the type's: uint16 gives the high byte, a 12-bit TIFF ``x >> 4``), signed
  ``b``-bit integers give ``(2 * max(x, 0)) >> (b - 8)`` (int16: ``x >> 7``, negatives 0), floats
  are taken as [0, 1] and give ``floor(clip(x, 0, 1) * 255 + 0.5)``.

For ``percentile`` and ``minmax`` integer samples map with exact int64 arithmetic::

    c = clip(x, lo, hi)
    out = ((c - lo) * 255 + (hi - lo) // 2) // (hi - lo)     # 255 (c - lo) / (hi - lo), halves up

and float samples in float64 as ``floor((c - lo) / (hi - lo) * 255 + 0.5)`` (each IEEE operation
is correctly rounded, so this too is the same on every machine). When ``lo == hi`` the map is a
step: samples above ``hi`` give 255, the others 0 (so a constant band is all 0).

Valid samples are those that are finite (NaN and +-inf count as nodata) and differ from
the GeoTIFF's GDAL nodata value (tag 42113) when it has one. Invalid samples give 0, and a band
with no valid sample is all 0. 64-bit integer samples are refused.

Reading
-------
:func:`decode_each` reads the small files of a run (up to :data:`SMALL_FILE_BYTES`) whole, a group
at a time, with four system calls a file (open, fstat, read, close; a buffered file object takes
eight or nine), and then decodes the group from memory. On the 2-core VM a system call slows the
code after it (caches and predictors start cold), so decoding 64x64 JPEG tiles in a group costs
about 41 us a tile against 46 read and decoded one at a time. A complete 8-bit gray or RGB JPEG
with no band choice goes straight to libjpeg-turbo from those bytes (``_plain_jpeg``: the same
pixels, without a file object or normalisation steps that leave them as they are; 1-2 us of
Python a tile less). Larger files are decoded from their path, read as their decoder needs them.

Errors
------
Every failure of :func:`decode_image` is a :class:`DecodeError` with a ``stage`` (``read``,
``decode`` or ``normalise``) and a one-line message. Images of more than
``DecodeOptions.max_pixels`` pixels are refused from their header, before any pixel is decoded;
this check replaces Pillow's own decompression-bomb warning and error, which are switched off. A
TIFF is also refused when it holds more than 16 samples per pixel of the limit, counted over the
image or over one tile where a tile is larger (thousands of bands, or one huge tile, in a small
file). The codecs of JPEG-, PNG-, WebP- and JPEG 2000-compressed TIFFs size their output from each
strip's or tile's own header, not from the TIFF's tags: every such header is read first, and the
file is refused when one declares more rows or columns than its strip or tile (as libtiff refuses
such a JPEG strip), or more than 4 components beyond its samples; a JPEG strip or tile must also
end with its end-of-image marker (one cut short or zero-filled would be filled in with made-up
pixels). JPEG XL, JPEG XR and LERC, whose headers are not read here, are decoded unchecked: LERC is common in elevation GeoTIFFs, and refusing
every such file would cost more users than the bomb it could carry.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import logging
import math
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.errors import one_line
from gpu_pipeline.inputs import jpeg2000

try:
    from imagecodecs import jpeg2k_decode, jpeg8_decode, png_decode
except ImportError:  # then every JPEG goes through Pillow, and 16-bit colour PNGs and JPEG 2000 are refused
    jpeg2k_decode = jpeg8_decode = png_decode = None

# Our header check against DecodeOptions.max_pixels replaces Pillow's: its limit (about 179
# megapixels) is below ours, and its warning cannot be silenced per call from worker threads.
Image.MAX_IMAGE_PIXELS = None

#: The error of a file that is none of the images read.
_NOT_AN_IMAGE = "not a supported image (PNG, JPEG, BMP, GIF, WebP, TIFF or JPEG 2000)"
_PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")  # never EPS & co., which run programs
#: Pillow modes whose pixels are used as they are (gray, RGB, alpha or padding, 16/32-bit, float).
_PILLOW_MODES_AS_THEY_ARE = ("L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "I", "F")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_GDAL_NODATA_TAG = 42113


class DecodeError(Exception):
    """One file could not become an image.

    Parameters
    ----------
    stage : {"read", "decode", "normalise"}
        ``read``: the file cannot be opened or is empty; ``decode``: it is not a supported image,
        is damaged, too large or needs a missing codec; ``normalise``: its bands or samples cannot
        be brought to gray or RGB uint8 (band choice, sample type).
    message : str
        One line for a human, without the path (the caller reports the path).
    """

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message


# --------------------------------------------------------------------------------------------
# Decoding


def quiet_codecs() -> None:
    """For the command line and its decode processes: a damaged file becomes that file's error
    record, and the codecs' own messages would only add noise to stderr: tifffile's warnings and
    errors alike (tifffile 2026.11 logs at ERROR what earlier versions logged at WARNING), and the
    libpng and libjpeg warnings imagecodecs logs. (The Python API leaves the caller's logging as it
    is, but for the note below.)"""
    for name in ("tifffile", "imagecodecs"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.propagate = False
        logger.addHandler(logging.NullHandler())  # (so that neither _TiffErrors nor logging prints them)


class _InterlaceNote(logging.Filter):
    """Drops libpng's "Interlace handling should be turned on when using png_read_image", which
    imagecodecs logs for every interlaced PNG it decodes (16-bit colour ones come here): a note
    on imagecodecs' own use of libpng, whose pixels are right, not on the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Interlace handling should be turned on" not in record.getMessage()


logging.getLogger("imagecodecs").addFilter(_InterlaceNote())


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
            raise DecodeError("decode", f"damaged TIFF file: {_one_line(ValueError(caught[0].removesuffix(' padded')))}")
        return data


_TIFF_ERRORS = _TiffErrors()
logging.getLogger("tifffile").addHandler(_TIFF_ERRORS)


def decode_image(path: str | os.PathLike[str], options: DecodeOptions) -> np.ndarray:
    """Decode ``path`` into a C-contiguous uint8 gray (H, W) or RGB (H, W, 3) array.

    Raises
    ------
    DecodeError
        For any failure, with the stage it happened in and a one-line message.
    """
    return _decode(options, path=path)


def decode_data(data: bytes, options: DecodeOptions) -> np.ndarray:
    """:func:`decode_image` of a file's bytes ``data`` (held in memory)."""
    return _decode(options, data=data)


def _decode(options: DecodeOptions, path: str | os.PathLike[str] | None = None, data: bytes | None = None) -> np.ndarray:
    """:func:`decode_image` of ``path``, or of the file's bytes ``data`` when given."""
    stage = "read"
    try:
        fh, opened = (io.BytesIO(data), None) if data is not None else _open_regular_file(path)
        with fh:
            magic = fh.read(4)
            if not magic:
                raise DecodeError("read", "the file is empty (0 bytes)")
            fh.seek(0)
            stage = "decode"
            nodata = bits = None
            if magic in _TIFF_MAGIC:
                bands, nodata, bits = _read_tiff(fh, options.max_pixels)
            elif magic in (jpeg2000.JP2_SIGNATURE[:4], jpeg2000.J2K_MAGIC):
                bands, bits = _read_jpeg2000(fh, options.max_pixels)
            elif magic.startswith(_JPEG_MAGIC) and jpeg8_decode is not None:
                bands = _read_jpeg(fh, options.max_pixels)
            else:
                bands = _read_with_pillow(fh, options.max_pixels)
            if bands.shape[0] == 0 or bands.shape[1] == 0:  # a TIFF may say so; no backend computes on it
                raise DecodeError("decode", f"the image has no pixels ({bands.shape[1]}x{bands.shape[0]})")
            if opened is not None and _version(os.fstat(fh.fileno())) != _version(opened):
                raise DecodeError("read", "the file changed while it was read (still being written?): its pixels "
                                          "may mix two versions; --retry-failed reads it again")
        stage = "normalise"
        image = _to_uint8(_select_bands(bands, options.bands), options.stretch, nodata, bits)
        return np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 1 else image)
    except DecodeError:
        raise
    except OSError as exc:
        if stage == "read":
            raise DecodeError("read", _cannot_read(exc)) from None
        raise DecodeError(stage, f"damaged or truncated image data: {_one_line(exc)}") from None
    except MemoryError:
        raise DecodeError(stage, "not enough memory to decode the image") from None
    except Exception as exc:  # the engine needs every failure as a DecodeError
        raise DecodeError(stage, f"cannot {stage} the image: {_one_line(exc)}") from None


def decode_or_error(path: str | os.PathLike[str], options: DecodeOptions) -> np.ndarray | tuple[str, str]:
    """:func:`decode_image`, or ``(stage, message)`` of its error: what one file's record needs.
    Any exception counts (a decoder bug must not end the run); :class:`DecodeError` keeps its stage."""
    return _or_error(decode_image, path, options)


def _or_error(decode, source, options: DecodeOptions) -> np.ndarray | tuple[str, str]:
    try:
        return decode(source, options)
    except DecodeError as exc:
        return exc.stage, str(exc)
    except Exception as exc:
        return "decode", one_line(exc)


#: Files up to this size are read whole by :func:`decode_each` (every tile, most photos); larger
#: ones are decoded from their path.
SMALL_FILE_BYTES = 1 << 20
#: :func:`decode_each` reads at most this many files, and stops at this many bytes, before it
#: decodes them: few enough that a caller which stops early has read little for nothing.
READ_AHEAD_FILES = 32
READ_AHEAD_BYTES = 4 << 20


def decode_each(paths: Iterable[str | os.PathLike[str]], options: DecodeOptions,
                into: Callable[[tuple[int, ...]], np.ndarray | None] | None = None,
                working: Callable[[int], None] | None = None) -> Iterator[np.ndarray | tuple[str, str]]:
    """:func:`decode_or_error` of each of ``paths``, in order, small files read a group at a time
    before they are decoded (module docstring, "Reading"). The results are the same.

    ``into``, when given, is asked for the array a plain JPEG (see :func:`_plain_jpeg`) of a
    shape should be decoded into, and may say None (a fresh array then): a decode process decodes
    straight into its shared memory. ``working``, when given, is called with a file's position in
    ``paths`` before the file is read and again before it is decoded (a decode process under a time
    limit notes which file it is on, and since when)."""
    paths = list(paths)
    start = 0
    while start < len(paths):
        contents: list[bytes | None | tuple[str, str]] = []
        size = 0
        for position, path in enumerate(paths[start:start + READ_AHEAD_FILES], start):
            if working is not None:
                working(position)
            content = _read_small_file(path)
            contents.append(content)
            size += len(content) if isinstance(content, bytes) else 0
            if size >= READ_AHEAD_BYTES:
                break
        for position, (path, content) in enumerate(zip(paths[start:], contents), start):
            if isinstance(content, tuple):  # (it could not be read: nothing to decode)
                yield content
                continue
            if working is not None:
                working(position)
            if content is None:
                yield decode_or_error(path, options)
            else:
                image = _plain_jpeg(content, options, into)
                yield image if image is not None else _or_error(decode_data, content, options)
        start += len(contents)


#: Where a decoded image starts: this many bytes past a 16-byte boundary. libjpeg-turbo's x86 colour
#: conversion writes a row with non-temporal stores (past the caches, to memory, then a store fence)
#: when the row starts on a 16-byte boundary (32 with AVX2). A tile read again a moment later then
#: cost 42 us to decode instead of 28 (imagecodecs' ``jpeg8_decode``, 2-core VM), and as malloc
#: aligns numpy's memory to 16 bytes, half the tiles took that path. A 12-MP scene decodes in the
#: same time either way.
OFF_BOUNDARY = 8


def off_boundary_array(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array of ``shape`` that starts :data:`OFF_BOUNDARY` bytes past a 16-byte
    boundary (numpy's memory is 16-byte aligned wherever malloc is; if not, it is only slower)."""
    return np.empty(math.prod(shape) + OFF_BOUNDARY, np.uint8)[OFF_BOUNDARY:].reshape(shape)


def _plain_jpeg(data: bytes, options: DecodeOptions,
                into: Callable[[tuple[int, ...]], np.ndarray | None] | None = None
                ) -> np.ndarray | tuple[str, str] | None:
    """What :func:`decode_data` gives for the commonest file, a complete 8-bit gray or RGB JPEG
    within the pixel limit with no band choice, without its generic steps (a file object, band
    selection and normalisation, which leave such pixels as they are); None for any other file
    or any failure, which :func:`decode_data` then decodes or explains (that of an image which
    asked the decoding budget is explained here, as :func:`_or_error` says it, without asking
    again: the one image held its pixels twice). A tile's decode is a
    GIL-held step of the decode threads: this is 1-2 us of Python a tile less. ``into`` gives the
    array to decode into (see :func:`decode_each`)."""
    if jpeg8_decode is None or options.bands is not None or not data.startswith(_JPEG_MAGIC):
        return None
    shape = _libjpeg_shape(data)
    if shape is None:
        return None
    pixels = shape[0] * shape[1]
    if pixels > options.max_pixels:
        return None
    charge = _libjpeg_charge(data, shape)
    large = charge >= BUDGETED_FROM_BYTES
    if large:  # (a tile does not make the call)
        _ask_budget(charge)
    out = into(shape) if into is not None else None
    try:
        image = jpeg8_decode(data, out=out if out is not None else off_boundary_array(shape))
    except Exception:
        image = None
    if image is None or image.shape != shape or image.dtype != np.uint8 or not image.flags.c_contiguous:
        if not large:
            return None
        with budgeted(None):  # (it asked already)
            return _or_error(decode_data, data, options)
    return image


def _read_small_file(path: str | os.PathLike[str]) -> bytes | None | tuple[str, str]:
    """The bytes of ``path`` when it is a regular file of at most :data:`SMALL_FILE_BYTES`; None
    when it is larger; ``(stage, message)`` when it cannot be read, as :func:`decode_image` says it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block
    except OSError as exc:
        return "read", _cannot_read(exc)
    except ValueError as exc:  # a name open() refuses (a NUL byte), as decode_image says it: in its
        # words on every Python (3.13's os.open says "embedded null character in path")
        return "read", "cannot read the image: " + ("embedded null byte" if "null" in str(exc) else _one_line(exc))
    except Exception as exc:
        return "read", f"cannot read the image: {_one_line(exc)}"
    try:
        info = os.fstat(fd)
        mode, size = info.st_mode, info.st_size
        if stat.S_ISDIR(mode):  # as open() refuses it
            return "read", _cannot_read(IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
        if not stat.S_ISREG(mode):
            return "read", _not_a_regular_file(mode)
        if size > SMALL_FILE_BYTES:
            return None
        data = os.read(fd, size + 1)  # all of it in one call, unless it grew since fstat
        if len(data) > size:
            parts = [data]
            while part := os.read(fd, 1 << 16):
                parts.append(part)
            data = b"".join(parts)
        return data
    except OSError as exc:
        return "read", _cannot_read(exc)
    finally:
        os.close(fd)


def _open_regular_file(path: str | os.PathLike[str]) -> tuple[BinaryIO, os.stat_result]:
    """Open ``path`` for reading only if it is a regular file; the file and its status.

    Opened non-blocking, then checked: a FIFO, socket or device among the inputs would otherwise
    block the run forever (a FIFO waits for a writer) or read without end (``/dev/zero``).
    """
    fh = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))
    try:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DecodeError("read", _not_a_regular_file(info.st_mode))
        os.set_blocking(fh.fileno(), True)
        return fh, info
    except BaseException:
        fh.close()
        raise


def _version(info: os.stat_result) -> tuple[int, int, int]:
    """What changes when a file is written (size, modification and change times): a file decoded
    from its path is read piece by piece while it decodes, so a writer at work (a sync rewriting it
    in place) would give pixels of two versions. A file read whole (:func:`decode_each`'s small
    ones) is read by one system call, and a rename leaves the open file as it was."""
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _cannot_read(exc: OSError) -> str:
    return f"cannot read the file: {exc.strerror or _one_line(exc)}"


def _not_a_regular_file(mode: int) -> str:
    return f"not a regular file (a {_file_kind(mode)}); skipped"


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _one_line(exc: BaseException) -> str:
    """The exception's text on one line, without object reprs such as ``<_io.BufferedReader ...>``."""
    text = re.sub(r"<[^<>]*>", "", str(exc))
    text = " ".join(text.split())
    return text or type(exc).__name__


def _file_bytes(fh: BinaryIO) -> int:
    """The size of the file ``fh`` reads (its position is kept)."""
    position = fh.tell()
    size = fh.seek(0, io.SEEK_END)
    fh.seek(position)
    return size


def _check_size(width: int, height: int, max_pixels: int) -> None:
    """The pixel limit. Every reader calls it with the size the header declares, before the
    pixels are allocated."""
    if width * height > max_pixels:
        raise DecodeError(
            "decode",
            f"{width} x {height} = {width * height:,} pixels is over the limit of "
            f"{max_pixels:,} (decompression-bomb guard)",
        )


#: What decoding an image holds at its peak is what a large image asks the decoding budget
#: (:func:`budgeted`): its file's bytes, and so many bytes a pixel, by reader, for the codec's
#: buffers and the copies on the way to 8-bit samples. Each covers the peak that
#: ``scripts/decoding_memory.py`` measures for its kinds (docs/nightly.md, "Memory"); 16 bytes a
#: pixel for every image let a 13-band 16-bit TIFF, which holds 70 a pixel, take 4.4 times its share.
#: The 8-bit result of a reader that does not decode into it, a pixel:
RESULT_BYTES = 3
#: libjpeg-turbo decodes into the result itself (RGB: 4.2 a pixel with a file of 1.3), a sample.
LIBJPEG_BYTES_A_SAMPLE = 2
#: Pillow: its image and numpy's copy (PNG RGB: 9.9 a pixel with a file of 3), and for WebP
#: libwebp's own buffer on top (RGB: 22), a sample.
PILLOW_BYTES_A_SAMPLE = 4
WEBP_BYTES_A_SAMPLE = 9
#: OpenJPEG: its int32 samples and its tiles' buffers (RGB: 21.9 a pixel, 16-bit gray 10.2), a
#: sample; what it allocates for the codestream's structures on top.
JPEG2000_BYTES_A_SAMPLE = 8
#: tifffile: the decoded image, and a copy of it (the codec's, or one in native byte order), and
#: the three bands chosen from it (13 bands of 16 bits, deflated: 70 a pixel with a file of 22); a
#: float image's stretch works on a float64 band.
TIFF_COPIES = 2
FLOAT_STRETCH_BYTES = 8
#: A palette TIFF: its index, its colours as three 16-bit samples twice, and the result (13 a pixel).
TIFF_PALETTE_BYTES = 1 + 2 * 6 + RESULT_BYTES
#: A CMYK TIFF goes through Pillow in five copies of its samples (21 a pixel with a file of 4).
CMYK_COPIES = 5
#: Images whose decoding holds at least this many bytes (a 0.7-MP RGB JPEG) ask the decoding budget
#: before they are decoded; smaller ones (tiles) never wait, nor take a lock, for it.
BUDGETED_FROM_BYTES = 4 << 20
_budget: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar("decoding_budget",
                                                                                      default=None)


@contextlib.contextmanager
def budgeted(ask: Callable[[int], None] | None) -> Iterator[None]:
    """Within it, this thread calls ``ask(bytes)`` for each image it decodes whose decoding holds
    :data:`BUDGETED_FROM_BYTES` or more, once its header has been read and checked and before its
    pixels are allocated: the decode pool waits there until the images being decoded and waiting
    for the engine leave room for it, so that many decoders of large images fit the memory a run
    has. ``None``: nothing is asked."""
    token = _budget.set(ask)
    try:
        yield
    finally:
        _budget.reset(token)


def _ask_budget(charge: int) -> None:
    """Ask the decoding budget (:func:`budgeted`) for ``charge`` bytes, those an image's decoding
    holds at its peak, if it is that large."""
    if charge >= BUDGETED_FROM_BYTES:
        ask = _budget.get()
        if ask is not None:
            ask(charge)


def _read_with_pillow(fh: BinaryIO, max_pixels: int) -> np.ndarray:
    """Bands (H, W, C) of a PNG/JPEG/BMP/GIF/WebP, in their own sample type."""
    try:
        im = Image.open(fh, formats=_PILLOW_FORMATS)  # reads the header only
    except UnidentifiedImageError:
        fh.seek(0)
        kind = _format_by_signature(fh.read(12))
        if kind:
            raise DecodeError("decode", f"damaged {kind} file") from None
        raise DecodeError("decode", _NOT_AN_IMAGE) from None
    with im:
        _check_size(im.width, im.height, max_pixels)
        if im.format in ("PNG", "WEBP") and _zero_filled(fh, im.format):
            raise DecodeError("decode", f"truncated {im.format.replace('WEBP', 'WebP')} file: zero bytes where its "
                                        "image data should end (a download still being written?)")
        samples = 4 if im.mode in ("P", "PA") else len(im.getbands())  # (a palette's colours: RGB, or RGBA)
        per_sample = WEBP_BYTES_A_SAMPLE if im.format == "WEBP" else PILLOW_BYTES_A_SAMPLE
        _ask_budget(_file_bytes(fh) + im.width * im.height * (samples * per_sample + RESULT_BYTES))
        if im.format == "PNG" and im.mode in ("RGB", "RGBA") and _png_bit_depth(fh) == 16:
            return _read_wide_png(fh, im.width, im.height)
        if im.mode in ("P", "PA"):
            transparent = im.mode == "PA" or "transparency" in im.info
            im = im.convert("RGBA" if transparent else "RGB")
        elif im.mode == "1":
            im = im.convert("L")
        elif im.mode not in _PILLOW_MODES_AS_THEY_ARE and not im.mode.startswith("I;16"):
            im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV
        bands = np.array(im)  # loads the pixels; writeable, unlike np.asarray
    return _native_order(bands).reshape(im.height, im.width, -1)


#: A PNG ends with its IEND chunk (length 0, type, CRC).
_PNG_END = b"\0\0\0\0IEND\xaeB`\x82"
#: A WebP whose image data (its VP8 or VP8L chunk) ends in this many zero bytes was cut short and
#: zero-filled: entropy-coded data does not end in a run of zeros.
_WEBP_ZERO_TAIL = 64


def _zero_filled(fh: BinaryIO, kind: str) -> bool:
    """Whether a PNG or WebP was cut short and zero-filled to its full size (a download that
    preallocates its file). Pillow decodes the zeros as pixels (PNG: it does not check the image
    data's CRC, and stops at the zeros; WebP: libwebp fills in the rest), so such a file became a
    result record that no resume would redo. A PNG that ends in zeros must have its IEND chunk
    right before them (a complete one padded with zeros is fine), and a WebP's image data must not
    end in :data:`_WEBP_ZERO_TAIL` zeros (its other chunks, EXIF padded with zeros, may)."""
    fh.seek(-1, io.SEEK_END)
    if fh.read(1) != b"\0":  # (nearly every file: read no further)
        return False
    fh.seek(0)
    data = fh.read()
    if kind == "PNG":
        return not data.rstrip(b"\0").endswith(_PNG_END)
    position, end = 12, min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    while position + 8 <= end:  # the RIFF chunks: (type, size, data padded to an even size)
        chunk, size = data[position:position + 4], int.from_bytes(data[position + 4:position + 8], "little")
        if chunk in (b"VP8 ", b"VP8L"):
            image_end = min(end, position + 8 + size)
            tail = data[max(position + 8, image_end - _WEBP_ZERO_TAIL):image_end]
            return bool(tail) and not tail.strip(b"\0")
        position += 8 + size + (size & 1)
    return False


def _png_bit_depth(fh: BinaryIO) -> int | None:
    """The bit depth in a PNG's header, or None."""
    fh.seek(0)
    header = _png_header(fh.read(26))
    return None if header is None else header[2]


def _png_header(head: bytes) -> tuple[int, int, int] | None:
    """Width, height and bit depth from the first bytes of a PNG (its IHDR chunk comes first), or None."""
    if not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR" or len(head) < 25:
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), head[24]


def _read_wide_png(fh: BinaryIO, width: int, height: int) -> np.ndarray:
    """Bands (H, W, C) of a 16-bit RGB, RGBA or gray + alpha PNG, all 16 bits: Pillow reads these
    as 8-bit RGB(A), keeping only the high byte, so they go to libpng (imagecodecs)."""
    if png_decode is None:
        raise DecodeError("decode", "16-bit colour PNGs need the imagecodecs package (pip install imagecodecs)")
    fh.seek(0)
    return _native_order(png_decode(fh.read())).reshape(height, width, -1)


_JPEG_MAGIC = b"\xff\xd8\xff"
#: Start-of-frame markers (all but DHT C4, JPG C8 and DAC CC): they carry the image size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(precision, height, width, components) from a JPEG's start-of-frame segment, or None."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            return data[i + 4], int.from_bytes(data[i + 5:i + 7], "big"), \
                int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9]
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _ends_after_its_scan(data: bytes) -> bool:
    """Whether a JPEG has its end-of-image marker after its first scan. Entropy-coded data never
    holds the bytes FF D9, so none there means a file cut short: padded with zeros to its full size
    (a download that preallocates), libjpeg decodes the zeros as pixels, where a file that just ends
    is "truncated" to Pillow. An EXIF thumbnail's marker, before the scan, does not count. True
    where no scan is found: the decoder explains."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", i) != -1
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return True


def _libjpeg_shape(data: bytes) -> tuple[int, int] | tuple[int, int, int] | None:
    """The shape libjpeg-turbo decodes a JPEG to, (H, W) gray or (H, W, 3), when it decodes it
    directly: complete (it ends with its end-of-image marker), 8-bit, gray or three-channel. None
    for any other, Pillow's to decode or refuse (CMYK, 12-bit, truncated, damaged headers)."""
    frame = _jpeg_frame(data)
    if frame is None or frame[0] != 8 or frame[3] not in (1, 3) or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    return frame[1:3] if frame[3] == 1 else frame[1:]


def _libjpeg_charge(data: bytes, shape: tuple[int, ...]) -> int:
    """What libjpeg-turbo's decoding of the JPEG ``data`` to ``shape`` holds (:func:`budgeted`)."""
    return len(data) + math.prod(shape) * LIBJPEG_BYTES_A_SAMPLE


def _read_jpeg(fh: BinaryIO, max_pixels: int) -> np.ndarray:
    """Bands (H, W, C) of a JPEG: libjpeg-turbo directly when :func:`_libjpeg_shape` says so, else
    Pillow."""
    data = fh.read()
    shape = _libjpeg_shape(data)
    if shape is None:
        frame = _jpeg_frame(data)
        if frame is not None and frame[0] != 8:  # Pillow cannot identify it, and would call it damaged
            raise DecodeError("decode", f"{frame[0]}-bit JPEG is not supported (8-bit only)")
        if data.endswith(b"\0") and not _ends_after_its_scan(data):  # Pillow decodes the zeros as pixels
            raise DecodeError("decode", "truncated JPEG file: zero bytes where its image data should end "
                                        "(a download still being written?)")
        fh.seek(0)
        return _read_with_pillow(fh, max_pixels)
    height, width = shape[:2]
    _check_size(width, height, max_pixels)
    _ask_budget(_libjpeg_charge(data, shape))
    return jpeg8_decode(data, out=off_boundary_array(shape)).reshape(height, width, -1)


#: JP2 colour spaces (the colr box's enumerated ones) whose samples are used as they are: sRGB, greyscale.
_JP2_AS_THEY_ARE = frozenset({16, 17})


def _read_jpeg2000(fh: BinaryIO, max_pixels: int) -> tuple[np.ndarray, int | None]:
    """Bands (H, W, C) of a JPEG 2000 file (JP2, or a bare codestream), decoded by OpenJPEG
    (imagecodecs), and their bits per sample (12 for 12-bit samples, which come as uint16).

    The headers are checked first (:func:`_check_jpeg2000`), as a TIFF's tags are. Colour is used
    as stored: gray or RGB samples only (sYCC, CMYK, an ICC profile would each need a conversion,
    which OpenJPEG's callers do in different ways); a palette is applied."""
    if jpeg2k_decode is None:
        raise DecodeError("decode", "JPEG 2000 files need the imagecodecs package (pip install imagecodecs)")
    data = fh.read()
    start, end, header = 0, len(data), {}
    if not data.startswith(jpeg2000.J2K_MAGIC):
        if not data.startswith(jpeg2000.JP2_SIGNATURE):
            raise DecodeError("decode", _NOT_AN_IMAGE)
        header, codestream = jpeg2000.header_boxes(data)
        if codestream is None:
            raise DecodeError("decode", "damaged JPEG 2000 file: no codestream box")
        start, end = codestream
        _check_jp2_colour(data[slice(*header[b"colr"])] if b"colr" in header else b"")
        if b"pclr" in header and b"cmap" not in header:  # (OpenJPEG would give the indices as gray samples)
            raise DecodeError("decode", "damaged JPEG 2000 file: a palette box (pclr) without its component "
                                        "mapping box (cmap)")
    palette = header.get(b"pclr")
    height, width, bits = _check_jpeg2000(data, start, end, palette, max_pixels)
    bands = jpeg2k_decode(data, numthreads=1).reshape(height, width, -1)  # (one thread: the engine decodes many)
    if palette:  # its samples have its entries' depth, not that of the codestream's indices
        bits = jpeg2000.palette_depth(data, palette)
    if bands.dtype == np.uint8 and bits < 8:
        return _full_range(bands, bits), 8
    return bands, bits


def _check_jpeg2000(data: bytes, start: int, end: int, palette: tuple[int, int] | None,
                    max_pixels: int) -> tuple[int, int, int]:
    """Height, width and bits per sample of the codestream ``data[start:end]``, from its headers,
    or DecodeError: the pixel limit; the samples limit, for the samples (a palette's columns
    included: OpenJPEG decodes one plane per column) and for what OpenJPEG allocates from the
    headers before it decodes a sample (:class:`jpeg2000.Allocation`: a few bytes may ask for
    gigabytes); components of one size and one sample type; every tile held by a tile-part and the
    end marker (EOC) last: OpenJPEG decodes a lost tile, or a codestream zero-filled to its full
    size, into made-up pixels without an error. Then it asks the decoding budget for what the
    decoding holds: the file, the samples, those structures and the result."""
    frame = jpeg2000.frame(data[start:min(end, start + jpeg2000.SIZ_BYTES)])
    if frame is None:
        raise DecodeError("decode", "damaged JPEG 2000 file: no image header (SIZ marker)")
    width, height, components = frame
    _check_size(width, height, max_pixels)
    limit = SAMPLES_PER_LIMIT_PIXEL * max_pixels
    count = max(len(components), jpeg2000.palette_columns(data, palette) if palette else 0)
    own = count * width * height
    _check_samples(width, height, count, own, max_pixels)
    if any(steps != [1, 1] for _, _, *steps in components):
        raise DecodeError("decode", "JPEG 2000 with subsampled components is not supported")
    if len({(bits, signed) for bits, signed, _, _ in components}) > 1:
        raise DecodeError("decode", "JPEG 2000 components of different sample types are not supported")
    if end - start < 2 or data[end - 2:end] != b"\xff\xd9":
        raise DecodeError("decode", "truncated JPEG 2000 file: its codestream does not end with its end marker "
                                    "(a download still being written?)")
    parts = jpeg2000.tile_parts(data, start, end)
    structures = _check_structures(data, start, parts, (width, height, len(components)), own, "image's", limit)
    missing = jpeg2000.missing_tile(data, start, parts)
    if missing is not None:
        raise DecodeError("decode", f"damaged JPEG 2000 file: tile {missing[0] + 1} of {missing[1]} is missing "
                                    "(no tile-part holds it)")
    _ask_budget(len(data) + own * JPEG2000_BYTES_A_SAMPLE + structures * jpeg2000.BYTES_PER_SAMPLE
                + width * height * RESULT_BYTES)
    return height, width, components[0][0]


def _check_structures(data: bytes, start: int, parts: list[tuple[int, int, int]] | None,
                      frame: tuple[int, int, int], own: int, whose: str, limit: int | None = None) -> int:
    """What OpenJPEG allocates for the structures of the codestream at ``data[start:]`` (its
    tile-parts ``parts``; ``frame``: its width, height and components) before it decodes a
    sample, in samples, or DecodeError where that is over ``limit`` (samples) or many times the
    ``own`` samples of the image (or segment: ``whose``) it decodes to."""
    width, height, components = frame
    allocated = jpeg2000.allocation(data, start, components, parts)
    structures = allocated.samples()
    what = (f"{width} x {height} pixels in {allocated}: OpenJPEG allocates for them, before it decodes a sample, "
            f"as much as {structures:,} samples")
    if limit is not None and structures > limit:
        raise DecodeError("decode", f"{what}, over the limit of {limit:,} ({SAMPLES_PER_LIMIT_PIXEL} per pixel of "
                                    "the limit; decompression-bomb guard)")
    if structures > max(STRUCTURE_SAMPLES_PER_SAMPLE * own, STRUCTURE_SAMPLES_ANY_IMAGE):
        raise DecodeError("decode", f"{what}, {structures / own:.1f} times the {whose} {own:,} (at most "
                                    f"{STRUCTURE_SAMPLES_PER_SAMPLE} times, or {STRUCTURE_SAMPLES_ANY_IMAGE:,} samples; "
                                    "decompression-bomb guard)")
    return structures


#: What OpenJPEG may allocate for a codestream's structures, in samples a sample of the image, or in
#: samples whatever the image (64 MiB), under any pixel limit: the default one (a gigapixel) let a
#: 103-byte file of 2048 x 2048 pixels with 2 x 2 precincts take 2.3 GB, 142 samples a sample.
#: Usual coding styles cost under 1; 4 x 4 code-blocks, the smallest, about 6.4, and 14.5 in
#: 16 x 16 tiles (measured with ``jpeg2000.allocation`` on files Pillow's encoder wrote).
STRUCTURE_SAMPLES_PER_SAMPLE = 16
STRUCTURE_SAMPLES_ANY_IMAGE = 16 << 20


def _check_jp2_colour(colr: bytes) -> None:
    """Refuse a JP2 whose colour specification (its colr box) asks for a conversion (module docstring)."""
    if not colr:  # (a JP2 must have one, in its header box)
        raise DecodeError("decode", "damaged JPEG 2000 file: no colour specification box (colr)")
    method, space = colr[:1], int.from_bytes(colr[3:7], "big")
    if method == b"\x01" and space in _JP2_AS_THEY_ARE:
        return
    if method == b"\x01":
        what = "colour space " + {12: "CMYK", 18: "sYCC", 24: "e-sYCC"}.get(space, str(space))
    else:
        what = "an ICC colour profile" if method in (b"\x02", b"\x03") else "an unknown colour specification"
    raise DecodeError("decode", f"JPEG 2000 with {what} is not supported (gray or sRGB samples only)")


def _format_by_signature(head: bytes) -> str | None:
    """The format that the first bytes announce, to tell a damaged image from a foreign file."""
    signatures = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP"}
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in signatures.items() if head.startswith(magic)), None)


#: TIFF colour models whose samples are not R, G, B or gray: refused rather than read as such.
#: (JPEG-compressed YCbCr is decoded to RGB by libjpeg, and CMYK is converted: both are read.)
_TIFF_FOREIGN_COLOURS = frozenset(tifffile.PHOTOMETRIC) - {
    tifffile.PHOTOMETRIC.MINISWHITE, tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB,
    tifffile.PHOTOMETRIC.PALETTE, tifffile.PHOTOMETRIC.SEPARATED, tifffile.PHOTOMETRIC.YCBCR}


def _read_tiff(fh: BinaryIO, max_pixels: int) -> tuple[np.ndarray, float | None, int]:
    """Bands (H, W, C) of a TIFF's first full-resolution page, its GDAL nodata value if any, and its
    bits per sample (12 for 12-bit samples, which tifffile gives as uint16)."""
    try:
        tif = tifffile.TiffFile(fh)
    except MemoryError:
        raise
    except Exception as exc:  # tifffile's errors for a damaged header are struct, value and index errors
        raise DecodeError("decode", f"damaged TIFF file: {_one_line(exc)}") from None
    with tif:
        page = _full_resolution_page(tif)
        _check_tiff_size(page, max_pixels)
        _check_tiff_segments(tif.filehandle, page)
        _ask_budget(tif.filehandle.size + _tiff_pixels(page) * _tiff_bytes_a_pixel(page))
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
            bands = _inverted(_native_order(bands), bits)
            nodata = _inverted_nodata(nodata, bands.dtype, bits)
        elif page.photometric == tifffile.PHOTOMETRIC.SEPARATED:
            bands = _cmyk_to_rgb(bands)
        if bands.dtype == np.uint8 and bits < 8:
            bands, bits = _full_range(bands, bits), 8
        return _native_order(bands), nodata, bits


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
    sample = _as_sample(dtype, nodata)
    if sample is None or dtype.kind == "b":
        return nodata
    return float(_inverted(np.array([sample], dtype), bits)[0])


def _full_range(bands: np.ndarray, bits: int) -> np.ndarray:
    """1- to 7-bit samples onto 0..255, as PNG and Pillow give them: ``(x * 255 + m // 2) // m`` with
    ``m = 2**b - 1`` (4-bit: ``17 x``, 2-bit: ``85 x``). Read as they were, a 4-bit TIFF's 0..15
    was near black, where the same picture as a PNG spanned 0..255."""
    top = (1 << bits) - 1
    wide = np.minimum(bands, top).astype(np.uint16)
    return ((wide * 255 + top // 2) // top).astype(np.uint8)


def _full_resolution_page(tif: tifffile.TiffFile) -> tifffile.TiffPage:
    """The first page that is not a reduced-resolution copy (NewSubfileType bit 0): a thumbnail
    may come first. Its colour model must be one we read (see :data:`_TIFF_FOREIGN_COLOURS`)."""
    if not tif.pages:
        raise DecodeError("decode", "damaged TIFF file: no image in it")
    page = tif.pages.first
    if page.subfiletype & 1:
        page = next((p for p in tif.pages if not p.subfiletype & 1), page)
    photometric = page.photometric
    if photometric in _TIFF_FOREIGN_COLOURS or (
            photometric == tifffile.PHOTOMETRIC.YCBCR and page.compression != tifffile.COMPRESSION.JPEG):
        name = getattr(photometric, "name", photometric)
        raise DecodeError("decode", f"TIFF colour model {name} is not supported (only gray, RGB, palette, "
                                    "CMYK and JPEG-compressed YCbCr are)")
    return page


#: Samples a TIFF may hold per pixel of the limit: a multispectral image at the limit still decodes
#: (Sentinel-2's 13 bands), thousands of bands or one huge tile in a small file do not.
SAMPLES_PER_LIMIT_PIXEL = 16


def _check_tiff_size(page: tifffile.TiffPage, max_pixels: int) -> None:
    """The pixel limit, and the samples it allows (:data:`SAMPLES_PER_LIMIT_PIXEL` a pixel),
    counted over the image or over one tile where a tile is larger: a small file may declare
    thousands of bands or one huge tile, which decode to far more memory than its pixels say."""
    _check_size(page.imagewidth, page.imagelength, max_pixels)
    if page.imagedepth != 1:
        raise DecodeError("decode", f"volumetric TIFF images (depth {page.imagedepth}) are not supported")
    samples = page.samplesperpixel * _tiff_pixels(page)
    tile = f" in tiles of {page.tilewidth} x {page.tilelength}" if page.is_tiled else ""
    _check_samples(page.imagewidth, page.imagelength, page.samplesperpixel, samples, max_pixels, tile)


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


def _check_samples(width: int, height: int, per_pixel: int, samples: int, max_pixels: int, where: str = "") -> None:
    """Refuse an image whose ``samples`` (``per_pixel`` a pixel, counted over the image or ``where``
    its decoder allocates more) are over :data:`SAMPLES_PER_LIMIT_PIXEL` a pixel of the limit."""
    if samples > SAMPLES_PER_LIMIT_PIXEL * max_pixels:
        raise DecodeError("decode", f"{width} x {height} pixels of {per_pixel} sample{'s' if per_pixel > 1 else ''}"
                                    f"{where}: {samples:,} samples is over the limit of "
                                    f"{SAMPLES_PER_LIMIT_PIXEL * max_pixels:,} ({SAMPLES_PER_LIMIT_PIXEL} per pixel "
                                    "of the limit; decompression-bomb guard)")


# Segment headers. tifffile gives these codecs a strip's or tile's bytes and takes whatever size
# their own header states (then crops it to the segment): a 636-byte JPEG strip saying 40000 x 40000
# decoded 1.6 gigapixels. So each segment's header is read first and checked against its segment,
# as libtiff does for JPEG ("JPEG strip/tile size exceeds expected dimensions").

#: Bytes of a segment read for its header; a header further in (large boxes or markers before it)
#: is looked for in the whole segment.
_SEGMENT_HEAD_BYTES = 1024


def _jpeg_segment_size(head: bytes) -> tuple[int, int, int] | None:
    frame = _jpeg_frame(head) if head.startswith(b"\xff\xd8") else None
    return None if frame is None else (frame[2], frame[1], frame[3])


def _png_segment_size(head: bytes) -> tuple[int, int, int] | None:
    header = _png_header(head)
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
    (module docstring, "Errors"): each header is read before any segment is decoded. And when a
    segment ends past the end of the file (a file cut short): tifffile 2026.11 pads such a
    segment with zeros, and its error, which :class:`_TiffErrors` turns into this image's, is lost
    where the caller has silenced tifffile's logger."""
    size, kind = fh.size, "tile" if page.is_tiled else "strip"
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


def _check_jpeg2000_segment(fh: tifffile.FileHandle, offset: int, count: int, declared: tuple[int, int, int],
                            where: str) -> None:
    """Refuse a JPEG 2000 strip or tile whose structures OpenJPEG would allocate at many times its
    own samples, as for a JPEG 2000 file (:func:`_check_structures`): a 359-byte TIFF of one 2048 x
    2048 strip with 2 x 2 precincts took 2.3 GB."""
    fh.seek(offset)
    data = fh.read(max(0, min(count, fh.size - offset)))
    start = 0
    if not data.startswith(jpeg2000.J2K_MAGIC):  # a JP2 file in the segment
        _, codestream = jpeg2000.header_boxes(data)
        if codestream is None:
            return  # (OpenJPEG refuses it)
        start = codestream[0]
        data = data[:codestream[1]]
    frame = jpeg2000.frame(data[start:start + jpeg2000.SIZ_BYTES])
    if frame is None:
        return
    width, height, components = frame
    try:
        _check_structures(data, start, jpeg2000.tile_parts(data, start, len(data)), (width, height, len(components)),
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


def _native_order(array: np.ndarray) -> np.ndarray:
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _gdal_nodata(page: tifffile.TiffPage) -> float | None:
    tag = page.tags.get(_GDAL_NODATA_TAG)
    if tag is None:
        return None
    try:
        return float(str(tag.value).strip("\x00 "))
    except ValueError:
        return None  # a malformed tag: use every pixel


# --------------------------------------------------------------------------------------------
# Normalisation


def _select_bands(bands: np.ndarray, chosen: tuple[int, ...] | None) -> np.ndarray:
    """The 1 (gray) or 3 (RGB) bands to keep, as (H, W, 1) or (H, W, 3)."""
    count = bands.shape[2]
    if chosen is not None:
        if max(chosen) > count:
            raise DecodeError(
                "normalise",
                f"--bands {','.join(map(str, chosen))} asks for band {max(chosen)}, "
                f"but the image has {count} band{'s' if count > 1 else ''}",
            )
        indices = [b - 1 for b in chosen]
    elif count <= 2:
        indices = [0]  # gray, or gray + alpha
    elif count <= 4:
        indices = [0, 1, 2]  # RGB, or RGB + alpha or a 4th band
    else:
        raise DecodeError(
            "normalise", f"the image has {count} bands: choose 1 or 3 with --bands (e.g. --bands 4,3,2)"
        )
    return bands if indices == list(range(count)) else bands[:, :, indices]


def _to_uint8(bands: np.ndarray, stretch: str, nodata: float | None, bits: int | None = None) -> np.ndarray:
    """``bands`` as uint8 (module docstring); ``bits``: bits per sample where a TIFF says (12-bit
    samples come as uint16: the ``bitdepth`` stretch takes ``x >> 4`` of them, not the high byte)."""
    if bands.dtype == np.uint8:
        return bands
    if bands.dtype == np.bool_:
        return bands.astype(np.uint8) * np.uint8(255)
    if bands.dtype.kind not in "uif" or (bands.dtype.kind in "ui" and bands.dtype.itemsize > 4):
        raise DecodeError("normalise", f"{bands.dtype} samples are not supported")
    out = np.empty(bands.shape, np.uint8)
    for i in range(bands.shape[2]):
        band, nodata_value = bands[:, :, i], _as_sample(bands.dtype, nodata)
        if bands.dtype.kind in "ui" and bands.dtype.itemsize <= 2:
            _stretch_by_table(band, stretch, nodata_value, out[:, :, i], bits)
        else:
            _stretch_directly(band, stretch, nodata_value, out[:, :, i], bits)
    return out


def _stretch_by_table(band: np.ndarray, stretch: str, nodata, out: np.ndarray, bits: int | None) -> None:
    """8- and 16-bit integers: statistics from a histogram, then a lookup table of every value.

    Same results as :func:`_stretch_directly`, in a fraction of its time and memory.
    """
    info = np.iinfo(band.dtype)
    values = np.arange(info.min, info.max + 1, dtype=band.dtype)
    if stretch == "bitdepth":
        table = _fixed_depth(values, bits)
    else:
        histogram = np.zeros(values.size, np.int64)
        for rows in _row_chunks(band.shape[0], band.shape[1]):
            histogram += np.bincount(_table_index(band[rows], info.min), minlength=values.size)
        if nodata is not None:
            histogram[int(nodata) - info.min] = 0
        limits = _limits_from_histogram(histogram, stretch)
        table = (
            np.zeros(values.size, np.uint8)
            if limits is None
            else _linear(values, *(v + info.min for v in limits))
        )
    if nodata is not None:
        table[int(nodata) - info.min] = 0
    for rows in _row_chunks(band.shape[0], band.shape[1]):
        out[rows] = table[_table_index(band[rows], info.min).reshape(out[rows].shape)]


def _row_chunks(height: int, width: int, pixels: int = 1 << 20) -> list[slice]:
    """Row ranges of about a megapixel: index temporaries stay small whatever the image size."""
    step = max(1, pixels // max(width, 1))
    return [slice(start, start + step) for start in range(0, height, step)]


def _table_index(samples: np.ndarray, minimum: int) -> np.ndarray:
    index = samples.astype(np.intp).ravel()
    index -= minimum
    return index


def _limits_from_histogram(histogram: np.ndarray, stretch: str) -> tuple[int, int] | None:
    """The module docstring's ``(lo, hi)`` as table offsets: ``v[j]`` is the first value whose
    cumulative count exceeds ``j``."""
    cumulative = np.cumsum(histogram)
    n = int(cumulative[-1])
    if n == 0:
        return None
    k = 0 if stretch == "minmax" else (2 * (n - 1)) // 100
    lo, hi = np.searchsorted(cumulative, [k, n - 1 - k], side="right")
    return int(lo), int(hi)


def _stretch_directly(band: np.ndarray, stretch: str, nodata, out: np.ndarray, bits: int | None) -> None:
    """32-bit integers and floats: statistics by partial sorting, arithmetic on every sample."""
    valid = np.isfinite(band) if band.dtype.kind == "f" else None
    if nodata is not None:
        valid = band != nodata if valid is None else valid & (band != nodata)
    if valid is not None and valid.all():
        valid = None  # the common case: no mask to apply
    if valid is not None and band.dtype.kind == "f":
        band = np.where(valid, band, 0)  # no NaN reaches the arithmetic below
    if stretch == "bitdepth":
        out[...] = _fixed_depth(band, bits)
    else:
        limits = _limits(band, valid, stretch)
        out[...] = 0 if limits is None else _linear(band, *limits)
    if valid is not None:
        out[~valid] = 0


def _as_sample(dtype: np.dtype, nodata: float | None):
    """The nodata value in the band's sample type (as GDAL compares it), or None if it has none."""
    if nodata is None or np.isnan(nodata):
        return None  # NaN is excluded as a non-finite value anyway
    if dtype.kind == "f":
        return dtype.type(nodata)
    info = np.iinfo(dtype)
    if nodata.is_integer() and info.min <= nodata <= info.max:
        return dtype.type(int(nodata))
    return None  # no sample can equal it


def _limits(band: np.ndarray, valid: np.ndarray | None, stretch: str) -> tuple | None:
    """``(lo, hi)`` of the valid samples by the module docstring's rule; None if there are none."""
    samples = band.ravel() if valid is None else band[valid]
    n = samples.size
    if n == 0:
        return None
    if stretch == "minmax":
        return samples.min(), samples.max()
    k = (2 * (n - 1)) // 100
    ordered = np.partition(samples, (k, n - 1 - k))  # a copy: the band is left alone
    return ordered[k], ordered[n - 1 - k]


def _linear(band: np.ndarray, lo, hi) -> np.ndarray:
    """Samples in [lo, hi] mapped linearly onto 0..255, rounded to nearest (module docstring)."""
    if lo == hi:
        return np.where(band > hi, 255, 0).astype(np.uint8)
    clipped = np.clip(band, lo, hi)
    if band.dtype.kind == "f":
        lo, hi = float(lo), float(hi)
        scaled = (clipped.astype(np.float64) - lo) / (hi - lo) * 255.0 + 0.5
        return np.floor(scaled, out=scaled).astype(np.uint8)
    lo, hi = int(lo), int(hi)
    span = hi - lo
    shifted = clipped.astype(np.int64)
    shifted -= lo
    shifted *= 255
    shifted += span // 2
    shifted //= span
    return shifted.astype(np.uint8)


def _fixed_depth(band: np.ndarray, bits: int | None = None) -> np.ndarray:
    """The ``bitdepth`` stretch: the samples' full range (``bits`` of them, else their type's) onto
    0..255; a sample beyond ``bits`` (a damaged file) gives 255."""
    if band.dtype.kind == "f":
        scaled = np.clip(band.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5
        return np.floor(scaled, out=scaled).astype(np.uint8)
    bits = max(8, min(bits or 64, band.dtype.itemsize * 8))  # (a signed sample of fewer than 8 bits: as int8)
    if band.dtype.kind == "u":
        return np.minimum(band >> (bits - 8), 255).astype(np.uint8)
    return np.minimum((np.maximum(band, 0).astype(np.int64) * 2) >> (bits - 8), 255).astype(np.uint8)
