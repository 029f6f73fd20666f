"""The nightly job as a hostile user tries it: odd names, odd files, foreign outputs, two writers, full disks.

Each test reproduces one case of issue #13 that lost or corrupted data before it was fixed.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from gpu_pipeline.cli import app
from gpu_pipeline.config import DecodeOptions
from gpu_pipeline.inputs.decode import decode_or_error
from gpu_pipeline.outputs.lines import COLUMNS
from gpu_pipeline.outputs.parquet import ParquetSink
from gpu_pipeline.outputs.plan import OutputLock, inspect_output, lock_path, open_sink, read_records
from gpu_pipeline.outputs.sink import SinkError, SinkWriteError, record_key
from tests.runs import REPO, STARTED_MARKER, sitecustomize, start, wait_until
from tests.strategies import examples

runner = CliRunner()


def make_images(folder: Path, count: int, size: int = 20, seed: int = 0, names=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / (names[index] if names else f"tile{index:03d}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, compress_level=0)
        paths.append(path.absolute())
    return paths


def run(*args: str):
    return runner.invoke(app, ["run", *args, "--backend", "reference", "-q"])


def python_c(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c script`` run from the checkout, its output captured as text."""
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def by_path(records: list[dict]) -> dict[str, dict]:
    keys = [record_key(r) for r in records]
    assert len(keys) == len(set(keys)), "a path was recorded twice"
    return dict(zip(keys, records))


def every_line_is_a_record(out: Path) -> bool:
    return all(isinstance(json.loads(line), dict) for line in out.read_bytes().splitlines())


@pytest.fixture
def tiles(tmp_path) -> Path:
    make_images(tmp_path / "tiles", 20)
    return tmp_path / "tiles"


# ---------------------------------------------------------------- 1. CSV and a newline in a file name


def test_csv_resume_keeps_every_row_after_a_name_with_a_newline(tmp_path):
    names = [f"tile{i:02d}.png" for i in range(11)]
    names[3] = "two\nlines.png"
    names[7] = 'a "quoted"\r\nname.png'
    names[9] = "bare\rreturn.png"  # csv.writer before Python 3.13 left it unquoted: two rows
    folder = tmp_path / "odd"
    make_images(folder, 11, names=names)
    out = tmp_path / "out.csv"
    assert run(str(folder), "--out", str(out)).exit_code == 0
    first = out.read_bytes()
    result = runner.invoke(app, ["run", str(folder), "--out", str(out), "--backend", "reference"])
    assert result.exit_code == 0, result.output
    assert "11 of 11 images already recorded" in result.stderr
    assert out.read_bytes() == first
    with open(out, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert sorted(Path(row["path"]).name for row in rows) == sorted(names)
    pandas = pytest.importorskip("pandas")
    assert sorted(pandas.read_csv(out, keep_default_na=False)["path"].map(lambda p: Path(p).name)) == sorted(names)


def test_csv_resume_reads_a_name_with_more_than_a_thousand_newlines(tmp_path):
    """A CSV record spanning more than 1,000 lines was taken for damage: the image of a name with
    3,000 newlines (a path of 3 KB, which fits) was redone and recorded again on every resume."""
    folder = tmp_path / "odd"
    make_images(folder.joinpath(*["\n" * 250] * 12), 1)
    out = tmp_path / "out.csv"
    assert run(str(folder), "--out", str(out)).exit_code == 0
    first = out.read_bytes()
    assert first.count(b"\n") > 3000
    result = runner.invoke(app, ["run", str(folder), "--out", str(out), "--backend", "reference"])
    assert result.exit_code == 0, result.output
    assert "1 of 1 images already recorded" in result.stderr and "damaged" not in result.stderr
    assert out.read_bytes() == first


@pytest.mark.parametrize("lines, read", [(8192, True), (8193, False)])
def test_a_csv_record_is_read_over_at_most_8192_lines(tmp_path, lines, read):
    """A quoted name spans lines; past 8,192 of them (no name holds that many newlines) an open quote
    is damage, not a record: a torn quote is not joined to the rest of the file."""
    out = tmp_path / "out.csv"
    with open(out, "w", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(COLUMNS)
        row = dict.fromkeys(COLUMNS, "") | {"path": "/x" + "\n" * (lines - 1), "stage": "decode", "error": "bad"}
        writer.writerow([row[column] for column in COLUMNS])
    assert out.read_bytes().count(b"\n") == 1 + lines
    assert read_records(out) == ([{"path": row["path"], "stage": "decode", "error": "bad"}] if read else [])

@pytest.mark.parametrize("left", ["torn", "zeros", "foreign"])
def test_a_csv_header_torn_by_a_crash_is_written_again(tiles, tmp_path, left):
    """A power cut can leave the header half written or zero-filled: refused as "not a gpu-pipeline
    CSV output" where a JSONL output in the same state resumed. A header that is whole and not ours
    is still refused."""
    out = tmp_path / "out.csv"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    whole = out.read_bytes()
    out.write_bytes({"torn": whole[:40], "zeros": bytes(96), "foreign": b"path,width\n"}[left])
    result = run(str(tiles), "--out", str(out))
    if left == "foreign":
        assert result.exit_code == 2 and "unexpected header" in result.stderr
        return
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == whole


@pytest.mark.parametrize("content", [b"path", bytes(4096)])
def test_a_file_that_only_looks_like_a_torn_csv_header_is_not_replaced(tiles, tmp_path, content):
    """A torn header is written again only beside its settings record, which a run writes before
    its output: a file of someone else's (zeros, a few letters) without one was replaced without
    --overwrite, where the same file named .jsonl was refused."""
    out = tmp_path / "out.csv"
    out.write_bytes(content)
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2 and "has no settings record" in result.stderr, result.output
    assert out.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "tiles"]


# ---------------------------------------------------------------- 2. a file name that is not UTF-8


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_name_that_is_not_utf8_is_recorded_exactly_and_resumed(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    folder = tmp_path / "bytes"
    make_images(folder, 3)
    raw_name = os.fsencode(folder) + b"/\xff\xfe.png"
    with open(raw_name, "wb") as stream:
        stream.write((folder / "tile000.png").read_bytes())
    out = tmp_path / f"out{suffix}"
    assert run(str(folder), "--out", str(out)).exit_code == 0
    records = read_records(out)
    assert len(records) == 4
    (odd,) = [r for r in records if "path_bytes" in r]
    assert base64.b64decode(odd["path_bytes"]) == raw_name
    assert odd["path"].endswith("/\\xff\\xfe.png")
    assert all("path_bytes" not in r for r in records if r is not odd)  # ordinary records: as before
    # the rerun matches it: nothing is redone
    result = runner.invoke(app, ["run", str(folder), "--out", str(out), "--backend", "reference"])
    assert result.exit_code == 0 and "4 of 4 images already recorded" in result.stderr
    assert len(read_records(out)) == 4


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_an_error_message_naming_a_file_that_is_not_utf8_is_written_as_text(tmp_path, suffix):
    """The name turns up in the message too (here: its edge map's name is someone else's file): the
    message shows the byte as ``\\xff``, as ``path`` does. It once crashed the CSV and Parquet writers
    (a traceback, the batch's records lost) and put a lone surrogate in the JSON (unreadable there)."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    folder, edges = tmp_path / "bytes", tmp_path / "edges"
    make_images(folder, 2)
    edges.mkdir()
    with open(os.fsencode(folder) + b"/bad\xff.png", "wb") as stream:
        stream.write((folder / "tile000.png").read_bytes())
    with open(os.fsencode(edges) + b"/bad\xff.png.edges.png", "w") as stream:
        stream.write("mine")
    out = tmp_path / f"out{suffix}"
    result = run(str(folder), "--out", str(out), "--save-edges", str(edges))
    assert result.exit_code == 1, result.output
    records = read_records(out)
    assert len(records) == 3
    (odd,) = [r for r in records if "error" in r]
    assert odd["stage"] == "save-edges" and "bad\\xff.png.edges.png exists" in odd["error"]
    if suffix == ".jsonl":
        for line in out.read_bytes().splitlines():
            json.loads(line.decode("utf-8"))["error" if b'"error"' in line else "path"].encode("utf-8")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_retry_failed_redoes_a_file_whose_name_is_not_utf8(tmp_path, suffix):
    """Its error record is matched by its exact bytes (``path_bytes``), not by the name shown."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    folder = tmp_path / "bytes"
    make_images(folder, 2)
    raw_name = os.fsencode(folder) + b"/bad\xff.png"
    open(raw_name, "wb").close()  # broken: an error record
    out = tmp_path / f"out{suffix}"
    assert run(str(folder), "--out", str(out)).exit_code == 1
    with open(raw_name, "wb") as stream:  # repaired
        stream.write((folder / "tile000.png").read_bytes())
    assert run(str(folder), "--out", str(out), "--retry-failed").exit_code == 0
    records = by_path(read_records(out))
    assert len(records) == 3 and all("error" not in record for record in records.values())


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_an_error_message_naming_a_file_that_is_not_utf8_is_text_whatever_the_image_names(tmp_path, suffix):
    """Every image name is UTF-8 and only the message names a file that is not (an edge map in a
    folder so named): the batch is written in one go, and its error must be shown as ``\\xff`` too."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    folder, edges = tmp_path / "plain", Path(os.fsdecode(os.fsencode(tmp_path) + b"/edges\xff"))
    make_images(folder, 2)
    edges.mkdir()
    (edges / "tile000.png.edges.png").write_text("mine")
    out = tmp_path / f"out{suffix}"
    result = run(str(folder), "--out", str(out), "--save-edges", str(edges))
    assert result.exit_code == 1, result.output
    (odd,) = [r for r in read_records(out) if "error" in r]
    assert odd["stage"] == "save-edges" and "edges\\xff/tile000.png.edges.png exists" in odd["error"], odd
    if suffix != ".parquet":
        out.read_bytes().decode("utf-8")  # (strict: no lone surrogate)
        assert "\\udcff" not in out.read_text()


def test_messages_show_a_name_that_is_not_utf8_as_records_do(tiles, tmp_path):
    """The summary printed ``\\udcff`` (Python's escape), where records and the docs show ``\\xff``."""
    out = os.fsdecode(os.fsencode(tmp_path) + b"/r\xff.jsonl")
    result = runner.invoke(app, ["run", str(tiles), "--out", out, "--backend", "reference"])
    assert result.exit_code == 0, result.output
    assert f"results: {tmp_path}/r\\xff.jsonl" in result.stderr and "udcff" not in result.stderr


def readme_record_fields() -> list[str]:
    """The fields README's "Records" table lists, in its order (``width``, ``height`` on one row)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("### Records"):readme.index("A file that cannot be processed")]
    return [field for row in re.findall(r"^\| (`[^|]+`) \|", table, re.M) for field in re.findall(r"`(\w+)`", row)]


def test_ordinary_jsonl_records_have_no_extra_field(tiles, tmp_path):
    """Their fields are README's, in its order (a field added to the records and not to the README failed
    no test), without ``path_bytes``."""
    listed = [field for field in readme_record_fields() if field != "path_bytes"]
    assert listed[:2] == ["path", "width"] and listed[-1] == "label"
    out = tmp_path / "out.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    for line in out.read_text().splitlines():
        assert list(json.loads(line)) == listed


# ---------------------------------------------------------------- 3, 4, 8: outputs that are not ours to add to


def test_a_folder_that_cannot_be_listed_is_named_and_the_run_exits_1(tmp_path, locked):
    """Its images were skipped without a word, and the run said 0: "every input has a record"."""
    make_images(tmp_path / "in" / "open", 2)
    make_images(tmp_path / "in" / "locked", 2)
    locked("locked")
    out = tmp_path / "out.jsonl"
    result = run(str(tmp_path / "in"), "--out", str(out))
    assert result.exit_code == 1, result.output
    assert f"warning: cannot list {tmp_path / 'in' / 'locked'} (Permission denied); its images are not processed" \
        in result.stderr
    assert len(read_records(out)) == 2
    # and again after the run, where the summary would hide the first warning
    assert result.stderr.endswith("warning: 1 folder(s) could not be listed; their images have no records\n")
    import gpu_pipeline

    with pytest.warns(RuntimeWarning, match="cannot list .*locked"):
        assert len(list(gpu_pipeline.run([tmp_path / "in"], backend="reference"))) == 2
    result = run(str(tmp_path / "in" / "locked"), "--out", str(tmp_path / "other.jsonl"))
    assert result.exit_code == 2 and "cannot list" in result.stderr and "Permission denied" in result.stderr


def test_more_than_ten_folders_that_cannot_be_listed_are_counted_after_the_tenth(tmp_path, locked):
    """A warning a folder for the first ten, then one line for the rest, not a screenful."""
    make_images(tmp_path / "in" / "open", 2)
    for number in range(12):
        (tmp_path / "in" / f"locked{number:02d}").mkdir()
        locked(f"locked{number:02d}")
    result = run(str(tmp_path / "in"), "--out", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 1, result.output
    named = [line for line in result.stderr.splitlines() if line.startswith("warning: cannot list")]
    assert named == [f"warning: cannot list {tmp_path / 'in' / f'locked{number:02d}'} (Permission denied); "
                     "its images are not processed" for number in range(10)]
    assert "warning: and 2 more folders that cannot be listed\n" in result.stderr


def test_an_out_that_is_not_our_output_is_refused_and_left_alone(tiles, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    result = run(str(tiles), "--out", str(notes))
    assert result.exit_code == 2 and "no settings record" in result.stderr
    assert notes.read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "tiles"]  # nothing written


def test_an_out_on_dev_stdout_is_refused_and_the_file_behind_it_left_alone(tiles, tmp_path):
    """``--out /dev/stdout >> log``: the settings went to /dev/stdout.settings.json, and the next such
    run took the log for its output and cut it to its records."""
    log = tmp_path / "log.txt"
    log.write_text("my log line 1\nno newline")
    settings = Path("/dev/stdout.settings.json")
    try:
        for _ in range(2):
            with open(log, "ab") as stdout:
                done = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(tiles), "--out", "/dev/stdout",
                                       "-q", "--backend", "reference"], stdout=stdout, stderr=subprocess.PIPE, text=True,
                                      timeout=300)
            assert done.returncode == 2 and "use --out - for standard output" in done.stderr
    finally:
        settings.unlink(missing_ok=True)
    assert log.read_text() == "my log line 1\nno newline"


def test_dev_shm_is_a_place_for_outputs(tiles, tmp_path):
    out = Path(f"/dev/shm/gpu-pipeline-test-{os.getpid()}.jsonl")
    try:
        assert run(str(tiles), "--out", str(out)).exit_code == 0 and len(read_records(out)) == 20
    finally:
        for leftover in (out, Path(f"{out}.settings.json")):
            leftover.unlink(missing_ok=True)
    before = sorted(os.listdir("/dev"))
    result = run(str(tiles), "--out", "/dev/shm/", "--format", "parquet")  # its settings would go into /dev
    assert result.exit_code == 2 and "or a name in /dev/shm/" in result.stderr
    assert sorted(os.listdir("/dev")) == before


@pytest.mark.parametrize("out", ["/dev/shm/", "/dev/stdout", "/proc/self/fd/1"])
def test_an_out_under_dev_or_proc_is_refused_by_name_before_its_lock_is_made(tiles, monkeypatch, out):
    """The lock (/dev/shm.lock for /dev/shm/) was made before the name was checked: root's run made
    it in /dev, and a user, who may not write there, was told "cannot write in /dev, where the output
    and its lock go" instead of where an output may go."""
    made = []

    def lock_as_a_user(self):  # (root may write in /dev: refused as for any other user)
        made.append(self.path)
        raise SinkError(errno.EACCES, f"cannot write in {self.path.parent}, where the output and its lock go")

    monkeypatch.setattr(OutputLock, "acquire", lock_as_a_user)
    result = run(str(tiles), "--out", out, "--format", "parquet")
    assert result.exit_code == 2 and "or a name in /dev/shm/" in result.stderr, result.output
    assert made == []


def test_an_out_that_is_a_process_descriptor_is_refused(tiles):
    """nightly.md: "a device or a process's descriptor" is no place for a file of records."""
    result = run(str(tiles), "--out", "/proc/self/fd/1")
    assert result.exit_code == 2 and "--out /proc/self/fd/1: under /dev or /proc, not a place" in result.stderr


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_file_output_spelled_as_a_folder_is_refused_and_left_whole(tiles, tmp_path, overwrite):
    """``--out r.jsonl/`` was refused only after r.jsonl had been emptied (or an empty one made)."""
    out = tmp_path / "r.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    before = out.read_bytes()
    for name in (f"{out}/", f"{tmp_path / 'new.csv'}/"):
        result = run(str(tiles), "--out", name, *overwrite)
        assert result.exit_code == 2 and "drop the trailing /" in result.stderr
    assert out.read_bytes() == before and not (tmp_path / "new.csv").exists()


def test_an_out_that_is_the_model_file_is_refused_even_with_overwrite(tiles, tmp_path):
    model = tmp_path / "model.json"
    shutil.copy(REPO / "gpu_pipeline" / "labels" / "models" / "eurosat.json", model)
    before = model.read_bytes()
    (tmp_path / "link.json").symlink_to(model)
    for out in (model, tmp_path / "link.json"):
        result = run(str(tiles), "--out", str(out), "--model", str(model), "--overwrite")
        assert result.exit_code == 2 and "is the model file this run reads" in result.stderr
    assert model.read_bytes() == before


def test_an_out_that_is_one_of_the_inputs_is_refused_even_with_overwrite(tiles, tmp_path):
    image = tiles / "tile004.png"
    before = image.read_bytes()
    for extra in ([], ["--overwrite"]):
        result = run(str(tiles), "--out", str(image), "--format", "jsonl", *extra)
        assert result.exit_code == 2 and "one of the input images" in result.stderr
    assert image.read_bytes() == before


@pytest.mark.parametrize("spelling", ["linked folder", "linked out", "hard link"])
def test_an_out_that_reaches_an_input_another_way_is_refused_even_with_overwrite(tiles, tmp_path, spelling):
    """The same file under another name (a symbolic link in the inputs or in --out, a hard link)."""
    image = tiles / "tile004.png"
    before = {path.name: path.read_bytes() for path in tiles.iterdir()}
    (tmp_path / "work").mkdir()
    if spelling == "linked folder":  # the inputs through a link, --out by the real folder
        (tmp_path / "work/inputs").symlink_to(tiles)
        inputs, out = tmp_path / "work/inputs", image
    elif spelling == "linked out":
        (tmp_path / "work/out.jsonl").symlink_to(image)
        inputs, out = tiles, tmp_path / "work/out.jsonl"
    else:
        os.link(image, tmp_path / "work/out.jsonl")
        inputs, out = tiles, tmp_path / "work/out.jsonl"
    for extra in ([], ["--overwrite"]):
        result = run(str(inputs), "--out", str(out), "--format", "jsonl", *extra)
        assert result.exit_code == 2 and "one of the input images" in result.stderr, result.output
    assert {path.name: path.read_bytes() for path in tiles.iterdir()} == before
    assert {path.name for path in (tmp_path / "work").iterdir()} <= {"inputs", "out.jsonl"}  # nothing written


def test_an_input_named_as_the_outputs_settings_record_is_refused_even_with_overwrite(tiles, tmp_path):
    image = tmp_path / "photo.settings.json"
    shutil.copy(sorted(tiles.iterdir())[0], image)
    before = image.read_bytes()
    result = run(str(image), "--out", str(tmp_path / "photo"), "--overwrite")
    assert result.exit_code == 2 and "one of the inputs" in result.stderr, result.output
    assert image.read_bytes() == before


def test_an_input_named_as_the_lock_of_an_out_spelled_with_a_slash_is_refused(tiles, tmp_path):
    """``--out photo.parquet/`` keeps its lock in ``photo.parquet.lock``, as ``photo.parquet`` does: a
    stale lock given as an input (empty: a lock the run takes) is one of the output's own files, and
    refused. Looked for as ``photo.parquet/.lock``, it was taken as the lock and read as an image too:
    the run wrote the dataset and exited 1 for that image's error record."""
    pytest.importorskip("pyarrow")
    lock = tmp_path / "photo.parquet.lock"
    lock.write_bytes(b"")
    result = run(str(tiles), str(lock), "--out", str(tmp_path / "photo.parquet") + "/", "--overwrite")
    assert result.exit_code == 2 and "one of the inputs" in result.stderr, result.output
    assert not (tmp_path / "photo.parquet").exists()


def test_our_output_is_never_an_input_whatever_its_spelling(tiles, tmp_path):
    """nightly.md: our own output is never taken as an input, whatever its name (here: an
    image-like name, reached through a linked folder on the second night)."""
    folder = tmp_path / "in"
    folder.mkdir()
    chosen = sorted(tiles.iterdir())[:6]
    for path in chosen:
        os.link(path, folder / path.name)
    (tmp_path / "linked").symlink_to(folder)
    for night in range(3):
        result = run(str(folder), "--out", str(tmp_path / "linked/results.png"), "--format", "jsonl")
        assert result.exit_code == 0, result.output
    records = by_path(read_records(folder / "results.png"))
    assert sorted(Path(path).name for path in records) == [path.name for path in chosen]


@pytest.mark.parametrize("where", ["in a folder", "named"])
def test_a_symbolic_link_among_the_inputs_to_our_output_is_not_an_input(tiles, tmp_path, where):
    """An input that is a symbolic link to the output, under a name of its own (found in a folder,
    or named): found out by its device and inode, and skipped."""
    out = tmp_path / "results.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    link = (tiles if where == "in a folder" else tmp_path) / "zz-latest.png"
    link.symlink_to(out)
    result = run(str(tiles), *([str(link)] if where == "named" else []), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "zz-latest" not in out.read_text() and len(read_records(out)) == 20


def _bind(source: Path, target: Path) -> None:
    """``target`` (an existing file) made a second name of ``source`` by a bind mount; a skip where
    this process may not mount (not root, no mount namespace of its own, not Linux)."""
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip() or done.returncode}")


@pytest.mark.skipif(os.geteuid() != 0 if hasattr(os, "geteuid") else True, reason="a bind mount needs root")
@pytest.mark.parametrize("direction", ["out on an input", "an input on our output"])
def test_a_file_bind_mount_between_an_input_and_the_output_is_found_out(tiles, tmp_path, direction):
    """The same file under two names with no link between them: a file bind mount. Every input is
    compared with an existing --out by device and inode, so --overwrite never replaces the input and
    our own output is never taken for an image. (A review broke an attempt to compare only the
    inputs named like the output, links and named files: this is why every input is compared.)"""
    out = tmp_path / "work" / "out.jsonl"
    out.parent.mkdir()
    if direction == "out on an input":
        image = sorted(tiles.iterdir())[0]
        before = image.read_bytes()
        out.touch()
        _bind(image, out)
        try:
            result = run(str(tiles), "--out", str(out), "--format", "jsonl", "--overwrite")
            assert result.exit_code == 2 and "one of the input images" in result.stderr, result.output
            assert image.read_bytes() == before
        finally:
            subprocess.run(["umount", str(out)], check=True)
    else:
        assert run(str(tiles), "--out", str(out)).exit_code == 0
        alias = tiles / "zz-latest.png"
        alias.touch()
        _bind(out, alias)
        try:
            result = run(str(tiles), "--out", str(out))
            assert result.exit_code == 0, result.output
            assert "zz-latest" not in out.read_text() and len(read_records(out)) == 20
        finally:
            subprocess.run(["umount", str(alias)], check=True)


@pytest.mark.parametrize("name, written, message", [
    ("r.jsonl", "csv", "written as csv"),
    # named .csv, resumed without --format: not "not a CSV output, use --overwrite"
    ("r.csv", "jsonl", "was written as jsonl, not csv; use the same --format"),
])
def test_resume_in_another_format_is_refused_naming_the_recorded_one(tiles, tmp_path, name, written, message):
    out = tmp_path / name
    assert run(str(tiles), "--out", str(out), "--format", written).exit_code == 0
    before = out.read_bytes()
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2 and message in result.stderr
    assert out.read_bytes() == before
    assert run(str(tiles), "--out", str(out), "--format", written).exit_code == 0


@pytest.mark.parametrize("name, written", [("r.txt", "csv"), ("r.csv", "jsonl"), ("r.jsonl", "csv"),
                                           ("r.csv", "parquet")])
def test_read_records_reads_an_output_written_with_format_whatever_its_name(tiles, tmp_path, name, written):
    """read_records took the format from the name alone: the CSV of `--out r.txt --format csv` read
    as JSON lines gave no record at all, without a word, and the JSON lines of r.csv raised
    "not a gpu-pipeline CSV output". What the output holds says its format."""
    if written == "parquet":
        pytest.importorskip("pyarrow")
    out, reference = tmp_path / name, tmp_path / f"reference.{written}"
    assert run(str(tiles), "--out", str(out), "--format", written).exit_code == 0
    assert run(str(tiles), "--out", str(reference)).exit_code == 0
    assert read_records(out) == read_records(reference) and len(read_records(out)) == 20


def test_read_records_reads_an_output_whose_start_says_no_format_by_its_name(tmp_path):
    """A first line a crash zero-filled tells no format: the name says it. (Taken for CSV whatever its
    name, the JSON lines after it were refused as "not a gpu-pipeline CSV output".)"""
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"\0\0\0\n" + b'{"path":"/a.png","stage":"decode","error":"bad"}\n')
    assert read_records(out) == [{"path": "/a.png", "stage": "decode", "error": "bad"}]


@pytest.mark.parametrize("below", ["x.jsonl", "sub/x.jsonl"])
def test_an_out_below_a_file_names_the_file(tiles, tmp_path, below):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    result = run(str(tiles), "--out", str(notes / below))
    assert result.exit_code == 2 and f"{notes} is not a folder" in result.stderr, result.output
    assert notes.read_text() == "mine\n" and sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt", "tiles"]


def test_save_edges_below_a_file_names_the_file(tiles, tmp_path):
    """A script, even: a file that may be searched (its x bits) is still no folder to write in."""
    script = tmp_path / "run.sh"
    script.write_text("mine\n")
    script.chmod(0o755)
    result = run(str(tiles), "--out", str(tmp_path / "r.jsonl"), "--save-edges", str(script / "edges"))
    assert result.exit_code == 2
    assert result.stderr == f"gpu-pipeline: error: --save-edges {script / 'edges'}: cannot write in {script}\n"
    assert script.read_text() == "mine\n" and sorted(path.name for path in tmp_path.iterdir()) == ["run.sh", "tiles"]


def test_parquet_to_stdout_is_refused(tiles, tmp_path, monkeypatch):
    """A Parquet dataset is a folder of files: there is no stream of it to write."""
    monkeypatch.chdir(tmp_path)
    result = run(str(tiles), "--out", "-", "--format", "parquet")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == "gpu-pipeline: error: Parquet output needs a folder, not stdout\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiles"]


@pytest.mark.parametrize("fmt, says", [("jsonl", "is not a regular file"), ("csv", "is not a regular file"),
                                      ("parquet", "is not a folder")])
def test_an_out_that_is_a_fifo_is_refused_before_it_is_opened(tmp_path, fmt, says):
    """A named pipe given as --out (a FIFO opened to write waits for a reader for ever)."""
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    with pytest.raises(SinkError, match=f"^{re.escape(str(fifo))} {says}; use another --out$"):
        inspect_output(str(fifo), fmt)


def test_a_damaged_settings_record_is_named_as_such(tiles, tmp_path):
    out = tmp_path / "r.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    (tmp_path / "r.jsonl.settings.json").write_text("{torn")
    before = out.read_bytes()
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2
    assert "r.jsonl.settings.json exists and is not a gpu-pipeline settings record that can be read" in result.stderr
    assert out.read_bytes() == before


@pytest.mark.parametrize("pipeline", [None, {"low_threshold": "100"}])
def test_a_settings_record_edited_out_of_shape_is_other_settings(tiles, tmp_path, pipeline):
    """Still JSON, but its pipeline no object or a threshold no number (edited by hand): a refusal
    that names the settings, where thresholds put in Canny's order raised a TypeError."""
    out = tmp_path / "r.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    record = tmp_path / "r.jsonl.settings.json"
    settings = json.loads(record.read_text())
    settings["pipeline"] = None if pipeline is None else {**settings["pipeline"], **pipeline}
    record.write_text(json.dumps(settings))
    before = out.read_bytes()
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"{out} holds results computed with other settings (changed: pipeline" in result.stderr
    assert out.read_bytes() == before


@pytest.mark.parametrize("why", ["no such input", "unknown backend", "--save-edges is --out"])
def test_a_refused_run_leaves_no_folder_and_no_settings_record(tiles, tmp_path, monkeypatch, why):
    """The folders made for --out (and its lock) and a settings record written just before the
    output failed to open are removed again: a refusal writes nothing."""
    monkeypatch.chdir(tmp_path)
    args = {"no such input": [str(tmp_path / "nowhere"), "--out", "new/sub/out.jsonl"],
            "unknown backend": [str(tiles), "--out", "new/sub/out.jsonl", "--backend", "warp-drive"],
            "--save-edges is --out": [str(tiles), "--out", "same", "--save-edges", "same"]}[why]
    before = sorted(path.name for path in tmp_path.iterdir())
    result = runner.invoke(app, ["run", *args, "-q"] + ([] if "--backend" in args else ["--backend", "reference"]))
    assert result.exit_code == 2, result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == before


@pytest.mark.parametrize("stop", ["refused", "interrupted"])
def test_an_overwrite_stopped_before_the_output_is_reset_keeps_the_old_settings_record(tiles, tmp_path,
                                                                                        monkeypatch, stop):
    """--overwrite with other settings wrote its settings record, then the output could not be
    opened (another user's file) or Ctrl-C came: the old results stayed beside the new record, and
    the next resume with the new settings added to them without a word (found by a review)."""
    from gpu_pipeline.engine import job
    from gpu_pipeline.outputs.plan import OutputPlan
    from gpu_pipeline.outputs.sink import SinkError

    out = tmp_path / "o.jsonl"
    assert run(str(tiles), "--out", str(out), "--low", "100").exit_code == 0
    settings, records = job.settings_path(str(out)).read_bytes(), out.read_bytes()

    def refused(plan):
        raise SinkError(errno.EACCES, f"cannot write {out}: Permission denied")

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        if stop == "refused":
            patch.setattr(OutputPlan, "open", refused)
        else:
            patch.setattr(job, "remove_killed_runs_temporaries", interrupted)
        result = run(str(tiles), "--out", str(out), "--overwrite", "--low", "50")
    assert result.exit_code == (2 if stop == "refused" else 130), result.output
    assert job.settings_path(str(out)).read_bytes() == settings and out.read_bytes() == records
    assert "other settings" in run(str(tiles), "--out", str(out), "--low", "50").stderr
    assert run(str(tiles), "--out", str(out), "--low", "100").exit_code == 0 and out.read_bytes() == records


def test_a_new_output_refused_at_its_opening_leaves_no_settings_record(tiles, tmp_path, monkeypatch):
    from gpu_pipeline.outputs.plan import OutputPlan
    from gpu_pipeline.outputs.sink import SinkError

    def refused(plan):
        raise SinkError(errno.EACCES, "cannot write o.jsonl: Permission denied")

    monkeypatch.setattr(OutputPlan, "open", refused)
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2 and "Permission denied" in result.stderr, result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiles"]


def test_a_run_refused_at_its_output_closes_its_backend(tiles, tmp_path, monkeypatch, register):
    """The backend is opened last of the checks (a --dask local:N cluster: worker processes); an output
    that then fails to open ends the run with the backend closed, not left to the end of the process."""
    from gpu_pipeline.backends.reference import ReferenceBackend
    from gpu_pipeline.outputs.plan import OutputPlan

    closed = []

    class Counted(ReferenceBackend):
        name = "counted-closes"

        def close(self):
            closed.append(self)

    def refused(plan):
        raise SinkError(errno.EACCES, "cannot write o.jsonl: Permission denied")

    register(Counted)
    monkeypatch.setattr(OutputPlan, "open", refused)
    result = runner.invoke(app, ["run", str(tiles), "--out", str(tmp_path / "o.jsonl"), "--backend", "counted-closes",
                                 "-q"])
    assert result.exit_code == 2 and "Permission denied" in result.stderr, result.output
    assert len(closed) == 1


def test_two_spellings_of_one_output_take_one_lock(tiles, tmp_path):
    """A symbolic link to the output: a second run through it must wait its turn, not interleave."""
    from gpu_pipeline.outputs.plan import OutputLock

    out = tmp_path / "o.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    (tmp_path / "latest.jsonl").symlink_to("o.jsonl")
    (tmp_path / "latest.jsonl.settings.json").symlink_to("o.jsonl.settings.json")
    with OutputLock(str(out)):  # a run writing o.jsonl
        result = run(str(tiles), "--out", str(tmp_path / "latest.jsonl"))
    assert result.exit_code == 2 and "another gpu-pipeline run" in result.stderr, result.output


def test_the_lock_file_gets_the_bits_a_plain_open_gives_under_the_umask(tmp_path, umask):
    """The lock was created 0644 whatever the umask: in a folder a group shares (umask 002), the lock
    a killed run of one member left could not be opened by another's run, which refused the output
    where it should have locked the stale file again."""
    import stat

    from gpu_pipeline.outputs.plan import OutputLock

    umask(0o002)
    out = tmp_path / "o.jsonl"
    with OutputLock(str(out)):
        assert stat.S_IMODE(os.stat(lock_path(str(out))).st_mode) == 0o664


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_run_through_a_symbolic_link_resumes_the_output_it_leads_to(tiles, tmp_path, suffix):
    """docs/nightly.md: two spellings of one output (a symbolic link) are one output. The settings
    record lies beside the file the link leads to, as the lock does: `latest` made after a first run
    resumes it, and a run through the link first leaves a record the real name finds."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    first = sorted(tiles.iterdir())[:12]
    real, link = tmp_path / f"night1{suffix}", tmp_path / f"latest{suffix}"
    assert run(*map(str, first), "--out", str(real)).exit_code == 0
    link.symlink_to(real.name)
    result = run(str(tiles), "--out", str(link))
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and not (tmp_path / f"latest{suffix}.settings.json").exists()
    assert sorted(by_path(read_records(real))) == sorted(str(p) for p in tiles.iterdir())
    # the other way round: through the link first, then the real name
    other, other_link = tmp_path / f"night2{suffix}", tmp_path / f"today{suffix}"
    if suffix == ".parquet":
        other.mkdir()
    else:
        other.touch()
    other_link.symlink_to(other.name)
    assert run(*map(str, first), "--out", str(other_link)).exit_code == 0
    assert run(str(tiles), "--out", str(other)).exit_code == 0
    assert sorted(by_path(read_records(other))) == sorted(str(p) for p in tiles.iterdir())
    changed = run(str(tiles), "--out", str(link), "--low", "50")  # the real record is the one compared
    assert changed.exit_code == 2 and "other settings" in changed.stderr


def test_a_settings_record_beside_the_link_itself_is_named_where_it_belongs(tiles, tmp_path):
    """Runs before 2026-12-06 kept it beside the name given. Read from there, it was taken for the
    record of whatever the link led to next (a new night's output), and written there again: the
    refusal names it and where it belongs instead, and nothing is written."""
    real, link = tmp_path / "night1.jsonl", tmp_path / "latest.jsonl"
    real.touch()
    link.symlink_to(real.name)
    assert run(str(tiles), "--out", str(link)).exit_code == 0
    os.rename(tmp_path / "night1.jsonl.settings.json", tmp_path / "latest.jsonl.settings.json")  # the old place
    before = real.read_bytes()
    result = run(str(tiles), "--out", str(link))
    assert result.exit_code == 2 and "runs before 2026-12-06 kept it beside the link" in result.stderr
    assert f"move it to {tmp_path / 'night1.jsonl.settings.json'}" in result.stderr, result.stderr
    assert real.read_bytes() == before and not (tmp_path / "night1.jsonl.settings.json").exists()
    os.rename(tmp_path / "latest.jsonl.settings.json", tmp_path / "night1.jsonl.settings.json")  # as it says
    assert run(str(tiles), "--out", str(link)).exit_code == 0


def test_a_symbolic_link_out_that_leads_nowhere_is_refused_saying_so(tiles, tmp_path):
    link = tmp_path / "latest.jsonl"
    link.symlink_to("night2.jsonl")
    result = run(str(tiles), "--out", str(link))
    assert result.exit_code == 2 and "night2.jsonl, which does not exist" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.jsonl", "tiles"]


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_link_out_into_a_missing_folder_is_refused_leaving_no_folder(tiles, tmp_path, dry_run):
    """The lock goes beside the file the link leads to: the folders made for it, there, were left
    behind by the refusal (and by a dry run, which writes nothing), where those made for --out were removed."""
    link = tmp_path / "latest.jsonl"
    link.symlink_to(tmp_path / "nights" / "12" / "night2.jsonl")
    result = run(str(tiles), "--out", str(link), *dry_run)
    assert result.exit_code == 2 and "night2.jsonl, which does not exist" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.jsonl", "tiles"]


def test_the_settings_record_is_written_through_no_link_that_was_there(tiles, tmp_path):
    """Its temporary name is this process's own, made exclusively: a link planted at a name it
    might take leads nowhere."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for name in ("o.jsonl.settings.json.tmp", ".o.jsonl.settings.json.tmp"):
        (tmp_path / name).symlink_to(notes)
    assert run(str(tiles), "--out", str(tmp_path / "o.jsonl")).exit_code == 0
    assert notes.read_text() == "mine\n"


def test_a_json_file_with_a_pipeline_key_is_not_taken_for_a_settings_record(tiles, tmp_path):
    mine = tmp_path / "o.jsonl.settings.json"
    mine.write_text('{"pipeline": "stages of our own", "owner": "ops"}\n')
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2 and "is not a gpu-pipeline settings record" in result.stderr
    assert mine.read_text() == '{"pipeline": "stages of our own", "owner": "ops"}\n'


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["", "overwrite"])
@pytest.mark.parametrize("content", ["USER DATA\n", '{"name": "mine"}\n'], ids=["text", "json"])
@pytest.mark.parametrize("sidecar", ["settings.json", "lock"])
def test_a_file_of_the_users_where_a_sidecar_goes_is_left_alone(tiles, tmp_path, sidecar, content, overwrite):
    """OUT.settings.json and OUT.lock are ours to write and remove; a file of that name that is
    not (no output yet) is refused, not replaced, even with --overwrite: it replaces the output."""
    mine = tmp_path / f"r.jsonl.{sidecar}"
    mine.write_text(content)
    result = run(str(tiles), "--out", str(tmp_path / "r.jsonl"), *overwrite)
    assert result.exit_code == 2 and f"{mine} exists and is not a gpu-pipeline" in result.stderr, result.output
    assert "use --overwrite" not in result.stderr  # (it would not help)
    assert mine.read_text() == content and not (tmp_path / "r.jsonl").exists()


def test_overwrite_replaces_a_settings_record_of_ours_this_version_cannot_compare(tiles, tmp_path):
    """A record of an early version (no label model in it) cannot be compared with this run's
    settings: refused, naming --overwrite, which then starts afresh."""
    out = tmp_path / "r.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    record = tmp_path / "r.jsonl.settings.json"
    early = json.loads(record.read_text())
    del early["model"], early["format"]
    record.write_text(json.dumps(early))
    before = out.read_bytes()
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2 and "use --overwrite" in result.stderr, result.output
    assert out.read_bytes() == before and json.loads(record.read_text()) == early
    assert run(str(tiles), "--out", str(out), "--overwrite").exit_code == 0
    assert set(json.loads(record.read_text())) == {"pipeline", "decode", "model", "format"}


def test_an_output_whose_settings_record_is_gone_is_refused(tiles, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    (tmp_path / "out.jsonl.settings.json").unlink()
    before = out.read_bytes()
    result = run(str(tiles), "--out", str(out), "--low", "10")
    assert result.exit_code == 2 and "no settings record" in result.stderr
    assert out.read_bytes() == before
    assert run(str(tiles), "--out", str(out), "--low", "10", "--overwrite").exit_code == 0


# ---------------------------------------------------------------- 5. one damaged line in the middle


def test_a_damaged_line_in_the_middle_loses_no_other_record(tiles, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(str(tiles), "--out", str(out), "--batch-size", "4").exit_code == 0
    clean = by_path(read_records(out))
    lines = out.read_bytes().splitlines(keepends=True)
    damaged = json.loads(lines[5])["path"]
    lines[5] = lines[5][:30] + b"\n"
    out.write_bytes(b"".join(lines))
    result = runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "reference"])
    assert result.exit_code == 0, result.output
    assert f"warning: {out}: skipped 1 damaged line(s) between intact records" in result.stderr  # (nightly.md)
    assert "19 of 20 images already recorded" in result.stderr
    assert out.read_bytes().startswith(b"".join(lines))  # every intact record kept where it was
    assert by_path(read_records(out)) == clean
    assert json.loads(out.read_bytes().splitlines()[-1])["path"] == damaged  # only it was redone


def test_a_last_line_without_its_newline_is_redone_not_glued_to(tiles, tmp_path):
    """A torn last line can be valid JSON; accepting it glues the next batch onto it."""
    out = tmp_path / "out.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    clean = by_path(read_records(out))
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:10]).rstrip(b"\n"))  # 9 whole records and one without its newline
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    assert every_line_is_a_record(out)
    assert out.read_bytes().startswith(b"".join(lines[:9]))
    assert by_path(read_records(out)) == clean


def test_trailing_garbage_after_the_last_record_is_cut(tiles, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    clean = out.read_bytes()
    lines = clean.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:12]) + b"\0" * 100 + b"\n" + b"\0" * 50)
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    assert every_line_is_a_record(out)
    assert by_path(read_records(out)) == by_path([json.loads(line) for line in lines])


# ---------------------------------------------------------------- 6. two runs on one output


def test_a_second_run_on_a_locked_output_exits_2_naming_the_holder(tiles, tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputLock(str(out)):
        result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2
    assert f"process {os.getpid()}" in result.stderr and "another gpu-pipeline run" in result.stderr
    assert not out.exists()
    assert run(str(tiles), "--out", str(out)).exit_code == 0  # released: the next run goes ahead
    assert not lock_path(str(out)).exists()


@pytest.mark.parametrize("kind", ["folder", "fifo", "link"])
def test_a_lock_file_that_is_not_a_file_is_named_and_left_alone(tiles, tmp_path, kind):
    """The refusal named the output ("cannot write out.jsonl: Is a directory", "Illegal seek"), and a
    link there made its target, wherever it pointed."""
    lock, target = tmp_path / "out.jsonl.lock", tmp_path / "elsewhere"
    {"folder": lock.mkdir, "fifo": lambda: os.mkfifo(lock), "link": lambda: lock.symlink_to(target)}[kind]()
    result = run(str(tiles), "--out", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 2
    assert str(lock) in result.stderr and "remove it or use another --out" in result.stderr
    assert not target.exists() and not (tmp_path / "out.jsonl").exists()


def test_an_output_folder_made_read_only_during_the_run_keeps_its_lock_file_quietly(tiles, tmp_path, monkeypatch):
    """The lock file cannot be removed at the end (its folder made read-only meanwhile): the run had
    done its work, and ended in a traceback, exit 1. A stale lock file is locked again. (Root passes
    permission checks: os.unlink is made to refuse as it refuses a user.)"""
    out = tmp_path / "out.jsonl"
    real_unlink = os.unlink

    def read_only_folder(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "unlink", read_only_folder)
        result = run(str(tiles), "--out", str(out))
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert lock_path(str(out)).exists()  # left behind, holding no lock
    (tiles / "new.png").write_bytes((tiles / "tile000.png").read_bytes())
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    assert len(by_path(read_records(out))) == 21 and not lock_path(str(out)).exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_lock_file_removed_during_the_run_stops_it_before_a_second_run_writes_too(tiles, tmp_path, monkeypatch,
                                                                                     suffix):
    """A wrapper's ``rm -f *.lock`` while the run writes: the next run locked a new file and both
    wrote the same images (4,000 inputs, 7,120 records). The run stops at its next batch instead,
    and leaves alone the lock file the other run made."""
    out = tmp_path / f"out{suffix}"
    lock = lock_path(str(out))
    real_replace, real_write = os.replace, os.write
    batches = []

    def remove_the_lock_after_two_batches(written: Path):
        if out in (written, written.parent):  # a batch of lines, or a part
            batches.append(written)
            if len(batches) == 2:
                lock.unlink()
                lock.write_text("99999999\n")  # another run's, locked by it

    def replace(source, target, *args, **kwargs):
        real_replace(source, target, *args, **kwargs)
        remove_the_lock_after_two_batches(Path(target))

    def write(descriptor, data):
        written = real_write(descriptor, data)
        if descriptor > 2:
            remove_the_lock_after_two_batches(Path(os.path.realpath(f"/proc/self/fd/{descriptor}")))
        return written

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        patch.setattr(os, "write", write)
        result = runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "reference", "-q",
                                     "--batch-size", "4"])
    assert result.exit_code == 3, result.output
    assert result.stderr.splitlines() == [
        f"gpu-pipeline: error: the lock {lock} was removed during the run, and another run could write {out} "
        "too: stopped; the records written before are kept: fix the cause and run the same command again to resume"]
    assert len(by_path(read_records(out))) == 8
    assert lock.read_text() == "99999999\n"


def test_a_lock_file_removed_between_its_opening_and_its_locking_is_not_held(tmp_path, monkeypatch):
    """The run before releases its lock by removing the file: a run that opened it just before then
    locked a file no longer there, and the next run took the lock too (two writers on one output)."""
    out = str(tmp_path / "out.jsonl")
    opened = OutputLock._open

    def released_meanwhile(self):
        descriptor = opened(self)
        monkeypatch.setattr(OutputLock, "_open", opened)  # (once)
        self.path.unlink()  # what the holder's release does
        return descriptor

    monkeypatch.setattr(OutputLock, "_open", released_meanwhile)
    with OutputLock(out):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
        with pytest.raises(SinkError, match="another gpu-pipeline run"):
            OutputLock(out).acquire()
    assert not lock_path(out).exists()


def test_a_run_refused_for_a_full_disk_at_its_lock_leaves_no_lock_file(tiles, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)  # the process id written into the lock
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2 and "No space left on device" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]


def test_a_run_refused_for_a_full_disk_at_its_settings_record_names_it_and_leaves_nothing(tiles, tmp_path,
                                                                                          monkeypatch):
    from gpu_pipeline.engine import job

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(job, "write_replacing", disk_full)
    out = tmp_path / "new" / "out.jsonl"
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert result.stderr == f"gpu-pipeline: error: cannot write {out}.settings.json: {os.strerror(errno.ENOSPC)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]


def test_an_overwrite_refused_as_it_empties_the_output_names_it_and_keeps_its_records(tiles, tmp_path, monkeypatch):
    """The output's own error (a read-only remount between the checks and the run) says which file."""
    from gpu_pipeline.outputs import plan

    out = tmp_path / "out.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(plan, "_emptied", read_only)
    result = run(str(tiles), "--out", str(out), "--overwrite", "--low", "50")
    assert result.exit_code == 2, result.output
    assert result.stderr == f"gpu-pipeline: error: cannot write {out}: {os.strerror(errno.EROFS)}\n"
    # (the records, and the settings record put back as it was)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_a_second_real_run_while_the_first_writes_exits_2_and_adds_nothing(tmp_path):
    folder = tmp_path / "many"
    (first_image,) = make_images(folder, 1, size=128)
    for index in range(1, 600):  # enough work that the first run is still writing when the second starts
        os.link(first_image, folder / f"link{index:04d}.png")
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", str(out),
               "--backend", "reference", "--batch-size", "4", "--workers", "1", "-q"]
    first = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.01)
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    first_running = first.poll() is None
    assert first.wait(timeout=300) == 0, first.stderr.read()
    if not first_running:
        pytest.skip("the first run ended before the second started")
    assert second.returncode == 2, second.stderr
    assert f"process {first.pid}" in second.stderr
    assert every_line_is_a_record(out)
    assert len(by_path(read_records(out))) == 600


# ---------------------------------------------------------------- 7. a refused rerun writes nothing


def test_retry_failed_with_changed_settings_is_refused_before_rewriting(tmp_path):
    folder = tmp_path / "images"
    make_images(folder, 4)
    (folder / "tile001.png").write_bytes(b"")
    out = tmp_path / "out.jsonl"
    assert run(str(folder), "--out", str(out)).exit_code == 1
    before = out.read_bytes()
    result = run(str(folder), "--out", str(out), "--retry-failed", "--blur", "3")
    assert result.exit_code == 2 and "other settings" in result.stderr
    assert out.read_bytes() == before


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_retry_failed_rewrites_through_a_temporary_of_its_own_and_keeps_a_symbolic_link(tmp_path, suffix):
    """It wrote OUT.rewrite with open("wb"): a user's file there was truncated and renamed onto the
    output, a link there was followed; and it replaced a symbolic link --out by a copy."""
    folder = tmp_path / "images"
    make_images(folder, 4)
    (folder / "tile001.png").write_bytes(b"")
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / f"nightly{suffix}"
    real.touch()
    out = tmp_path / f"results{suffix}"
    out.symlink_to(real)
    assert run(str(folder), "--out", str(out)).exit_code == 1
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    (tmp_path / f"results{suffix}.rewrite").write_text("my notes")
    (tmp_path / "data" / f".nightly{suffix}.{os.getpid()}.tmp").symlink_to(precious)  # (this run's PID)
    make_images(folder, 4)  # the broken file is repaired
    assert run(str(folder), "--out", str(out), "--retry-failed").exit_code == 0
    assert out.is_symlink() and os.readlink(out) == str(real)
    records = by_path(read_records(real))
    assert len(records) == 4 and all("error" not in r for r in records.values())
    assert precious.read_text() == "mine" and (tmp_path / f"results{suffix}.rewrite").read_text() == "my notes"
    # no temporary left (the settings record lies beside the file the link leads to)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [f"nightly{suffix}", f"nightly{suffix}.settings.json"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_what_is_renamed_into_the_output_was_synced_first(tmp_path, monkeypatch, suffix):
    """A --retry-failed rewrite and each Parquet part are on disk before the rename that puts them in
    place: renamed unsynced, a power cut can leave the output's name on an empty file."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    folder = tmp_path / "images"
    make_images(folder, 4)
    (folder / "tile001.png").write_bytes(b"")
    out = tmp_path / f"out{suffix}"
    assert run(str(folder), "--out", str(out)).exit_code == 1
    make_images(folder, 4)  # the broken file is repaired
    synced, renamed = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        synced.add(os.fstat(descriptor).st_ino)
        real_fsync(descriptor)

    def replace(source, target):
        if Path(target) in (out, out.parent) or Path(target).parent == out:  # (not the settings record)
            renamed.append((Path(target).name, os.stat(source).st_ino in synced))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert run(str(folder), "--out", str(out), "--retry-failed").exit_code == 0
    assert renamed and all(was_synced for _, was_synced in renamed), renamed


def a_dead_pid() -> int:
    """The PID of a process that has ended and been reaped: it runs nothing (until the PID is reused)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_what_a_killed_run_left_is_removed_by_the_next_run(tiles, tmp_path):
    """A SIGKILL runs no clean-up: half-written edge maps and rewrites stayed hidden for ever."""
    out, edges = tmp_path / "out.jsonl", tmp_path / "edges"
    assert run(str(tiles), "--out", str(out), "--save-edges", str(edges)).exit_code == 0
    dead, old = a_dead_pid(), time.time() - 3600
    stale = [edges / f".tile003.png.edges.png.{dead}.tmp", tmp_path / f".out.jsonl.{dead}.tmp",
             tmp_path / f".out.jsonl.settings.json.{dead}.tmp"]
    kept = [edges / f".tile004.png.edges.png.{dead}.tmp",  # touched a moment ago: perhaps another machine's
            edges / ".tile005.png.edges.png.1.tmp",  # a running process's (init's)
            edges / ".notes.txt.1.tmp", tmp_path / f".other.jsonl.{dead}.tmp"]  # not ours to judge
    for path in stale + kept:
        path.write_bytes(b"\x89PNG half")
    for path in stale + kept[1:]:
        os.utime(path, (old, old))
    out.write_bytes(b"".join(out.read_bytes().splitlines(keepends=True)[:3]))  # killed after 3 records
    assert run(str(tiles), "--out", str(out), "--save-edges", str(edges)).exit_code == 0
    assert [path.name for path in stale if path.exists()] == []
    assert [path.name for path in kept if not path.exists()] == []


def test_a_killed_runs_map_temporaries_go_when_nothing_is_left_to_save(tmp_path):
    """They were removed from a folder only when a map was next saved there: a run killed near its end
    left them for good once the output was complete (8 of 15 kills in a hunt)."""
    folder, out, edges = tmp_path / "in", tmp_path / "out.jsonl", tmp_path / "edges"
    make_images(folder / "a" / "b", 3)
    assert run(str(folder), "--out", str(out), "--save-edges", str(edges)).exit_code == 0
    dead, old = a_dead_pid(), time.time() - 3600
    stale = edges / "a" / "b" / f".tile001.png.edges.png.{dead}.tmp"
    stale.write_bytes(b"\x89PNG half")
    os.utime(stale, (old, old))
    assert run(str(folder), "--out", str(out), "--save-edges", str(edges)).exit_code == 0  # nothing to do
    assert not stale.exists()


def test_names_near_the_file_name_limit_get_their_edge_maps_and_outputs(tmp_path):
    """A map's temporary, ``.NAME.PID.tmp``, passed the 255 bytes a name may have for names of 236 to
    245 bytes whose map (NAME) fitted: each such image became a save-edges error. Now the temporary
    keeps the name's end, and a killed run's such temporary is still found and removed."""
    from gpu_pipeline.outputs.files import temporary_name

    folder, edges = tmp_path / "long", tmp_path / "edges"
    names = [("N" * (length - 4)) + ".png" for length in (230, 236, 240, 245)] + ["é" * 118 + ".png"]
    make_images(folder, len(names), names=names)
    out = tmp_path / (("o" * 229) + ".jsonl")  # 235 bytes: its settings' temporary passed it too
    result = run(str(folder), "--out", str(out), "--save-edges", str(edges))
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in edges.iterdir()) == sorted(name + ".edges.png" for name in names)
    dead, old = a_dead_pid(), time.time() - 3600
    left = [edges / temporary_name(names[3] + ".edges.png", dead), tmp_path / temporary_name(out.name, dead),
            tmp_path / temporary_name(out.name + ".settings.json", dead)]
    assert [len(os.fsencode(path.name)) for path in left[::2]] == [255, 255]  # cut to fit
    for path in left:
        path.write_bytes(b"half")
        os.utime(path, (old, old))
    (edges / names[3]).with_name(names[3] + ".edges.png").unlink()  # (so that a map is saved there again)
    out.write_bytes(b"".join(out.read_bytes().splitlines(keepends=True)[:3]))  # killed after 3 records
    assert run(str(folder), "--out", str(out), "--save-edges", str(edges)).exit_code == 0
    assert [path.name for path in left if path.exists()] == []


# ---------------------------------------------------------------- 9. FIFOs and other special files


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_tifffiles_own_warnings_do_not_reach_stderr(tiles, tmp_path, decode):
    """A damaged TIFF is its error record; tifffile's warning ("invalid offset to first page") was
    printed too, from decode processes (and sometimes after the command had returned)."""
    (tiles / "damaged.tif").write_bytes(b"II*\x00\x08\x00\x00\x00")
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(tiles), "--out", str(out), "-q",
                             "--backend", "reference", "--decode", decode], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and result.stderr == ""
    assert by_path(read_records(out))[str(tiles / "damaged.tif")]["error"] == "damaged TIFF file: no image in it"


@pytest.mark.parametrize("kind", ["FIFO", "socket"])
def test_a_fifo_or_a_socket_among_the_inputs_gets_an_error_record_and_does_not_hang(tiles, tmp_path, kind):
    """Named as what it is, whether read with the small files or decoded from its path (a socket
    cannot be opened at all: its record said "No such device or address")."""
    special = tiles / "special.png"
    with contextlib.ExitStack() as stack:
        if kind == "FIFO":
            os.mkfifo(special)
        else:
            stack.enter_context(socket.socket(socket.AF_UNIX)).bind(str(special))
        out = tmp_path / "out.jsonl"
        for args in ([str(tiles)], [str(tiles / "tile000.png"), str(special)]):
            process = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", *args, "--out", str(out),
                                      "--backend", "reference", "-q", "--overwrite"],
                                     cwd=REPO, capture_output=True, text=True, timeout=120)
            assert process.returncode == 1, process.stderr
            record = by_path(read_records(out))[str(special)]
            assert record["stage"] == "read" and record["error"] == f"not a regular file (a {kind}); skipped"
        assert decode_or_error(special, DecodeOptions()) == ("read", f"not a regular file (a {kind}); skipped")


# ---------------------------------------------------------------- 10. disk full


def test_disk_full_ends_the_run_with_one_line_and_exit_3_and_stays_resumable(tiles, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    real_write = os.write
    writes = []

    def full_after_two_batches(descriptor, data):
        if descriptor > 2 and os.path.realpath(f"/proc/self/fd/{descriptor}") == str(out.resolve()):
            writes.append(len(data))
            if len(writes) > 2:
                real_write(descriptor, bytes(data)[:50])  # a torn part, as a full disk leaves
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(descriptor, data)

    monkeypatch.setattr(os, "write", full_after_two_batches)
    result = runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "reference",
                                 "--batch-size", "4"])
    monkeypatch.setattr(os, "write", real_write)
    assert result.exit_code == 3, result.output
    assert "No space left on device" in result.stderr and "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        line for line in result.stderr.splitlines() if line.startswith("gpu-pipeline: error:")]
    assert len(read_records(out)) == 8  # the two batches written are kept
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    assert len(by_path(read_records(out))) == 20 and every_line_is_a_record(out)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
@pytest.mark.parametrize("how", ["removed", "renamed", "replaced by a folder"])
def test_an_output_file_taken_away_during_the_run_ends_it_with_exit_3(tiles, tmp_path, monkeypatch, suffix, how):
    # a cleanup job or a hand removes the output while the run writes: its records went to no file, exit 0
    out = tmp_path / f"out{suffix}"
    real_write = os.write
    batches = []

    def take_away_after_two_batches(descriptor, data):
        written = real_write(descriptor, data)
        if descriptor > 2 and os.path.realpath(f"/proc/self/fd/{descriptor}") == str(out.resolve()):
            batches.append(len(data))
            if len(batches) == 3:
                if how == "renamed":
                    out.rename(tmp_path / "out.old")
                else:
                    out.unlink()
                    if how == "replaced by a folder":
                        out.mkdir()
        return written

    monkeypatch.setattr(os, "write", take_away_after_two_batches)
    result = runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "reference", "-q",
                                 "--batch-size", "4"])
    monkeypatch.setattr(os, "write", real_write)
    assert result.exit_code == 3, result.output
    assert result.stderr.splitlines() == [
        f"gpu-pipeline: error: cannot write {out}: it was removed or replaced during the run; the records "
        "written before are kept: fix the cause and run the same command again to resume"]
    if how == "removed":  # the same command makes it again
        assert run(str(tiles), "--out", str(out)).exit_code == 0
        assert len(by_path(read_records(out))) == 20


def test_a_relative_output_is_still_its_file_after_the_working_folder_changes(tmp_path, monkeypatch):
    """A script using the Python API may chdir while its run writes: an output named relatively is
    still the file written. The check that it was not taken away looked for it in the new folder,
    found nothing there, and stopped the run as if the output had been removed."""
    from gpu_pipeline.outputs.lines import LineSink

    monkeypatch.chdir(tmp_path)
    sink = LineSink("out.jsonl", "jsonl")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    try:
        sink.write([{"path": "/a.png", "stage": "decode", "error": "bad"}])
    finally:
        sink.close()
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"path":"/a.png","stage":"decode","error":"bad"}\n'
    assert list((tmp_path / "elsewhere").iterdir()) == []

def run_writing_with(monkeypatch, write, tiles: Path, out: Path, edges: Path):
    """A run of ``tiles`` (batches of 4) saving edge maps into ``edges``, with ``write`` for ``os.write``."""
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write)
        return runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "reference", "-q",
                                   "--batch-size", "4", "--save-edges", str(edges)])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_full_disk_under_save_edges_ends_the_run_naming_the_map_and_stays_resumable(tiles, tmp_path,
                                                                                       monkeypatch, code):
    """Every image after the disk filled got a save-edges error record ("No space left on device")
    and the run went on through the night, exit 1, its maps never written. Now it stops as for a
    full disk under its records: exit 3, one line naming the map; the batches recorded stay, and
    their maps with them."""
    out, edges = tmp_path / "out.jsonl", tmp_path / "edges"
    real_write = os.write
    maps = []

    def full_after_six_maps(descriptor, data):
        if descriptor > 2 and os.path.realpath(f"/proc/self/fd/{descriptor}").startswith(f"{edges.resolve()}/"):
            maps.append(len(data))
            if len(maps) > 6:
                raise OSError(code, os.strerror(code))
        return real_write(descriptor, data)

    result = run_writing_with(monkeypatch, full_after_six_maps, tiles, out, edges)
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1, result.stderr
    assert re.fullmatch(rf"gpu-pipeline: error: cannot write the edge map {re.escape(str(edges))}/tile0\d\d"
                        rf"\.png\.edges\.png: {os.strerror(code)}; the records written before are kept: "
                        r"fix the cause and run the same command again to resume\n", result.stderr), result.stderr
    recorded = read_records(out)
    assert len(recorded) == 4 and not any("error" in record for record in recorded)  # the first batch
    saved = sorted(p.name for p in edges.iterdir())
    assert {Path(r["path"]).name + ".edges.png" for r in recorded} <= set(saved)
    assert all(name.endswith(".edges.png") for name in saved)  # no temporary left behind
    assert run(str(tiles), "--out", str(out), "--save-edges", str(edges)).exit_code == 0
    assert len(by_path(read_records(out))) == 20 and len(list(edges.iterdir())) == 20


def test_an_edge_map_that_cannot_be_written_for_its_own_reason_is_that_images_error(tiles, tmp_path, monkeypatch):
    """Only a disk's errors stop the run: an error of one map (here EIO) is that image's record."""
    out, edges = tmp_path / "out.jsonl", tmp_path / "edges"
    real_write = os.write

    def one_map_fails(descriptor, data):
        if descriptor > 2 and "tile007" in os.path.realpath(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(descriptor, data)

    result = run_writing_with(monkeypatch, one_map_fails, tiles, out, edges)
    assert result.exit_code == 1, result.output
    failed = [record for record in read_records(out) if "error" in record]
    assert [(Path(r["path"]).name, r["stage"]) for r in failed] == [("tile007.png", "save-edges")]
    assert os.strerror(errno.EIO) in failed[0]["error"] and len(read_records(out)) == 20
    assert len(list(edges.iterdir())) == 19


def test_files_cut_short_and_zero_filled_get_error_records_and_the_run_goes_on(tiles, tmp_path):
    """The round's new refusals, end to end: a PNG, a WebP and a JPEG-compressed TIFF cut short and
    zero-filled (a download still being written) are each a decode error record; the other images,
    a 4-bit min-is-white TIFF among them, are results."""
    import io

    import tifffile

    picture = np.random.default_rng(3).integers(0, 256, (48, 64, 3), np.uint8)

    def zero_filled(data: bytes) -> bytes:
        cut = len(data) // 2
        return data[:cut] + bytes(len(data) - cut)

    for kind, options in (("PNG", {}), ("WEBP", {"quality": 80})):
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, kind, **options)
        (tiles / f"partial.{kind.lower()}").write_bytes(zero_filled(buffer.getvalue()))
    tifffile.imwrite(tiles / "whole.tif", picture, compression="jpeg", photometric="rgb")
    (tiles / "partial.tif").write_bytes(zero_filled((tiles / "whole.tif").read_bytes()))
    tifffile.imwrite(tiles / "four.tif", (picture[:, :, 0] >> 4), bitspersample=4, photometric="miniswhite")
    out = tmp_path / "out.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 1
    records = {Path(record["path"]).name: record for record in read_records(out)}
    assert len(records) == 20 + 5
    failed = {name: record for name, record in records.items() if "error" in record}
    assert sorted(failed) == ["partial.png", "partial.tif", "partial.webp"]
    assert all(record["stage"] == "decode" and "truncated" in record["error"] for record in failed.values())
    assert records["whole.tif"]["width"] == 64 and records["four.tif"]["bands"] == 1


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_an_out_name_too_long_for_its_settings_record_is_refused_writing_nothing(tiles, tmp_path, dry_run):
    """Refused among the checks, so that a dry run refuses it too (it said the run would go on)."""
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / ("o" * 244 + ".jsonl")  # 250 bytes; OUT.settings.json would be 264
    result = run(str(tiles), "--out", str(out), *dry_run)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr == (f"gpu-pipeline: error: --out {out}: the name is too long for the settings record "
                             f"beside it ({out.name}.settings.json); choose a shorter one\n")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_stdout_on_a_full_disk_exits_3_with_one_line(bundled_data_dir):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(bundled_data_dir / "eurosat"),
                                 "--out", "-", "--backend", "reference", "-q"], stdout=full, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stderr == "gpu-pipeline: error: cannot write to stdout: No space left on device\n"


def test_stdout_closed_by_its_reader_exits_3_with_one_line(bundled_data_dir, tmp_path):
    """`gpu-pipeline run --out - | head`: exit 3 (the output could not be written), not 1 (images failed)."""
    tiles = sorted((bundled_data_dir / "eurosat").rglob("*.jpg"))
    for index in range(300):  # about 230 KB of records: more than a pipe holds, so the run must meet the close
        os.link(tiles[index % len(tiles)], tmp_path / f"tile{index:03d}.jpg")
    process = subprocess.Popen([sys.executable, "-m", "gpu_pipeline.cli", "run", str(tmp_path),
                                "--out", "-", "--backend", "reference", "-q", "--batch-size", "16"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert process.stdout.read(100)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 3, stderr
    assert stderr == "gpu-pipeline: error: cannot write to stdout: Broken pipe\n"


# ---------------------------------------------------------------- 11. --save-edges


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_save_edges_and_out_naming_one_place_are_refused_up_front(tiles, tmp_path, suffix):
    """The refusal said "cannot write n1/r.jsonl: Is a directory" (the edge folder made first)."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    place = tmp_path / "n1" / f"r{suffix}"
    result = run(str(tiles), "--out", str(place), "--save-edges", str(tmp_path / "n1" / "." / f"r{suffix}"))
    assert result.exit_code == 2 and "--save-edges and --out both name" in result.stderr
    assert not (tmp_path / "n1").exists()


def test_save_edges_on_an_existing_file_is_refused_up_front(tiles, tmp_path):
    blocker = tmp_path / "edges"
    blocker.write_text("x")
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"), "--save-edges", str(blocker))
    assert result.exit_code == 2 and "--save-edges" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("inside", ["", "edges"])
def test_save_edges_inside_a_parquet_dataset_folder_is_refused_up_front(tiles, tmp_path, inside):
    """Its next run would refuse the dataset folder for holding files that are not parts."""
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    result = run(str(tiles), "--out", str(out), "--save-edges", str(out / inside))
    message = "is inside the Parquet dataset folder" if inside else "--save-edges and --out both name"
    assert result.exit_code == 2 and message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]


def test_an_input_swapped_for_a_link_during_the_run_keeps_its_own_edge_map(tiles, tmp_path):
    """The map's name was resolved when it was saved: z.png, replaced by a link to a.png after it was
    decoded, overwrote a.png's map (and an input folder swapped for a link made every later image a
    save-edges error naming a Python ValueError). Names are now the inputs' own, never resolved."""
    from gpu_pipeline.outputs.edges import edge_saver

    a, z = str(tiles / "tile000.png"), str(tiles / "tile019.png")
    save = edge_saver(tmp_path / "edges", str(tiles))
    os.unlink(z)
    os.symlink(a, z)  # after z was decoded
    save(z, np.full((2, 2), 255, np.uint8))
    assert [p.name for p in (tmp_path / "edges").iterdir()] == ["tile019.png.edges.png"]


def test_edge_maps_read_back_in_pillow_and_opencv_with_their_marks(tmp_path):
    """The saver's own PNG writer: the map's pixels in both readers, its Software and Source texts."""
    import cv2

    from gpu_pipeline.outputs.edges import edge_saver
    from gpu_pipeline.outputs.files import SOFTWARE, png_texts

    name = str(tmp_path / "in" / "sub" / "é 1.png")
    edges = (np.random.default_rng(5).random((13, 29)) < 0.2).astype(np.uint8) * 255
    edge_saver(tmp_path / "edges", str(tmp_path / "in"))(name, edges)
    saved = tmp_path / "edges" / "sub" / "é 1.png.edges.png"
    assert np.array_equal(np.asarray(Image.open(saved)), edges)
    assert np.array_equal(cv2.imread(str(saved), cv2.IMREAD_UNCHANGED), edges)
    assert png_texts(saved) == {"Software": SOFTWARE, "Source": name}
    assert sorted(os.listdir(saved.parent)) == [saved.name]  # no temporary left behind


def test_an_edge_folder_removed_during_the_run_is_made_again(tmp_path):
    """Each folder is made once a run; one removed after that is made again for the next map."""
    from gpu_pipeline.outputs.edges import edge_saver

    save = edge_saver(tmp_path / "edges", str(tmp_path))
    save(str(tmp_path / "sub" / "a.png"), np.zeros((2, 2), np.uint8))
    shutil.rmtree(tmp_path / "edges")
    save(str(tmp_path / "sub" / "b.png"), np.zeros((2, 2), np.uint8))
    assert os.listdir(tmp_path / "edges" / "sub") == ["b.png.edges.png"]


def test_the_edge_map_of_an_image_deeper_than_pythons_recursion_limit_is_saved(tmp_path):
    """``Path.mkdir(parents=True)`` recursed once per missing folder: the map of an image about
    1,000 folders deep became a save-edges error record naming a RecursionError."""
    from gpu_pipeline.outputs.edges import edge_saver

    depth = sys.getrecursionlimit() + 100
    relative = "/".join(["d"] * depth)
    top = tmp_path / "edges"
    try:
        edge_saver(top, str(tmp_path))(f"{tmp_path}/{relative}/x.png", np.full((3, 3), 255, np.uint8))
        assert np.asarray(Image.open(f"{top}/{relative}/x.png.edges.png")).tolist() == [[255] * 3] * 3
    finally:  # pytest's clean-up (shutil.rmtree) recurses too: it would fail on this tree later
        folder = f"{top}/{relative}"
        while folder != str(top):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    os.unlink(os.path.join(folder, name))
                os.rmdir(folder)
            folder = os.path.dirname(folder)


def test_an_edge_map_that_cannot_be_written_is_named_in_its_error_not_its_temporary(tmp_path, monkeypatch):
    """An edge folder made unwritable during a run (a permission, not a disk): each image's error record
    said "PermissionError: [Errno 13] Permission denied: '.../.a.png.edges.png.655.tmp'", a hidden
    name the user never sees."""
    from gpu_pipeline.errors import one_line
    from gpu_pipeline.outputs import edges

    def refused(target, data):
        folder, name = os.path.split(target)
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(folder, f".{name}.655.tmp"))

    monkeypatch.setattr(edges, "write_replacing", refused)
    with pytest.raises(PermissionError) as caught:
        edges.edge_saver(tmp_path / "edges", str(tmp_path))(str(tmp_path / "a.png"), np.zeros((2, 2), np.uint8))
    assert one_line(caught.value) == \
        f"PermissionError: cannot write the edge map {tmp_path}/edges/a.png.edges.png: Permission denied"


def test_the_folders_an_edge_saver_remembers_stay_few(tmp_path):
    """It remembers the folders it made (a mkdir a map cost a system call), but not all of a run's:
    a folder per image (a product per folder, a tile pyramid) kept 0.5 KB each for the whole run."""
    from gpu_pipeline.outputs.edges import MADE_FOLDERS_KEPT, edge_saver

    save = edge_saver(tmp_path / "edges", str(tmp_path))
    made = dict(zip(save.__code__.co_freevars, (cell.cell_contents for cell in save.__closure__)))["made"]
    sizes = []
    for index in range(MADE_FOLDERS_KEPT + 50):
        save(str(tmp_path / f"p{index}" / "a.png"), np.zeros((1, 1), np.uint8))
        sizes.append(len(made))
    assert max(sizes) == MADE_FOLDERS_KEPT and 0 < sizes[-1] <= MADE_FOLDERS_KEPT  # never one more
    assert len(os.listdir(tmp_path / "edges")) == MADE_FOLDERS_KEPT + 50


def test_an_edge_saver_refuses_an_image_outside_its_root_and_writes_nothing(tmp_path):
    """The maps mirror the inputs below the root: an image elsewhere has no place there (its name, cut
    at the root's length, put the map of /elsewhere/a.png at EDGES/here/a.png.edges.png)."""
    from gpu_pipeline.outputs.edges import edge_saver

    save = edge_saver(tmp_path / "edges", "/data")
    with pytest.raises(ValueError, match="^/elsewhere/a.png is not below /data$"):
        save("/elsewhere/a.png", np.zeros((1, 1), np.uint8))
    with pytest.raises(ValueError, match="is not below"):
        save("/database/a.png", np.zeros((1, 1), np.uint8))  # (a name that only starts like the root)
    assert not (tmp_path / "edges").exists()

#: Pieces of names Path treats apart (empty and "." parts, leading and doubled slashes) and odd ones.
_NAME_PIECES = st.lists(st.sampled_from(["/", ".", "a", "é \n\\", "\udcff"]), max_size=12).map("".join)


@settings(max_examples=examples(400), deadline=None)
@given(folder=st.sampled_from(["/", "//", "//x", "/e", "/e/f g", "/\udcff"]), relative=_NAME_PIECES)
@example(folder="/e", relative="a/./b")
@example(folder="/e", relative="a//b")
@example(folder="/e", relative="./a")
@example(folder="/e", relative="/a")
def test_edge_map_names_are_those_a_path_gave(folder, relative):
    """The saver builds its names as strings, no Path a map: the same names as the Path did (and
    their folders and temporaries), for discovery's plain names and for any other."""
    from gpu_pipeline.outputs.edges import edge_map_name
    from gpu_pipeline.outputs.files import temporary_name

    made = Path(folder) / (relative + ".edges.png")
    name = edge_map_name(folder, relative)
    assert name == str(made)
    assert os.path.dirname(name) == str(made.parent)
    stem, slash, last = name.rpartition("/")  # as write_replacing names its temporary
    assert stem + slash + temporary_name(last, 42) == str(made.with_name(temporary_name(made.name, 42)))


def test_the_edge_saver_a_dask_chunk_carries_stays_small(tmp_path):
    """Each --dask chunk pickles its saver: a table of every input's resolved name made it 7.7 MB a
    chunk for 100,000 files. It holds the edge folder and the root only."""
    from gpu_pipeline.outputs.edges import edge_saver

    cloudpickle = pytest.importorskip("cloudpickle")
    assert len(cloudpickle.dumps(edge_saver(tmp_path / "edges", str(tmp_path)))) < 20_000


def edge_count_of_map(path: Path) -> int:
    return int((np.asarray(Image.open(path)) > 0).sum())


def test_new_files_higher_in_the_tree_do_not_move_the_edge_maps(tmp_path):
    """The maps mirrored the common folder of the files found: a resume that found a new file above
    the old ones moved the root, and grow/x.png's map replaced grow/a/x.png's (an edge map of ours,
    so without a word), while a/x.png was never redone."""
    grow, edges, out = tmp_path / "grow", tmp_path / "edges", tmp_path / "out.jsonl"
    make_images(grow / "a", 1, names=["x.png"])
    assert run(str(grow), "--out", str(out), "--save-edges", str(edges)).exit_code == 0
    make_images(grow, 1, names=["x.png"], seed=5)
    assert run(str(grow), "--out", str(out), "--save-edges", str(edges)).exit_code == 0
    counts = {Path(record["path"]).relative_to(grow).as_posix(): record["edge_count"] for record in read_records(out)}
    assert counts["a/x.png"] != counts["x.png"]
    assert {name: edge_count_of_map(edges / (name + ".edges.png")) for name in counts} == counts


def test_an_edge_map_of_another_image_is_left_alone(tmp_path):
    """Two nights' folders into one --save-edges: each night's root is its own folder, so the second
    night's x.png maps to the first night's x.png.edges.png. That map is ours but of another image:
    it is left whole and the image gets a save-edges error naming the other one."""
    first, second, edges = tmp_path / "in" / "2026-12-05", tmp_path / "in" / "2026-12-06", tmp_path / "edges"
    make_images(first, 1, names=["x.png"])
    make_images(second, 1, names=["x.png"], seed=5)
    assert run(str(first), "--out", str(tmp_path / "05.jsonl"), "--save-edges", str(edges)).exit_code == 0
    before = (edges / "x.png.edges.png").read_bytes()
    result = run(str(second), "--out", str(tmp_path / "06.jsonl"), "--save-edges", str(edges))
    assert result.exit_code == 1
    (record,) = read_records(tmp_path / "06.jsonl")
    assert record["stage"] == "save-edges"
    assert record["error"].endswith(f"x.png.edges.png is the edge map of {first / 'x.png'}; it is left alone "
                                    "(save the edge maps of these inputs into another folder)")
    assert (edges / "x.png.edges.png").read_bytes() == before
    # the same image again (a rerun with --overwrite) replaces its own map
    assert run(str(first), "--out", str(tmp_path / "05.jsonl"), "--save-edges", str(edges), "--overwrite").exit_code == 0


def test_an_edge_map_of_another_image_whose_name_is_not_utf8_is_left_alone(tmp_path):
    """A map recorded such a name only as shown (``\\xff``), which names no file: taken for the map
    of an image that is gone, the first night's map was replaced by the second night's, without a
    word. Its exact bytes are recorded beside it now; the same image still replaces its own map."""
    from gpu_pipeline.outputs.edges import edge_saver
    from gpu_pipeline.outputs.files import png_texts

    first, second, edges = tmp_path / "05", tmp_path / "06", tmp_path / "edges"
    for night, seed in ((first, 0), (second, 5)):
        make_images(night, 1, seed=seed)
        os.rename(night / "tile000.png", os.fsencode(night) + b"/\xff.png")
    first_map, second_map = np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.uint8)
    edge_saver(edges, str(first))(os.fsdecode(os.fsencode(first) + b"/\xff.png"), first_map)
    saved = os.fsencode(edges) + b"/\xff.png.edges.png"
    before = Path(os.fsdecode(saved)).read_bytes()
    texts = png_texts(Path(os.fsdecode(saved)))
    assert texts["Source"] == f"{first}/\\xff.png"
    assert base64.b64decode(texts["Source bytes"]) == os.fsencode(first) + b"/\xff.png"
    with pytest.raises(FileExistsError, match="is the edge map of .*05/\\\\xff.png; it is left alone"):
        edge_saver(edges, str(second))(os.fsdecode(os.fsencode(second) + b"/\xff.png"), second_map)
    assert Path(os.fsdecode(saved)).read_bytes() == before
    edge_saver(edges, str(first))(os.fsdecode(os.fsencode(first) + b"/\xff.png"), second_map)  # its own: replaced
    assert np.array_equal(np.asarray(Image.open(os.fsdecode(saved))), second_map)


@pytest.mark.parametrize("damage", ["not base64", "no Source beside it"])
def test_an_edge_map_with_damaged_source_bytes_is_left_alone_with_a_plain_message(tmp_path, damage):
    """A map edited by hand: its image got a base64 error, or a KeyError, as its save-edges error."""
    from gpu_pipeline.outputs.edges import edge_saver
    from gpu_pipeline.outputs.files import SOFTWARE
    from gpu_pipeline.outputs.png import gray_png

    edges, other = tmp_path / "edges", tmp_path / "other.png"
    edges.mkdir()
    other.write_bytes(b"another image, which exists")
    if damage == "not base64":
        marks, international = {"Source bytes": "not base64!"}, {"Source": str(other)}
    else:
        marks, international = {"Source bytes": base64.b64encode(bytes(other)).decode()}, {}
    saved = edges / "a.png.edges.png"
    saved.write_bytes(gray_png(np.zeros((2, 2), np.uint8), text={"Software": SOFTWARE, **marks},
                               international=international))
    before = saved.read_bytes()
    with pytest.raises(FileExistsError, match=r"a.png.edges.png is the edge map of .*; it is left alone"):
        edge_saver(edges, str(tmp_path / "data"))(str(tmp_path / "data" / "a.png"), np.full((2, 2), 255, np.uint8))
    assert saved.read_bytes() == before


@pytest.mark.parametrize("way", ["a link to the folder", "the folder renamed"])
def test_the_same_images_under_another_name_replace_their_own_edge_maps(tmp_path, way):
    """A map records its image's name; the same file reached another way (a link, another mount) or
    a folder renamed since is the same image, not another one: every image became a save-edges
    error (its results lost) the first time this check ran."""
    data, edges = tmp_path / "data", tmp_path / "edges"
    make_images(data, 3)
    assert run(str(data), "--out", str(tmp_path / "a.jsonl"), "--save-edges", str(edges)).exit_code == 0
    if way == "a link to the folder":
        again = tmp_path / "linked"
        again.symlink_to(data)
    else:
        again = tmp_path / "renamed"
        data.rename(again)
    result = run(str(again), "--out", str(tmp_path / "b.jsonl"), "--save-edges", str(edges))
    assert result.exit_code == 0, result.output
    assert all("error" not in record for record in read_records(tmp_path / "b.jsonl"))


@pytest.mark.parametrize("as_root", [False, True])
def test_save_edges_that_cannot_be_created_is_refused_writing_nothing(tiles, tmp_path, monkeypatch, as_root):
    """nightly.md: a --save-edges that cannot be created exits 2; for root, whom every permission
    check lets through, the folder is created before anything else is written, and that decides."""
    if as_root:
        monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    before = set(tmp_path.iterdir())
    # (in /sys, where nothing can be made either: /proc is refused by name, before the folder is made)
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"), "--save-edges", "/sys/gpu-pipeline-test/edges")
    assert result.exit_code == 2 and "--save-edges /sys/gpu-pipeline-test/edges" in result.stderr
    assert set(tmp_path.iterdir()) == before


@pytest.mark.parametrize("edges", ["/proc/gpu-pipeline-test", "/dev"])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry run"])
def test_save_edges_under_dev_or_proc_is_refused_by_name_by_a_run_and_its_dry_run_alike(tiles, tmp_path, monkeypatch,
                                                                                        dry_run, edges):
    """Root's dry run with --save-edges /proc/x said the run would go on (exit 0), and the run refused
    it only as it came to make the folder: no permission check refuses root (who would have written
    maps into /dev itself). Refused by name among the checks now, as an --out there is: one line,
    exit 2, nothing written."""
    from gpu_pipeline.engine import job

    def never(*args):  # (refused with the checks: a run that got here would write maps into /dev)
        raise AssertionError("the run began")

    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)  # (as root, whoever runs the tests)
    monkeypatch.setattr(job, "execute", never)
    before = set(tmp_path.iterdir())
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"), "--save-edges", edges, *dry_run)
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.count("\n") == 1
    assert f"--save-edges {edges}: under /dev or /proc, not a place for edge maps" in result.stderr
    assert set(tmp_path.iterdir()) == before


def test_a_run_refused_after_making_the_edge_folder_removes_it(tiles, tmp_path, monkeypatch):
    from gpu_pipeline.engine import job
    from gpu_pipeline.errors import UsageError

    def refuse(out, settings):
        assert (tmp_path / "kept/new/edges").is_dir()  # made first
        raise UsageError("cannot write the settings (planted)")

    monkeypatch.setattr(job, "write_settings", refuse)
    (tmp_path / "kept").mkdir()
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"), "--save-edges", str(tmp_path / "kept/new/edges"))
    assert result.exit_code == 2 and "planted" in result.stderr
    assert not list((tmp_path / "kept").iterdir()) and not (tmp_path / "o.jsonl").exists()


def test_save_edges_beside_a_symbolic_link_loop_gives_it_an_error_record(tiles, tmp_path):
    """The loop crashed the edge saver with a traceback before the first image."""
    folder = tmp_path / "loop"
    folder.mkdir()
    (folder / "a.png").symlink_to("b.png")
    (folder / "b.png").symlink_to("a.png")
    image = sorted(tiles.iterdir())[0]
    os.link(image, folder / image.name)
    out = tmp_path / "o.jsonl"
    result = run(str(folder), "--out", str(out), "--save-edges", str(tmp_path / "edges"))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    records = by_path(read_records(out))
    assert {Path(path).name: record.get("stage") for path, record in records.items()} == {
        "a.png": "read", "b.png": "read", image.name: None}
    assert [path.name for path in (tmp_path / "edges").rglob("*.png")] == [image.name + ".edges.png"]


def test_save_edges_replaces_its_own_maps_and_leaves_anyone_elses(tiles, tmp_path):
    edges = tmp_path / "edges"
    first = sorted(tiles.iterdir())[0]
    assert run(str(tiles), "--out", str(tmp_path / "a.jsonl"), "--save-edges", str(edges)).exit_code == 0
    assert run(str(tiles), "--out", str(tmp_path / "a.jsonl"), "--save-edges", str(edges),
               "--overwrite").exit_code == 0  # our own maps, replaced
    mine = edges / (first.name + ".edges.png")
    mine.write_bytes(b"USER FILE")
    result = run(str(tiles), "--out", str(tmp_path / "b.jsonl"), "--save-edges", str(edges))
    assert result.exit_code == 1, result.output
    failed = [record for record in read_records(tmp_path / "b.jsonl") if "error" in record]
    assert [(Path(r["path"]).name, r["stage"]) for r in failed] == [(first.name, "save-edges")]
    assert "exists and was not written by gpu-pipeline" in failed[0]["error"]
    assert mine.read_bytes() == b"USER FILE" and len(list(edges.iterdir())) == 20


def test_save_edges_replaces_maps_of_versions_that_wrote_no_text_chunks(tiles, tmp_path):
    """Versions before 2026-12-05 wrote maps without Software and Source chunks: a later run into the
    same folder took each for someone else's file, and every such image got a save-edges error
    instead of its result, at every run. A PNG without text that is not such a map is still left alone."""
    edges = tmp_path / "edges"
    assert run(str(tiles), "--out", str(tmp_path / "a.jsonl"), "--save-edges", str(edges)).exit_code == 0
    maps = sorted(edges.iterdir())
    for path in maps[:3]:  # as an earlier version wrote them: the same pixels, no text chunk
        with Image.open(path) as image:
            pixels = np.asarray(image)
        Image.fromarray(pixels).save(path, format="PNG")
    user = maps[3]  # the user's own map of that image: binary, its size, other pixels (another Canny)
    with Image.open(user) as image:
        pixels = np.asarray(image).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(user, format="PNG")
    result = run(str(tiles), "--out", str(tmp_path / "b.jsonl"), "--save-edges", str(edges))
    failed = [record for record in read_records(tmp_path / "b.jsonl") if "error" in record]
    assert [Path(r["path"]).name + ".edges.png" for r in failed] == [user.name], failed
    assert result.exit_code == 1
    for path in maps[:3]:
        with Image.open(path) as image:
            assert image.info.get("Software", "").startswith("gpu-pipeline")
    with Image.open(user) as image:
        assert "Software" not in image.info and np.array_equal(np.asarray(image), pixels)


def test_save_edges_meets_a_fifo_a_hard_link_and_a_torn_map(tiles, tmp_path):
    """A FIFO where a map goes hung the run for ever; a map hard-linked elsewhere was rewritten
    there too; a map cut short by a kill made an error record on every later night."""
    edges = tmp_path / "edges"
    names = sorted(path.name for path in tiles.iterdir())
    assert run(str(tiles), "--out", str(tmp_path / "a.jsonl"), "--save-edges", str(edges)).exit_code == 0
    os.link(edges / f"{names[1]}.edges.png", tmp_path / "snapshot.png")
    snapshot = (tmp_path / "snapshot.png").read_bytes()
    (edges / f"{names[0]}.edges.png").unlink()
    os.mkfifo(edges / f"{names[0]}.edges.png")
    # in a process of its own, killed if it hangs (as the code before did, blocked opening the FIFO)
    result = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(tiles), "--out",
                             str(tmp_path / "b.jsonl"), "--save-edges", str(edges), "--low", "10", "-q",
                             "--backend", "reference"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    failed = [record for record in read_records(tmp_path / "b.jsonl") if "error" in record]
    assert [(Path(r["path"]).name, r["stage"]) for r in failed] == [(names[0], "save-edges")]
    assert (tmp_path / "snapshot.png").read_bytes() == snapshot  # the other name keeps the old map
    assert (edges / f"{names[1]}.edges.png").read_bytes() != snapshot  # --low 10: a new map
    assert not [path for path in edges.iterdir() if path.name.startswith(".")]


def test_edge_maps_saved_inside_an_input_folder_are_never_inputs(tiles, tmp_path):
    edges = tiles / "edges"
    for night in range(3):
        out = tmp_path / f"night{night}.jsonl"
        assert run(str(tiles), "--out", str(out), "--save-edges", str(edges)).exit_code == 0
        assert len(read_records(out)) == 20
    assert len(list(edges.rglob("*.edges.png"))) == 20


# ---------------------------------------------------------------- 12. --dask pointed at something else


@pytest.fixture
def http_server():
    class Silent(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_dask_pointed_at_an_http_server_fails_fast_in_one_line(tiles, tmp_path, http_server):
    pytest.importorskip("distributed")
    started = time.monotonic()
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"), "--dask", http_server, "--dask-timeout", "2")
    assert time.monotonic() - started < 30
    assert result.exit_code == 2
    assert "cannot connect to the Dask scheduler" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.fixture
def garbage_server():
    """Accepts connections and answers bytes that are not Dask's protocol (once read as a 3 EiB frame)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"\xff" * 64)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    listener.close()


def test_dask_pointed_at_a_service_answering_garbage_fails_in_one_line(tiles, tmp_path, garbage_server):
    pytest.importorskip("distributed")
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"), "--dask", garbage_server, "--dask-timeout", "3")
    assert result.exit_code == 2, result.output
    assert "cannot connect to the Dask scheduler" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_dask_timeout_must_be_positive(tiles, tmp_path):
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"), "--dask", "local:1", "--dask-timeout", "0")
    assert result.exit_code == 2 and "--dask-timeout" in result.stderr


# ---------------------------------------------------------------- 13. Parquet: resumable like JSONL


def wait_for_parts(out: Path, at_least: int) -> None:
    wait_until(lambda: out.is_dir() and len(list(out.glob("part-*.parquet"))) >= at_least,
               f"{out} reaching {at_least} parts")


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("many"), 200, size=40, seed=1)


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -9), (signal.SIGTERM, 143)])
def test_parquet_is_resumable_after_a_kill(many, tmp_path, sig, code):
    pq = pytest.importorskip("pyarrow.parquet")
    folder = many[0].parent
    out = tmp_path / "out.parquet"
    process = start(folder, out)
    wait_for_parts(out, 2)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    partial = len(pq.read_table(out))
    assert 0 < partial < 200
    assert start(folder, out, "-q").wait(timeout=300) == 0
    table = pq.read_table(out)
    assert len(table) == 200 and len(set(table.column("path").to_pylist())) == 200
    assert not [p for p in out.iterdir() if not p.name.startswith("part-")]


def test_parquet_dataset_reads_as_one_table_in_pyarrow_pandas_and_duckdb(tiles, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out.parquet"
    assert run(str(tiles), "--out", str(out), "--batch-size", "8").exit_code == 0
    jsonl = tmp_path / "same.jsonl"
    assert run(str(tiles), "--out", str(jsonl)).exit_code == 0
    expected = {r["path"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert len(list(out.glob("part-*.parquet"))) == 3  # one part per batch: 8 + 8 + 4
    table = pq.read_table(out).to_pylist()
    assert {row["path"]: row["edge_count"] for row in table} == {p: r["edge_count"] for p, r in expected.items()}
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_parquet(out)
    assert len(frame) == 20 and set(frame["path"]) == set(expected)
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"select path, edge_count, histogram from read_parquet('{out}/*.parquet')").fetchall()
    assert {path: (count, list(histogram)) for path, count, histogram in rows} == {
        p: (r["edge_count"], r["histogram"]) for p, r in expected.items()}


def test_duckdb_reads_the_paths_back_under_a_folder_named_like_a_partition_with_nightly_mds_query(tiles, tmp_path):
    """nightly.md: DuckDB takes a folder above named ``key=value`` for a column, and ``path=...``
    replaces the paths; the page's query, with ``hive_partitioning = false``, reads them as written."""
    duckdb = pytest.importorskip("duckdb")
    pytest.importorskip("pyarrow")
    out = tmp_path / "path=night1" / "out.parquet"
    out.parent.mkdir()
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    query = re.search(r"\(`(select \* from read_parquet\('out/\*\.parquet'.*?\))`", " ".join(
        (REPO / "docs" / "nightly.md").read_text(encoding="utf-8").split())).group(1)
    paths = [row["path"] for row in read_records(out)]
    assert {row[0] for row in duckdb.sql(query.replace("'out/", f"'{out}/")).project("path").fetchall()} == set(paths)
    hived = duckdb.sql(f"select path from read_parquet('{out}/*.parquet')").fetchall()  # the trap the page names
    assert {row[0] for row in hived} == {"night1"}


def test_parquet_retry_failed_drops_error_rows_and_redoes_them(tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "images"
    paths = make_images(folder, 6)
    paths[2].write_bytes(b"")
    out = tmp_path / "out.parquet"
    assert run(str(folder), "--out", str(out), "--batch-size", "2").exit_code == 1
    make_images(folder, 6)
    assert run(str(folder), "--out", str(out)).exit_code == 1
    for part in out.iterdir():  # a dataset its owner made private: the rewritten part stays so
        part.chmod(0o600)
    assert run(str(folder), "--out", str(out), "--retry-failed").exit_code == 0
    records = by_path(read_records(out))
    assert len(records) == 6 and all("error" not in r for r in records.values())
    assert [oct(part.stat().st_mode & 0o777) for part in sorted(out.iterdir())][:3] == ["0o600"] * 3


@pytest.mark.parametrize("how", [[], ["--retry-failed"], ["--overwrite"]])
def test_the_new_parts_of_a_dataset_its_owner_made_private_stay_private(tmp_path, umask, how):
    """A JSONL output keeps its permissions whatever a run adds to it; a dataset's new parts were 0666
    less the umask, so the records that a resume, a --retry-failed or an --overwrite wrote into a
    dataset whose parts were made private (0600) could be read, or under umask 002 written, by others."""
    pytest.importorskip("pyarrow")
    umask(0o002)
    folder = tmp_path / "images"
    make_images(folder, 4)[3].write_bytes(b"")  # an error record, for --retry-failed to redo
    out = tmp_path / "out.parquet"
    assert run(str(folder), "--out", str(out), "--batch-size", "2").exit_code == 1
    for part in out.iterdir():
        part.chmod(0o600)
    make_images(folder, 6)  # two more images, and the failed one mended
    assert run(str(folder), "--out", str(out), *how).exit_code == (0 if how else 1)  # (a resume keeps the error)
    assert len(read_records(out)) == 6  # (three of them in a new part: a part is never appended to)
    assert {oct(part.stat().st_mode & 0o777) for part in out.iterdir()} == {"0o600"}


def test_a_datasets_new_part_takes_the_permissions_of_its_last_part_not_its_first(tmp_path, umask):
    """The docs say the last part: the one written most recently, which the owner made private after
    the first run had left its parts readable by all."""
    pytest.importorskip("pyarrow")
    umask(0o022)
    folder = tmp_path / "images"
    make_images(folder, 4)
    out = tmp_path / "out.parquet"
    assert run(str(folder), "--out", str(out), "--batch-size", "2").exit_code == 0
    (out / "part-000001.parquet").chmod(0o600)  # (part-000000 stays 0644)
    make_images(folder, 6)
    assert run(str(folder), "--out", str(out), "--batch-size", "2").exit_code == 0
    assert oct((out / "part-000002.parquet").stat().st_mode & 0o777) == "0o600"


def test_overwrite_of_a_dataset_whose_last_part_cannot_be_read(tmp_path):
    """A dataset's last part that is gone when its permissions are read (a link left dangling, a part
    removed between the listing and the stat) refused --overwrite with "cannot write OUT: No such file
    or directory", which removes such a part: its new parts take the umask's permissions instead."""
    pytest.importorskip("pyarrow")
    folder = tmp_path / "images"
    make_images(folder, 3)
    out = tmp_path / "out.parquet"
    assert run(str(folder), "--out", str(out), "--batch-size", "2").exit_code == 0
    (out / "part-000009.parquet").symlink_to(tmp_path / "gone.parquet")
    result = run(str(folder), "--out", str(out), "--batch-size", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(part.name for part in out.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    assert len(read_records(out)) == 3


def _a_dataset_whose_first_and_last_parts_failed(tmp_path) -> tuple[Path, list[Path], Path]:
    """6 images in a Parquet dataset of parts of 2, images 0 and 5 empty files (error rows in its
    first and last parts): their folder, the images and the dataset."""
    folder = tmp_path / "images"
    paths = make_images(folder, 6)
    paths[0].write_bytes(b"")
    paths[5].write_bytes(b"")
    out = tmp_path / "out.parquet"
    assert run(str(folder), "--out", str(out), "--batch-size", "2").exit_code == 1
    return folder, paths, out


def test_a_parquet_retry_failed_that_cannot_rewrite_every_part_changes_none(tmp_path, monkeypatch):
    """--retry-failed rewrites each part that holds error rows; the disk filling up at the second such
    part used to leave the first rewritten (its error rows gone) while the run was refused (exit 2,
    "before anything was written"). Now every part is written aside first: the dataset is as it was."""
    pq = pytest.importorskip("pyarrow.parquet")
    folder, _, out = _a_dataset_whose_first_and_last_parts_failed(tmp_path)
    before = {part.name: part.read_bytes() for part in out.iterdir()}
    failed_in = [name for name in before if any(pq.read_table(out / name).column("error").to_pylist())]
    assert len(failed_in) == 2  # the error rows are in two parts
    make_images(folder, 6)
    written = []
    write_table = pq.write_table

    def disk_fills_up(*args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(write_table(*args, **kwargs))

    monkeypatch.setattr(pq, "write_table", disk_fills_up)
    result = run(str(folder), "--out", str(out), "--retry-failed")
    assert written and result.exit_code == 2 and "No space left on device" in result.stderr
    assert {part.name: part.read_bytes() for part in out.iterdir()} == before  # no part changed, no temporary
    monkeypatch.undo()
    assert run(str(folder), "--out", str(out), "--retry-failed").exit_code == 0
    assert len(read_records(out)) == 6 and all("error" not in r for r in read_records(out))


def _retry_failed_with_a_part_changed(tmp_path, monkeypatch, which: int, change):
    """:func:`_a_dataset_whose_first_and_last_parts_failed`, then ``--retry-failed`` with
    ``change(part)`` done to part ``which`` once --retry-failed listed the parts to rewrite. The
    run's result, the dataset, the images whose results that part held and the dataset's files
    (name: bytes) just after the change."""
    pq = pytest.importorskip("pyarrow.parquet")
    from gpu_pipeline.outputs import parquet

    folder, paths, out = _a_dataset_whose_first_and_last_parts_failed(tmp_path)
    make_images(folder, 6)
    listed, drop = parquet.parts, parquet.drop_error_rows
    held, changed = [], {}

    def listed_then_changed(where: Path) -> list[Path]:
        found = listed(where)
        table = pq.read_table(found[which])
        assert any(table.column("error").to_pylist())  # (a part --retry-failed rewrites)
        held.extend(Path(path).name for path, error in zip(*table.select(["path", "error"]).to_pydict().values())
                    if error is None)
        change(found[which])
        changed.update({entry.name: entry.read_bytes() for entry in where.iterdir()})
        return found

    def drop_with_a_part_changed(*args) -> None:
        monkeypatch.setattr(parquet, "parts", listed_then_changed)
        drop(*args)
        monkeypatch.setattr(parquet, "parts", listed)

    monkeypatch.setattr(parquet, "drop_error_rows", drop_with_a_part_changed)
    result = run(str(folder), "--out", str(out), "--retry-failed")
    monkeypatch.undo()
    return result, out, paths, held, changed


def test_a_parquet_retry_failed_refuses_a_part_removed_since_the_listing(tmp_path, monkeypatch):
    """--retry-failed lists the dataset's parts, then reads and stats each: one removed in between (by
    another program) refused the run, "cannot write OUT: No such file or directory" (exit 2), naming
    neither the part nor what happened; skipped, its results were lost with exit 0, the resume holding
    them recorded. It is refused naming the part, nothing written, and the next run redoes its images."""
    result, out, paths, lost, kept = _retry_failed_with_a_part_changed(tmp_path, monkeypatch, 0, Path.unlink)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "part-000000.parquet was removed while this run read the dataset; run the command again" in result.stderr
    assert {entry.name: entry.read_bytes() for entry in out.iterdir()} == kept  # (no temporary left either)
    assert run(str(paths[0].parent), "--out", str(out), "--retry-failed").exit_code == 0
    records = read_records(out)
    assert lost and sorted(Path(r["path"]).name for r in records) == sorted(path.name for path in paths)
    assert all("error" not in r for r in records)


def test_a_parquet_retry_failed_names_a_part_replaced_since_the_listing(tmp_path, monkeypatch):
    """A part another program renamed into place meanwhile, no Parquet file, ended --retry-failed with
    pyarrow's traceback (ArrowInvalid, exit 1). Now it is refused as a resume refuses such a part,
    naming it, and every part is as it was (the part rewritten aside before it goes)."""
    def replaced(part: Path) -> None:
        (tmp_path / "theirs").write_bytes(b"not parquet at all")
        os.replace(tmp_path / "theirs", part)

    result, out, _, _, kept = _retry_failed_with_a_part_changed(tmp_path, monkeypatch, -1, replaced)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "part-000001.parquet is not a readable Parquet part (" in result.stderr
    assert {entry.name: entry.read_bytes() for entry in out.iterdir()} == kept  # (no temporary left either)


def test_an_old_single_file_parquet_output_is_refused(tiles, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "old.parquet"
    out.write_bytes(b"PAR1 pretend\n")
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2 and "not a gpu-pipeline Parquet dataset" in result.stderr
    assert out.read_bytes() == b"PAR1 pretend\n"


# ---------------------------------------------------------------- 15. SIGINT during start-up


def test_an_interrupt_python_wraps_during_the_imports_exits_130_quietly():
    """Ctrl-C landing in a class's ``__set_name__`` (a dataclass's field, as a module is imported)
    reaches Python 3.11 as a RuntimeError caused by the KeyboardInterrupt: CI's start-up test saw
    that traceback and exit 1. (Python 3.12 no longer wraps it.)"""
    script = ("import gpu_pipeline.cli.app\n"
              "class Interrupted:\n"
              "    def __set_name__(self, owner, name):\n"
              "        raise KeyboardInterrupt\n"
              "class Importing:\n"
              "    field = Interrupted()\n")
    done = python_c(script)
    assert (done.returncode, done.stderr) == (130, "")
    done = python_c(script.replace("raise KeyboardInterrupt", "raise ValueError('a bug')"))
    assert done.returncode == 1 and "ValueError: a bug" in done.stderr  # any other error keeps its traceback


def test_a_sigterm_python_wraps_in_a_commands_own_imports_exits_143_quietly():
    """The same once a command runs, where SIGTERM and SIGINT raise the command line's Interrupted: a
    command's lazy import defining a dataclass as the signal lands gave the wrapping RuntimeError's
    traceback and exit 1 on Python 3.11."""
    script = ("import os, signal, sys, time\n"
              "import gpu_pipeline.cli.app\n"
              "cli = sys.modules['gpu_pipeline.cli.app']  # (the package's 'app' is the typer app)\n"
              "class Signalled:\n"
              "    def __set_name__(self, owner, name):\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "        time.sleep(30)  # the handler raises here\n"
              "def command():\n"
              "    class Importing:\n"
              "        field = Signalled()\n"
              "cli.app = command\n"
              "cli.main()\n")
    done = python_c(script)
    assert (done.returncode, done.stderr) == (143, "")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3])
def test_sigint_during_start_up_exits_130_quietly(tiles, tmp_path, delay):
    """Ctrl-C ``delay`` s after the command line's own code began (its imports, then discovery, the
    output's checks, the backend): exit 130, no traceback. Counted from that moment, not from the
    process's start: on a loaded machine fixed delays landed while the interpreter itself was still
    starting (CPython's traceback, no code of ours yet), and the test skipped."""
    marker = tmp_path / "started"
    env = dict(os.environ, **sitecustomize(tmp_path / "site", STARTED_MARKER), STARTED_MARK=str(marker))
    process = subprocess.Popen([sys.executable, "-m", "gpu_pipeline.cli", "run", str(tiles), "--out",
                                str(tmp_path / "o.jsonl"), "--backend", "reference", "-q"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_until(lambda: marker.exists() or process.poll() is not None, "the command line's start")
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert marker.exists(), f"the command line's code never ran: {stderr}"
    if process.returncode == 0:
        pytest.skip(f"the run finished within {delay} s of its start, before the signal")
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "Aborted" not in stderr




@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_sigint_a_shell_ignores_still_stops_the_start_up(tiles, tmp_path, delay):
    """A script's background job inherits SIGINT ignored (the shell's doing, and ``kill -INT`` still
    stops it: ``errors.ignored_on_purpose``). Python leaves it ignored, and until the command line set
    its own handler, after its imports, a SIGINT was lost: the run went on to the end, exit 1 (found
    by the race soak: ``kill -INT`` 0.1-0.25 s into a background run)."""
    marker = tmp_path / "started"
    env = dict(os.environ, **sitecustomize(tmp_path / "site", STARTED_MARKER), STARTED_MARK=str(marker))
    process = subprocess.Popen([sys.executable, "-m", "gpu_pipeline.cli", "run", str(tiles), "--out",
                                str(tmp_path / "o.jsonl"), "--backend", "reference", "-q"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_until(lambda: marker.exists() or process.poll() is not None, "the command line's start")
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert marker.exists(), f"the command line's code never ran: {stderr}"
    assert (process.returncode, stderr) == (130, "")


#: A ``sitecustomize`` that sends the command line SIGTERM as it calls ``gpu_pipeline.engine.job.SIGNAL_IN``.
SIGNAL_IN_START_UP = """
import os, signal, time
with open("/proc/self/cmdline", "rb") as cmdline:
    command_line = b"gpu_pipeline.cli" in cmdline.read()  # (not its fork server or decode processes)
if command_line:
    from gpu_pipeline.engine import job

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the start-up handler raises here

    setattr(job, os.environ["SIGNAL_IN"], signalled)
"""


@pytest.mark.parametrize("step", ["write_settings", "warm_up_backend"])
def test_a_stop_signal_before_the_run_begins_stops_the_fork_server_quietly(tiles, tmp_path, step):
    """SIGTERM as the settings are written or the kernels load, the decode processes' fork server
    already started (it imports meanwhile): exit 143 and nothing on stderr, under ``python -X dev``
    too. The fork server, which no run had taken over yet, was left to the interpreter's exit, which
    said "ResourceWarning: subprocess N is still running" and "unclosed <socket.socket ...>" (found
    by the race soak: Ctrl-C at 0.5-0.7 s into a run of 2,000 tiles)."""
    from gpu_pipeline.inputs.processes import available

    if not available():
        pytest.skip("decode processes are not available here")
    env = dict(os.environ, **sitecustomize(tmp_path / "site", SIGNAL_IN_START_UP), SIGNAL_IN=step)
    done = subprocess.run([sys.executable, "-X", "dev", "-m", "gpu_pipeline.cli", "run", str(tiles), "--out",
                           str(tmp_path / "o.jsonl"), "--backend", "numba", "--decode", "processes", "--workers", "2",
                           "-q"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert (done.returncode, done.stderr) == (143, "")

# ---------------------------------------------------------------- the CSV, read by other tools


def test_csv_columns_hold_what_their_header_says(tmp_path):
    folder = tmp_path / "images"
    make_images(folder, 6, size=32, seed=5)
    (folder / "broken.png").write_bytes(b"not a png")
    jsonl, table = tmp_path / "out.jsonl", tmp_path / "out.csv"
    assert run(str(folder), "--out", str(jsonl)).exit_code == 1
    assert run(str(folder), "--out", str(table)).exit_code == 1
    expected = {r["path"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    with open(table, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert len(rows) == len(expected) == 7
    for row in rows:
        record = expected[row["path"]]
        if "error" in record:
            assert (row["stage"], row["error"]) == (record["stage"], record["error"])
            assert row["edge_count"] == row["edge_density"] == row["histogram"] == ""
            continue
        for column in ("width", "height", "bands", "edge_count"):
            assert int(row[column]) == record[column], column
        assert float(row["edge_density"]) == record["edge_density"]
        assert float(row["edge_density"]) == round(int(row["edge_count"]) / (int(row["width"]) * int(row["height"])), 6)
        assert (row["backend"], row["label"]) == (record["backend"], record["label"])
        assert [int(v) for v in row["histogram"].split()] == record["histogram"]
        assert row["stage"] == row["error"] == row["path_bytes"] == ""
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_csv(table, keep_default_na=False)
    assert list(frame.columns) == list(COLUMNS)
    good = frame[frame["error"] == ""]
    for _, row in good.iterrows():
        assert int(row["edge_count"]) == expected[row["path"]]["edge_count"]
        assert float(row["edge_density"]) == expected[row["path"]]["edge_density"]


def test_the_csv_and_parquet_columns_are_those_nightly_md_lists(tmp_path):
    """docs/nightly.md, "Output formats": the CSV header in the order it lists, and the Parquet dataset
    with the same columns, `histogram` a fixed-size list of 256 int64."""
    doc = " ".join((REPO / "docs" / "nightly.md").read_text(encoding="utf-8").split())
    listed = re.search(r"one row per image with the columns `([^`]+)`", doc).group(1).split(", ")
    folder = tmp_path / "images"
    make_images(folder, 2)
    assert run(str(folder), "--out", str(tmp_path / "out.csv")).exit_code == 0
    assert (tmp_path / "out.csv").read_text().splitlines()[0].split(",") == listed
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    assert run(str(folder), "--out", str(tmp_path / "out.parquet")).exit_code == 0
    schema = pq.read_table(tmp_path / "out.parquet").schema
    assert schema.names == listed
    assert schema.field("histogram").type == pa.list_(pa.int64(), 256)


class Killed(BaseException):
    """Stands for SIGKILL arriving in the middle of a write."""


def a_result(path: str) -> dict:
    return {"path": path, "width": 2, "height": 2, "bands": 1, "backend": "reference", "histogram": [4] + [0] * 255,
            "edge_count": 0, "edge_density": 0.0, "label": "dark-smooth"}


def test_a_parquet_part_killed_while_being_written_is_never_read(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out.parquet"
    sink = open_sink(str(out), resume=False)
    sink.write([a_result("/a.png")])
    real_write_table = pq.write_table

    def torn(table, where, **options):
        real_write_table(table, where, **options)
        where.flush()
        where.truncate(100)  # what a kill mid-write leaves
        raise Killed

    monkeypatch.setattr(pq, "write_table", torn)
    with pytest.raises(Killed):
        sink.write([a_result("/b.png")])
    monkeypatch.undo()
    assert pq.read_table(out).column("path").to_pylist() == ["/a.png"]
    plan = inspect_output(str(out))
    assert plan.existing.succeeded == {"/a.png"}
    plan.open().write([a_result("/b.png")])
    assert sorted(pq.read_table(out).column("path").to_pylist()) == ["/a.png", "/b.png"]
    assert sorted(p.name for p in out.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]


def test_parts_numbered_past_a_million_keep_their_order_and_the_next_number(tmp_path):
    """Sorted by name, part-1000000 comes before part-999999: a resume read them out of order and
    numbered its first part 1000000, which replaced the part of that name (a batch of records lost)."""
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    out.mkdir()
    sink = ParquetSink(str(out), 999_999)
    sink.write([a_result("/a.png")])
    sink.write([a_result("/b.png")])
    plan = inspect_output(str(out))
    assert plan.next_part == 1_000_001 and plan.existing.succeeded == {"/a.png", "/b.png"}
    assert [record["path"] for record in read_records(out)] == ["/a.png", "/b.png"]


def test_a_batch_of_no_records_writes_no_parquet_part(tmp_path):
    """A part per batch, but none for a batch without records: an empty part took a number, and a
    folder of empty parts read as a dataset of nothing."""
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    out.mkdir()
    with ParquetSink(str(out), 0) as sink:
        sink.write([])
        sink.write([{"path": "/a.png", "stage": "decode", "error": "bad"}])
    assert [path.name for path in out.iterdir()] == ["part-000000.parquet"]


def test_a_parquet_part_that_cannot_be_written_leaves_no_temporary(tmp_path, monkeypatch):
    """A full disk ends the run leaving only whole parts: the hidden part it was writing stayed in
    the dataset folder until the next run."""
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out.parquet"
    sink = open_sink(str(out), resume=False)
    sink.write([a_result("/a.png")])
    real_write_table = pq.write_table

    def full(table, where, **options):
        real_write_table(table, where, **options)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(SinkWriteError, match="No space left on device"):
        sink.write([a_result("/b.png")])
    assert sorted(p.name for p in out.iterdir()) == ["part-000000.parquet"]


def test_a_parquet_part_that_cannot_be_renamed_into_place_leaves_no_temporary(tmp_path, monkeypatch):
    """The rename that puts a written part in place can fail too: the same refusal, naming the output,
    and the hidden part goes, as when its writing fails."""
    pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out.parquet"
    sink = open_sink(str(out), resume=False)
    sink.write([a_result("/a.png")])

    def refused(source, target):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(SinkWriteError, match=f"^cannot write {re.escape(str(out))}: Permission denied$") as info:
        sink.write([a_result("/b.png")])
    assert info.value.errno == errno.EACCES
    assert sorted(p.name for p in out.iterdir()) == ["part-000000.parquet"]


def test_retry_failed_removes_a_part_left_without_rows(tmp_path):
    """A part that held only error rows goes: rewritten, it stayed behind as a part of no rows."""
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "images"
    for path in make_images(folder, 2):
        path.write_bytes(b"")
    out = tmp_path / "out.parquet"
    assert run(str(folder), "--out", str(out)).exit_code == 1
    make_images(folder, 2)  # the broken files are repaired
    assert run(str(folder), "--out", str(out), "--retry-failed").exit_code == 0
    assert [pq.read_metadata(part).num_rows for part in out.iterdir()] == [2]
    assert len(read_records(out)) == 2


def test_a_hidden_file_of_the_users_in_a_dataset_folder_is_no_part_of_ours(tiles, tmp_path):
    """Only ``.part-*.tmp`` files are our temporaries: another hidden ``.part-`` file is the user's,
    kept on resume and never deleted by --overwrite."""
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    (out / ".part-notes.txt").write_text("mine")
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    result = run(str(tiles), "--out", str(out), "--overwrite")
    assert result.exit_code == 2 and "did not write (.part-notes.txt)" in result.stderr, result.output
    assert (out / ".part-notes.txt").read_text() == "mine" and len(read_records(out)) == 20


@pytest.mark.parametrize("theirs", ["data.parquet", "notes.txt", "part-0.parquet"])
def test_a_resume_into_a_dataset_folder_holding_files_we_did_not_write_is_refused(tiles, tmp_path, theirs):
    """The output folder replaced by someone else's dataset (its settings record left beside it): the
    resume wrote its parts among their files, and pyarrow then read the folder as one table of their
    schema, our columns gone. A hidden file of the user's is no part of the dataset and stays allowed."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out.parquet"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    shutil.rmtree(out)
    out.mkdir()
    pq.write_table(pa.table({"path": ["/theirs.png"], "score": [0.5]}), out / theirs)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"{out} holds files gpu-pipeline did not write ({theirs}); resuming would mix" in result.stderr, result.stderr
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_a_dataset_folder_with_many_files_we_did_not_write_is_refused_naming_three(tiles, tmp_path):
    """The refusal names the first three of them in order, and no more: one line, however full the folder."""
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    for name in ("d.txt", "b.txt", "a.txt", "c.txt"):
        (out / name).write_text("mine")
    for overwrite in ([], ["--overwrite"]):
        result = run(str(tiles), "--out", str(out), *overwrite)
        assert result.exit_code == 2 and "did not write (a.txt, b.txt, c.txt);" in result.stderr, result.output
        assert len(result.stderr.splitlines()) == 1

def test_the_hidden_part_a_killed_run_left_is_removed_on_resume(tiles, tmp_path):
    """nightly.md: a kill leaves only whole parts, and the hidden leftover is removed on resume. The
    kill tests cannot see it go: the resume's first part takes the killed part's name, and its own
    temporary writes over the leftover. Here the leftover has a name no part of the resume takes."""
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out.parquet"
    first = sorted(tiles.iterdir())[:4]
    assert run(*map(str, first), "--out", str(out)).exit_code == 0
    (out / ".part-000007.parquet.tmp").write_bytes(b"PAR1 half a part")  # killed mid-write, seven parts later
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    assert len(pq.read_table(out)) == 20


@pytest.mark.parametrize("name", ["run-2026-12-05T01:15:00.parquet", "s3:x.parquet", "file:y.parquet", b"e\xff.parquet"])
def test_a_parquet_out_named_like_a_uri_or_not_utf8_is_a_folder_here(tiles, tmp_path, monkeypatch, name):
    """pyarrow reads a name given as text as a URI ("run-2026-12-05T01" a file system) and wants it
    UTF-8: such an --out once crashed each run (a traceback, an empty dataset that never filled)."""
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.chdir(tmp_path)
    out = os.fsdecode(name)
    assert run(str(tiles), "--out", out).exit_code == 0
    assert run(str(tiles), "--out", out).exit_code == 0  # and it resumes
    assert len(read_records(out)) == 20
    parts = sorted(Path(out).glob("part-*.parquet"))
    assert sum(len(pq.read_table(part.open("rb"))) for part in parts) == 20


def test_the_documented_duckdb_query_reads_the_paths_under_a_folder_named_like_a_partition(tiles, tmp_path):
    """docs/nightly.md's query: DuckDB's hive partitioning off, or a folder above named ``path=x``
    makes every path read "x"."""
    duckdb = pytest.importorskip("duckdb")
    pytest.importorskip("pyarrow")
    out = tmp_path / "path=x" / "out.parquet"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    query = (Path(__file__).parent.parent / "docs" / "nightly.md").read_text().split("(`select * from ")[1].split("`")[0]
    paths = duckdb.sql("select path from " + query.replace("'out/", f"'{out}/")).fetchall()
    assert sorted(path for (path,) in paths) == sorted(str(p) for p in tiles.iterdir())


def test_overwrite_never_deletes_files_we_did_not_write_in_a_dataset_folder(tiles, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = run(str(tiles), "--out", str(out), "--overwrite")
    assert result.exit_code == 2 and "did not write" in result.stderr
    (tmp_path / "out.parquet.settings.json").unlink()
    result = run(str(tiles), "--out", str(out))  # its advice must not be an --overwrite that cannot help
    assert result.exit_code == 2 and "no settings record" in result.stderr
    assert "only when it holds nothing but gpu-pipeline's Parquet parts" in result.stderr, result.stderr
    assert (out / "notes.txt").read_text() == "mine" and len(read_records(out)) == 20


def test_our_output_with_an_image_name_inside_an_input_folder_is_never_an_input(tiles):
    out = tiles / "results.png"
    assert run(str(tiles), "--out", str(out), "--format", "jsonl").exit_code == 0
    result = runner.invoke(app, ["run", str(tiles), "--out", str(out), "--format", "jsonl", "--backend", "reference"])
    assert result.exit_code == 0 and "20 of 20 images already recorded" in result.stderr
    assert str(out) not in by_path(read_records(out))


# ---------------------------------------------------------------- names in messages: one line, never markup


def test_a_refusal_naming_a_file_with_a_newline_is_one_line(tiles, tmp_path):
    out = tmp_path / "o\nut.jsonl"
    out.write_text("mine\n")
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "o\\nut.jsonl exists but has no settings record" in result.stderr
    assert out.read_text() == "mine\n"


@pytest.mark.parametrize("name", ["[/b]out.jsonl", "[bold]out.jsonl"])
def test_names_that_look_like_markup_are_printed_as_they_are(tiles, tmp_path, name):
    """The console prints rich markup; a name is not markup (``[/b]`` raised after the run)."""
    out = tmp_path / name
    first = runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "reference"])
    assert first.exit_code == 0, first.output
    assert f"results: {out}\n" in first.stderr
    again = runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "reference"])
    assert again.exit_code == 0, again.output
    assert f"resuming {out}: 20 of 20 images already recorded" in again.stderr


def test_records_to_a_stdout_without_a_binary_buffer_are_written_as_text(monkeypatch):
    """A notebook's stdout has no .buffer: the UTF-8 bytes path raised AttributeError there."""
    import io

    from gpu_pipeline.outputs.lines import LineSink

    stdout = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    sink = LineSink("-", "jsonl")
    sink.write([a_result("/é.png")])
    assert json.loads(stdout.getvalue())["path"] == "/é.png"


def test_a_sigterm_while_the_backend_closes_gets_the_summary_and_leaves_no_lock(tiles, tmp_path):
    """A Dask cluster takes about half a second to close after the last record: a SIGTERM then ended
    the process by the default action (no summary, a stale lock), a SIGINT with no summary."""
    out = tmp_path / "out.jsonl"
    script = f"""
import os, signal, sys
from gpu_pipeline.backends import registry
from gpu_pipeline.backends.reference import ReferenceBackend

class Closing(ReferenceBackend):
    name = "closing"
    def close(self):
        os.kill(os.getpid(), signal.SIGTERM)  # as the cluster closes

registry.register("closing", lambda: Closing)
sys.argv = ["gpu-pipeline", "run", {str(tiles)!r}, "--out", {str(out)!r}, "--backend", "closing"]
from gpu_pipeline.cli.app import main
main()
"""
    done = python_c(script, timeout=300)
    assert done.returncode == 143, done.stderr
    assert "20 images with backend closing" in done.stderr
    assert len(read_records(out)) == 20 and not lock_path(str(out)).exists()


def test_a_pyarrow_that_cannot_read_back_error_rows_is_refused_before_writing(tiles, tmp_path, monkeypatch):
    """pyarrow before 26 writes an error row's null histogram (a fixed-size list) but cannot read it
    back: --retry-failed ended in a traceback and pandas.read_parquet failed (found on Python 3.10,
    whose newest pyarrow is 25)."""
    pyarrow = pytest.importorskip("pyarrow")
    monkeypatch.setattr(pyarrow, "__version__", "25.0.1")
    out = tmp_path / "out.parquet"
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "Parquet output needs pyarrow 26 or later, found 25.0.1" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_output_whose_settings_record_has_no_format_resumes(tiles, tmp_path, suffix):
    """Versions before 2026-12-01 chose the format as today (--format or the name) and did not record
    it: "changed: format" refused every resume of months of their outputs, and a CSV was said to be
    "written as jsonl"."""
    first = sorted(tiles.iterdir())[:8]
    out = tmp_path / f"out{suffix}"
    assert run(*map(str, first), "--out", str(out)).exit_code == 0
    record = tmp_path / f"out{suffix}.settings.json"
    earlier = json.loads(record.read_text())
    del earlier["format"]
    record.write_text(json.dumps(earlier, indent=2) + "\n")
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert sorted(by_path(read_records(out))) == sorted(str(p) for p in tiles.iterdir())
    assert json.loads(record.read_text())["format"] == suffix[1:]  # recorded from now on
    del earlier["pipeline"]["low_threshold"]
    record.write_text(json.dumps({**earlier, "pipeline": {**earlier["pipeline"], "low_threshold": 50.0}}))
    changed = run(str(tiles), "--out", str(out))
    assert changed.exit_code == 2 and "changed: pipeline" in changed.stderr


#: The settings record of a run with every default, as versions since 2026-12-01 write it (earlier
#: ones, the same without "format"), written out here rather than taken from this version's run.
DEFAULT_SETTINGS_RECORD = {
    "pipeline": {"low_threshold": 100.0, "high_threshold": 200.0, "l2_gradient": False, "blur_ksize": 5},
    "decode": {"bands": None, "stretch": "percentile", "max_pixels": 1000000000},
    "model": None,
    "format": "jsonl",
}


@pytest.mark.parametrize("since", ["2026-12-01", "2026-11-26"])
def test_a_nightly_output_of_an_earlier_version_resumes_after_an_upgrade(tiles, tmp_path, since):
    """nightly.md: the same command picks up where it stopped (only going back to an older version
    is not supported). A default changed (a threshold, the stretch, the pixel limit) or a key renamed
    in the settings record refuses every output written before the upgrade as "other settings"; the
    tests that take the record from this version's own run cannot see it."""
    first = sorted(tiles.iterdir())[:8]
    out = tmp_path / "nightly.jsonl"
    assert run(*map(str, first), "--out", str(out)).exit_code == 0
    before = out.read_bytes()
    earlier = {key: value for key, value in DEFAULT_SETTINGS_RECORD.items()
               if since >= "2026-12-01" or key != "format"}
    (tmp_path / "nightly.jsonl.settings.json").write_text(json.dumps(earlier, indent=2) + "\n")
    result = runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "reference"])
    assert result.exit_code == 0, result.output
    assert f"resuming {out}: 8 of 20 images already recorded" in result.stderr
    assert out.read_bytes().startswith(before)
    assert sorted(by_path(read_records(out))) == sorted(str(p) for p in tiles.iterdir())


def test_an_output_whose_settings_record_has_no_format_is_not_resumed_in_another(tiles, tmp_path):
    """Without a recorded format, this run's was assumed: a CSV resumed with --format jsonl was read
    as JSON lines (no record readable) and rewritten from its first byte, without a word (review)."""
    first = sorted(tiles.iterdir())[:5]
    out = tmp_path / "out.csv"
    assert run(*map(str, first), "--out", str(out)).exit_code == 0
    record = tmp_path / "out.csv.settings.json"
    earlier = json.loads(record.read_text())
    del earlier["format"]
    record.write_text(json.dumps(earlier))
    before = out.read_bytes()
    result = run(str(tiles), "--out", str(out), "--format", "jsonl")
    assert result.exit_code == 2 and "was written as csv, not jsonl" in result.stderr, result.stderr
    assert out.read_bytes() == before


def test_a_single_file_parquet_of_an_early_version_is_named_as_such(tiles, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    assert run(str(tiles), "--out", str(tmp_path / "o.jsonl")).exit_code == 0
    earlier = json.loads((tmp_path / "o.jsonl.settings.json").read_text())
    del earlier["format"]
    out.write_bytes(b"PAR1 an early version's single Parquet file PAR1")
    (tmp_path / "out.parquet.settings.json").write_text(json.dumps(earlier))
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2 and "is a single Parquet file, not a gpu-pipeline Parquet dataset folder" in result.stderr


def test_an_empty_file_named_as_a_parquet_output_is_named_as_such(tiles, tmp_path):
    """It said "cannot write out.parquet: File exists"; --overwrite makes the dataset folder."""
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    out.touch()
    result = run(str(tiles), "--out", str(out))
    assert result.exit_code == 2
    assert result.stderr == (f"gpu-pipeline: error: {out} is an empty file, not a gpu-pipeline Parquet dataset "
                             "folder; use --overwrite or another --out\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet", "tiles"] and out.is_file()  # (nothing written)
    assert run(str(tiles), "--out", str(out), "--overwrite").exit_code == 0
    assert out.is_dir() and len(read_records(out)) == len(list(tiles.iterdir()))


def test_a_folder_that_cannot_be_written_is_named_not_a_lock_to_remove(tmp_path, monkeypatch):
    """`cd / && gpu-pipeline run` as a user: "cannot use /results.jsonl.lock ...: Permission denied;
    remove it", about a lock that did not exist. (Root passes permission checks: os.open is made to
    refuse here as it refuses a user.)"""
    from gpu_pipeline.outputs import plan

    real_open = os.open

    def refused(path, flags, *args):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(plan.os, "open", refused)
    with pytest.raises(plan.SinkError, match=r"cannot write in .*, where the output and its lock go: Permission denied; "
                                             r"use another --out"):
        plan.OutputLock(str(tmp_path / "results.jsonl")).acquire()
    (tmp_path / "results.jsonl.lock").write_text("")  # there: then it is the lock that cannot be used
    with pytest.raises(plan.SinkError, match="the lock of the output: Permission denied; remove it"):
        plan.OutputLock(str(tmp_path / "results.jsonl")).acquire()


# ---------------------------------------------------------------- --dry-run: tonight's command, checked by day
def _everything_under(folder: Path) -> dict[str, tuple[int, bytes] | None]:
    """Each file under ``folder`` with its modification time in ns and its bytes, and each folder (None:
    a dry run takes the output's lock for its checks, as a run does, so its folder's time changes)."""
    return {str(path.relative_to(folder)): None if path.is_dir() else (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(folder.rglob("*"))}


def test_a_dry_run_says_what_the_run_would_do_and_writes_nothing(tmp_path):
    """nightly.md: `--dry-run` runs every check of the run and prints the images it would process out
    of those found, and what the output already holds of them; nothing is written, not even the
    output's folder, its settings record or its lock; exit 0. Then the same night resumed, retried
    and overwritten, each said as the run would do it."""
    tiles = tmp_path / "in"
    make_images(tiles, 6)
    (tiles / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "results" / "nightly.jsonl"
    before = _everything_under(tmp_path)
    result = run(str(tiles), "--out", str(out), "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout == ("dry run: 7 of 7 images to process with backend reference into "
                             f"{out} (a new output); nothing written\n")
    assert _everything_under(tmp_path) == before  # (no results/ folder, no lock, no settings)

    assert run(str(tiles), "--out", str(out)).exit_code == 1  # the night runs: 6 results, 1 error
    make_images(tiles, 8, seed=1, names=[f"new{index}.png" for index in range(8)])  # 8 more arrive
    before = _everything_under(tmp_path)
    lines = {}
    for extra in ([], ["--retry-failed"], ["--overwrite"]):
        result = run(str(tiles), "--out", str(out), "--dry-run", *extra)
        assert result.exit_code == 0 and result.stderr == "", result.output
        lines[" ".join(extra)] = result.stdout
    assert _everything_under(tmp_path) == before  # (the output, its settings, no lock: as they were)
    assert lines == {
        "": f"dry run: 8 of 15 images to process with backend reference into {out}; 7 already recorded there "
            "(1 as errors: --retry-failed redoes them); nothing written\n",
        "--retry-failed": f"dry run: 9 of 15 images to process with backend reference into {out}, 1 of them recorded "
                          "as errors before (--retry-failed); 6 already recorded there; nothing written\n",
        "--overwrite": f"dry run: 15 of 15 images to process with backend reference into {out} (--overwrite: its "
                       "records replaced); nothing written\n"}
    assert run(str(tiles), "--out", "-", "--dry-run").stdout == (
        "dry run: 15 of 15 images to process with backend reference into standard output; nothing written\n")
    shown = re.search(r"^(dry run: .*)$", (REPO / "docs" / "nightly.md").read_text(encoding="utf-8"), re.MULTILINE)[1]

    def shape(line: str, out: str, backend: str) -> str:
        return re.sub(r"\d[\d,]*", "N", line.replace(out, "OUT").replace(f"backend {backend}", "backend B"))

    assert shape(shown, "/data/results/nightly.jsonl", "numba") == shape(lines[""].strip(), str(out), "reference")


def test_a_dry_run_is_refused_where_the_run_would_be(tmp_path):
    """The point of checking by day: a dry run refuses (exit 2, the run's own line, nothing written)
    what the night's run would refuse: other settings than the output's, another run writing it,
    a backend that cannot start."""
    tiles = tmp_path / "in"
    make_images(tiles, 3)
    out = tmp_path / "out.jsonl"
    assert run(str(tiles), "--out", str(out)).exit_code == 0
    before = _everything_under(tmp_path)
    other = run(str(tiles), "--out", str(out), "--low", "50", "--dry-run")
    assert other.exit_code == 2 and other.stdout == ""
    assert other.stderr == run(str(tiles), "--out", str(out), "--low", "50").stderr
    assert "--low 100 -> 50" in other.stderr
    with OutputLock(str(out)):  # another run holds the output
        busy = run(str(tiles), "--out", str(out), "--dry-run")
    assert busy.exit_code == 2 and "another gpu-pipeline run" in busy.stderr and busy.stdout == ""
    unavailable = runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "nonesuch", "--dry-run"])
    assert unavailable.exit_code == 2 and unavailable.stdout == ""
    assert _everything_under(tmp_path) == before


def test_a_dry_run_names_a_folder_that_cannot_be_listed(tmp_path, locked):
    """As the run does (test_a_folder_that_cannot_be_listed_is_named_and_the_run_exits_1): a dry run
    that found two images of four must say why, not only "2 of 2 images"."""
    make_images(tmp_path / "in" / "open", 2)
    make_images(tmp_path / "in" / "locked", 2)
    locked("locked")
    result = run(str(tmp_path / "in"), "--out", str(tmp_path / "out.jsonl"), "--dry-run")
    assert result.exit_code == 0 and result.stdout.startswith("dry run: 2 of 2 images"), result.output
    assert result.stderr == (f"warning: cannot list {tmp_path / 'in' / 'locked'} (Permission denied); its images "
                             "are not processed\n")


def test_a_dry_run_closes_the_backend_it_started(tmp_path, register):
    """A dry run starts the backend (one that cannot start refuses), then closes it unused: a --dask
    local:N cluster's worker processes, a GPU's memory, are not left to the end of the process."""
    from gpu_pipeline.backends.reference import ReferenceBackend

    closed = []

    class Counted(ReferenceBackend):
        name = "counted-closes"

        def close(self):
            closed.append(self)

    register(Counted)
    make_images(tmp_path / "in", 2)
    result = runner.invoke(app, ["run", str(tmp_path / "in"), "--out", str(tmp_path / "o.jsonl"), "--backend",
                                 "counted-closes", "--dry-run"])
    assert result.exit_code == 0 and result.stdout.startswith("dry run: 2 of 2 images"), result.output
    assert len(closed) == 1


def test_a_dry_run_starts_no_decode_processes(tmp_path, monkeypatch):
    """A run of many files starts its fork server while it checks the output (to be ready by the first
    batch); a dry run, which decodes nothing, must not: the check of a 50,000-file night would fork
    for nothing."""
    from gpu_pipeline.engine import job

    started = []
    monkeypatch.setattr(job, "early_fork_server", lambda *args: started.append(args))
    tiles = tmp_path / "in"
    make_images(tiles, 3)
    result = runner.invoke(app, ["run", str(tiles), "--out", str(tmp_path / "o.jsonl"), "--backend", "reference",
                                 "--decode", "processes", "--dry-run"])
    assert result.exit_code == 0 and result.stdout.startswith("dry run: 3 of 3 images"), result.output
    assert started == []
