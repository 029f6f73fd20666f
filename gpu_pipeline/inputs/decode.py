"""Decode image files to the uint8 gray or RGB arrays every backend takes (the bands and samples
brought there by :mod:`gpu_pipeline.inputs.normalise`).

Decoding
--------
The first bytes choose the decoder, not the extension: TIFF and BigTIFF go to tifffile
(:mod:`gpu_pipeline.inputs.tiff`), which reads the first full-resolution page only (the image of a
COG, never an overview or a later page; a thumbnail stored first is skipped). Gray, RGB, palette and
JPEG-compressed YCbCr TIFFs are read as such, 8-bit CMYK is converted to RGB as Pillow converts a
CMYK JPEG, and other colour models (CIELab, uncompressed YCbCr, ...) are refused rather than read as
RGB. PNG, JPEG, BMP, GIF (first frame) and WebP go to Pillow. JPEG 2000 (a JP2 file or a bare
codestream, by its first bytes) goes to OpenJPEG through imagecodecs (``_read_jpeg2000``: gray or
sRGB samples only, its image header checked first, a codestream without its end marker refused).
Complete 8-bit gray or three-channel JPEGs take a faster path through imagecodecs' libjpeg-turbo
(``jpeg8_decode``), which gives the same pixels as Pillow (both run libjpeg with its default,
accurate IDCT) at about twice the speed on small tiles; a JPEG that does not end with its EOI marker
(truncated), or any other JPEG, goes to Pillow, which refuses truncated data where libjpeg alone
would fill it in; one cut short and zero-filled to its full size (a download that preallocates its
file) is refused before, as Pillow would decode the zeros as pixels, and so is such a PNG or WebP
(``_zero_filled``). Pixels are used as stored (no EXIF rotation, no ``Image.draft``). LZW and other
non-zlib TIFF compressions need the ``imagecodecs`` package; without it the error says so. 16-bit
RGB, RGBA and gray + alpha PNGs go to libpng (imagecodecs' ``png_decode``), since Pillow keeps only
their high byte; 16-bit gray PNGs stay with Pillow, which keeps all 16 bits. Both are stretched
(:mod:`gpu_pipeline.inputs.normalise`).

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
end with its end-of-image marker, and a WebP one's image data must not end in zeros (one cut short
or zero-filled would be filled in with made-up pixels). JPEG XL, JPEG XR and LERC, whose headers
are not read here, are decoded unchecked: LERC is common in elevation GeoTIFFs, and refusing every
such file would cost more users than the bomb it could carry. The checks and the decoding budget: :mod:`gpu_pipeline.inputs.limits`.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.errors import one_line
from gpu_pipeline.inputs import jpeg2000
from gpu_pipeline.inputs.headers import jpeg_frame, png_header, webp_zero_filled, zero_ended
from gpu_pipeline.inputs.limits import (  # noqa: F401  (DecodeError and budgeted: this module's API too)
    BUDGETED_FROM_BYTES, JPEG2000_BYTES_A_SAMPLE, LIBJPEG_BYTES_A_SAMPLE, PILLOW_BYTES_A_SAMPLE, RESULT_BYTES,
    SAMPLES_PER_LIMIT_PIXEL, WEBP_BYTES_A_SAMPLE, DecodeError, ask_budget, budgeted, check_samples, check_size,
    check_structures, text_of)
from gpu_pipeline.inputs.normalise import full_range, native_order, select_bands, to_uint8
from gpu_pipeline.inputs.tiff import TIFF_MAGIC, read_tiff

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


#: The one handler :func:`quiet_codecs` adds, however often it runs: a new one each time, the command
#: line called in one process (a scheduler, a test's CliRunner) added two a run, for good.
_QUIET = logging.NullHandler()
#: The loggers of the codecs that :func:`quiet_codecs` quiets.
_CODECS = ("tifffile", "imagecodecs")


def quiet_codecs() -> None:
    """For the command line and its decode processes: a damaged file becomes that file's error
    record, and the codecs' own messages would only add noise to stderr: tifffile's warnings and
    errors alike (tifffile 2026.11 logs at ERROR what earlier versions logged at WARNING), and the
    libpng and libjpeg warnings imagecodecs logs. (The Python API leaves the caller's logging as it
    is, but for the note below.)"""
    for name in _CODECS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.propagate = False
        logger.addHandler(_QUIET)  # (so that neither tiff's error handler nor logging prints them)


@contextmanager
def codecs_quieted() -> Iterator[None]:
    """:func:`quiet_codecs` for a run, then the loggers as they were: the command line called in a
    program's process (a scheduler's, a test's CliRunner) left the program's codecs quiet for good."""
    loggers = [logging.getLogger(name) for name in _CODECS]
    before = [(logger.level, logger.propagate, _QUIET in logger.handlers) for logger in loggers]
    quiet_codecs()
    try:
        yield
    finally:
        for logger, (level, propagate, quiet) in zip(loggers, before):
            logger.setLevel(level)
            logger.propagate = propagate
            if not quiet:
                logger.removeHandler(_QUIET)


class _InterlaceNote(logging.Filter):
    """Drops libpng's "Interlace handling should be turned on when using png_read_image", which
    imagecodecs logs for every interlaced PNG it decodes (16-bit colour ones come here): a note
    on imagecodecs' own use of libpng, whose pixels are right, not on the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Interlace handling should be turned on" not in record.getMessage()


logging.getLogger("imagecodecs").addFilter(_InterlaceNote())


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
            if magic in TIFF_MAGIC:
                bands, nodata, bits = read_tiff(fh, options.max_pixels)
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
        image = to_uint8(select_bands(bands, options.bands), options.stretch, nodata, bits)
        return np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 1 else image)
    except DecodeError:
        raise
    except OSError as exc:
        if stage == "read" or exc.errno is not None:  # (the system's, read as the pixels decode: EIO, ESTALE)
            raise DecodeError("read", _cannot_read(exc)) from None
        raise DecodeError(stage, f"damaged or truncated image data: {text_of(exc)}") from None
    except MemoryError:
        raise DecodeError(stage, "not enough memory to decode the image") from None
    except Exception as exc:  # the engine needs every failure as a DecodeError
        raise DecodeError(stage, f"cannot {stage} the image: {text_of(exc)}") from None


def decode_or_error(path: str | os.PathLike[str], options: DecodeOptions) -> np.ndarray | tuple[str, str]:
    """:func:`decode_image`, or ``(stage, message)`` of its error: what one file's record needs.
    Any exception counts (a decoder bug must not end the run): :func:`decode_image` raises every one
    as a :class:`DecodeError`, with its stage, and anything else is caught here too."""
    return _or_error(decode_image, path, options)


def _or_error(decode, source, options: DecodeOptions) -> np.ndarray | tuple[str, str]:
    try:
        return decode(source, options)
    except DecodeError as exc:
        return exc.stage, str(exc)
    except Exception as exc:  # (unreached while _decode wraps every failure; kept: a decoder bug never ends a run)
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
        ask_budget(charge)
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
        return "read", _cannot_open(path, exc)
    except ValueError as exc:  # a name open() refuses (a NUL byte), as decode_image says it: in its
        # words on every Python (3.13's os.open says "embedded null character in path")
        return "read", "cannot read the image: " + ("embedded null byte" if "null" in str(exc) else text_of(exc))
    except Exception as exc:
        return "read", f"cannot read the image: {text_of(exc)}"
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
    try:
        fh = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))
    except OSError as exc:
        raise DecodeError("read", _cannot_open(path, exc)) from None
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
    return f"cannot read the file: {exc.strerror or text_of(exc)}"


def _cannot_open(path: str | os.PathLike[str], exc: OSError) -> str:
    """Why ``path`` could not be opened: a socket (or a device with nothing behind it) cannot be
    opened at all (ENXIO, "No such device or address"), and is named as the other special files."""
    if exc.errno == errno.ENXIO:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return _cannot_read(exc)
        if not stat.S_ISREG(mode):
            return _not_a_regular_file(mode)
    return _cannot_read(exc)


def _not_a_regular_file(mode: int) -> str:
    return f"not a regular file (a {_file_kind(mode)}); skipped"


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _file_bytes(fh: BinaryIO) -> int:
    """The size of the file ``fh`` reads (its position is kept)."""
    position = fh.tell()
    size = fh.seek(0, io.SEEK_END)
    fh.seek(position)
    return size


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
        check_size(im.width, im.height, max_pixels)
        if im.format in ("PNG", "WEBP") and _zero_filled(fh, im.format):
            raise DecodeError("decode", f"truncated {im.format.replace('WEBP', 'WebP')} file: zero bytes where its "
                                        "image data should end (a download still being written?)")
        samples = 4 if im.mode in ("P", "PA") else len(im.getbands())  # (a palette's colours: RGB, or RGBA)
        per_sample = WEBP_BYTES_A_SAMPLE if im.format == "WEBP" else PILLOW_BYTES_A_SAMPLE
        ask_budget(_file_bytes(fh) + im.width * im.height * (samples * per_sample + RESULT_BYTES))
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
    return native_order(bands).reshape(im.height, im.width, -1)


#: A PNG ends with its IEND chunk (length 0, type, CRC).
_PNG_END = b"\0\0\0\0IEND\xaeB`\x82"


def _zero_filled(fh: BinaryIO, kind: str) -> bool:
    """Whether a PNG or WebP was cut short and zero-filled to its full size (a download that
    preallocates its file). Pillow decodes the zeros as pixels (PNG: it does not check the image
    data's CRC, and stops at the zeros; WebP: libwebp fills in the rest), so such a file became a
    result record that no resume would redo. A PNG that ends in zeros must have its IEND chunk
    right before them (a complete one padded with zeros is fine); a WebP, see :func:`webp_zero_filled`."""
    data = zero_ended(fh)
    if data is None:
        return False
    if kind == "PNG":
        return not data.rstrip(b"\0").endswith(_PNG_END)
    return webp_zero_filled(data)


def _png_bit_depth(fh: BinaryIO) -> int | None:
    """The bit depth in a PNG's header, or None."""
    fh.seek(0)
    header = png_header(fh.read(26))
    return None if header is None else header[2]


def _read_wide_png(fh: BinaryIO, width: int, height: int) -> np.ndarray:
    """Bands (H, W, C) of a 16-bit RGB, RGBA or gray + alpha PNG, all 16 bits: Pillow reads these
    as 8-bit RGB(A), keeping only the high byte, so they go to libpng (imagecodecs)."""
    if png_decode is None:
        raise DecodeError("decode", "16-bit colour PNGs need the imagecodecs package (pip install imagecodecs)")
    fh.seek(0)
    return native_order(png_decode(fh.read())).reshape(height, width, -1)


_JPEG_MAGIC = b"\xff\xd8\xff"


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
    frame = jpeg_frame(data)
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
        frame = jpeg_frame(data)
        if frame is not None and frame[0] != 8:  # Pillow cannot identify it, and would call it damaged
            raise DecodeError("decode", f"{frame[0]}-bit JPEG is not supported (8-bit only)")
        if data.endswith(b"\0") and not _ends_after_its_scan(data):  # Pillow decodes the zeros as pixels
            raise DecodeError("decode", "truncated JPEG file: zero bytes where its image data should end "
                                        "(a download still being written?)")
        fh.seek(0)
        return _read_with_pillow(fh, max_pixels)
    height, width = shape[:2]
    check_size(width, height, max_pixels)
    ask_budget(_libjpeg_charge(data, shape))
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
        found = jpeg2000.codestream(data)
        if found is None:
            raise DecodeError("decode", "damaged JPEG 2000 file: no codestream box")
        header, start, end = found
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
        return full_range(bands, bits), 8
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
    check_size(width, height, max_pixels)
    limit = SAMPLES_PER_LIMIT_PIXEL * max_pixels
    count = max(len(components), jpeg2000.palette_columns(data, palette) if palette else 0)
    own = count * width * height
    check_samples(width, height, count, own, max_pixels)
    if any(steps != [1, 1] for _, _, *steps in components):
        raise DecodeError("decode", "JPEG 2000 with subsampled components is not supported")
    if len({(bits, signed) for bits, signed, _, _ in components}) > 1:
        raise DecodeError("decode", "JPEG 2000 components of different sample types are not supported")
    if end - start < 2 or data[end - 2:end] != b"\xff\xd9":
        raise DecodeError("decode", "truncated JPEG 2000 file: its codestream does not end with its end marker "
                                    "(a download still being written?)")
    parts = jpeg2000.tile_parts(data, start, end)
    structures = check_structures(data, start, parts, (width, height, len(components)), own, "image's", limit)
    missing = jpeg2000.missing_tile(data, start, parts)
    if missing is not None:
        raise DecodeError("decode", f"damaged JPEG 2000 file: tile {missing[0] + 1} of {missing[1]} is missing "
                                    "(no tile-part holds it)")
    ask_budget(len(data) + own * JPEG2000_BYTES_A_SAMPLE + structures * jpeg2000.BYTES_PER_SAMPLE
               + width * height * RESULT_BYTES)
    return height, width, components[0][0]


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
