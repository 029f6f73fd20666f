"""Records are held byte for byte to golden files written by the code before the batch data plane.

Three changes since were made on purpose, and checked to be the only ones when the files were
rewritten: CSV and Parquet gained the ``path_bytes`` column (empty for UTF-8 names; the
nightly-safety work), ``model.jsonl`` has the labels of the refitted ``eurosat`` model, and the
error of a file that is no image lists JPEG 2000 among the formats (read since 2026-12-06).

The corpus is the bundled data plus a few broken files (so error records are covered too), copied
under a temporary folder; paths in the records are made portable by replacing that folder with
``DATA``. JSONL and CSV are compared as bytes, Parquet as its schema and rows (the file itself
embeds the writer's version).

After a deliberate change to the records (a new field), ``python -m tests.test_golden`` rewrites the
files from the code as it is; read the diff before committing it, and say here what changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpu_pipeline.cli import app

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
BUNDLED = Path(__file__).resolve().parent.parent / "data"


def golden_corpus(root: Path) -> Path:
    """The bundled data and three files that fail to decode, under ``root / "data"``."""
    folder = root / "data"
    shutil.copytree(BUNDLED, folder)
    broken = folder / "broken"
    broken.mkdir()
    jpeg = next(iter(sorted((folder / "eurosat").rglob("*.jpg"))))
    (broken / "truncated.jpg").write_bytes(jpeg.read_bytes()[:400])
    (broken / "empty.png").write_bytes(b"")
    (broken / "not_an_image.png").write_bytes(b"this is text, not a PNG\n")
    return folder


def run_on(folder: Path, out: Path, *args: str) -> None:
    result = CliRunner().invoke(app, ["run", str(folder), "--out", str(out), "--backend", "numba", "-q", *args])
    assert result.exit_code == 1, result.output  # the broken files fail, the rest succeed


def portable(text: str, folder: Path) -> str:
    return text.replace(str(folder.absolute()), "DATA")


def parquet_rows(path: Path, folder: Path) -> str:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    rows = [json.dumps(row, separators=(",", ":")) for row in table.to_pylist()]
    return portable(str(table.schema) + "\n" + "\n".join(rows) + "\n", folder)


def records_of(root: Path, name: str, *args: str) -> str:
    """What golden file ``name`` holds, from a run of the code as it is under ``root``."""
    folder = golden_corpus(root)
    out = root / name.removesuffix(".rows")
    run_on(folder, out, *args)
    return parquet_rows(out, folder) if name.endswith(".rows") else portable(out.read_text(), folder)


GOLDEN_FILES = [("data.jsonl", ()), ("data.csv", ()), ("model.jsonl", ("--model", "eurosat")), ("data.parquet.rows", ())]


@pytest.mark.parametrize("decode", ["threads", "processes"])
@pytest.mark.parametrize("name, args", GOLDEN_FILES)
def test_records_match_the_golden_files(tmp_path, name, args, decode):
    """Decoded in threads or in worker processes, the records are the same bytes."""
    assert records_of(tmp_path, name, *args, "--decode", decode) == (GOLDEN / name).read_text()


if __name__ == "__main__":  # rewrite the golden files (see above)
    import tempfile

    for name, args in GOLDEN_FILES:
        with tempfile.TemporaryDirectory() as root:
            (GOLDEN / name).write_text(records_of(Path(root), name, *args))
