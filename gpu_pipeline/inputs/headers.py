"""What the first bytes of a JPEG or a PNG declare, read before any decoder allocates (as
:mod:`gpu_pipeline.inputs.jpeg2000` reads a JPEG 2000's), and whether a file, or a WebP's image data, ends
in zeros."""

from __future__ import annotations

import io
import struct
from typing import BinaryIO


def png_header(head: bytes) -> tuple[int, int, int] | None:
    """Width, height and bit depth from the first bytes of a PNG (its IHDR chunk comes first), or None."""
    if not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR" or len(head) < 25:
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), head[24]


#: Start-of-frame markers (all but DHT C4, JPG C8 and DAC CC): they carry the image size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


#: A big-endian 16-bit number at an offset (a segment's length, a frame's height and width).
_U16 = struct.Struct(">H").unpack_from


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(precision, height, width, components) from a JPEG's start-of-frame segment, or None.

    Read for every JPEG tile, in a decode thread holding the GIL: numbers unpacked in place (a slice
    and ``int.from_bytes`` each took 1.2 us a EuroSAT tile, this 0.6)."""
    i, end = 2, len(data) - 9
    while i < end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            return data[i + 4], _U16(data, i + 5)[0], _U16(data, i + 7)[0], data[i + 9]
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + _U16(data, i + 2)[0]
    return None


def zero_ended(fh: BinaryIO, start: int = 0, end: int | None = None) -> bytes | None:
    """The bytes of ``fh`` from ``start`` to ``end`` (None: to the file's end) when the last of them
    is a zero, else None: the first test for a file (or a TIFF's strip or tile) cut short and
    zero-filled, which reads a single byte of nearly every one."""
    if end is None:
        fh.seek(-1, io.SEEK_END)
    else:
        fh.seek(end - 1)
    if fh.read(1) != b"\0":  # (nearly every one: read no further)
        return None
    fh.seek(start)
    return fh.read(-1 if end is None else end - start)


#: A WebP whose image data (its VP8 or VP8L chunk) ends in this many zero bytes was cut short and
#: zero-filled: entropy-coded data does not end in a run of zeros.
WEBP_ZERO_TAIL = 64


def webp_zero_filled(data: bytes) -> bool:
    """Whether a WebP's image data ends in :data:`WEBP_ZERO_TAIL` zeros: one cut short and zero-filled
    to its full size (a download that preallocates its file), which libwebp fills in with made-up
    pixels and no error. Its other chunks (EXIF padded with zeros) may end so."""
    position, end = 12, min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    while position + 8 <= end:  # the RIFF chunks: (type, size, data padded to an even size)
        chunk, size = data[position:position + 4], int.from_bytes(data[position + 4:position + 8], "little")
        if chunk in (b"VP8 ", b"VP8L"):
            image_end = min(end, position + 8 + size)
            tail = data[max(position + 8, image_end - WEBP_ZERO_TAIL):image_end]
            return bool(tail) and not tail.strip(b"\0")
        position += 8 + size + (size & 1)
    return False
