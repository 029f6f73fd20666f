"""Nightly-run guarantees: resume, kills, signals, formats, bounded memory (issue: nightly scale).

The subprocess tests run the real command line and kill it, as cron, an OOM killer or a reboot would.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gpu_pipeline.cli import app
from gpu_pipeline.outputs.plan import format_for, lock_path, read_records
from tests.runs import Terminal, start, tagged, wait_until

runner = CliRunner()


def make_images(folder: Path, count: int, size: int = 24, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"tile{index:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, compress_level=0)
        paths.append(path.absolute())
    return paths


def run(*args: str):
    return runner.invoke(app, ["run", *args, "--backend", "reference", "-q"])


def by_path(records: list[dict]) -> dict[str, dict]:
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)), "a path was recorded twice"
    return {r["path"]: r for r in records}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("tiles"), 40)


@pytest.fixture(scope="module")
def clean_records(tiles, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("clean") / "clean.jsonl"
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0
    return by_path(read_records(out))


def test_records_hold_absolute_paths(clean_records, tiles):
    assert set(clean_records) == {str(p) for p in tiles}


def test_a_path_spelled_with_a_leading_double_slash_resumes_and_saves_its_edge_maps(tiles, tmp_path):
    """"$ROOT/$DIR" with ROOT=/ gives //tmp/...: os.path.abspath keeps the two slashes (POSIX leaves
    them to the system; Linux reads /). Each file got a second record on resume, and --save-edges
    failed every image ("//tmp/.../a.png is not below /tmp/...", the edge root being /tmp/...)."""
    folder, out = str(tiles[0].parent), tmp_path / "o.jsonl"
    assert run(folder, "--out", str(out)).exit_code == 0
    assert run("/" + folder, "--out", str(out)).exit_code == 0
    assert set(by_path(read_records(out))) == {str(p) for p in tiles}
    result = run("/" + folder, "--out", str(tmp_path / "p.jsonl"), "--save-edges", str(tmp_path / "edges"))
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "edges").iterdir())) == len(tiles)
    # an output written before the fix holds the // names: resumed, not a second record of every file
    old = tmp_path / "old.jsonl"
    old.write_text(out.read_text().replace('"path":"/', '"path":"//'))
    (tmp_path / "old.jsonl.settings.json").write_bytes((tmp_path / "o.jsonl.settings.json").read_bytes())
    before = old.read_bytes()
    result = run("/" + folder, "--out", str(old))
    assert result.exit_code == 0 and old.read_bytes() == before, result.output


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_torn_tail_is_dropped_and_the_rest_resumed(tiles, clean_records, tmp_path, suffix):
    out = tmp_path / f"out{suffix}"
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0
    lines = out.read_bytes().splitlines(keepends=True)
    keep = len(lines) // 2
    out.write_bytes(b"".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])  # torn last line
    result = runner.invoke(app, ["run", str(tiles[0].parent), "--out", str(out), "--backend", "reference"])
    assert result.exit_code == 0, result.output
    assert "already recorded" in result.stderr
    assert by_path(read_records(out)) == clean_records
    assert out.read_bytes().endswith(b"\n")


def test_garbage_in_the_middle_is_skipped_and_its_image_redone(tiles, clean_records, tmp_path):
    """A crash can leave zeros inside the file: that line is skipped, the records after it are kept."""
    out = tmp_path / "out.jsonl"
    run(str(tiles[0].parent), "--out", str(out))
    lines = out.read_bytes().splitlines(keepends=True)
    lines[5] = b"\0" * 40 + b"\n"
    out.write_bytes(b"".join(lines))
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0
    assert by_path(read_records(out)) == clean_records


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_long_zero_tail_is_dropped_reading_it_a_piece_at_a_time(tiles, clean_records, tmp_path, suffix):
    """A crash can leave a tail of zeros with no newline: it was read as one line (300 MB of zeros
    took 704 MB of memory to resume). Now a line longer than LONGEST_LINE is read in pieces."""
    import tracemalloc

    from gpu_pipeline.outputs.lines import LONGEST_LINE, scan

    out = tmp_path / f"out{suffix}"
    run(str(tiles[0].parent), "--out", str(out))
    lines = out.read_bytes().splitlines(keepends=True)
    kept = b"".join(lines[:-3])
    with open(out, "wb") as stream:
        stream.write(kept)
        stream.write(b"\0" * (24 * LONGEST_LINE))
    tracemalloc.start()
    try:
        found = scan(out, suffix[1:])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * LONGEST_LINE
    assert (found.good_end, found.size, found.existing.dropped_bytes) == (len(kept), len(kept) + 24 * LONGEST_LINE,
                                                                           24 * LONGEST_LINE)
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0  # the tail cut, the last images redone
    assert by_path(read_records(out)) == clean_records


def _lines_of(records: list[dict], fmt: str) -> list[bytes]:
    from gpu_pipeline.outputs.records import csv_text, jsonl_text

    text = (jsonl_text if fmt == "jsonl" else csv_text)(records)
    return text.encode().splitlines(keepends=True)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_line_longer_than_any_record_in_the_middle_is_one_damaged_line(tmp_path, monkeypatch, fmt):
    """The records after it keep their places; a CSV record with an open quote never runs into it."""
    from gpu_pipeline.outputs import lines as line_outputs
    from gpu_pipeline.outputs.lines import CSV_HEADER, scan

    monkeypatch.setattr(line_outputs, "LONGEST_LINE", 1000)
    records = [{"path": f"/data/{i}.png", "stage": "read", "error": "empty"} for i in range(4)]
    good = _lines_of(records, fmt)
    header = (CSV_HEADER + "\n").encode() if fmt == "csv" else b""
    for long in (b"x" * 5000 + b"\n", b"\0" * 1001 + b"\n", b"y" * 999 + b"\n"):  # over the limit, and at it
        unbalanced = b'"/data/open,' + b"\n" if fmt == "csv" else b"{\n"
        data = header + good[0] + unbalanced + long + good[1] + good[2] + long + good[3]
        (tmp_path / "out").write_bytes(data)
        found = scan(tmp_path / "out", fmt)
        assert found.existing.succeeded == set() and found.existing.failed == {f"/data/{i}.png" for i in range(4)}
        assert (found.good_end, found.existing.dropped_bytes) == (len(data), 0)
        assert found.existing.damaged == 3, long[:3]


@pytest.mark.parametrize("whole", [False, True], ids=["resume", "read_records"])
def test_a_json_line_that_is_no_record_is_one_damaged_line(tmp_path, whole):
    """A line another program appended (a number, a list, a name that is no string): JSON, but no
    record; it is damage, and the records around it keep their places."""
    from gpu_pipeline.outputs.lines import scan

    records = [{"path": f"/data/{i}.png", "stage": "read", "error": "empty"} for i in range(2)]
    good = _lines_of(records, "jsonl")
    strays = [b"1\n", b"[1, 2]\n", b"null\n", b'{"path": 3, "stage": "read", "error": "empty"}\n']
    data = good[0] + b"".join(strays) + good[1]
    (tmp_path / "out.jsonl").write_bytes(data)
    kept = []
    found = scan(tmp_path / "out.jsonl", "jsonl", lambda record, raw: kept.append(record), whole=whole)
    assert found.existing.failed == {"/data/0.png", "/data/1.png"} and found.existing.damaged == len(strays)
    assert [record["path"] for record in kept] == ["/data/0.png", "/data/1.png"] and found.good_end == len(data)


def test_a_csv_record_split_by_a_long_line_is_not_joined_across_it(tmp_path, monkeypatch):
    """A name with a newline spans two lines; a long line between its halves is damage, and the halves
    around it are no record (joined across it, they were one, and the bytes kept were not the file's)."""
    from gpu_pipeline.outputs import lines as line_outputs
    from gpu_pipeline.outputs.lines import CSV_HEADER, scan

    monkeypatch.setattr(line_outputs, "LONGEST_LINE", 1000)
    first, second, last = _lines_of([{"path": "/data/x\ny.png", "stage": "read", "error": "empty"},
                                     {"path": "/data/z.png", "stage": "read", "error": "empty"}], "csv")
    assert first.startswith(b'"/data/x') and second.startswith(b'y.png"')
    data = (CSV_HEADER + "\n").encode() + first + b"x" * 5000 + b"\n" + second + last
    (tmp_path / "out.csv").write_bytes(data)
    found = scan(tmp_path / "out.csv", "csv")
    assert found.existing.failed == {"/data/z.png"} and found.existing.damaged == 3
    assert found.good_end == len(data)


@pytest.mark.parametrize("tail", [b"\0" * 5000, b"\0" * 5000 + b"\n", b"z" * 5000])
def test_a_csv_output_that_starts_with_a_long_line(tmp_path, monkeypatch, tail):
    """Zeros from the start to the end of the file are a header torn by a crash (nothing to keep);
    a long first line with a newline, or anything else, is not our output."""
    from gpu_pipeline.outputs import lines as line_outputs
    from gpu_pipeline.outputs.lines import scan
    from gpu_pipeline.outputs.sink import SinkError

    monkeypatch.setattr(line_outputs, "LONGEST_LINE", 1000)
    (tmp_path / "out.csv").write_bytes(tail)
    if tail.strip(b"\0"):
        with pytest.raises(SinkError, match="unexpected header"):
            scan(tmp_path / "out.csv", "csv")
    else:
        found = scan(tmp_path / "out.csv", "csv")
        assert (found.good_end, found.existing.dropped_bytes) == (0, 5000)


def test_finished_output_is_not_redone(tiles, tmp_path):
    out = tmp_path / "out.jsonl"
    run(str(tiles[0].parent), "--out", str(out))
    before = out.read_bytes()
    result = runner.invoke(app, ["run", str(tiles[0].parent), "--out", str(out), "--backend", "reference"])
    assert result.exit_code == 0
    assert f"{len(tiles)} of {len(tiles)} images already recorded" in result.stderr
    assert out.read_bytes() == before


def test_a_file_replaced_under_its_name_keeps_its_record_until_overwrite(tmp_path):
    """docs/nightly.md: resume goes by path, not by content; a corrected delivery under the same name
    keeps the record of the first version, and --overwrite (or another --out) redoes it."""
    (first,) = make_images(tmp_path / "in", 1, seed=1)
    out = tmp_path / "out.jsonl"
    assert run(str(first), "--out", str(out)).exit_code == 0
    (old,) = read_records(out)
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(first)  # the corrected file, same name
    assert run(str(first), "--out", str(out)).exit_code == 0
    assert read_records(out) == [old]
    assert run(str(first), "--out", str(out), "--overwrite").exit_code == 0
    (new,) = read_records(out)
    assert new["histogram"][0] == 24 * 24 != old["histogram"][0]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_failures_are_kept_until_retry_failed(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    folder = tmp_path / "images"
    paths = make_images(folder, 4)
    paths[1].write_bytes(b"")
    out = tmp_path / f"out{suffix}"
    assert run(str(folder), "--out", str(out)).exit_code == 1
    make_images(folder, 4)  # the broken file is repaired
    assert run(str(folder), "--out", str(out)).exit_code == 1  # its error record still stands
    assert "error" in by_path(read_records(out))[str(paths[1])]
    assert run(str(folder), "--out", str(out), "--retry-failed").exit_code == 0
    records = by_path(read_records(out))
    assert len(records) == 4 and all("error" not in r for r in records.values())
    # README: a resume appends what it processes after the records already there
    assert list(records) == [str(paths[0]), str(paths[2]), str(paths[3]), str(paths[1])]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_retry_failed_on_some_inputs_keeps_the_error_records_of_the_others(tmp_path, suffix):
    """`run night/b --retry-failed` removed the error records of night/a's files too, which it did not
    redo: their records vanished from the output, exit 0, until the next run of the whole night."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    night = tmp_path / "night"
    a, b = make_images(night / "a", 3), make_images(night / "b", 3)
    a[1].write_bytes(b"")
    b[2].write_bytes(b"")
    out = tmp_path / f"out{suffix}"
    assert run(str(night), "--out", str(out)).exit_code == 1
    make_images(night / "b", 3)  # b's broken file is repaired
    assert run(str(night / "b"), "--out", str(out), "--retry-failed").exit_code == 0
    records = by_path(read_records(out))
    assert len(records) == 6 and [path for path, record in records.items() if "error" in record] == [str(a[1])]
    assert run(str(night / "b"), "--out", str(out)).exit_code == 0  # a's error record is no input's of this run
    assert run(str(night), "--out", str(out)).exit_code == 1  # a's error record still stands


def test_retry_failed_rewrites_the_output_without_its_damaged_lines(tmp_path):
    """The rewrite keeps the intact records only: the damaged line goes with it, its image is
    redone, and no warning counts a damaged line the output no longer holds."""
    folder = tmp_path / "images"
    paths = make_images(folder, 6)
    paths[1].write_bytes(b"")
    out = tmp_path / "out.jsonl"
    assert run(str(folder), "--out", str(out)).exit_code == 1
    lines = out.read_bytes().splitlines(keepends=True)
    damaged = next(index for index, line in enumerate(lines[1:-1], 1) if b'"error"' not in line)
    lines[damaged] = lines[damaged][:30] + b"\n"
    out.write_bytes(b"".join(lines))
    make_images(folder, 6)  # the broken file is repaired
    result = runner.invoke(app, ["run", str(folder), "--out", str(out), "--backend", "reference", "--retry-failed"])
    assert result.exit_code == 0, result.output
    assert "damaged" not in result.stderr and "5 of 6 images already recorded" not in result.stderr
    records = by_path(read_records(out))
    assert len(records) == 6 and all("error" not in r for r in records.values())
    assert all(json.loads(line) for line in out.read_bytes().splitlines())  # the damaged line is gone


def test_overwrite_starts_afresh(tiles, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"path": "/elsewhere/old.png", "stage": "decode", "error": "old"}\n')
    assert run(str(tiles[0].parent), "--out", str(out), "--overwrite").exit_code == 0
    assert "/elsewhere/old.png" not in by_path(read_records(out))



@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_overwrite_leaves_a_hard_link_to_the_old_output_as_it_was(tiles, tmp_path, fmt):
    """A backup made with hard links (``cp -l``, rsnapshot) shares the output's file: --overwrite
    truncated it in place, and the backup lost its records. The output is started as a new file
    where another name shares it, truncated where none does (its mode and owner kept)."""
    out = tmp_path / f"out.{fmt}"
    assert run(str(tiles[0]), "--out", str(out)).exit_code == 0
    backup = tmp_path / f"backup.{fmt}"
    os.link(out, backup)
    kept = backup.read_bytes()
    assert run(str(tiles[1]), "--out", str(out), "--overwrite").exit_code == 0
    assert backup.read_bytes() == kept
    assert list(by_path(read_records(out))) == [str(tiles[1])]
    out.chmod(0o600)  # (a new file would get 0o666 less the umask; an inode number may be reused)
    assert run(str(tiles[2]), "--out", str(out), "--overwrite").exit_code == 0
    assert out.stat().st_mode & 0o777 == 0o600 and list(by_path(read_records(out))) == [str(tiles[2])]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_overwrite_through_a_symbolic_link_to_a_hard_linked_output_keeps_the_link(tiles, tmp_path, fmt):
    """latest -> night1, night1 backed up by a hard link: --overwrite through the link starts night1
    afresh as a new file (the backup keeps its records) and the link stays a link. The hard link
    must be looked for on the file the link leads to: looked for on the link's own name, the link
    was removed and a file made in its place, and night1 kept the old records."""
    night = tmp_path / f"night1.{fmt}"
    assert run(str(tiles[0]), "--out", str(night)).exit_code == 0
    backup = tmp_path / f"backup.{fmt}"
    os.link(night, backup)
    kept = backup.read_bytes()
    latest = tmp_path / f"latest.{fmt}"
    latest.symlink_to(night.name)
    assert run(str(tiles[1]), "--out", str(latest), "--overwrite").exit_code == 0
    assert latest.is_symlink() and os.readlink(latest) == night.name
    assert list(by_path(read_records(night))) == [str(tiles[1])] and backup.read_bytes() == kept


def test_a_rerun_from_another_working_folder_resumes(tiles, clean_records, tmp_path, monkeypatch):
    """nightly.md: paths are recorded absolute, so a rerun from elsewhere matches them, however the folder is spelt."""
    out = tmp_path / "out.jsonl"
    folder = tiles[0].parent
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    first = os.path.relpath(folder)  # ../../tiles0 or the like
    assert ".." in first
    assert run(first, "--out", str(out)).exit_code == 0
    assert by_path(read_records(out)) == clean_records
    monkeypatch.chdir(folder)
    for spelling in (".", "./", f"../{folder.name}/.", str(folder) + "/./"):
        result = runner.invoke(app, ["run", spelling, "--out", str(out), "--backend", "reference"])
        assert result.exit_code == 0, result.output
        assert f"{len(tiles)} of {len(tiles)} images already recorded" in result.stderr, spelling
    assert by_path(read_records(out)) == clean_records


def test_resume_with_other_settings_is_refused(tiles, tmp_path):
    out = tmp_path / "out.jsonl"
    run(str(tiles[0].parent), "--out", str(out))
    result = run(str(tiles[0].parent), "--out", str(out), "--low", "10")
    assert result.exit_code == 2
    assert "other settings" in result.stderr and "pipeline" in result.stderr


def test_a_resume_with_the_thresholds_swapped_resumes(tiles, tmp_path):
    """--low 200 --high 100 is cv2.Canny's --low 100 --high 200 (it swaps them): the same records,
    where the resume was refused as other settings."""
    folder, out = str(tiles[0].parent), tmp_path / "out.jsonl"
    assert run(str(tiles[0]), "--out", str(out), "--low", "150", "--high", "60").exit_code == 0
    result = run(folder, "--out", str(out), "--low", "60", "--high", "150")
    assert result.exit_code == 0, result.output
    fresh = tmp_path / "fresh.jsonl"
    assert run(folder, "--out", str(fresh), "--low", "60", "--high", "150").exit_code == 0
    assert by_path(read_records(out)) == by_path(read_records(fresh))
    assert "other settings" in run(folder, "--out", str(out), "--low", "61", "--high", "150").stderr


@pytest.mark.parametrize("option, value", [("--bands", "3,2,1"), ("--stretch", "minmax"),
                                           ("--max-pixels", "100000")])
def test_resume_with_other_decode_settings_is_refused(tiles, tmp_path, option, value):
    out = tmp_path / "out.jsonl"
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0
    before = out.read_bytes()
    result = run(str(tiles[0].parent), "--out", str(out), option, value)
    assert result.exit_code == 2, result.output
    assert "other settings (changed: decode" in result.stderr
    assert out.read_bytes() == before


@pytest.mark.parametrize("first, then", [("1,2,3", "1"), ("1", "1,2,3")])
def test_a_resume_with_bands_that_begin_as_the_recorded_ones_is_refused(tiles, tmp_path, first, then):
    """``--bands 1`` after ``--bands 1,2,3``: the lists agree as far as the shorter goes, and the
    settings differ all the same (gray against RGB)."""
    out = tmp_path / "out.jsonl"
    assert run(str(tiles[0].parent), "--out", str(out), "--bands", first).exit_code == 0
    out.write_text("\n".join(out.read_text().splitlines()[:10]) + "\n")  # (a resume has images to add)
    before = out.read_bytes()
    result = run(str(tiles[0].parent), "--out", str(out), "--bands", then)
    assert result.exit_code == 2, result.output
    assert f"(changed: decode: --bands {first} -> {then}; see " in result.stderr, result.stderr
    assert out.read_bytes() == before


@pytest.mark.parametrize("options, changed", [
    (["--low", "50"], "changed: pipeline: --low 100 -> 50; "),
    (["--l2", "--blur", "3"], "changed: pipeline: --l2 off -> on, --blur 5 -> 3; "),
    (["--bands", "3,2,1", "--stretch", "minmax"],
     "changed: decode: --bands not given -> 3,2,1, --stretch percentile -> minmax; "),
    (["--high", "250", "--max-pixels", "100000"],
     "changed: pipeline: --high 200 -> 250; decode: --max-pixels 1000000000 -> 100000; "),
    (["--low", "100.00001"], "changed: pipeline: --low 100 -> 100.00001; "),  # (not 100 -> 100)
    # the values as typed, not in the order cv2.Canny takes them ("--low 100 -> 250, --high 200 -> 300")
    (["--low", "300", "--high", "250"], "changed: pipeline: --low 100 -> 300, --high 200 -> 250; "),
    (["--low", "250", "--high", "100"], "changed: pipeline: --low 100 -> 250, --high 200 -> 100; "),
])
def test_a_resume_with_other_settings_names_the_options_that_changed(tiles, tmp_path, options, changed):
    """The refusal said "changed: pipeline": a user who had edited the nightly command had to diff the
    settings record by hand to find which option to put back."""
    out = tmp_path / "out.jsonl"
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0
    result = run(str(tiles[0].parent), "--out", str(out), *options)
    assert result.exit_code == 2, result.output
    assert changed in result.stderr, result.stderr


@pytest.mark.parametrize("other, changed", [
    (["--blur", "3"], "pipeline: --blur 5 -> 3"),
    # (no section whose only difference is the thresholds' order: "changed: pipeline: ; decode: ...")
    (["--stretch", "minmax"], "decode: --stretch percentile -> minmax"),
])
def test_thresholds_given_the_other_way_round_are_no_change_to_name(tiles, tmp_path, other, changed):
    """An output written with --low 200 --high 100 (cv2.Canny swaps them) resumed with --low 100
    --high 200 and another --blur, or --stretch: only that changed, and a section that differs only in
    the thresholds' order is not named."""
    out = tmp_path / "out.jsonl"
    assert run(str(tiles[0].parent), "--out", str(out), "--low", "200", "--high", "100").exit_code == 0
    result = run(str(tiles[0].parent), "--out", str(out), "--low", "100", "--high", "200", *other)
    assert result.exit_code == 2, result.output
    assert f"(changed: {changed}; see " in result.stderr, result.stderr


@pytest.mark.parametrize("section, name, edited, changed", [
    ("pipeline", "low_threshold", "100", 'pipeline: --low "100" -> 100'),
    # (a list was shown as its items: "--low 100 -> 100", and 'percentile -> "percentile"' quoted this run's)
    ("pipeline", "low_threshold", [100], "pipeline: --low [100] -> 100"),
    ("decode", "stretch", ["percentile"], 'decode: --stretch ["percentile"] -> percentile'),
    ("decode", "bands", [True, 2, 3], "decode: --bands [true, 2, 3] -> not given"),  # (read "True,2,3")
])
def test_a_recorded_value_that_differs_only_in_its_type_is_shown_as_recorded(tiles, tmp_path, section, name,
                                                                             edited, changed):
    """A threshold edited into the settings record as text, "100", was refused as "--low 100 -> 100":
    no change to see. The record's value is shown as the record has it."""
    out = tmp_path / "out.jsonl"
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0
    settings = Path(f"{out}.settings.json")
    record = json.loads(settings.read_text())
    record[section][name] = edited  # (a record edited by hand)
    settings.write_text(json.dumps(record))
    result = run(str(tiles[0].parent), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"(changed: {changed}; see " in result.stderr, result.stderr


@pytest.mark.parametrize("edited, options, changed", [
    (True, ["--low", "1"], "pipeline: --low true -> 1"),
    (False, ["--low", "0"], "pipeline: --low false -> 0"),
])
def test_a_recorded_true_is_no_threshold_on_resume(tiles, tmp_path, edited, options, changed):
    """A settings record edited by hand to hold JSON true for a threshold resumed a run with --low 1
    (Python's True == 1): records of two settings in one output. true is no number: other settings."""
    out = tmp_path / "out.jsonl"
    assert run(str(tiles[0].parent), "--out", str(out), *options).exit_code == 0
    out.write_text("\n".join(out.read_text().splitlines()[:10]) + "\n")  # (a resume has images to add)
    settings = Path(f"{out}.settings.json")
    record = json.loads(settings.read_text())
    record["pipeline"]["low_threshold"] = edited  # (a record edited by hand)
    settings.write_text(json.dumps(record))
    before = out.read_bytes(), settings.read_bytes()
    result = run(str(tiles[0].parent), "--out", str(out), *options)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and f"(changed: {changed}; see " in result.stderr, result.stderr
    assert (out.read_bytes(), settings.read_bytes()) == before


def test_a_setting_this_version_does_not_know_is_named_in_the_refusal(tiles, tmp_path):
    """An output a newer version wrote, with a setting this one does not have, was refused as
    "changed: pipeline: " with nothing after it: nothing for the user to act on."""
    out = tmp_path / "out.jsonl"
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0
    settings = Path(f"{out}.settings.json")
    record = json.loads(settings.read_text())
    record["pipeline"]["min_edges"] = 3  # (a newer version's option)
    settings.write_text(json.dumps(record))
    result = run(str(tiles[0].parent), "--out", str(out), "--low", "50")
    assert result.exit_code == 2, result.output
    assert "(changed: pipeline: --low 100 -> 50, min_edges 3 -> not a setting of this version; see " in result.stderr


def test_a_setting_the_record_lacks_is_named_in_the_refusal(tiles, tmp_path):
    """The other way round: a settings record without one of this version's settings whose value is
    None here (--bands left out) is refused as other settings, and said "changed: decode: " with
    nothing after it, the missing key being None on both sides of the comparison."""
    out = tmp_path / "out.jsonl"
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0
    settings = Path(f"{out}.settings.json")
    record = json.loads(settings.read_text())
    del record["decode"]["bands"]  # (a record edited by hand, or written before the setting was)
    settings.write_text(json.dumps(record))
    result = run(str(tiles[0].parent), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "(changed: decode: --bands not recorded -> not given; see " in result.stderr, result.stderr


def test_the_backend_may_change_between_runs(tiles, clean_records, tmp_path):
    """nightly.md: every backend gives the same bytes, so a resume may take another one."""
    out = tmp_path / "out.jsonl"
    folder = tmp_path / "images"
    folder.mkdir()
    for path in tiles[:20]:
        os.link(path, folder / path.name)
    assert run(str(folder), "--out", str(out)).exit_code == 0
    for path in tiles[20:]:
        os.link(path, folder / path.name)
    result = runner.invoke(app, ["run", str(folder), "--out", str(out), "--backend", "numba", "-q"])
    assert result.exit_code == 0, result.output
    records = by_path(read_records(out))
    assert len(records) == 40 and {r["backend"] for r in records.values()} == {"reference", "numba"}
    for path, record in records.items():
        expected = clean_records[str(tiles[0].parent / Path(path).name)]
        assert {**record, "path": "", "backend": ""} == {**expected, "path": "", "backend": ""}


def test_an_output_of_another_extension_is_json_lines(tiles, clean_records, tmp_path):
    out = tmp_path / "results.txt"
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0
    lines = out.read_text().splitlines()
    assert by_path([json.loads(line) for line in lines]) == clean_records


def test_an_output_that_cannot_be_read_back_is_refused(tiles, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    assert run(str(tiles[0].parent), "--out", str(out), "--batch-size", "16").exit_code == 0
    part = sorted(out.glob("part-*.parquet"))[1]
    part.write_bytes(b"not parquet at all")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    result = run(str(tiles[0].parent), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert f"cannot read {out} back" in result.stderr
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_output_made_read_only_is_refused_saying_why_once(tiles, tmp_path, monkeypatch, fmt):
    """A resume onto an output its owner made read-only (chmod a-w) said the refusal twice: "cannot
    write OUT: cannot write OUT: Permission denied". Nothing is written."""
    import errno

    out = tmp_path / f"out.{fmt}"
    assert run(str(tiles[0]), "--out", str(out)).exit_code == 0
    out.chmod(0o444)
    real_open = os.open

    def open_as_its_owner(path, flags, *args, **kwargs):  # (root may write any file: refused as for a user)
        if os.fspath(path) == str(out) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_as_its_owner)
    before = out.read_bytes()
    result = run(str(tiles[1]), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert result.stderr == f"gpu-pipeline: error: cannot write {out}: Permission denied\n"
    assert out.read_bytes() == before


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry run"])
def test_an_output_this_process_may_not_write_is_refused_with_the_checks(tiles, tmp_path, monkeypatch, fmt, dry_run):
    """An output made read-only since its last run: a resume onto a Parquet folder processed a batch,
    then exited 3 ("the records written before are kept: ... run the same command again"), and
    --dry-run said the run would go on, for every format. Refused with the checks: exit 2, nothing written."""
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"out.{fmt}"
    assert run(str(tiles[0]), "--out", str(out)).exit_code == 0
    out.chmod(0o555 if fmt == "parquet" else 0o444)
    real_access = os.access  # (root passes every permission check: refused as for any other user)
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
        False if os.fspath(path) == str(out) and mode & os.W_OK else real_access(path, mode, **kwargs)))
    written = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    try:
        result = run(str(tiles[1]), "--out", str(out), *(["--dry-run"] if dry_run else []))
    finally:
        out.chmod(0o755 if fmt == "parquet" else 0o644)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"gpu-pipeline: error: cannot write {out}: Permission denied\n"
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == written


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_an_output_the_disk_cannot_read_back_is_refused_with_the_disks_error(tmp_path, monkeypatch, fmt):
    """An I/O error while a resume reads the output back is the disk's, said as such and with its
    errno: it was taken for a file, or a Parquet part, that is not ours ("cannot read OUT back:
    [Errno 5] ...", EINVAL)."""
    import errno

    from gpu_pipeline.outputs import parquet, plan
    from gpu_pipeline.outputs.sink import SinkError

    out = tmp_path / f"out.{fmt}"

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    if fmt == "parquet":
        pytest.importorskip("pyarrow")
        out.mkdir()
        (out / "part-000000.parquet").write_bytes(b"PAR1")
        monkeypatch.setattr(parquet, "_read_part", unreadable)
    else:
        out.write_text("records\n")
        monkeypatch.setattr(plan, "scan", unreadable)
    with pytest.raises(SinkError) as refused:
        plan.inspect_output(str(out))
    assert refused.value.errno == errno.EIO and str(refused.value) == f"cannot read {out}: Input/output error"

@pytest.mark.parametrize("damage", [lambda data: data[:-20], lambda data: b"", lambda data: data[:len(data) // 2]])
def test_a_damaged_part_is_named_in_the_refusal(tiles, tmp_path, damage):
    """A part with a torn footer was refused naming only the folder (and pyarrow's '<Buffer>'): among
    hundreds of parts the user could not tell which one to move aside."""
    pytest.importorskip("pyarrow")
    out = tmp_path / "out.parquet"
    assert run(str(tiles[0].parent), "--out", str(out), "--batch-size", "16").exit_code == 0
    part = sorted(out.glob("part-*.parquet"))[1]
    part.write_bytes(damage(part.read_bytes()))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    result = run(str(tiles[0].parent), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"gpu-pipeline: error: cannot read {out} back: {part.name} is not a readable Parquet "
                                    "part (") and "<Buffer>" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "move it out of the folder" in result.stderr
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_resume_with_another_label_model_is_refused(tiles, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(str(tiles[0].parent), "--out", str(out)).exit_code == 0
    result = run(str(tiles[0].parent), "--out", str(out), "--model", "eurosat")
    assert result.exit_code == 2 and "model" in result.stderr


def test_csv_and_jsonl_hold_the_same_records(tiles, clean_records, tmp_path):
    folder = tiles[0].parent
    (folder / "broken.png").write_bytes(b"not a png")
    try:
        for fmt in ("jsonl", "csv"):
            out = tmp_path / f"out.{fmt}"
            assert run(str(folder), "--out", str(out)).exit_code == 1
        jsonl, csv = (by_path(read_records(tmp_path / f"out.{fmt}")) for fmt in ("jsonl", "csv"))
        assert jsonl == csv
        assert {k: v for k, v in jsonl.items() if "error" not in v} == clean_records
    finally:
        (folder / "broken.png").unlink()


def test_format_option_overrides_the_extension(tiles, tmp_path):
    out = tmp_path / "out.txt"
    assert run(str(tiles[0]), "--out", str(out), "--format", "csv").exit_code == 0
    assert out.read_text().startswith("path,width,height")
    assert run(str(tiles[0]), "--out", str(out), "--format", "xml").exit_code == 2


@pytest.mark.parametrize("name, expected", [(".csv", "csv"), (".CSV", "csv"), (".parquet", "parquet"),
                                            ("out.PQ", "parquet"), ("a.csv.json", "jsonl"), (".settings", "jsonl"),
                                            ("out.csv/", "csv"), ("out", "jsonl")])
def test_format_is_the_one_the_name_ends_with(name, expected):
    """A name that is only its extension (``--out .csv``: ``Path`` sees a hidden file with no
    suffix) is written in that format, not as JSON lines under a name a reader takes for it."""
    assert format_for(name) == expected


@pytest.mark.parametrize("name, meant", [("out.parquett", ".parquet"), ("out.cvs", ".csv"), ("out.tsv", ".csv"),
                                         ("out.jsnl", ".jsonl")])
def test_a_new_output_named_with_a_slip_of_an_extension_is_refused(tiles, tmp_path, name, meant):
    """``--out results.parquett`` was written as JSON Lines (anything unknown is), which the reader it
    was named for then refused, after the night's run. A new output so named is refused, naming the
    extension meant; --format writes it all the same, and an output that exists resumes."""
    out = tmp_path / name
    result = run(str(tiles[0]), "--out", str(out))
    assert result.exit_code == 2 and not out.exists()
    assert result.stderr == (f"gpu-pipeline: error: --out {out}: its extension is no output format's; did you mean "
                             f"{meant}? Name it so, or give --format jsonl, csv or parquet\n")
    assert run(str(tiles[0]), "--out", str(out), "--format", "jsonl").exit_code == 0
    assert run(str(tiles[0]), "--out", str(out)).exit_code == 0  # (an output of ours: resumed as it is)


@pytest.mark.parametrize("fmt, example", [(None, "results.jsonl"), ("csv", "results.csv")])
def test_a_folder_as_the_output_of_a_file_format_is_refused_suggesting_a_file_in_it(tiles, tmp_path, fmt, example):
    """``--out results/`` (a folder for the night's results) said "is not a regular file"."""
    folder = tmp_path / "results"
    folder.mkdir()
    result = run(str(tiles[0]), "--out", str(folder), *(["--format", fmt] if fmt else []))
    assert result.exit_code == 2 and list(folder.iterdir()) == []
    kind = "CSV" if fmt else "JSON Lines"
    assert result.stderr == (f"gpu-pipeline: error: {folder} is a folder; a {kind} output is a file: name one in it "
                             f"(such as {folder / example}), or give another --out\n")


@pytest.mark.parametrize("name", ["out.txt", "out.log", "out", "out.results", "out.dat"])
def test_an_output_named_with_another_extension_is_json_lines(tiles, tmp_path, name):
    assert run(str(tiles[0]), "--out", str(tmp_path / name)).exit_code == 0
    assert (tmp_path / name).read_text().startswith("{")


def test_parquet_round_trip_and_resume(tiles, clean_records, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet needs the optional pyarrow (extra 'parquet')")
    out = tmp_path / "out.parquet"
    assert run(str(tiles[0].parent), "--out", str(out), "--batch-size", "16").exit_code == 0
    assert by_path(read_records(out)) == clean_records
    assert sorted(part.name for part in out.iterdir()) == [
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]  # one part per batch: 16 + 16 + 8
    assert len(pq.read_table(out)) == len(clean_records)
    (out / "part-000001.parquet").unlink()  # as if the run had stopped there
    result = runner.invoke(app, ["run", str(tiles[0].parent), "--out", str(out), "--backend", "reference"])
    assert result.exit_code == 0 and "24 of 40 images already recorded" in result.stderr
    assert by_path(read_records(out)) == clean_records
    assert run(str(tiles[0].parent), "--out", str(out), "--overwrite").exit_code == 0
    assert by_path(read_records(out)) == clean_records


def test_parquet_without_pyarrow_says_how_to_install(tiles, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    result = run(str(tiles[0]), "--out", str(tmp_path / "o.parquet"))
    assert result.exit_code == 2 and "gpu-pipeline[parquet]" in result.stderr


# ---------------------------------------------------------------- real processes, real signals


def wait_for_records(out: Path, at_least: int) -> None:
    wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= at_least, f"{out} reaching {at_least} records")


@pytest.fixture(scope="module")
def many_tiles(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("many"), 300, size=40, seed=1)


def test_sigkill_at_random_moments_then_resume_gives_one_record_per_path(many_tiles, tmp_path):
    folder = many_tiles[0].parent
    out = tmp_path / "out.jsonl"
    rng = random.Random(1234)
    for attempt in range(4):
        process = start(folder, out, "--decode", ("threads", "processes")[attempt % 2])
        time.sleep(rng.uniform(0.3, 2.0))
        process.kill()
        process.wait()
    final = start(folder, out, "-q")
    assert final.wait(timeout=300) == 0, final.stderr.read()
    records = by_path(read_records(out))
    assert set(records) == {str(p) for p in many_tiles}
    assert all("error" not in r for r in records.values())


def run_on_a_terminal(folder: Path, out: str) -> Terminal:
    return Terminal("-m", "gpu_pipeline.cli", "run", str(folder), "--out", out, "--backend", "reference",
                    "--batch-size", "8", "--workers", "2")


def hung_up_after_8_records(folder: Path, out: Path) -> Terminal:
    """A run into ``out`` on a terminal that closes once 8 records are written."""
    terminal = run_on_a_terminal(folder, str(out))
    wait_for_records(out, 8)
    terminal.hang_up()
    return terminal


def test_a_run_whose_terminal_closes_keeps_what_it_finished(many_tiles, tmp_path, hangups_heard):
    """An ssh session dropped under a run started by hand: the kernel hangs its terminal up (SIGHUP
    to the session), and the run ends as after a SIGTERM, its finished batches written: resumable.
    It was killed at once (the batches in flight lost, its lock file left behind)."""
    folder = many_tiles[0].parent
    out = tmp_path / "out.jsonl"
    terminal = hung_up_after_8_records(folder, out)
    assert terminal.process.wait(timeout=120) == 129
    assert out.read_bytes().endswith(b"\n") and not lock_path(str(out)).exists()
    assert 0 < len(by_path(read_records(out))) < len(many_tiles)
    assert start(folder, out, "-q").wait(timeout=300) == 0
    assert len(by_path(read_records(out))) == len(many_tiles)


def test_a_run_under_nohup_outlives_its_terminal(many_tiles, tmp_path, hangups_ignored):
    """``nohup gpu-pipeline run ...``: the hangup stays ignored, and the messages the run still writes
    to the closed terminal are dropped (an I/O error each); every image gets its record."""
    folder = many_tiles[0].parent
    out = tmp_path / "out.jsonl"
    terminal = hung_up_after_8_records(folder, out)
    assert terminal.process.wait(timeout=300) == 0
    assert sorted(by_path(read_records(out))) == sorted(str(path) for path in many_tiles)


def test_a_run_started_with_ctrl_c_ignored_still_stops_on_it(many_tiles, tmp_path):
    """A shell starts a script's background jobs (``gpu-pipeline run ... &``) with SIGINT ignored, not
    on purpose as ``nohup`` ignores SIGHUP: ``kill -INT`` still stops the run, its batches written."""
    folder = many_tiles[0].parent
    out = tmp_path / "out.jsonl"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = start(folder, out)
    finally:
        signal.signal(signal.SIGINT, previous)
    wait_for_records(out, 8)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert 0 < len(by_path(read_records(out))) < len(many_tiles)


def test_records_to_a_terminal_that_closed_end_the_run_as_a_full_disk_does(many_tiles, tmp_path, hangups_ignored):
    """``run --out -`` on a terminal that went away (its hangup ignored): the records can no longer be
    written, so the run stops with exit 3."""
    terminal = run_on_a_terminal(many_tiles[0].parent, "-")
    wait_until(lambda: terminal.shown.count(b"\n") >= 8, "records on the terminal")
    terminal.hang_up()
    assert terminal.process.wait(timeout=120) == 3


@pytest.mark.parametrize("decode", ["threads", "processes"])
@pytest.mark.parametrize("sig, code, times", [(signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 1),
                                              (signal.SIGTERM, 143, 2), (signal.SIGHUP, 129, 1)])
def test_signal_flushes_reports_and_exits(many_tiles, tmp_path, sig, code, times, decode, hangups_heard):
    """Twice: SIGTERM to the run and then to its process group, as coreutils timeout sends it.
    SIGHUP: the terminal of the run went away (an ssh session dropped)."""
    folder = many_tiles[0].parent
    out = tmp_path / "out.jsonl"
    tag = f"signal-{sig}-{times}-{decode}-{os.getpid()}"
    process = start(folder, out, "--decode", decode, tag=tag)
    wait_for_records(out, 8)
    for _ in range(times):
        process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    wait_until(lambda: not tagged(tag), "the run's decode processes ending", timeout=20)
    assert "Traceback" not in stderr
    partial = by_path(read_records(out))
    assert 0 < len(partial) < len(many_tiles)
    assert (f"interrupted: {len(many_tiles) - len(partial)} images not processed; "
            "run the same command again to resume") in stderr
    assert out.read_bytes().endswith(b"\n")
    assert start(folder, out, "-q").wait(timeout=300) == 0
    assert len(by_path(read_records(out))) == len(many_tiles)


def test_a_resume_stopped_by_a_signal_counts_what_is_still_to_do(many_tiles, tmp_path):
    """The "images not processed" of a resume that is stopped too: those of its own inputs, not of
    every file (the images recorded before are not to do)."""
    folder = many_tiles[0].parent
    out = tmp_path / "out.jsonl"
    for run_number in range(2):
        before = out.read_bytes().count(b"\n") if out.exists() else 0
        process = start(folder, out, "--decode", "threads", tag=f"resumed-{run_number}-{os.getpid()}")
        # records of this run's own: the first run's alone once let the signal reach the resume
        # before Python had started (-15, not 143), on a loaded machine
        wait_for_records(out, before + 8)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 143, stderr
        recorded = len(by_path(read_records(out)))
        assert 0 < recorded < len(many_tiles)
        assert f"interrupted: {len(many_tiles) - recorded} images not processed; " in stderr


def test_an_interrupted_run_counts_its_failed_images_as_processed(tmp_path, monkeypatch):
    """"images not processed" are those without a record: an error record is one (it is not redone)."""
    from gpu_pipeline.engine import job

    folder = tmp_path / "images"
    paths = make_images(folder, 10)
    paths[1].write_bytes(b"")
    paths[3].write_bytes(b"")
    streamed = job.stream

    def stopped_after_six(engine, todo, sink, stop, console, show_bar):  # as a signal after six images
        summary = streamed(engine, todo[:6], sink, stop, console, show_bar)
        summary.interrupted = True
        return summary

    monkeypatch.setattr(job, "stream", stopped_after_six)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["run", str(folder), "--out", str(out), "--backend", "reference"])
    records = by_path(read_records(out))
    assert len(records) == 6 and sum("error" in record for record in records.values()) == 2
    assert "interrupted: 4 images not processed; run the same command again to resume" in result.stderr
    assert result.exit_code == 1, result.output


def test_a_nights_counts_read_in_thousands_in_every_line_of_the_run(tmp_path, monkeypatch):
    """The interrupt, damage and resume lines group thousands as the summary and the progress lines
    do (1,000 images not processed, not 1000): a night's counts read alike in its log."""
    from gpu_pipeline.engine import job

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(1_001):  # (errors: the quickest records to make)
        (folder / f"{index:04d}.png").write_bytes(b"not an image")
    out = tmp_path / "out.jsonl"
    arguments = ["run", str(folder), "--out", str(out), "--backend", "reference"]
    streamed = job.stream

    def stopped_after_one(engine, todo, sink, stop, console, show_bar):  # as a signal after one image
        summary = streamed(engine, todo[:1], sink, stop, console, show_bar)
        summary.interrupted = True
        return summary

    with monkeypatch.context() as patch:
        patch.setattr(job, "stream", stopped_after_one)
        assert "interrupted: 1,000 images not processed; " in runner.invoke(app, arguments).stderr
    assert runner.invoke(app, arguments).exit_code == 1  # the rest
    first, *others = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(first + b"{torn\n" * 1_000 + b"".join(others))  # (between intact records)
    (folder / "new.png").write_bytes(b"not an image")
    stderr = runner.invoke(app, arguments).stderr
    assert f"warning: {out}: skipped 1,000 damaged line(s) between intact records" in stderr
    assert (f"resuming {out}: 1,001 of 1,002 images already recorded (1,001 failed; --retry-failed redoes them)"
            in stderr), stderr


SIGNALLED = """
import os, signal, sys, threading, time
from gpu_pipeline.engine.job import stop_on_signals
sig = int(sys.argv[1])
with stop_on_signals(threading.Event()) as received:
    os.kill(os.getpid(), sig)
    os.kill(os.getpid(), sig)  # the same signal delivered twice, as coreutils timeout does
    time.sleep(0.2)
    print("stopping once:", received, flush=True)
    time.sleep(1.2)
    os.kill(os.getpid(), sig)  # a second one, later: the user insists
    time.sleep(1)
    print("still running", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_second_signal_acts_at_once_but_the_same_one_twice_does_not(sig, hangups_heard):
    """nightly.md: the first Ctrl-C or SIGTERM stops the run after the batches in flight; a second
    one, the system's default action at once (the output stays resumable: see the SIGKILL test)."""
    result = subprocess.run([sys.executable, "-c", SIGNALLED, str(int(sig))], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout == f"stopping once: [{int(sig)}]\n", result.stderr
    assert result.returncode == -sig, result.stderr


def test_a_handler_set_outside_python_gives_way_to_the_default_after_the_run(monkeypatch, hangups_heard):
    """``signal.signal`` returns None for a handler that a program embedding Python set (Python cannot
    put it back): the run's end passed that None on, and ``signal.signal(sig, None)`` raises TypeError."""
    from gpu_pipeline.engine.job import stop_on_signals
    from gpu_pipeline.errors import STOP_SIGNALS

    handlers: dict[int, object] = {}

    def outside_python(sig, handler):
        previous, handlers[sig] = handlers.get(sig), handler
        return previous

    monkeypatch.setattr(signal, "signal", outside_python)
    with stop_on_signals(threading.Event()):
        assert set(handlers) == set(STOP_SIGNALS) and all(callable(h) for h in handlers.values())
    assert handlers == {sig: signal.SIG_DFL for sig in STOP_SIGNALS}


def test_the_handlers_before_the_run_are_put_back_after_it():
    """The command line's own handlers (exit 130 / 143 quietly while it shuts down) come back after
    the run's, not the system's default."""
    from gpu_pipeline.engine.job import stop_on_signals
    from gpu_pipeline.errors import STOP_SIGNALS

    def ours(signum, frame):
        pass

    previous = {sig: signal.signal(sig, ours) for sig in STOP_SIGNALS}
    try:
        with stop_on_signals(threading.Event()):
            assert all(signal.getsignal(sig) is not ours for sig in STOP_SIGNALS)
        assert all(signal.getsignal(sig) is ours for sig in STOP_SIGNALS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc")
def test_decode_processes_end_when_their_run_is_killed(tmp_path):
    """SIGKILL leaves the main process no time to stop its workers: they end on their own."""
    # more pixels than the decode pool may hold ahead (16 MP), in images small enough for decode
    # processes: the workers wait for room, alive, until the kill
    scenes = make_images(tmp_path / "scenes", 250, size=350, seed=2)
    tag = f"sigkill-{os.getpid()}"
    process = start(scenes[0].parent, tmp_path / "out.jsonl", "--decode", "processes", tag=tag)
    wait_for_records(tmp_path / "out.jsonl", 2)
    assert len(tagged(tag)) >= 3  # the run, the fork server, decode processes
    process.kill()
    process.wait()
    wait_until(lambda: not tagged(tag), "the decode processes ending", timeout=20)


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_one_sigterm_ends_a_run_whose_decoder_hangs_and_leaves_no_process(tmp_path, decode):
    """A decoder stuck for good (a codec's endless loop, a hung mount) held the batch being filled:
    SIGTERM waited for it for ever (coreutils ``timeout`` sends one), and the stuck decode process
    outlived the run. Now the run ends with its summary and the records of every finished batch."""
    from tests.runs import hanging_decoder, wait_until_hanging

    images = make_images(tmp_path / "in", 60, size=350, seed=3)  # 2 or 3 images a decoded part
    tag = f"hang-{decode}-{os.getpid()}"
    process = start(images[0].parent, tmp_path / "out.jsonl", "--decode", decode, tag=tag,
                    env=hanging_decoder(tmp_path / "site", "tile00040"))
    wait_for_records(tmp_path / "out.jsonl", 16)
    wait_until_hanging(tmp_path / "site")  # the run is now stuck at tile00040
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    # well within the 10 s that docker stop allows before its SIGKILL (the batch in flight was
    # written only after the decode pool had waited 10 s for the stuck decoder)
    assert time.monotonic() - signalled < 6
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted:" in stderr and "Traceback" not in stderr
    written = by_path(read_records(tmp_path / "out.jsonl"))
    assert 16 <= len(written) <= 40 and str(images[40]) not in written
    wait_until(lambda: not tagged(tag), "the run's processes ending", timeout=30)
    # the next run (the file fixed) does the rest
    assert run(str(images[0].parent), "--out", str(tmp_path / "out.jsonl")).exit_code == 0
    assert set(by_path(read_records(tmp_path / "out.jsonl"))) == {str(path) for path in images}


def test_the_records_before_a_stuck_decode_are_written_while_it_hangs(tmp_path):
    """A batch computed while the next one decodes is written then: the record of the image before
    a stuck one (a batch each here) waited for that decode, for ever without ``--decode-timeout``,
    unwritten, and a kill lost it."""
    from tests.runs import hanging_decoder, wait_until_hanging

    images = make_images(tmp_path / "in", 8, size=520, seed=5)  # a decoded part each (over 256 K pixels)
    tag = f"before-stuck-{os.getpid()}"
    process = start(images[0].parent, tmp_path / "out.jsonl", "--decode", "threads", "--batch-size", "1",
                    tag=tag, env=hanging_decoder(tmp_path / "site", "tile00005"))
    try:
        wait_until_hanging(tmp_path / "site")
        wait_for_records(tmp_path / "out.jsonl", 5)
        assert set(by_path(read_records(tmp_path / "out.jsonl"))) == {str(path) for path in images[:5]}
        assert process.poll() is None  # still stuck on tile00005
    finally:
        process.kill()
        process.wait()


def peak_rss_kib(folder: Path, out: Path) -> int:
    process = start(folder, out, "-q")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, process.stderr.read()
    return usage.ru_maxrss


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_files(tmp_path):
    """Peak RSS of a 5,000-file run stays within a few MB of a 500-file run (queue and batch bound it)."""
    small = make_images(tmp_path / "small", 500, size=16)[0].parent
    large = make_images(tmp_path / "large", 5000, size=16, seed=2)[0].parent
    rss_small = peak_rss_kib(small, tmp_path / "small.jsonl")
    rss_large = peak_rss_kib(large, tmp_path / "large.jsonl")
    assert len(read_records(tmp_path / "large.jsonl")) == 5000
    # 4,500 more paths cost ~1 MB of path strings; anything near O(records) would be far more.
    assert rss_large - rss_small < 24 * 1024, (rss_small, rss_large)


#: A ``sitecustomize`` that sends the run SIGTERM from inside llvmlite's lock (its acquire callback,
#: within ``_LLVMLock.__enter__``, the lock taken) the first time the main thread takes it while the
#: numba backend's helper threads are at work: a SIGTERM during the kernels' loading, at that moment.
TERM_INSIDE_LLVM_LOCK = """
import os, signal, threading
if os.environ.get("TERM_INSIDE_LLVM_LOCK"):
    from llvmlite.binding import ffi
    from gpu_pipeline.backends import numba_cpu

    state = {"helpers": False, "sent": False}
    real = numba_cpu.NumbaCpuBackend._on_workers

    def on_workers(self, kernel, workers, before, after):
        state["helpers"] = state["helpers"] or (workers > 1 and self._helpers is not None)
        return real(self, kernel, workers, before, after)

    def acquired():
        if state["helpers"] and not state["sent"] and threading.current_thread() is threading.main_thread():
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGTERM)

    numba_cpu.NumbaCpuBackend._on_workers = on_workers
    ffi.register_lock_callback(acquired, lambda: None)
"""


def test_sigterm_inside_llvmlites_lock_as_the_kernels_load_ends_the_run(tmp_path):
    """A SIGTERM while numba loads the kernels (start-up: exit 143 at once) raised its exception
    inside llvmlite's lock entry, the lock taken: never released, the numba helper threads waited
    for it, the run for them, for ever (1 of 72 kills in a soak, no output, killed by docker stop's
    SIGKILL). The signal is now acted on just after."""
    from tests.runs import sitecustomize

    folder = tmp_path / "images"
    make_images(folder, 4, size=40)
    env = {**sitecustomize(tmp_path / "site", TERM_INSIDE_LLVM_LOCK), "TERM_INSIDE_LLVM_LOCK": "1"}
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", str(out),
                                "--backend", "numba", "--threads", "2", "--decode", "threads"],
                               cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("the run hung after its SIGTERM") from None
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    assert not lock_path(str(out)).exists()
