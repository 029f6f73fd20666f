"""What the command line asks for: the contenders, the generated corpus, the batch size,
checked before anything is generated or timed (UsageError)."""

from __future__ import annotations

import math

from gpu_pipeline.bench.corpus import FORMATS, MAX_CORPUS_PIXELS, TILE_SIZE
from gpu_pipeline.bench.measuring import contender_names, unavailable_reason
from gpu_pipeline.errors import UsageError

DEFAULT_SIZE = "512x512"
DEFAULT_COUNT = 16
DEFAULT_TILES = 48
DEFAULT_FORMAT = "jpeg"


def parse_contenders(text: str | None) -> list[str]:
    """``"numba, opencv"`` -> ``["numba", "opencv"]``; None means every backend and baseline.

    A contender named explicitly must be able to run here (else UsageError, as for ``verify``);
    from the default set, the ones that cannot run are listed with the reason.
    """
    known = contender_names()
    if text is None:
        return known
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise UsageError(f"--backends takes comma-separated names such as numba,opencv, got {text!r}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UsageError(f"unknown backend {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    for name in names:
        reason = unavailable_reason(name)
        if reason is not None:
            raise UsageError(f"{name!r} cannot run here: {reason}")
    return list(dict.fromkeys(names))


def parse_size(text: str) -> tuple[int, int]:
    """``"640x480"`` -> ``(640, 480)``; a single number is a square."""
    parts = text.lower().split("x")
    try:
        width, height = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
    except ValueError:
        raise UsageError(f"--size takes WIDTHxHEIGHT such as 512x512, got {text!r}") from None
    if width < 1 or height < 1:
        raise UsageError(f"--size must be at least 1x1, got {text!r}")
    return width, height


#: libjpeg's largest image side (JPEG_MAX_DIMENSION).
JPEG_MAX_SIDE = 65500


def generation_request(size: str | None, count: int | None, tiles: int | None, fmt: str | None) -> dict:
    """The keyword arguments of :func:`generate_corpus` (less the folder), defaults filled in."""
    width, height = parse_size(DEFAULT_SIZE if size is None else size)  # ("": refused, not the default)
    count = DEFAULT_COUNT if count is None else count
    tiles = DEFAULT_TILES if tiles is None else tiles
    fmt = (DEFAULT_FORMAT if fmt is None else fmt).lower()
    if count < 1:
        raise UsageError(f"--count must be >= 1, got {count}")
    if tiles < 0:
        raise UsageError(f"--tiles must be >= 0, got {tiles}")
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "jpeg" and max(width, height) > JPEG_MAX_SIDE:  # (a traceback from Pillow's writer, exit 1)
        raise UsageError(f"--size {width}x{height}: a JPEG is at most {JPEG_MAX_SIDE} pixels a side; "
                         "use --format png or a smaller --size")
    pixels = count * width * height + tiles * TILE_SIZE ** 2
    if pixels > MAX_CORPUS_PIXELS:
        raise UsageError(f"the corpus would hold {pixels / 1e6:,.0f} MP; bench keeps it decoded in memory, "
                         f"at most {MAX_CORPUS_PIXELS / 1e6:.0f} MP: lower --count or --size")
    return {"count": count, "width": width, "height": height, "tiles": tiles, "fmt": fmt}


def default_batch_size(images: int) -> int:
    """At most a quarter of the corpus per batch (the backend's own pixel budget may cut batches
    smaller), so that the corpus makes at least 4 batches: decode overlaps compute only across
    batches, and a nightly run has thousands of them."""
    return max(1, math.ceil(images / 4))
