"""What decoding one image may take, checked from its headers before its pixels are allocated,
and how a reader fails.

Every reader raises :class:`DecodeError` (a stage and a one-line message). Once it has read its
image's header, and before it allocates, it calls :func:`check_size` (``DecodeOptions.max_pixels``),
:func:`check_samples` where the samples may outnumber the pixels (bands, tiles),
:func:`check_structures` for a JPEG 2000 codestream, and :func:`ask_budget` with what its decoding
will hold at its peak (a run's decoding budget: :func:`budgeted`). What each refuses, and why:
:mod:`gpu_pipeline.inputs.decode`, "Errors".
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator

from gpu_pipeline.inputs import jpeg2000


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

    def __reduce__(self):  # (pickled with both arguments: a process pool or Dask worker sends it back)
        return type(self), (self.stage, self.message)


def text_of(exc: BaseException) -> str:
    """The exception's text on one line, without object reprs such as ``<_io.BufferedReader ...>``."""
    text = re.sub(r"<[^<>]*>", "", str(exc))
    text = " ".join(text.split())
    return text or type(exc).__name__


def check_size(width: int, height: int, max_pixels: int) -> None:
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


def ask_budget(charge: int) -> None:
    """Ask the decoding budget (:func:`budgeted`) for ``charge`` bytes, those an image's decoding
    holds at its peak, if it is that large."""
    if charge >= BUDGETED_FROM_BYTES:
        ask = _budget.get()
        if ask is not None:
            ask(charge)


def check_structures(data: bytes, start: int, parts: list[tuple[int, int, int]] | None,
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


#: Samples a TIFF may hold per pixel of the limit: a multispectral image at the limit still decodes
#: (Sentinel-2's 13 bands), thousands of bands or one huge tile in a small file do not.
SAMPLES_PER_LIMIT_PIXEL = 16


def check_samples(width: int, height: int, per_pixel: int, samples: int, max_pixels: int, where: str = "") -> None:
    """Refuse an image whose ``samples`` (``per_pixel`` a pixel, counted over the image or ``where``
    its decoder allocates more) are over :data:`SAMPLES_PER_LIMIT_PIXEL` a pixel of the limit."""
    if samples > SAMPLES_PER_LIMIT_PIXEL * max_pixels:
        raise DecodeError("decode", f"{width} x {height} pixels of {per_pixel} sample{'s' if per_pixel > 1 else ''}"
                                    f"{where}: {samples:,} samples is over the limit of "
                                    f"{SAMPLES_PER_LIMIT_PIXEL * max_pixels:,} ({SAMPLES_PER_LIMIT_PIXEL} per pixel "
                                    "of the limit; decompression-bomb guard)")
