#!/usr/bin/env python3
"""What decoding one image holds at its peak, against what the decoding budget charges it, a pixel.

    python scripts/decoding_memory.py [--side 2048] [KIND ...]

Writes an image of each KIND (default: all; a format, its bands, sample type and compression) with
random samples, so that a compressed file is as large as its pixels (the worst case: the file's
bytes are in memory while it decodes), and decodes each in a fresh process under
``decode.budgeted``. Prints, in bytes a pixel, the peak RSS the decode added (the process's
high-water mark after it, less its RSS before) and what the image asked the budget. The engine
lets large images decode only while their charges fit half the memory a run may use
(docs/nightly.md, "Memory"), so a charge under the peak is a bound that does not hold:
``tests/test_large_images.py`` checks some of these kinds so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _tiff(bands: int, dtype: str, compression: str | None = None, tile: bool = False, **extra):
    def write(path: Path, side: int) -> None:
        import tifffile

        rng = np.random.default_rng(0)
        top = 256 if dtype == "uint8" else 4096
        samples = rng.integers(0, top, (side, side, bands)).astype(dtype)
        options = dict(extra)
        photometric = options.pop("photometric", "rgb" if bands == 3 else "minisblack")
        if photometric == "palette":
            options["colormap"] = rng.integers(0, 65536, (3, 256)).astype(np.uint16)
        planar = options.pop("planarconfig", "contig")
        if planar == "separate":  # (tifffile takes such samples band by band)
            samples = np.ascontiguousarray(np.moveaxis(samples, -1, 0))
        tifffile.imwrite(path, samples[..., 0] if bands == 1 else samples, photometric=photometric,
                         planarconfig=None if bands == 1 else planar,
                         compression=compression, tile=(256, 256) if tile else None, **options)
    return write, "tif", "4,3,2" if bands >= 4 and extra.get("photometric") != "separated" else None


def _pillow(mode: str, file_format: str, **save):
    def write(path: Path, side: int) -> None:
        from PIL import Image

        rng = np.random.default_rng(0)
        if mode in ("I;16", "I"):
            image = Image.fromarray(rng.integers(0, 65536, (side, side)).astype(np.uint16))
        else:
            channels = {"L": 1, "P": 1, "RGB": 3, "RGBA": 4}[mode]
            samples = rng.integers(0, 256, (side, side, channels)).astype(np.uint8)
            image = Image.fromarray(samples[..., 0] if channels == 1 else samples, "L" if mode == "P" else mode)
            if mode == "P":
                image = image.convert("RGB").quantize(256)
        image.save(path, file_format, **save)
    return write, {"JPEG": "jpg", "JPEG2000": "jp2"}.get(file_format, file_format.lower()), None


def _wide_png(path: Path, side: int) -> None:
    import cv2

    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 65536, (side, side, 3)).astype(np.uint16))


#: KIND: (writer, file suffix, --bands)
KINDS = {
    "jpeg-rgb": _pillow("RGB", "JPEG", quality=95),
    "jpeg-gray": _pillow("L", "JPEG", quality=95),
    "png-rgb": _pillow("RGB", "PNG"),
    "png-rgba": _pillow("RGBA", "PNG"),
    "png-palette": _pillow("P", "PNG"),
    "png-gray16": _pillow("I;16", "PNG"),
    "png-rgb16": (_wide_png, "png", None),
    "webp-rgb": _pillow("RGB", "WEBP", lossless=True),
    "bmp-rgb": _pillow("RGB", "BMP"),
    "gif-palette": _pillow("P", "GIF"),
    "jp2-rgb": _pillow("RGB", "JPEG2000"),
    "jp2-gray16": _pillow("I;16", "JPEG2000"),
    "tiff-gray8": _tiff(1, "uint8"),
    "tiff-gray16-zlib": _tiff(1, "uint16", "zlib"),
    "tiff-gray-float32": _tiff(1, "float32"),
    "tiff-gray-float64": _tiff(1, "float64"),
    "tiff-palette": _tiff(1, "uint8", photometric="palette"),
    "tiff-rgb8": _tiff(3, "uint8"),
    "tiff-rgb8-zlib": _tiff(3, "uint8", "zlib"),
    "tiff-rgb16-zlib-tiled": _tiff(3, "uint16", "zlib", tile=True),
    "tiff-rgb-float32-zlib": _tiff(3, "float32", "zlib"),
    "tiff-cmyk": _tiff(4, "uint8", photometric="separated"),
    "tiff-4band16": _tiff(4, "uint16"),
    "tiff-4band16-zlib": _tiff(4, "uint16", "zlib"),
    "tiff-4band-float32": _tiff(4, "float32"),
    "tiff-13band8-zlib": _tiff(13, "uint8", "zlib"),
    "tiff-13band16": _tiff(13, "uint16"),
    "tiff-13band16-planar": _tiff(13, "uint16", planarconfig="separate"),
    "tiff-13band16-zlib": _tiff(13, "uint16", "zlib"),
    "tiff-13band16-bigendian": _tiff(13, "uint16", byteorder=">"),
    "tiff-13band16-zlib-tiled": _tiff(13, "uint16", "zlib", tile=True),
    "tiff-13band-float32-zlib": _tiff(13, "float32", "zlib"),
}


def measure(kind: str, folder: Path, side: int) -> dict:
    """Peak RSS that decoding an image of ``kind`` adds, and what it asked the budget, in bytes a
    pixel: in a fresh process, so that the high-water mark is this decode's, after a tile of the
    same kind has loaded the codec."""
    writer, suffix, bands = KINDS[kind]
    path, tile = folder / f"{kind}.{suffix}", folder / f"{kind}-tile.{suffix}"
    writer(path, side)
    writer(tile, 16)
    code = """
import json, sys
sys.path.insert(0, sys.argv[4])
from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.inputs.decode import budgeted, decode_image
options = DecodeOptions(bands=tuple(int(b) for b in sys.argv[3].split(",")) if sys.argv[3] else None)
def resident(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) * 1024
decode_image(sys.argv[2], options)
before, asked = resident("VmRSS:"), []
with budgeted(asked.append):
    image = decode_image(sys.argv[1], options)
print(json.dumps({"peak": resident("VmHWM:") - before, "asked": sum(asked), "pixels": image.shape[0] * image.shape[1]}))
"""
    done = subprocess.run([sys.executable, "-c", code, str(path), str(tile), bands or "", str(REPO)],
                          capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout)
    return {"peak": figures["peak"] / figures["pixels"], "charged": figures["asked"] / figures["pixels"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kinds", nargs="*", choices=[[], *KINDS], metavar="KIND", help=", ".join(KINDS))
    parser.add_argument("--side", type=int, default=2048, help="pixels a side (default 2048: 4 MP)")
    args = parser.parse_args()
    if not os.path.exists("/proc/self/status"):
        sys.exit("needs Linux (/proc/self/status)")
    print(f"{'kind':28s} {'peak':>7s} {'charged':>8s}  bytes a pixel, {args.side} x {args.side}")
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds or KINDS:
            figures = measure(kind, Path(folder), args.side)
            flag = "" if figures["peak"] <= figures["charged"] else "  UNDER-CHARGED"
            print(f"{kind:28s} {figures['peak']:7.1f} {figures['charged']:8.1f}{flag}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
