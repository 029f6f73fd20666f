"""Decoded bands to the uint8 gray or RGB image every backend takes: the band choice, and the
stretch of samples wider than 8 bits. It happens here, once, on the host, so all backends see the
same bytes.

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
"""

from __future__ import annotations

import numpy as np

from gpu_pipeline.inputs.limits import DecodeError


def full_range(bands: np.ndarray, bits: int) -> np.ndarray:
    """1- to 7-bit samples onto 0..255, as PNG and Pillow give them: ``(x * 255 + m // 2) // m`` with
    ``m = 2**b - 1`` (4-bit: ``17 x``, 2-bit: ``85 x``). Read as they were, a 4-bit TIFF's 0..15
    was near black, where the same picture as a PNG spanned 0..255."""
    top = (1 << bits) - 1
    wide = np.minimum(bands, top).astype(np.uint16)
    return ((wide * 255 + top // 2) // top).astype(np.uint8)


def native_order(array: np.ndarray) -> np.ndarray:
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def select_bands(bands: np.ndarray, chosen: tuple[int, ...] | None) -> np.ndarray:
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


def to_uint8(bands: np.ndarray, stretch: str, nodata: float | None, bits: int | None = None) -> np.ndarray:
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
        band, nodata_value = bands[:, :, i], as_sample(bands.dtype, nodata)
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
        table = fixed_depth(values, bits)
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
        out[...] = fixed_depth(band, bits)
    else:
        limits = _limits(band, valid, stretch)
        out[...] = 0 if limits is None else _linear(band, *limits)
    if valid is not None:
        out[~valid] = 0


def as_sample(dtype: np.dtype, nodata: float | None):
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


def fixed_depth(band: np.ndarray, bits: int | None = None) -> np.ndarray:
    """The ``bitdepth`` stretch: the samples' full range (``bits`` of them, else their type's) onto
    0..255; a sample beyond ``bits`` (a damaged file) gives 255."""
    if band.dtype.kind == "f":
        scaled = np.clip(band.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5
        return np.floor(scaled, out=scaled).astype(np.uint8)
    bits = max(8, min(bits or 64, band.dtype.itemsize * 8))  # (a signed sample of fewer than 8 bits: as int8)
    if band.dtype.kind == "u":
        return np.minimum(band >> (bits - 8), 255).astype(np.uint8)
    return np.minimum((np.maximum(band, 0).astype(np.int64) * 2) >> (bits - 8), 255).astype(np.uint8)
