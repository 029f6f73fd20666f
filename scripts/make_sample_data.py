"""Rebuild the bundled sample set ``data/`` (and ``tests/fixtures/``) from the shared real imagery.

Real files are copied byte for byte and checked against the shared ``MANIFEST.json`` sha256;
derived files (``data/formats/``, ``tests/fixtures/``) are written from those real tiles with
fixed settings, so a rerun with the same Pillow/tifffile versions gives the same bytes.
``data/SOURCES.md`` is written by hand and left alone.

Usage: ``python scripts/make_sample_data.py [--source ../shared/data]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
EUROSAT_PER_CLASS = 5
UCMERCED = ["agricultural/agricultural70.tif", "denseresidential/denseresidential19.tif", "river/river08.tif"]
UINT8_SCENE = "scenes/rio-tiler_hro_colorado_201404_13SED190110_0x1500m_CL_1.tif"
UINT16_SCENE = "multiband/rio-tiler_rgb.tif"
#: Tiles the derived files are made from (paths under the shared data folder).
EUROSAT_TILE = "eurosat_rgb/Residential/Residential_1045.jpg"
UCMERCED_TILE = "scenes/ucmerced/river/river08.tif"
GENERATED = ["eurosat", "scenes", "multiband", "formats"]  # under data/; SOURCES.md is kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "data")
    parser.add_argument("--fixtures", type=Path, default=REPO / "tests" / "fixtures")
    args = parser.parse_args()
    for name in GENERATED:
        shutil.rmtree(args.out / name, ignore_errors=True)
    copy_real_files(args.source, args.out)
    write_derived_formats(args.source, args.out / "formats")
    write_fixtures(args.source, args.fixtures)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {sum(1 for p in args.out.rglob('*') if p.is_file())} files, {total / 1e6:.2f} MB")


def copy_real_files(source: Path, out: Path) -> None:
    checksums = _manifest_checksums(source)
    copies = {}
    for class_dir in sorted(p for p in (source / "eurosat_rgb").iterdir() if p.is_dir()):
        for tile in sorted(class_dir.glob("*.jpg"))[:EUROSAT_PER_CLASS]:
            copies[tile.relative_to(source).as_posix()] = f"eurosat/{class_dir.name}/{tile.name}"
    for tile in UCMERCED:
        copies[f"scenes/ucmerced/{tile}"] = f"scenes/ucmerced/{tile}"
    copies[UINT8_SCENE] = UINT8_SCENE
    copies[UINT16_SCENE] = UINT16_SCENE
    for src, dst in copies.items():
        data = (source / src).read_bytes()
        if hashlib.sha256(data).hexdigest() != checksums[src]:
            raise SystemExit(f"{src}: sha256 differs from MANIFEST.json")
        (out / dst).parent.mkdir(parents=True, exist_ok=True)
        (out / dst).write_bytes(data)


def _manifest_checksums(source: Path) -> dict[str, str]:
    manifest = json.loads((source / "MANIFEST.json").read_text())
    sums = {f"eurosat_rgb/{f['file']}": f["sha256"] for f in manifest["eurosat_rgb"]["files"]}
    sums.update({f"{f['folder']}/{f['file']}": f["sha256"] for f in manifest["other"]})
    return sums


def write_derived_formats(source: Path, out: Path) -> None:
    """Other modes and formats, made from real tiles (how each is made: data/SOURCES.md)."""
    out.mkdir(parents=True)
    eurosat = Image.open(source / EUROSAT_TILE).convert("RGB")
    ucmerced = Image.open(source / UCMERCED_TILE).convert("RGB")
    ucmerced.convert("L").save(out / "gray.png")
    rgba = eurosat.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(eurosat.size))
    rgba.save(out / "rgba.png")
    ucmerced.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out / "palette.gif"
    )
    eurosat.save(out / "rgb.bmp")
    eurosat.save(out / "lossless.webp", lossless=True, quality=100, method=4)
    Image.fromarray(tifffile.imread(source / UINT16_SCENE)[:, :, 0]).save(out / "gray16.png")
    rgb = np.asarray(eurosat)
    fourth = np.asarray(eurosat.convert("L"))
    tifffile.imwrite(
        out / "four_band_planar.tif",
        np.concatenate([rgb.transpose(2, 0, 1), fourth[None]]),
        photometric="minisblack",
        planarconfig="separate",
        compression="zlib",
        metadata=None,
    )


def write_fixtures(source: Path, fixtures: Path) -> None:
    """A 5-band uint16 TIFF: it needs --bands, so it stays out of the default run over data/."""
    fixtures.mkdir(parents=True, exist_ok=True)
    scene = tifffile.imread(source / UINT16_SCENE)[96:160, 96:160]  # a 64 x 64 crop inside the data
    mean = (scene.astype(np.uint32).sum(axis=2) // 3).astype(np.uint16)
    brightest = scene.max(axis=2)
    tifffile.imwrite(
        fixtures / "five_band_uint16.tif",
        np.dstack([scene, mean, brightest]),
        photometric="minisblack",
        planarconfig="contig",
        tile=(32, 32),
        compression="zlib",
        metadata=None,
    )


if __name__ == "__main__":
    main()
