"""``--files-from LIST``: the paths of a run or a verify listed in a file, or on standard input.

A night's list of new images (a catalogue query, ``find -newer``) holds more names than a command
line: 50,000 paths of 80 bytes are twice Linux's 2 MB for arguments ("Argument list too long").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpu_pipeline.cli import app
from gpu_pipeline.inputs.discover import listed_paths
from tests.runs import REPO, Terminal, wait_until
from tests.test_nightly import make_images

runner = CliRunner()


def run(*args: str, input: bytes | None = None):
    return runner.invoke(app, ["run", *args, "--backend", "reference", "-q"], input=input)


def lines_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_bytes().splitlines()]


def test_a_listed_run_writes_the_records_of_the_same_paths_given_as_arguments(tmp_path):
    paths = make_images(tmp_path / "images", 6)
    chosen = [paths[4], paths[1], paths[3]]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{path}\n" for path in chosen))
    given, listed = tmp_path / "given.jsonl", tmp_path / "listed.jsonl"
    assert run(*map(str, chosen), "--out", str(given)).exit_code == 0
    assert run("--files-from", str(listing), "--out", str(listed)).exit_code == 0
    assert listed.read_bytes() == given.read_bytes()
    assert [record["path"] for record in lines_of(listed)] == [str(paths[1]), str(paths[3]), str(paths[4])]


def test_a_list_from_standard_input_separated_by_nul_keeps_a_name_with_a_newline(tmp_path):
    """``find -print0 | gpu-pipeline run --files-from -``: NUL separates the names, so a name may
    hold a newline (or end in a space); relative names are the current folder's, as arguments."""
    names = ["plain.png", "two\nlines.png", "ends in a space .png"]
    make_images(tmp_path, 3, names=names)
    out = tmp_path / "out.jsonl"
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = run("--files-from", "-", "--out", str(out), input="\0".join(names).encode() + b"\0")
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    assert sorted(record["path"] for record in lines_of(out)) == sorted(str(tmp_path / name) for name in names)


def test_listed_paths_are_split_at_nul_when_there_is_one_else_at_newlines():
    assert listed_paths(b"a.png\nb c.png\n\nsub/d.png") == ["a.png", "b c.png", "sub/d.png"]  # blank lines skipped
    assert listed_paths(b"a\nb.png\0c.png\0") == ["a\nb.png", "c.png"]
    assert listed_paths(b"caf\xe9.png\n") == [os.fsdecode(b"caf\xe9.png")]  # bytes kept, as an argument's
    assert listed_paths(b"") == []


def test_listed_folders_are_searched_and_the_list_adds_to_the_arguments(tmp_path):
    paths = make_images(tmp_path / "a", 2) + make_images(tmp_path / "b", 2, seed=1)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'b'}\n")
    out = tmp_path / "out.jsonl"
    assert run(str(paths[0]), "--files-from", str(listing), "--out", str(out)).exit_code == 0
    assert [record["path"] for record in lines_of(out)] == [str(paths[0]), str(paths[2]), str(paths[3])]


def test_an_empty_list_is_refused_rather_than_the_sample_set_processed(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n\n")
    out = tmp_path / "out.jsonl"
    result = run("--files-from", str(listing), "--out", str(out))
    assert result.exit_code == 2 and f"--files-from {listing} lists no paths" in result.stderr
    assert not out.exists() and not Path(f"{out}.settings.json").exists()


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_a_list_that_cannot_be_read_is_refused_with_one_line(tmp_path, kind):
    listing = tmp_path / "list.txt"
    if kind == "folder":
        listing.mkdir()
    out = tmp_path / "out.jsonl"
    result = run("--files-from", str(listing), "--out", str(out))
    reason = "No such file or directory" if kind == "missing" else "Is a directory"
    assert result.exit_code == 2 and result.stderr == f"gpu-pipeline: error: cannot read --files-from {listing}: {reason}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == (["list.txt"] if kind == "folder" else [])


def test_a_listed_path_that_does_not_exist_gets_an_error_record_and_the_run_goes_on(tmp_path):
    """A file gone between the night's find and its run (a retention job) refused the whole run, as a
    missing argument does: nothing processed. A list is data: that path gets a read error record
    (--retry-failed redoes it once it is back), and the others their results."""
    paths = make_images(tmp_path / "images", 2)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[0]}\n{tmp_path / 'gone.png'}\n{paths[1]}\n")
    out = tmp_path / "out.jsonl"
    result = run("--files-from", str(listing), "--out", str(out))
    assert result.exit_code == 1, result.output
    records = {record["path"]: record for record in lines_of(out)}
    assert records[str(tmp_path / "gone.png")] == {"path": str(tmp_path / "gone.png"), "stage": "read",
                                                   "error": "cannot read the file: No such file or directory"}
    assert "error" not in records[str(paths[0])] and "error" not in records[str(paths[1])]


def test_a_list_none_of_whose_paths_exists_is_refused(tmp_path):
    """Relative names from another folder, say: nothing to do but error records, so it is refused."""
    listing = tmp_path / "list.txt"
    listing.write_text("images/a.png\nimages/b.png\n")
    out = tmp_path / "out.jsonl"
    result = run("--files-from", str(listing), "--out", str(out))
    assert result.exit_code == 2 and result.stderr == (
        "gpu-pipeline: error: none of the 2 paths listed can be reached (the first: no such file or folder: "
        "images/a.png); relative names are taken from the current folder\n")
    assert not out.exists()


def test_verify_takes_a_list_too(tmp_path):
    paths = make_images(tmp_path / "images", 3)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[2]}\n{paths[0]}\n")
    result = runner.invoke(app, ["verify", "--files-from", str(listing), "--backends", "numba", "--report",
                                 str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"]["compared"] == 2 and report["inputs"]["paths"] == [str(paths[2]), str(paths[0])]


def test_a_list_on_a_terminal_is_refused_instead_of_waiting_for_typing(tmp_path):
    """``--files-from -`` with nothing piped in: the run would wait for a list typed by hand."""
    out = tmp_path / "out.jsonl"
    terminal = Terminal("-m", "gpu_pipeline.cli", "run", "--files-from", "-", "--out", str(out))
    try:
        assert terminal.process.wait(timeout=120) == 2
        wait_until(lambda: b"--files-from -: standard input is a terminal" in terminal.shown, "the refusal")
    finally:
        terminal.hang_up()
    assert not out.exists()


def test_a_list_on_a_closed_standard_input_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", "--files-from", "-", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          preexec_fn=lambda: os.close(0))
    assert done.returncode == 2 and "--files-from -: standard input is closed" in done.stderr
    assert not out.exists()


def test_a_list_of_folders_without_images_is_named_by_its_first_three(tmp_path):
    """The refusal named every path given: a list of 100,000 made a line of megabytes."""
    folders = [tmp_path / f"empty{index}" for index in range(5)]
    for folder in folders:
        folder.mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{folder}\n" for folder in folders))
    result = run("--files-from", str(listing), "--out", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 2
    assert result.stderr == f"gpu-pipeline: error: no image files found in {folders[0]}, {folders[1]}, {folders[2]} and 2 more\n"


def test_a_listed_file_is_taken_whatever_its_extension_as_an_argument_is(tmp_path):
    """In a folder only image extensions are taken; a file named in the list is taken as named."""
    made = make_images(tmp_path / "images", 2)
    paths = [made[0].rename(made[0].with_name("scan.bin")), made[1].rename(made[1].with_name("scan.data"))]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[1]}\n{paths[0]}\n")
    out = tmp_path / "out.jsonl"
    assert run("--files-from", str(listing), "--out", str(out)).exit_code == 0
    assert [record["path"] for record in lines_of(out)] == [str(paths[0]), str(paths[1])]
    assert all(record["width"] == 20 for record in lines_of(out))  # decoded
    assert run(str(tmp_path / "images"), "--out", str(tmp_path / "other.jsonl")).exit_code == 2  # a folder: none


@pytest.mark.parametrize("listing, shown", [(b"\xef\xbb\xbf%s\n", "\\ufeff%s"), (b"%s \n", "'%s '"),
                                            (b"%s\r\n", "%s\\r")])
def test_a_listed_path_missing_for_a_character_unseen_is_refused_naming_it_visibly(tmp_path, listing, shown):
    """A list (here of one path) saved "UTF-8 with BOM" (Notepad, PowerShell), or with a space or CR at a line's end: nothing
    is stripped, so the path does not exist. The refusal named it as the file that does exist (the BOM
    and the space show as nothing), which left the user nothing to go on."""
    (path,) = make_images(tmp_path / "images", 1)
    (tmp_path / "list.txt").write_bytes(listing % os.fsencode(path))
    out = tmp_path / "out.jsonl"
    result = run("--files-from", str(tmp_path / "list.txt"), "--out", str(out))
    assert result.exit_code == 2 and result.stderr == (
        f"gpu-pipeline: error: the one path listed cannot be reached (no such file or folder: {shown % path})\n")
    assert not out.exists()


def test_edge_maps_of_listed_paths_mirror_their_absolute_names_whatever_the_list(tmp_path):
    """ROOT, the folder --save-edges mirrors, is the common folder of the paths given: for a list
    that changes every night it moved every night (a map of img/Forest/b.png went to EDGES/b.png...
    when the night listed only Forest's files, to EDGES/Forest/b.png... when it listed others too).
    A list's maps mirror the images' absolute names: the same place whatever else is listed."""
    forest = make_images(tmp_path / "img" / "Forest", 2)
    lake = make_images(tmp_path / "img" / "SeaLake", 1, seed=1)
    out, edges = tmp_path / "out.jsonl", tmp_path / "edges"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{lake[0]}\n{forest[0]}\n")
    assert run("--files-from", str(listing), "--out", str(out), "--save-edges", str(edges)).exit_code == 0
    listing.write_text(f"{forest[0]}\n{forest[1]}\n")  # the next night's list: Forest's alone
    assert run("--files-from", str(listing), "--out", str(out), "--save-edges", str(edges)).exit_code == 0
    maps = sorted(str(path.relative_to(edges)) for path in edges.rglob("*.edges.png"))
    assert maps == sorted(f"{str(path).lstrip('/')}.edges.png" for path in (*forest, *lake))
