"""What a JPEG 2000 file declares, read from its headers before OpenJPEG decodes it.

The JP2 file format's boxes (ITU-T T.800 Annex I) and the codestream's marker segments (T.800
Annex A): the image and its components (SIZ), the tile-parts (SOT), each component's coding style
(COD, COC), and a palette (pclr). :func:`gpu_pipeline.inputs.decode._read_jpeg2000` decides from
these, before any sample is decoded, whether the file is refused: OpenJPEG allocates for what the
headers declare (every tile, code-block and precinct) before it reads the data, so a file of a few
bytes can ask for gigabytes, and it decodes a lost tile or a zero-filled tail into made-up pixels.
Nothing here raises for a damaged header: a function says None (or nothing) where it cannot read
one, and OpenJPEG refuses the file then.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

#: A JP2 file starts with its signature box; a bare codestream (.j2k, .j2c) with SOC then SIZ.
JP2_SIGNATURE = b"\0\0\0\x0cjP  \r\n\x87\n"
J2K_MAGIC = b"\xff\x4f\xff\x51"
#: Bytes of a codestream that hold its SIZ marker, for the most components it may declare (16384).
SIZ_BYTES = 42 + 3 * 16384
#: What OpenJPEG allocates from a codestream's headers, before it decodes a sample, in bytes:
#: about 8 KB a tile and 1 KB a tile and component (65535 tiles of 1 x 1 pixels took 0.6 GB, and
#: 4.9 GB with 64 components, from files of at most 1 MB), and, for every tile, component,
#: resolution level and band, about 408 bytes a code-block and 160 a precinct (OpenJPEG 2.5.4,
#: fitted to within 2% on 512 x 512 to 2048 x 2048 pixels, code-blocks of 4 x 4 to 64 x 64,
#: precincts of 2 x 2 to none: a 103-byte file of 2048 x 2048 pixels with 2 x 2 precincts took
#: 2.3 GB; 5 bytes a pixel besides).
TILE_BYTES, TILE_COMPONENT_BYTES, CODE_BLOCK_BYTES, PRECINCT_BYTES = 8192, 1024, 408, 160
#: Bytes of OpenJPEG's own samples (int32): what :class:`Allocation` counts its bytes in.
BYTES_PER_SAMPLE = 4


@dataclass
class Allocation:
    """What OpenJPEG allocates for a codestream's structures before it decodes a sample (see
    :data:`TILE_BYTES`): its tiles, and the code-blocks and precincts of all of them (0 where
    the coding styles cannot be read: OpenJPEG refuses the file then)."""

    tiles: int
    components: int
    code_blocks: int = 0
    precincts: int = 0

    def samples(self) -> int:
        """The allocation as so many of OpenJPEG's samples: what it counts as against a limit of samples."""
        tile = TILE_BYTES + TILE_COMPONENT_BYTES * self.components
        return (self.tiles * tile + self.code_blocks * CODE_BLOCK_BYTES
                + self.precincts * PRECINCT_BYTES) // BYTES_PER_SAMPLE

    def __str__(self) -> str:
        return (f"{self.tiles:,} tile{'s' if self.tiles > 1 else ''} of {self.components} "
                f"component{'s' if self.components > 1 else ''}, {self.code_blocks:,} code-blocks and "
                f"{self.precincts:,} precincts")


def allocation(data: bytes, start: int, components: int, parts: list[tuple[int, int, int]] | None) -> Allocation:
    """What OpenJPEG allocates for the codestream at ``data[start:]`` (of ``components``, its tile-parts
    ``parts`` from :func:`tile_parts`) before it decodes a sample."""
    blocks = code_blocks(data, start, components, parts) or (0, 0)
    return Allocation(tile_count(data, start) or 1, components, *blocks)


def boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, where its contents start, where they end) of each box in ``data[start:end]``, in order;
    stops at a damaged box. A box of size 0 runs to the end."""
    end = len(data) if end is None else end
    i = start
    while i + 8 <= end:
        size, kind, contents = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8], i + 8
        if size == 1:  # the size follows, in 8 bytes
            size, contents = int.from_bytes(data[i + 8:i + 16], "big"), i + 16
        if size == 0:
            yield kind, contents, end
            return
        if size < contents - i:
            return
        yield kind, contents, i + size
        i += size


def first_boxes(data: bytes, start: int = 0, end: int | None = None) -> dict[bytes, tuple[int, int]]:
    """Where the contents of the first box of each type in ``data[start:end]`` start and end."""
    found: dict[bytes, tuple[int, int]] = {}
    for kind, first, last in boxes(data, start, end):
        found.setdefault(kind, (first, last))
    return found


def header_boxes(data: bytes) -> tuple[dict[bytes, tuple[int, int]], tuple[int, int] | None]:
    """Where the contents of the JP2 header's boxes that OpenJPEG reads (the first of each type) and
    of the codestream box (jp2c; None without one) start and end. OpenJPEG reads the boxes of every
    header box (jp2h) before the codestream box, and such boxes found at the top level after the
    first header box (a misplaced one): a later one may hold the palette (pclr) the first one lacks."""
    header: dict[bytes, tuple[int, int]] = {}
    after_jp2h = False
    for kind, first, last in boxes(data):
        if kind == b"jp2c":
            return header, (first, last)
        if kind == b"jp2h":
            after_jp2h = True
            for inner, where in first_boxes(data, first, last).items():
                header.setdefault(inner, where)
        elif after_jp2h:
            header.setdefault(kind, (first, last))
    return header, None


def codestream(data: bytes) -> tuple[dict[bytes, tuple[int, int]], int, int] | None:
    """The JP2 header's boxes (:func:`header_boxes`) and where the codestream starts and ends: in a
    JP2 file (its signature box's type at bytes 4 to 8) the codestream box's contents, None without
    one; anything else is taken as a bare codestream, all of ``data``, with no header boxes."""
    if data[4:8] != b"jP  ":
        return {}, 0, len(data)
    header, found = header_boxes(data)
    return None if found is None else (header, *found)


def palette_columns(data: bytes, pclr: tuple[int, int]) -> int:
    """The columns (output components) of a JP2 palette box: its third byte (after 2 of entries)."""
    first, last = pclr
    return data[first + 2] if first + 2 < min(last, len(data)) else 0


def palette_depth(data: bytes, pclr: tuple[int, int]) -> int:
    """The bits of a JP2 palette's entries: its first column's (after 2 bytes of entries and 1 of
    columns, a byte per column of bits - 1; imagecodecs refuses columns of different depths)."""
    first, last = pclr
    return (data[first + 3] & 0x7F) + 1 if first + 3 < min(last, len(data)) else 8


def frame(codestream: bytes) -> tuple[int, int, list[tuple[int, bool, int, int]]] | None:
    """Width, height and each component's (bits, signed, column step, row step) from a codestream's
    SIZ marker (ITU-T T.800, A.5.1), or None."""
    size = segment_size(codestream)
    if size is None:
        return None
    width, height, count = size
    table = codestream[42:42 + 3 * count]
    if count == 0 or len(table) < 3 * count:
        return None
    return width, height, [((table[i] & 0x7F) + 1, bool(table[i] & 0x80), table[i + 1], table[i + 2])
                           for i in range(0, 3 * count, 3)]


def tile_count(data: bytes, start: int) -> int | None:
    """The tiles of the codestream at ``data[start:]`` by its SIZ marker, or None for a tile grid
    OpenJPEG refuses (no tile size, no image area)."""
    siz = [int.from_bytes(data[start + i:start + i + 4], "big") for i in range(8, 40, 4)]
    x, y, _, _, tile_x, tile_y, x0, y0 = siz  # (the tile grid's origin, XTOsiz and YTOsiz)
    if not tile_x or not tile_y or x <= x0 or y <= y0:
        return None
    return -(-(x - x0) // tile_x) * -(-(y - y0) // tile_y)


def _header_segments(data: bytes, i: int, end: int) -> tuple[list[tuple[int, int, int]], int]:
    """The marker segments of a header from ``data[i]`` up to a tile-part (SOT) or its data (SOD),
    each as (marker, where its parameters start, where they end), and where they stop (T.800 A.4)."""
    segments = []
    while i + 4 <= end and data[i] == 0xFF and data[i + 1] not in (0x90, 0x93):
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segments.append((data[i + 1], i + 4, min(i + 2 + length, end)))
        i += 2 + length
    return segments, i


def tile_parts(data: bytes, start: int, end: int) -> list[tuple[int, int, int]] | None:
    """(tile, where its header's marker segments start, where it ends) of each tile-part of the
    codestream ``data[start:end]`` (T.800 A.4.2: SOT's Isot and Psot), or None where they cannot
    be walked to the end marker: OpenJPEG refuses those."""
    _, i = _header_segments(data, start + 2, end)
    parts = []
    while i + 10 <= end and data[i:i + 2] == b"\xff\x90":  # SOT: Lsot, Isot (the tile), Psot (its length)
        length = int.from_bytes(data[i + 6:i + 10], "big")
        parts.append((int.from_bytes(data[i + 4:i + 6], "big"), i + 2 + int.from_bytes(data[i + 2:i + 4], "big"),
                      i + length if length else end - 2))
        if length == 0:  # the last tile-part, to the end marker
            return parts
        i += length
    return parts if i == end - 2 else None


def missing_tile(data: bytes, start: int, parts: list[tuple[int, int, int]] | None) -> tuple[int, int] | None:
    """(index, count) of the first tile of the codestream at ``data[start:]`` that none of its
    tile-parts (:func:`tile_parts`) holds, or None. OpenJPEG leaves such a tile black without an
    error: a tile-part lost, or a damaged SIZ marker whose tile grid has more tiles than the
    codestream holds. None too where the tile-parts cannot be walked (None): OpenJPEG refuses those."""
    count = tile_count(data, start)
    if count is None or count > 65535 or parts is None:  # (OpenJPEG refuses more tiles, as the standard does)
        return None
    held = {tile for tile, _, _ in parts}
    return next(((tile, count) for tile in range(count) if tile not in held), None)


#: A component's coding style: decomposition levels, code-block width and height exponents, and
#: each resolution level's precinct width and height exponents.
_CodingStyle = tuple[int, int, int, tuple[tuple[int, int], ...]]


@functools.lru_cache(maxsize=64)  # (a tile-part header may repeat the same, thousands of times)
def _coding_style(spcod: bytes, scod: int) -> _CodingStyle | None:
    """A coding style from a COD's SPcod or a COC's SPcoc parameters and its Scod or Scoc (bit 0:
    precinct sizes follow; else 2^15: none) (T.800 A.6.1, A.6.2, Tables A.15 and A.21), or None
    for values OpenJPEG refuses."""
    if len(spcod) < 5:
        return None
    levels, xcb, ycb = spcod[0], spcod[1] + 2, spcod[2] + 2
    sizes = spcod[5:6 + levels] if scod & 1 else b"\xff" * (levels + 1)
    precincts = tuple((size & 0xF, size >> 4) for size in sizes)
    if levels > 32 or xcb > 10 or ycb > 10 or xcb + ycb > 12 or len(precincts) < levels + 1 \
            or 0 in (value for size in precincts[1:] for value in size):
        return None
    return levels, xcb, ycb, precincts


def _apply_coding_styles(styles: dict[int | None, _CodingStyle], data: bytes,
                         segments: list[tuple[int, int, int]], components: int) -> None:
    """Apply a header's COD and COC marker segments to ``styles`` (component: style, None: the
    other components) in order, as OpenJPEG does: a COD to every component, a COC to its own
    (Ccoc is 2 bytes from 257 components on; T.800 A.6.1, A.6.2). Unreadable ones are left out:
    OpenJPEG refuses them."""
    wide = components > 256
    for marker, first, last in segments:
        if marker == 0x52:  # COD: Scod, SGcod (4 bytes), SPcod
            style = _coding_style(data[first + 5:last], data[first])
            if style is not None:
                styles.clear()
                styles[None] = style
        elif marker == 0x53 and last > first + 1 + wide:  # COC: Ccoc, Scoc, SPcoc
            component = int.from_bytes(data[first:first + 1 + wide], "big")
            style = _coding_style(data[first + 2 + wide:last], data[first + 1 + wide])
            if style is not None and component < components:
                styles[component] = style


def _spans(low: Any, high: Any, exponent: int) -> Any:
    """How many cells of 2^exponent, from 0, the span low..high touches (ints, or arrays of them)."""
    return (high > low) * ((-(-high >> exponent)) - (low >> exponent))


def _axis_blocks(low: Any, high: Any, style: _CodingStyle, axis: int) -> list[tuple[Any, Any, Any]]:
    """Along one axis (0: x, 1: y) of a tile-component spanning low..high (ints, or arrays of them
    for a row of tiles), for each resolution level: its precincts, and the code-blocks of its
    low-pass and high-pass bands. A resolution level spans ceil(low / 2^(NL - r)), a high-pass
    band ceil((low - 2^(NL - r)) / 2^(NL - r + 1)) (T.800 B.5); code-blocks are cut to the
    precinct, whose band is half its resolution level's at r > 0 (B.6, B.7)."""
    levels, blocks = style[0], style[1 + axis]
    counts = []
    for r, sizes in enumerate(style[3]):
        shift, precinct = levels - r, sizes[axis]
        level = (-(-low >> shift), -(-high >> shift))
        if r == 0:
            counts.append((_spans(*level, precinct), _spans(*level, min(blocks, precinct)), 0))
            continue
        exponent, half = min(blocks, precinct - 1), 1 << shift
        counts.append((_spans(*level, precinct), _spans(-(-low >> shift + 1), -(-high >> shift + 1), exponent),
                       _spans(-(-(low - half) >> shift + 1), -(-(high - half) >> shift + 1), exponent)))
    return counts


def _tile_blocks(x: list[tuple[int, int, int]], y: list[tuple[int, int, int]]) -> tuple[int, int]:
    """Code-blocks and precincts (one for each band) from :func:`_axis_blocks`' counts along x and
    along y: the LL band at r = 0, HL, LH and HH above (T.800 B.5)."""
    blocks = precincts = 0
    for r, ((px, lx, hx), (py, ly, hy)) in enumerate(zip(x, y)):
        precincts += px * py * (1 if r == 0 else 3)
        blocks += lx * ly if r == 0 else hx * ly + lx * hy + hx * hy
    return blocks, precincts


def _grid(data: bytes, start: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each column (axis 0) or row (axis 1) of the tile grid starts and ends, from the SIZ
    marker at ``data[start:]`` (T.800 B.3)."""
    size, origin, tile, tile_origin = (int.from_bytes(data[start + i + 4 * axis:start + i + 4 * axis + 4], "big")
                                       for i in (8, 16, 24, 32))
    edges = tile_origin + tile * np.arange(-(-(size - tile_origin) // tile) + 1, dtype=np.int64)
    return np.maximum(edges[:-1], origin), np.minimum(edges[1:], size)


def code_blocks(data: bytes, start: int, components: int,
                 parts: list[tuple[int, int, int]] | None) -> tuple[int, int] | None:
    """Code-blocks and precincts (one for each band) that OpenJPEG allocates for all the tiles of
    the codestream at ``data[start:]``, by the coding style of each component (COD and COC in the
    main header, then in the tile's tile-part headers: T.800 A.4, A.6), components not subsampled;
    None where the main header's coding style cannot be read or the tiles cannot be walked
    (OpenJPEG refuses both). The main header's styles are summed over the tile grid's columns and
    rows (a code-block count is one along x times one along y); a tile with its own, tile by tile."""
    count = tile_count(data, start)
    if count is None or count > 65535 or parts is None:  # (OpenJPEG refuses more tiles)
        return None
    main: dict[int | None, _CodingStyle] = {}
    _apply_coding_styles(main, data, _header_segments(data, start + 2, len(data))[0], components)
    if None not in main:
        return None
    tiles: dict[int, dict[int | None, _CodingStyle]] = {}
    for tile, first, last in parts:
        segments = [s for s in _header_segments(data, first, last)[0] if s[0] in (0x52, 0x53)]
        if segments:
            _apply_coding_styles(tiles.setdefault(tile, dict(main)), data, segments, components)
    columns, rows = _grid(data, start, 0), _grid(data, start, 1)
    blocks = precincts = 0
    for style, count in _style_counts(main, components).items():
        x = [tuple(int(np.sum(n)) for n in level) for level in _axis_blocks(*columns, style, 0)]
        y = [tuple(int(np.sum(n)) for n in level) for level in _axis_blocks(*rows, style, 1)]
        b, p = _tile_blocks(x, y)
        blocks, precincts = blocks + count * b, precincts + count * p
    width = len(columns[0])
    changes: dict[_CodingStyle, dict[int, int]] = {}  # style: {tile: its components, less the main header's}
    for tile, styles in tiles.items():
        if tile < width * len(rows[0]):  # (OpenJPEG refuses others)
            for sign, own in ((1, styles), (-1, main)):
                for style, count in _style_counts(own, components).items():
                    change = changes.setdefault(style, {})
                    change[tile] = change.get(tile, 0) + sign * count
    for style, change in changes.items():  # (each style's tiles at once, as arrays)
        tile, count = np.fromiter(change, np.int64), np.fromiter(change.values(), np.int64)
        b, p = _tile_blocks(_axis_blocks(columns[0][tile % width], columns[1][tile % width], style, 0),
                            _axis_blocks(rows[0][tile // width], rows[1][tile // width], style, 1))
        blocks, precincts = blocks + int(np.sum(count * b)), precincts + int(np.sum(count * p))
    return blocks, precincts


def _style_counts(styles: dict[int | None, _CodingStyle], components: int) -> dict[_CodingStyle, int]:
    """How many components have each coding style of ``styles`` (:func:`_apply_coding_styles`)."""
    counts = {styles[None]: components - sum(1 for c in styles if c is not None)}
    for component, style in styles.items():
        if component is not None:
            counts[style] = counts.get(style, 0) + 1
    return counts


def segment_size(head: bytes) -> tuple[int, int, int] | None:
    """Image area and components from the SIZ marker of a codestream, bare or in a JP2 file's
    jp2c box (OpenJPEG allocates by these, whatever the JP2 header box says), a JP2 palette's
    columns counted as components (OpenJPEG decodes one plane per column)."""
    found = codestream(head)
    if found is None:
        return None
    header, start, _ = found
    columns = palette_columns(head, header[b"pclr"]) if b"pclr" in header else 0
    siz = head[start:start + 42]
    if len(siz) < 42 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    x, y, x0, y0 = (int.from_bytes(siz[i:i + 4], "big") for i in (8, 12, 16, 20))
    return x - x0, y - y0, max(int.from_bytes(siz[40:42], "big"), columns)
