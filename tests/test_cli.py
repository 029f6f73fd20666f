"""The command line: every exit code, the output records, and bad input mixed with good."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import textwrap
import sys
from pathlib import Path
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cpu_reference
from gpu_pipeline.backends.reference import ReferenceBackend
from gpu_pipeline import __version__
from gpu_pipeline.labels.labeller import DEFAULT_LABELS
from gpu_pipeline.cli import app
from gpu_pipeline.config import PipelineConfig
from tests.runs import Terminal, hanging_decoder, sitecustomize, wait_until_hanging

runner = CliRunner()
RESULT_KEYS = {"path", "width", "height", "bands", "backend", "histogram", "edge_count", "edge_density", "label"}


def invoke(*args: str):
    return runner.invoke(app, list(args))


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "sub" / "b.png")
    Image.fromarray(rng.integers(0, 256, (9, 30, 3), dtype=np.uint8)).save(folder / "c.jpg", quality=90)
    return folder


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"gpu-pipeline {__version__}"


def test_run_writes_one_result_per_image(image_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    result = invoke("run", str(image_dir), "--out", str(out), "--backend", "reference", "--low", "30",
                    "--high", "90", "--blur", "3", "--l2")
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert [Path(r["path"]).name for r in records] == ["a.png", "c.jpg", "b.png"]
    config = PipelineConfig(low_threshold=30, high_threshold=90, l2_gradient=True, blur_ksize=3)
    for record in records:
        assert set(record) == RESULT_KEYS
        image = np.asarray(Image.open(record["path"]))
        stages = cpu_reference.process_image(image, config)
        assert record["histogram"] == stages.histogram.tolist()
        assert record["edge_count"] == stages.edge_count
        assert record["edge_density"] == round(stages.edge_count / image.shape[0] / image.shape[1], 6)
        assert record["label"] in DEFAULT_LABELS
    assert "3 ok" in result.stderr and str(out) in result.stderr


def test_quiet_prints_nothing(image_dir, tmp_path):
    result = invoke("run", str(image_dir), "--out", str(tmp_path / "o.jsonl"), "--backend", "reference", "-q")
    assert result.exit_code == 0
    assert result.stderr == "" and result.stdout == ""


def test_stdout_output(image_dir):
    result = invoke("run", str(image_dir / "a.png"), "--out", "-", "--backend", "reference", "-q")
    assert result.exit_code == 0
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["width"] == 40 and record["height"] == 32


def test_glob_filters(image_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    assert invoke("run", str(image_dir), "--glob", "*.jpg", "--out", str(out), "-q").exit_code == 0
    assert [Path(r["path"]).name for r in read_records(out)] == ["c.jpg"]


def test_bad_files_get_error_records_and_the_run_goes_on(image_dir, tmp_path):
    (image_dir / "empty.png").write_bytes(b"")
    (image_dir / "text.jpg").write_text("this is not an image\n")
    good = (image_dir / "a.png").read_bytes()
    (image_dir / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out.jsonl"
    result = invoke("run", str(image_dir), "--out", str(out), "--backend", "reference")
    assert result.exit_code == 1, result.output
    records = {Path(r["path"]).name: r for r in read_records(out)}
    assert len(records) == 6
    for name in ("empty.png", "text.jpg", "truncated.png"):
        assert set(records[name]) == {"path", "stage", "error"}
        assert records[name]["error"] and "\n" not in records[name]["error"]
    for name in ("a.png", "c.jpg", "b.png"):
        assert set(records[name]) == RESULT_KEYS
    assert "3 failed" in result.stderr


def test_the_summary_reads_as_the_readmes_example(image_dir, tmp_path, monkeypatch):
    """README: the counts line ("N images with backend B in S s: K ok, F failed (R images/s, M MP/s)"),
    the labels most frequent first, and the output named by its absolute path, as the default
    relative `--out results.jsonl` is."""
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(image_dir / "white.png")
    (image_dir / "text.jpg").write_text("this is not an image\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("run", str(image_dir), "--out", "out.jsonl", "--backend", "reference")
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()  # (after a "ready in" line when a loaded machine made the warm-up slow)
    counts = r"5 images with backend reference in \d+\.\d\d s: 4 ok, 1 failed \([\d,]+ images/s, [\d,]+\.\d MP/s\)"
    assert [line for line in lines if re.fullmatch(counts, line)] == [lines[-4]], lines
    assert lines[-3:] == ["failures by stage: decode: 1", "labels: busy 3, bright-smooth 1",
                          f"results: {tmp_path / 'out.jsonl'}"]
    assert "resuming" not in result.stderr  # (a first run has nothing recorded before)


def test_a_run_whose_stderr_is_no_terminal_says_how_far_it_is_every_minute(tmp_path, monkeypatch):
    """A cron job's log had nothing from a run of hours until its summary: without a terminal (no
    bar), a line every PROGRESS_EVERY_S seconds says how far it is; none with --quiet, none once done.
    The share is rounded down: 49,999 of 50,000 is not 100 %."""
    import gpu_pipeline.engine.job as job

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(6):
        Image.fromarray(np.full((8, 8), index * 40, np.uint8)).save(folder / f"{index}.png")
    ticks = iter(range(0, 10**6, 30))  # 30 s a batch
    monkeypatch.setattr(job, "_clock", lambda: next(ticks))
    result = invoke("run", str(folder), "--out", str(tmp_path / "out.jsonl"), "--backend", "reference",
                    "--batch-size", "1")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress:")]
    # (the first a minute after the first image, from which the rate counts)
    assert lines == ["progress: 3 of 6 images (50%) in 0:01:30, 0.03 images/s, about 0:01:30 left",
                     "progress: 5 of 6 images (83%) in 0:02:30, 0.03 images/s, about 0:00:30 left"], result.stderr
    quiet = invoke("run", str(folder), "--out", str(tmp_path / "quiet.jsonl"), "--backend", "reference",
                   "--batch-size", "1", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_the_default_pixel_limit_is_one_gigapixel_and_read_from_the_header(image_dir, tmp_path):
    """README: images above --max-pixels (default one gigapixel) are refused before their pixels are
    decoded. The PNG declares 31623 x 31623 = 1,000,014,129 pixels and holds 100 bytes of data: a
    refusal naming the limit shows the header decided it. (A raised default let such bombs through;
    a lowered one refuses big scenes, and both make every earlier output's resume "other settings".)"""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = image_dir / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 31623, 31623, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))
    out = tmp_path / "out.jsonl"
    result = invoke("run", str(image_dir), "--out", str(out), "--backend", "reference", "-q")
    assert result.exit_code == 1, result.output
    records = {Path(r["path"]).name: r for r in read_records(out)}
    assert records["bomb.png"] == {"path": str(bomb), "stage": "decode", "error": (
        "31623 x 31623 = 1,000,014,129 pixels is over the limit of 1,000,000,000 (decompression-bomb guard)")}
    assert all("error" not in records[name] for name in ("a.png", "c.jpg", "b.png"))


def test_save_edges_writes_reference_edge_maps(image_dir, tmp_path):
    edges_dir = tmp_path / "edges"
    result = invoke("run", str(image_dir), "--out", str(tmp_path / "o.jsonl"), "--backend", "reference",
                    "--save-edges", str(edges_dir), "-q")
    assert result.exit_code == 0
    saved = np.asarray(Image.open(edges_dir / "sub" / "b.png.edges.png"))
    expected = cpu_reference.process_image(np.asarray(Image.open(image_dir / "sub" / "b.png")), PipelineConfig())
    assert np.array_equal(saved, expected.edges)


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/path"], "/no/such/path"),
        (["--backend", "nope"], "unknown backend"),
        (["--low", "-1"], "--low must be between 0 and 2147483647, got -1.0"),  # named as the option
        (["--high", "nan"], "--high must be between 0 and 2147483647, got nan"),
        (["--blur", "4"], "--blur must be one of (3, 5, 7), got 4"),
        (["--bands", "a,b"], "--bands takes comma-separated 1-based band numbers such as 4,3,2, got 'a,b'"),
        (["--bands", "0,1,2"], "1-based"),
        (["--bands", "1,2"], "1 or 3"),
        (["--stretch", "magic"], "--stretch must be one of percentile, minmax, bitdepth, got 'magic'"),
        (["--batch-size", "0"], "--batch-size"),
        (["--workers", "0"], "--workers"),
        (["--workers", "1025"], "--workers must be at most 1024, got 1025"),  # a slip once filled the memory
        (["--threads", "9223372036854775807"], "--threads must be at most 1024"),
        (["--workers", "1024", "--threads", "1024", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),  # 1024 is allowed
        (["--dask-timeout", "0"], "--dask-timeout must be > 0 and at most 86400 seconds, got 0.0"),
        (["--dask", "local:1", "--dask-timeout", "inf"], "--dask-timeout must be > 0 and at most 86400 seconds"),
        (["--dask", "local:1", "--dask-timeout", "1e308"], "--dask-timeout must be > 0 and at most 86400 seconds"),
        (["--decode", "fibers"], "--decode must be one of auto, threads, processes"),
        (["--max-pixels", "0"], "--max-pixels must be >= 1, got 0"),
        (["--backend", "numba", "--device", "0"], "--device 0 needs a GPU backend"),
        (["--backend", "reference", "--device", "1"], "needs a GPU backend"),
        (["--backend", "cupy", "--device", "-1"], "--device must be >= 0"),
        (["--device", "1", "--dask", "local:1"], "--device picks a GPU of this machine"),
        (["--device", "0", "--dask", "local:1"], "--device picks a GPU of this machine"),  # 0, the first GPU, too
        (["--decode", "processes", "--dask", "local:1"], "--decode processes is for a run on this machine"),
        (["--decode-timeout", "5", "--dask", "local:1"], "--decode-timeout is for a run on this machine"),
        (["--dask", "local-cuda"], "needs dask-cuda"),  # not among the test dependencies
        # what click finds as it parses: its usage lines and a framed box (six lines) before
        (["--low", "abc"], "gpu-pipeline: error: Invalid value for '--low': "),
        (["--bogus"], "gpu-pipeline: error: No such option: --bogus"),
        (["--glob", ""], "gpu-pipeline: error: Invalid value for '--glob': empty"),
    ],
)
def test_usage_errors_exit_2_with_one_line(image_dir, tmp_path, args, message):
    if args[0].startswith("--"):
        args = [str(image_dir), *args]
    result = invoke("run", *args, "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("args", [
    ["run", ""], ["run", "DATA", "--save-edges", ""], ["run", "DATA", "--glob", ""], ["run", "DATA", "--out", ""],
    ["run", "DATA", "--model", ""], ["verify", "DATA", "--report", ""], ["verify", "DATA", "--model", ""], ["bench", ""],
    ["fit", "", "--out", "m.json"],
    ["fit", "DATA", "--out", ""], ["evaluate", "", "--model", "eurosat"],
    ["evaluate", "DATA", "--model", "eurosat", "--plot", ""],
])
def test_an_empty_path_or_name_is_refused_not_taken_for_the_current_folder(args, image_dir, tmp_path, monkeypatch):
    """A shell variable left unset gives "": Path("") is ".", and --save-edges "" wrote edge maps here."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    result = runner.invoke(app, [str(image_dir) if arg == "DATA" else arg for arg in args])
    assert result.exit_code == 2, result.output
    assert "empty (a shell variable left unset?)" in result.output and "Traceback" not in result.output
    assert list((tmp_path / "here").iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["verify", "DATA", "--report", "-"], "standard output is for run --out - only"),
    (["bench", "DATA", "--json", "-"], "standard output is for run --out - only"),
    (["fit", "DATA", "--out", "-"], "standard output is for run --out - only"),
    (["verify", "DATA", "--report", "r.json/"], "ends with /; name a file"),
    (["fit", "DATA", "--out", "m.json/"], "ends with /; name a file"),
    (["evaluate", "DATA", "--model", "eurosat", "--plot", "p.png/"], "ends with /; name a file"),
    (["evaluate", "DATA", "--model", "eurosat", "--plot", "p.pdf"], "the plot is a PNG: name it .png"),
    (["bench", "DATA", "--plot", "p.svg"], "the plot is a PNG: name it .png"),
])
def test_a_file_a_command_writes_is_named_as_a_file(args, message, image_dir, tmp_path, monkeypatch):
    """"-" made a file named "-" (only run --out - is standard output), "r.json/" wrote r.json, and
    --plot p.pdf wrote PNG bytes under that name."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    result = runner.invoke(app, [str(image_dir) if arg == "DATA" else arg for arg in args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split()) and "Traceback" not in result.output
    assert list((tmp_path / "here").iterdir()) == []


LONG = "y" * 300  # over the 255 bytes a file name may have


@pytest.mark.parametrize("args", [
    ["run", LONG], ["run", f"DATA/{LONG}"], ["run", "DATA", "--save-edges", LONG], ["run", "DATA", "--out", LONG],
    ["run", "DATA", "--out", f"{LONG}/o.jsonl"], ["run", "DATA", "--model", LONG],
    ["verify", "DATA", "--report", LONG], ["bench", "DATA", "--json", LONG], ["fit", "DATA", "--out", LONG],
    ["evaluate", "DATA", "--model", LONG], ["evaluate", "DATA", "--model", "eurosat", "--plot", LONG],
])
def test_a_name_too_long_is_refused_not_a_traceback(args, image_dir, tmp_path, monkeypatch):
    """``Path.exists`` raises on such a name (Python before 3.13) deep in a command."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [arg.replace("DATA", str(image_dir)) for arg in args])
    assert result.exit_code == 2, result.output
    assert "name too long" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_retry_failed_with_standard_output_is_refused(image_dir):
    """Standard output holds no earlier records to redo: the flag did nothing, without a word."""
    result = invoke("run", str(image_dir), "--out", "-", "--retry-failed")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == ("gpu-pipeline: error: --retry-failed redoes the failed images of an --out file; "
                             "standard output holds none\n")


def test_a_name_with_a_c1_control_or_a_line_separator_is_escaped_in_messages(tmp_path):
    """U+009B is the terminal's CSI, as ESC [ is: a file name holding it could clear the screen or
    recolour the log through an error message. U+2028 breaks the line in some consoles."""
    missing = tmp_path / "scan\u009b2J\u2028.png"
    result = invoke("run", str(missing), "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2
    assert "scan\\u009b2J\\u2028.png" in result.stderr and "\u009b" not in result.stderr


@pytest.mark.parametrize("args, message", [(["runn"], "No such command 'runn'. Did you mean 'run'? (see gpu-pipeline --help)"),
                                           (["--bogus"], "No such option: --bogus (see gpu-pipeline --help)"),
                                           (["fit"], "Missing argument 'labeled_dir'. (see gpu-pipeline fit --help)"),
                                           (["run", "--low"], "Option '--low' requires an argument. (see gpu-pipeline --help)")])
def test_a_mistyped_command_line_is_one_line_and_exit_2(args, message):
    """As every refusal: not click's usage lines and framed box. (No command at all gives the help.)"""
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"gpu-pipeline: error: {message}\n"


@pytest.mark.parametrize("args, message", [(["fit"], "Missing argument 'labeled_dir'. (see gpu-pipeline fit --help)"),
                                           (["--bogus"], "No such option: --bogus (see gpu-pipeline --help)"),
                                           (["run", "data", "--low", "abc"],  # nightly.md's example
                                            "Invalid value for '--low': Input should be a valid number, unable to "
                                            "parse string as a number (see gpu-pipeline run --help)")])
def test_python_dash_m_points_to_the_same_help_as_the_command(args, message):
    """``python -m gpu_pipeline.cli`` is the ``gpu-pipeline`` command: its hint said "see gpu-pipeline
    -m gpu_pipeline.cli fit --help", a command that does not exist."""
    done = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", *args], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == f"gpu-pipeline: error: {message}\n"


def test_each_commands_description_survives_python_dash_OO():
    """Under ``python -OO`` (PYTHONOPTIMIZE=2, which some images set) the docstrings are stripped, and
    with them each command's description: `run --help` lost its exit statuses, the list of commands
    its summaries."""
    import typer.main

    script = ("import json, typer.main; from gpu_pipeline.cli import app; "
              "print(json.dumps({name: found.help for name, found in typer.main.get_command(app).commands.items()}))")
    done = subprocess.run([sys.executable, "-OO", "-c", script], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    described = {name: found.help for name, found in typer.main.get_command(app).commands.items()}
    assert all(described.values()) and json.loads(done.stdout) == described, done.stderr


_DESCRIBED = b'\n\n\ndef command():\n    """The description."""\n'


_MOVED = (None, "The description.")  # (Python 3.13's inspect finds the function where it moved to; 3.11's does not)


@pytest.mark.parametrize("source_now, descriptions", [
    (_DESCRIBED, ("The description.",)),
    (_DESCRIBED + b"# \xff, not UTF-8\n", (None,)),
    (b"x = 1\n" + _DESCRIBED, _MOVED),  # the block found is no function: TypeError
    (b"call(\n    key=lambda item: item)\n" + _DESCRIBED, _MOVED),  # half a statement: SyntaxError
    (b'def other():\n    """Another function\'s."""\n\n\n' + _DESCRIBED, _MOVED),  # not its own
])
def test_a_description_from_a_source_that_is_not_the_codes_is_none_never_a_crash(tmp_path, source_now,
                                                                                  descriptions):
    """Under ``python -OO`` each command's description is read from its source file. Where that file
    is no longer the one its bytecode was compiled from (unchecked-hash .pyc files, a source edited
    since), the lines found at the function's line number raised TypeError or SyntaxError: every
    command of ``gpu-pipeline`` crashed with a traceback as it was built, ``--help`` too; another
    function's docstring found there is not shown either."""
    import importlib.util
    import py_compile

    from gpu_pipeline.cli.options import _docstring_in_source

    path = tmp_path / "stale.py"
    path.write_bytes(_DESCRIBED)
    py_compile.compile(str(path), invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    path.write_bytes(source_now)  # (the bytecode is still used: its hash is never checked)
    spec = importlib.util.spec_from_file_location("stale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert _docstring_in_source(module.command) in descriptions


def latin_1_environment(tmp_path) -> dict:
    """The environment of a Latin-1 locale (LANG=en_US.ISO-8859-1, an old server's cron), made by
    localedef under ``tmp_path``; the test is skipped where it cannot be made."""
    locales = tmp_path / "locales"
    locales.mkdir()
    made = subprocess.run(["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(locales / "en_US.ISO-8859-1")],
                          capture_output=True, timeout=60) if shutil.which("localedef") else None
    env = {**{name: value for name, value in os.environ.items() if not name.startswith(("LC_", "LANG", "PYTHONUTF8"))},
           "LOCPATH": str(locales), "LANG": "en_US.ISO-8859-1"}
    encoding = subprocess.run([sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"], env=env,
                              capture_output=True, text=True, timeout=60).stdout.strip()
    if made is None or made.returncode != 0 or encoding != "iso8859-1":
        pytest.skip("needs localedef and glibc's en_US locale source, to make a Latin-1 locale")
    return env


def forest_image(tmp_path) -> Path:
    """A folder that holds one image, Forêt.png (its name in UTF-8)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), (40, 120, 40)).save(images / "Forêt.png")
    return images


def run_in_locale(env: dict, images: Path, out: Path, *extra: str, flags: tuple[str, ...] = ()):
    """``python FLAGS -m gpu_pipeline.cli run IMAGES --out OUT`` (the reference backend, quiet) in
    the environment ``env``; the finished process."""
    return subprocess.run([sys.executable, *flags, "-m", "gpu_pipeline.cli", "run", str(images), "--out", str(out),
                           "--backend", "reference", "--quiet", *extra], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)


def test_a_latin_1_locale_records_names_as_a_utf_8_one_does(tmp_path):
    """Under a Latin-1 locale (LANG=en_US.ISO-8859-1, an old server's cron) Python decodes file names
    as Latin-1: "Forêt.png" was recorded as "ForÃªt.png", a name no reader could open, and a resume of
    a night run under UTF-8 did those images again, a second record each. The command reads names as
    UTF-8 whatever the locale (Python's UTF-8 mode), as docs/nightly.md says."""
    env = latin_1_environment(tmp_path)
    images = forest_image(tmp_path)
    out = tmp_path / "r.jsonl"
    done = run_in_locale(env, images, out)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["path"] for line in out.read_text(encoding="utf-8").splitlines()] == [str(images / "Forêt.png")]


def test_a_users_pythonutf8_0_keeps_the_locales_names(tmp_path):
    """PYTHONUTF8=0, as ``-X utf8=0``, is the user's word for the locale's encoding (a resume of an
    output an earlier version wrote under Latin-1): the restart overrode it with PYTHONUTF8=1."""
    env = {**latin_1_environment(tmp_path), "PYTHONUTF8": "0"}
    images = forest_image(tmp_path)
    out = tmp_path / "r.jsonl"
    done = run_in_locale(env, images, out)
    assert done.returncode == 0, done.stderr
    as_latin_1 = os.fsencode(images / "Forêt.png").decode("latin-1")
    assert [record["path"] for record in read_records(out)] == [as_latin_1]


@pytest.mark.parametrize("mode", ["utf8=0", "utf8"])
def test_decode_processes_read_names_as_the_command_does_whatever_its_utf_8_mode(tmp_path, mode):
    """The decode processes' interpreter reads names in the command's encoding. Under a Latin-1
    locale, with ``-X utf8=0`` (the user's: the restart leaves it, but set PYTHONUTF8=1, which the
    fork server took) or ``-X utf8`` (which it did not take), each side read the name in another
    encoding, and every image decoded in a process was "No such file or directory"."""
    env = latin_1_environment(tmp_path)
    images = forest_image(tmp_path)
    out = tmp_path / "r.jsonl"
    # (--decode-timeout: every image is decoded in a process)
    done = run_in_locale(env, images, out, "--decode-timeout", "60", flags=("-X", mode))
    assert done.returncode == 0 and "error" not in read_records(out)[0], done.stderr + out.read_text(errors="replace")


@pytest.mark.parametrize("program", ["read from standard input", "its arguments from standard input"])
def test_a_program_that_calls_main_under_a_latin_1_locale_runs_the_command(tmp_path, program):
    """The command starts again in UTF-8 mode by running the interpreter as it was started. A program
    read from standard input (``python - <<EOF``, a cron job's here-document), or one that took its
    arguments from there, was started again with nothing left to read: it ended at once, exit 0 or
    the help, having done nothing. A program the restart cannot run again keeps its process."""
    env = latin_1_environment(tmp_path)
    images = forest_image(tmp_path)
    out = tmp_path / "r.jsonl"
    arguments = ["run", str(images), "--out", str(out), "--backend", "reference", "-q"]
    if program == "read from standard input":
        command, given = [sys.executable, "-"], ("import sys\nfrom gpu_pipeline.cli import main\n"
                                                 f"sys.argv = ['gpu-pipeline', *{arguments!r}]\nmain()\n")
    else:
        command = [sys.executable, "-c", "import sys\nfrom gpu_pipeline.cli import main\n"
                                         "sys.argv = ['gpu-pipeline', *sys.stdin.read().split('\\0')]\nmain()\n"]
        given = "\0".join(arguments)
    done = subprocess.run(command, input=given, env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert done.returncode == 0 and len(read_records(out)) == 1, done.stdout + done.stderr


def test_no_command_at_all_gives_the_help_not_an_error_line():
    """click's NoArgsIsHelpError is a usage error too: taken for one, the help became one error line."""
    result = runner.invoke(app, [])
    assert result.exit_code == 2 and result.stderr == ""
    assert "Usage:" in result.stdout and all(command in result.stdout for command in ("run", "verify", "fit"))


@pytest.mark.parametrize("args, message", [
    (["evaluate", "DATA", "--model", "eurosat", "--plot", "p.PNG", "--bands", "x"], "--bands takes comma-separated"),
    (["bench", "DATA", "--plot", "p.PNG", "--repeat", "0"], "--repeat must be >= 1, got 0"),
])
def test_a_plot_named_png_in_capitals_is_taken(args, message, image_dir, tmp_path, monkeypatch):
    """The suffix is compared whatever its case: the refusal is the later option's, not the plot's."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [str(image_dir) if arg == "DATA" else arg for arg in args])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


@pytest.mark.parametrize("value", ["0", "-3", "abc", "", "\u00b2"])  # (a digit to str.isdigit, not to int())
def test_a_bad_numba_num_threads_is_one_line_and_exit_2(value, tmp_path):
    """numba raised (0) or warned with a traceback's text ("abc") from deep inside every command."""
    result = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "info"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "NUMBA_NUM_THREADS": value})
    assert result.returncode == 2
    assert result.stderr == f"gpu-pipeline: error: NUMBA_NUM_THREADS must be a whole number >= 1, got {value!r}\n"


def test_a_fifo_where_the_settings_record_goes_is_refused_without_blocking(image_dir, tmp_path):
    os.mkfifo(tmp_path / "r.jsonl.settings.json")
    result = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(image_dir), "--out",
                             str(tmp_path / "r.jsonl"), "-b", "reference", "-q"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "is not a gpu-pipeline settings record" in result.stderr, result.stderr


def test_unwritable_output_is_a_usage_error(image_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("run", str(image_dir), "--out", str(blocker / "out.jsonl"))
    assert result.exit_code == 2 and f"{blocker} is not a folder" in result.stderr


def test_empty_folder_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("run", str(tmp_path / "empty"), "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2 and "no image files" in result.stderr


def test_unavailable_gpu_backend_says_why(image_dir, tmp_path):
    from gpu_pipeline.backends import unavailable_reason

    reason = unavailable_reason("cuda")
    if reason is None:
        pytest.skip("a real GPU is present: the cuda backend is available")
    result = invoke("run", str(image_dir), "--backend", "cuda", "--out", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 2
    assert "unavailable" in result.stderr and reason in result.stderr


def test_default_run_processes_the_bundled_data(tmp_path, bundled_data_dir):
    if not any(bundled_data_dir.rglob("*.jpg")):
        pytest.skip("data/ holds no sample images")
    out = tmp_path / "results.jsonl"
    result = invoke("run", "--out", str(out), "--backend", "reference")
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert len(records) == sum(1 for p in bundled_data_dir.rglob("*") if p.suffix.lower() in
                               {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
    assert all(set(r) == RESULT_KEYS for r in records)
    # README's `gpu-pipeline run` example: its labels line is what the run tallies and prints
    shown = re.search(r"^\$ gpu-pipeline run\n.*\n(labels: .*)$", (REPO / "README.md").read_text(encoding="utf-8"),
                      re.MULTILINE).group(1)
    assert shown in result.stderr.splitlines(), result.stderr


def test_the_readmes_example_output_is_the_bundled_datas(bundled_data_dir):
    """README's `gpu-pipeline run` and `head -n 1 results.jsonl` examples, and the image count of the
    verify examples (README, docs/verify.md): the sample set's count and its first record."""
    from gpu_pipeline.inputs.discover import discover

    files = discover([bundled_data_dir])
    if not files:
        pytest.skip("data/ holds no sample images")
    readme = (bundled_data_dir.parent / "README.md").read_text(encoding="utf-8")
    verify_doc = (bundled_data_dir.parent / "docs" / "verify.md").read_text(encoding="utf-8")
    counts = re.findall(r"^(\d+) images (?:with backend|compared with the reference)", readme, re.MULTILINE)
    counts += re.findall(r"verify --against-opencv --report verify.json\n(\d+) images compared", verify_doc)
    assert len(counts) == 3 and set(counts) == {str(len(files))}, counts
    shown = re.search(r'^\{"path":"[^"]*/sample_data/([^"]+)",(.+)$\n (.+)$', readme, re.MULTILINE)
    assert files[0].relative_to(bundled_data_dir).as_posix() == shown.group(1)
    fields = dict(re.findall(r'"(\w+)":("[^"]*"|[\d.]+)', shown.group(2) + shown.group(3)))
    result = invoke("run", str(files[0]), "--out", "-", "--backend", "reference", "-q")
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    for name in ("width", "height", "bands", "edge_count", "edge_density", "label"):
        assert json.dumps(record[name]) == fields[name], name
    histogram = re.search(r'"histogram":\[([^\]]*)\]', shown.group(3)).group(1)  # 0,0,0,...,5,15,29,...,0
    first, middle, last = (part.strip(",").split(",") for part in histogram.split("..."))
    assert record["histogram"][:3] == [int(v) for v in first] and record["histogram"][-1:] == [int(v) for v in last]
    assert [v for v in record["histogram"] if v][:3] == [int(v) for v in middle]


def test_a_run_loads_the_numba_kernels_without_importing_scipy_linalg(tmp_path, image_dir):
    """numba's math module asks, when first imported, whether scipy's BLAS is there for np.dot:
    importing scipy.linalg was 0.09 s of a 0.75 s one-image run (2 cores), for kernels that call no
    BLAS. The command line loads the kernels with it hidden, and hides it no longer after: a later
    import of it works (the API leaves a program's own numba alone)."""
    script = textwrap.dedent(f"""
        import importlib, sys
        from gpu_pipeline.cli.app import main
        sys.argv = ["gpu-pipeline", "run", {str(image_dir / "a.png")!r}, "--out", {str(tmp_path / "o.jsonl")!r},
                    "--backend", "numba", "-q"]
        try:
            main()
        except SystemExit as end:
            code = end.code
        loaded = "numba.np.arraymath" in sys.modules
        print(code, loaded, "scipy.linalg" in sys.modules, importlib.import_module("scipy.linalg.cython_blas") is not None)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["0", "True", "False", "True"], done.stdout + done.stderr
    assert read_records(tmp_path / "o.jsonl")[0]["histogram"] == cpu_reference.process_image(
        np.asarray(Image.open(image_dir / "a.png")), PipelineConfig()).histogram.tolist()


def test_console_script_runs_without_traceback(tmp_path):
    """The real entry point (python -m) maps a usage error to exit 2 without a traceback."""
    proc = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("gpu-pipeline: error:") and "Traceback" not in proc.stderr


def test_the_readme_synopsis_lists_every_run_option_with_its_default():
    """README's Usage block names each option of `gpu-pipeline run`, and a number shown is its default."""
    import re

    import typer.main

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    synopsis = readme[readme.index("gpu-pipeline run [PATHS...]"):readme.index("gpu-pipeline verify | bench")]
    command = typer.main.get_command(app).commands["run"]
    options = {name: param for param in command.params for name in param.opts + param.secondary_opts
               if name.startswith("--")}
    shown = set(re.findall(r"--[a-z][a-z0-9-]*", synopsis))
    assert shown == set(options), (shown ^ set(options))
    for name, value in re.findall(r"\[(--[a-z][a-z0-9-]*) ([0-9.]+|results\.jsonl)\]", synopsis):
        default = options[name].default
        assert (float(value) if isinstance(default, (int, float)) else value) == default, name


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["fit", "--help"], ["run", "missing-folder"]])
def test_help_and_refusals_do_not_import_numba(args):
    """numba's import is about 0.16 s that ``--help`` and a refused run have no use for (the
    ``fit`` and ``evaluate`` modules import it when those commands run)."""
    code = ("import sys\nfrom gpu_pipeline.cli.app import main\nsys.argv = ['gpu-pipeline', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
            "print('numba' in sys.modules, code)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert proc.stdout.splitlines()[-1] == ("False 2" if args[-1] == "missing-folder" else "False 0"), proc.stderr


class SlowToCompile(ReferenceBackend):
    """The reference, as a backend whose kernels are not in the cache: warming up takes a while."""

    name = "slow-to-compile"

    def compiles_on_warm_up(self) -> bool:
        return True

    def warm_up(self, config=None) -> None:
        time.sleep(1.1)


def test_a_first_compile_is_announced_before_it_starts_and_timed_after(tmp_path, image_dir, register):
    register(SlowToCompile)
    result = CliRunner().invoke(app, ["run", str(image_dir), "--out", str(tmp_path / "r.jsonl"),
                                      "--backend", "slow-to-compile"])
    assert result.exit_code == 0, result.output
    before = result.stderr.index("compiling the slow-to-compile kernels (first run after install")
    assert before < result.stderr.index("backend slow-to-compile ready in ")


@pytest.mark.parametrize("cache", ["none", "fresh"])
def test_kernels_compiled_at_every_run_for_want_of_a_cache_are_announced_so(tmp_path, image_dir, register,
                                                                           monkeypatch, cache):
    """It said "later runs load them from the cache" at every run, where none could be written, or
    only a fresh private folder (mkdtemp) that no later run finds."""
    from gpu_pipeline.backends import _numba_setup

    register(SlowToCompile)
    monkeypatch.setattr(_numba_setup, "CACHE_DIR", None if cache == "none" else str(tmp_path / "fresh"))
    monkeypatch.setattr(_numba_setup, "CACHE_IS_FRESH", cache == "fresh")
    result = CliRunner().invoke(app, ["run", str(image_dir), "--out", str(tmp_path / "r.jsonl"),
                                      "--backend", "slow-to-compile"])
    assert result.exit_code == 0, result.output
    assert "(about 15 s, at every run: no writable cache folder;" in result.stderr
    assert "ready in" in result.stderr and "cached" not in result.stderr.replace("no cache", "")


def test_kernels_found_in_the_cache_are_not_announced(tmp_path, image_dir, register):
    register(SlowToCompile)
    SlowToCompile.compiles_on_warm_up = lambda self: False
    try:
        result = CliRunner().invoke(app, ["run", str(image_dir), "--out", str(tmp_path / "r.jsonl"),
                                          "--backend", "slow-to-compile"])
    finally:
        del SlowToCompile.compiles_on_warm_up
    assert result.exit_code == 0, result.output
    assert "compiling" not in result.stderr
    # a slow load (1.1 s here) is timed as a load: it said "(kernels compiled once, then cached)"
    assert "backend slow-to-compile ready in " in result.stderr and "(kernels loaded)" in result.stderr
    assert "compiled" not in result.stderr


def test_a_slow_labeller_warm_up_is_timed(tmp_path, image_dir, monkeypatch):
    """README: a model's first load (its kernels compiled) says "labels ready in ..."."""
    import gpu_pipeline.engine.job as runner

    monkeypatch.setattr(runner, "warm_up_labeller", lambda labeller: time.sleep(1.1))
    result = CliRunner().invoke(app, ["run", str(image_dir), "--out", str(tmp_path / "r.jsonl"),
                                      "--backend", "reference"])
    assert result.exit_code == 0, result.output
    assert "labels ready in 1." in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_a_terminal_gets_a_progress_bar_with_count_rate_and_eta(tmp_path, bundled_data_dir):
    """README: a progress bar (count, images/s, ETA) shows on a terminal, and only there."""
    import os
    import pty

    primary, secondary = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "gpu_pipeline.cli", "run", str(bundled_data_dir / "eurosat"),
                                "--out", str(tmp_path / "r.jsonl"), "--backend", "reference"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary,
                               env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the run ended and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    assert process.wait(timeout=120) == 0, shown
    text = shown.decode(errors="replace")
    assert "processing" in text and "img/s" in text and "ETA" in text, text
    assert "50/50" in text  # the count, done
    piped = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(bundled_data_dir / "eurosat"),
                            "--out", str(tmp_path / "piped.jsonl"), "--backend", "reference"],
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "img/s" not in piped.stderr and "ETA" not in piped.stderr, piped.stderr


def test_the_labeller_is_warmed_up_before_the_first_batch(tmp_path, image_dir, monkeypatch):
    """A model's feature kernels compile on first use: that must happen before the run is timed."""
    import gpu_pipeline.engine.job as runner
    from gpu_pipeline.labels.labeller import default_labels

    calls = []

    def recording_labeller(images, histograms, edge_counts):
        calls.append([image.shape for image in images])
        return default_labels(images, histograms, edge_counts)

    monkeypatch.setattr(runner, "label_function", lambda model, config: recording_labeller)
    result = CliRunner().invoke(app, ["run", str(image_dir), "--out", str(tmp_path / "r.jsonl"),
                                      "--backend", "reference", "-q"])
    assert result.exit_code == 0, result.output
    assert calls[0] == [(8, 8), (8, 8, 3)]  # the warm-up, first
    assert sum(len(shapes) for shapes in calls[1:]) == len(list(image_dir.iterdir()))


@pytest.mark.parametrize("user_setting", [None, "4"])
def test_the_command_line_leaves_the_collector_on_and_blas_to_one_thread(user_setting):
    """Start-up freezes what its imports made and turns the collector back on (a run must not grow
    without bound); OpenBLAS gets one thread unless the user said otherwise."""
    import os

    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_NUM_THREADS"}
    if user_setting is not None:
        env["OPENBLAS_NUM_THREADS"] = user_setting
    probe = ("import gc, os, gpu_pipeline.cli; "
             "print(gc.isenabled(), gc.get_freeze_count() > 10000, os.environ['OPENBLAS_NUM_THREADS'])")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.split() == ["True", "True", user_setting or "1"]
    off = subprocess.run([sys.executable, "-c", "import gc; gc.disable(); import gpu_pipeline.cli; print(gc.isenabled())"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    assert off.stdout.split()[0] == "False"  # an importer that had turned the collector off keeps it off


# ---------------------------------------------------------------- the standard streams a cron job or a pipe gives

REPO = Path(__file__).resolve().parent.parent
needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


def command(*args: str, stdout=None, stderr=subprocess.PIPE, env=None, shell_redirects: str = ""):
    """``gpu-pipeline ARGS`` as a real process (its descriptors are the point), from the checkout."""
    words = " ".join(f"'{arg}'" for arg in [sys.executable, "-m", "gpu_pipeline.cli", *args])
    return subprocess.run(f"exec {words} {shell_redirects}", shell=True, cwd=REPO, stdout=stdout, stderr=stderr,
                          env=env, timeout=300)


def test_closed_stderr_and_stdout_are_opened_on_dev_null(image_dir, tmp_path):
    """2>&- made sys.stderr None: every run crashed at its first isatty, exit 1, no records."""
    out = tmp_path / "o.jsonl"
    assert command("run", str(image_dir), "--out", str(out), "--backend", "reference",
                   stderr=None, shell_redirects="2>&- <&-").returncode == 0
    assert len(out.read_text().splitlines()) == len([p for p in image_dir.rglob("*") if p.is_file()])
    for dry_run in ([], ["--dry-run"]):  # (a dry run meets the run's refusal: it ended with exit 3)
        refused = command("run", str(image_dir), "--out", "-", "--backend", "reference", *dry_run, shell_redirects=">&-")
        assert (refused.returncode, refused.stderr.decode()) == (2, "gpu-pipeline: error: --out -: standard output is closed\n")


@pytest.mark.parametrize("args", [["info"], ["info", "--json"], ["--version"], ["--help"],
                                  ["verify", "DATA", "--backends", "numba"], ["run", "DATA", "--out", "OUT", "--dry-run"]])
def test_results_for_a_closed_stdout_are_exit_3_and_one_line(image_dir, tmp_path, args):
    """``>&-``: the table, the JSON or the help went to the /dev/null put in its place, and the command
    said nothing, exit 0 (verify's 0 read as "identical" with no table shown). A run whose results go
    to a file writes nothing to stdout: it does its work, exit 0."""
    args = [str(image_dir) if arg == "DATA" else str(tmp_path / "o.jsonl") if arg == "OUT" else arg for arg in args]
    result = command(*args, shell_redirects=">&-")
    assert (result.returncode, result.stderr.decode()) == (
        3, "gpu-pipeline: error: cannot write to stdout: standard output is closed\n")
    assert not (tmp_path / "o.jsonl").exists()
    run = command("run", str(image_dir), "--out", str(tmp_path / "o.jsonl"), "--backend", "reference",
                  shell_redirects=">&-")
    assert run.returncode == 0, run.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == len([p for p in image_dir.rglob("*") if p.is_file()])


@pytest.mark.parametrize("args", [
    ["fit", "TREE", "--out", "FILE", "--backend", "reference"],
    ["evaluate", "TREE", "--model", "eurosat", "--backend", "reference", "--plot", "PNG"],
    ["bench", "DATA", "--backends", "reference", "--repeat", "1", "--no-scaling", "--json", "FILE"],
    ["verify", "DATA", "--backends", "numba", "--report", "FILE"],
    ["run", "DATA", "--out", "FILE", "--dry-run", "--model", "MISSING"],
])
def test_a_closed_stdout_refuses_a_command_whose_results_go_there_before_its_work(
        image_dir, bundled_data_dir, tmp_path, args):
    """``fit >&-``, ``bench --json >&-``: the command did all its work and wrote its files, then
    failed at its first line of results (exit 3). A refusal writes nothing: it comes first, before any
    other check (a dry run named its missing model, exit 2, where its plan could not be shown anyway)."""
    tree = tmp_path / "tree"
    for name in ("Forest", "River"):
        shutil.copytree(bundled_data_dir / "eurosat" / name, tree / name)
    words = {"TREE": str(tree), "DATA": str(image_dir), "FILE": str(tmp_path / "written"),
             "PNG": str(tmp_path / "written.png"), "MISSING": str(tmp_path / "gone.json")}
    result = command(*[words.get(arg, arg) for arg in args], shell_redirects=">&-")
    assert (result.returncode, result.stderr.decode()) == (
        3, "gpu-pipeline: error: cannot write to stdout: standard output is closed\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "tree"]


@needs_dev_full
@pytest.mark.parametrize("args", [["info"], ["--version"], ["--help"], ["run", "DATA", "--out", "-", "--format", "csv"],
                                  ["run", "DATA", "--out", "-", "--quiet"], ["verify", "DATA", "--backends", "numba"]])
def test_stdout_on_a_full_disk_is_exit_3_and_one_line(image_dir, args):
    """Tracebacks from rich, and for a CSV header exit 2 where JSON lines gave 3; records that fit in
    one write failed again at exit ("Exception ignored", exit 120)."""
    args = [str(image_dir) if arg == "DATA" else arg for arg in args]
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # as a user's
    with open("/dev/full", "w") as full:
        result = command(*args, *(["--backend", "reference"] if args[0] == "run" else []), stdout=full, env=buffered)
    assert result.returncode == 3, result.stderr
    assert result.stderr.decode() == "gpu-pipeline: error: cannot write to stdout: No space left on device\n"


@pytest.mark.parametrize("args", [["info"], ["--version"], ["verify", "DATA", "--backends", "numba"]])
def test_a_reader_that_closed_the_pipe_is_exit_3_not_1(image_dir, args):
    """rich and click end such a command with exit 1, which for verify means "differences"."""
    reader, writer = os.pipe()
    os.close(reader)  # gone before the first write
    try:
        result = command(*[str(image_dir) if arg == "DATA" else arg for arg in args], stdout=writer)
    finally:
        os.close(writer)
    assert result.returncode == 3, result.stderr
    assert result.stderr.decode().endswith("gpu-pipeline: error: cannot write to stdout: the reader closed the pipe\n")


def test_a_report_for_a_terminal_that_closed_is_exit_3_not_1(image_dir, tmp_path, hangups_ignored):
    """verify's report, due on a terminal that went away meanwhile (its hangup ignored, as under
    nohup): the write fails with an I/O error, which ended verify with exit 1, "differences"."""
    slowed = hanging_decoder(tmp_path / "site", next(image_dir.iterdir()).name, seconds=2)
    terminal = Terminal("-m", "gpu_pipeline.cli", "verify", str(image_dir), "--backends", "numba", env=slowed)
    wait_until_hanging(tmp_path / "site")  # started; its report not written yet
    terminal.hang_up()
    assert terminal.process.wait(timeout=300) == 3


@pytest.mark.parametrize("reader", ["reading", "gone"])
def test_a_broken_pipe_that_is_not_stdout_is_not_reported_as_stdout(image_dir, tmp_path, reader):
    """A decode process that died before its first request once raised BrokenPipeError out of the
    run, and the command said "cannot write to stdout: the reader closed the pipe" (exit 3), whether
    or not stdout's reader had gone: click ends any broken pipe so. A bug of ours was shown as the
    user's, and hidden. Only a write to stdout that failed is stdout's."""
    env = {**os.environ, **sitecustomize(tmp_path / "site", FAILING_RUN), "FAILING_RUN": "EPIPE"}
    out = ["run", str(image_dir), "--out", str(tmp_path / "o.jsonl"), "--backend", "reference"]
    if reader == "reading":
        result = command(*out, stdout=subprocess.PIPE, env=env)
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = command(*out, stdout=write_end, env=env)
        finally:
            os.close(write_end)
    assert result.returncode == 1 and "BrokenPipeError: [Errno 32] Broken pipe" in result.stderr.decode()
    assert "cannot write to stdout" not in result.stderr.decode()


@pytest.mark.parametrize("error, message", [("ENOSPC", "No space left on device"), ("EDQUOT", "Disk quota exceeded")])
def test_a_full_disk_under_another_file_is_not_reported_as_stdout(image_dir, tmp_path, error, message):
    """numba's cache on a full disk (or bench's temporary corpus) said "cannot write to stdout: No
    space left on device" (exit 3): the file is named instead. A quota is a full disk too."""
    env = {**os.environ, **sitecustomize(tmp_path / "site", FAILING_RUN), "FAILING_RUN": error}
    result = command("run", str(image_dir), "--out", str(tmp_path / "o.jsonl"), "--backend", "reference",
                     stdout=subprocess.PIPE, env=env)
    assert (result.returncode, result.stderr.decode()) == (1, f"gpu-pipeline: error: {message}: /cache/kernel.nbi\n")


def test_a_socket_reader_that_stopped_reading_is_exit_3(tmp_path):
    """A reader that shuts its socket for reading: the write fails with EPIPE, but poll() shows no
    error on the socket (which an earlier check of stdout's state relied on: a traceback, exit 1)."""
    import socket

    ours, theirs = socket.socketpair()
    theirs.shutdown(socket.SHUT_RD)
    try:
        result = command("--version", stdout=ours.fileno())
    finally:
        ours.close()
        theirs.close()
    assert result.returncode == 3, result.stderr
    assert result.stderr.decode() == "gpu-pipeline: error: cannot write to stdout: the reader closed the pipe\n"


FAILING_RUN = """
import errno, os
import gpu_pipeline.engine.job as job

def run_job(*args, **kwargs):
    if os.environ["FAILING_RUN"] == "EPIPE":
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    if os.environ["FAILING_RUN"] == "EACCES":
        raise PermissionError(errno.EACCES, "Permission denied", "/cache/kernel.nbi")
    if os.environ["FAILING_RUN"] == "EDQUOT":
        raise OSError(errno.EDQUOT, "Disk quota exceeded", "/cache/kernel.nbi")
    raise OSError(errno.ENOSPC, "No space left on device", "/cache/kernel.nbi")

job.run_job = run_job
"""


def test_an_os_error_that_is_no_write_error_is_shown_as_it_is(image_dir, tmp_path):
    """Only a full disk or a reader gone is said in one line: any other OSError out of a command is
    a bug of ours, shown with its traceback, not dressed as a message."""
    env = {**os.environ, **sitecustomize(tmp_path / "site", FAILING_RUN), "FAILING_RUN": "EACCES"}
    result = command("run", str(image_dir), "--out", str(tmp_path / "o.jsonl"), "--backend", "reference",
                     stdout=subprocess.PIPE, env=env)
    assert result.returncode == 1 and "PermissionError: [Errno 13] Permission denied" in result.stderr.decode()
    assert "gpu-pipeline: error:" not in result.stderr.decode()


def test_only_our_warnings_are_reworded_a_librarys_reads_as_python_shows_it():
    """``warning: MESSAGE`` is gpu-pipeline's voice: a library's warning in it would pass for ours."""
    probe = ("import warnings\nfrom gpu_pipeline.cli import streams\nfrom gpu_pipeline.errors import PipelineWarning\n"
             "streams.prepare()\nwarnings.warn('ours', PipelineWarning)\nwarnings.warn('a library', UserWarning)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 0 and lines[0] == "warning: ours"
    assert "UserWarning: a library" in lines[1] and "warning: a library" not in result.stderr


def test_a_signal_once_the_exit_status_is_decided_does_not_change_it():
    """A Ctrl-C while the interpreter shuts down raised Interrupted out of nothing: a traceback, exit 1."""
    probe = ("import os, signal, sys\nfrom gpu_pipeline.cli import main\nsys.argv = ['gpu-pipeline', '--version']\n"
             "try:\n    main()\nfinally:\n    os.kill(os.getpid(), signal.SIGINT)\n    os.kill(os.getpid(), signal.SIGTERM)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"gpu-pipeline {__version__}\n", "")


@needs_dev_full
def test_messages_that_cannot_be_written_do_not_change_the_exit_status(image_dir, tmp_path):
    """2>/dev/full made a run that wrote every record exit 1, and a refusal exit 1 instead of 2."""
    out = tmp_path / "o.jsonl"
    with open("/dev/full", "w") as full:
        assert command("run", str(image_dir), "--out", str(out), "--backend", "reference", stderr=full).returncode == 0
        assert command("run", str(tmp_path / "nope"), "--out", str(out), stderr=full).returncode == 2
    assert len(out.read_text().splitlines()) == len([p for p in image_dir.rglob("*") if p.is_file()])


def test_csv_to_stdout_is_utf8_whatever_the_locale(tmp_path):
    """With an ASCII stdout, the first name outside ASCII raised UnicodeEncodeError mid-run."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "é.png")
    result = command("run", str(folder), "--out", "-", "--format", "csv", "--backend", "reference", "-q",
                     stdout=subprocess.PIPE, env=dict(os.environ, PYTHONIOENCODING="ascii"))
    assert result.returncode == 0, result.stderr
    assert f"{folder}/é.png,8,8,1,".encode() in result.stdout


def test_run_help_lists_the_exit_statuses_the_readme_lists():
    """README and docs/nightly.md list run's exit statuses; --help said nothing of 4 (a failed GPU)."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    listed = re.search(r"Exit status: (.*?)Details:", readme, re.DOTALL).group(1)
    statuses = re.findall(r"\*\*(\d+)(?: / (\d+))?(?: / (\d+))?\*\*", listed)
    assert [s for group in statuses for s in group if s] == ["0", "1", "2", "3", "4", "130", "143", "129"]
    text = " ".join(invoke("run", "--help").output.replace("│", " ").split())
    for status in ("0 when", "1 when", "2 on", "3 when", "4 when", "130 / 143 / 129 when"):
        assert status in text, status


def test_help_texts_keep_their_brackets():
    """The help is rich markup: "gpu-pipeline[dask]" was printed "gpu-pipeline"."""
    result = invoke("run", "--help")
    assert result.exit_code == 0
    assert "gpu-pipeline[dask-cuda]" in result.output.replace("\n", "").replace(" ", "")
    assert "gpu-pipeline[dask]." in result.output


def test_without_numba_auto_runs_the_reference_backend_and_numba_only_commands_refuse(image_dir, tmp_path):
    """README: `auto` takes the first available backend; docs/nightly.md: the reference backend where
    numba cannot be imported; verify against OpenCV needs no numba either. The JSON lines and CSV writers format histograms with a numba kernel:
    without numba they write the same bytes in Python. --model, fit and evaluate need numba's
    kernels: one line, exit 2."""
    stand_in = tmp_path / "no-numba" / "numba"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text('raise ImportError("numba is not installed (a test stand-in)")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stand_in.parent), str(Path(__file__).parent.parent)])}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)

    for suffix in ("jsonl", "csv"):
        expected, got = tmp_path / f"expected.{suffix}", tmp_path / f"got.{suffix}"
        assert invoke("run", str(image_dir), "--backend", "reference", "--out", str(expected), "--quiet").exit_code == 0
        done = cli("run", str(image_dir), "--out", str(got), "--quiet")
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert got.read_bytes() == expected.read_bytes()
    verified = cli("verify", str(image_dir), "--against-opencv", "--report", str(tmp_path / "v.json"))
    if verified.returncode != 2 or "cv2" not in verified.stderr:  # (OpenCV missing: its own refusal)
        assert verified.returncode == 0 and "Traceback" not in verified.stderr, verified.stderr
    for args in (("run", str(image_dir), "--model", "eurosat", "--out", str(tmp_path / "m.jsonl")),
                 ("fit", str(image_dir), "--out", str(tmp_path / "model.json")),
                 ("evaluate", str(image_dir), "--model", "eurosat")):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("gpu-pipeline: error:") and "needs numba" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "model.json").exists()


class _SlowModel:
    """A label model whose kernels are not in numba's cache: its warm-up compiles them."""

    def compiles_on_warm_up(self) -> bool:
        return True

    def labels(self, images, histograms, edge_counts):
        time.sleep(1.1 if len(images) == 2 else 0)  # (the warm-up labels two tiny images)
        return ["slow"] * len(images)


def test_a_model_compile_is_announced_before_it_starts_and_timed_as_a_compile(tmp_path, image_dir, monkeypatch):
    """README: the first run with --model compiles the model's feature kernels, "reported as labels
    ready in ..."; it was announced with nothing and timed as "(kernels loaded)"."""
    import gpu_pipeline.engine.job as runner

    monkeypatch.setattr(runner, "label_function", lambda model, config=None: _SlowModel().labels)
    result = CliRunner().invoke(app, ["run", str(image_dir), "--out", str(tmp_path / "r.jsonl"),
                                      "--backend", "reference", "--model", "eurosat"])
    assert result.exit_code == 0, result.output
    before = result.stderr.index("compiling the label model's kernels (")
    assert before < result.stderr.index("labels ready in 1.")
    assert "(kernels compiled" in result.stderr and "(kernels loaded)" not in result.stderr


@pytest.mark.parametrize("model", ["eurosat", "eurosat-cnn"])
def test_a_shipped_model_knows_whether_its_kernels_are_cached(model, tmp_path):
    """Only the kernels its labels call count: a check over every kernel of its modules (the fit's,
    the serial twins) said "compiling" at every run."""
    from gpu_pipeline.backends import _numba_setup
    from gpu_pipeline.labels.labeller import labeller_compiles, warm_up_labeller
    from gpu_pipeline.labels.model import load_model

    labels = load_model(model).labels
    if _numba_setup.CACHE_DIR is None or _numba_setup.CACHE_IS_FRESH:
        pytest.skip("numba has no lasting cache folder here")
    warm_up_labeller(labels)
    assert not labeller_compiles(labels)
    code = f"from gpu_pipeline.labels.model import load_model; print(load_model({model!r}).compiles_on_warm_up())"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert fresh.stdout.strip() == "True", fresh.stderr


def test_a_signal_that_arrives_inside_a_c_callback_still_stops_the_command():
    """docs/nightly.md: Ctrl-C during start-up (kernel loading) exits 130 at once, quietly. Python ran
    the handler inside llvmlite's ctypes callback (numba loading a kernel), which dropped the
    exception with a traceback, and the run went on to exit 1 (1 of 98 signals in a hunt)."""
    code = ("import ctypes, signal, time\n"
            "from gpu_pipeline.cli.app import Interrupted, catch_interrupts\n"
            "catch_interrupts()\n"
            "callback = ctypes.CFUNCTYPE(None)(lambda: signal.raise_signal(signal.SIGTERM))\n"
            "try:\n"
            "    callback()\n"
            "    time.sleep(10)\n"
            "    print('lost')\n"
            "except Interrupted as exc:\n"
            "    print('interrupted', exc.args[0])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == f"interrupted {int(signal.SIGTERM)}", (done.stdout, done.stderr)
    assert done.stderr == ""


class _GpuThatCannotStart(ReferenceBackend):
    """A GPU backend whose start fails as CuPy's does on a GPU another process holds in exclusive mode."""

    name = "cupy"
    uses_gpu = True

    def __init__(self, threads=None, device_index=None):
        raise RuntimeError("cudaErrorDevicesUnavailable: CUDA-capable device(s) is/are busy or unavailable")


@pytest.fixture
def busy_gpu(monkeypatch):
    """A GPU machine (the driver loads) whose cupy backend is available but cannot start."""
    from gpu_pipeline.backends import registry

    monkeypatch.setattr(registry, "cuda_driver_loads", lambda: True)
    monkeypatch.setattr(registry, "AUTO_ORDER", ["cupy", "numba", "reference"])
    monkeypatch.setitem(registry._REGISTRY, "cupy", registry.BackendEntry(
        "cupy", "", lambda: _GpuThatCannotStart, needs_cuda_driver=True))


BUSY = "cupy could not start: RuntimeError: cudaErrorDevicesUnavailable: CUDA-capable device(s) is/are busy or unavailable"


def test_auto_passes_over_a_gpu_backend_that_cannot_start_and_says_why(busy_gpu, image_dir, tmp_path):
    """A GPU backend that fails as it starts (a busy GPU, its memory held by another process) was a
    traceback, exit 1, even under --backend auto; auto now takes the next backend and says why."""
    out = tmp_path / "out.jsonl"
    result = invoke("run", str(image_dir), "--out", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr == f"gpu-pipeline: backend auto: using numba; {BUSY}\n"
    records = read_records(out)
    assert len(records) == 3 and {r["backend"] for r in records} == {"numba"}


@pytest.mark.parametrize("args", [["--backend", "cupy"], ["--backend", "auto", "--device", "0"]])
def test_a_gpu_backend_that_cannot_start_is_exit_2_in_one_line_and_writes_nothing(busy_gpu, image_dir, tmp_path,
                                                                                   args):
    """Named (or auto with --device, which asks for that GPU): one line, exit 2, nothing written."""
    out = tmp_path / "out.jsonl"
    result = invoke("run", str(image_dir), "--out", str(out), "-q", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"gpu-pipeline: error: backend 'cupy' {BUSY.removeprefix('cupy ')}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_the_api_says_a_gpu_backend_could_not_start(busy_gpu):
    """README: a backend that cannot run here raises BackendUnavailable where it is made."""
    import gpu_pipeline
    from gpu_pipeline.backends import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="backend .cupy. could not start: RuntimeError"):
        gpu_pipeline.process([np.zeros((4, 4), np.uint8)], backend="cupy")


def test_auto_says_once_which_backend_it_took_when_both_gpu_backends_cannot_start(monkeypatch, image_dir, tmp_path):
    """A GPU another process holds in exclusive mode: neither GPU backend starts. auto printed a line
    for each try, the first "using cuda", which then failed too: one line, for the backend it took."""
    from gpu_pipeline.backends import registry

    monkeypatch.setattr(registry, "cuda_driver_loads", lambda: True)
    monkeypatch.setattr(registry, "AUTO_ORDER", ["cupy", "cuda", "numba", "reference"])
    for name in ("cupy", "cuda"):
        monkeypatch.setitem(registry._REGISTRY, name, registry.BackendEntry(
            name, "", lambda: _GpuThatCannotStart, needs_cuda_driver=True))
    out = tmp_path / "out.jsonl"
    result = invoke("run", str(image_dir), "--out", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr == f"gpu-pipeline: backend auto: using numba; {BUSY}; {BUSY.replace('cupy', 'cuda', 1)}\n"
    assert {r["backend"] for r in read_records(out)} == {"numba"}


COMMANDS = [[], ["run"], ["verify"], ["bench"], ["info"], ["fit"], ["evaluate"]]


@pytest.mark.parametrize("columns", ["80", "150"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "gpu-pipeline")
def test_a_flag_shows_no_value_in_the_help(command, columns):
    """typer 0.29 shows a flag's type, `--overwrite <bool>` (even `--help <bool>`), as if it took a
    value: `--overwrite true` then took "true" for an input path."""
    import typer.main

    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": columns})
    assert result.exit_code == 0
    group = typer.main.get_command(app)
    params = group.commands[command[0]].params if command else group.params
    flags = [name for param in params if getattr(param, "is_flag", False) for name in param.opts]
    assert flags or command == ["fit"] or command == ["evaluate"]
    for name in [*flags, "--help"]:
        row = next(line for line in result.stdout.splitlines() if re.search(rf"\s{name}\s", line))
        assert not re.search(r"<\w+>", row), row
    assert "bool" not in result.stdout


@pytest.mark.parametrize("columns", [80, 150])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "gpu-pipeline")
def test_the_help_text_is_wrapped_to_the_terminal_not_to_the_source(command, columns):
    """A command's description is wrapped at the terminal's width: typer kept the docstring's line
    breaks, so at 80 columns every other line was a stub (" (nothing written),") and at 150 the
    lines stopped at 100."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0
    text = result.stdout[result.stdout.index("Usage:"):result.stdout.index("╭")]
    paragraphs = [[line.strip() for line in block.splitlines() if line.strip()]
                  for block in re.split(r"\n\s*\n", text.split("\n", 1)[1])]
    assert sum(map(len, paragraphs)) >= 1
    for lines in paragraphs:
        for line, following in zip(lines, lines[1:]):  # the next word did not fit on the line
            assert len(line) + 1 + len(following.split()[0]) > columns - 4, (line, following)


#: Options whose absence means "not done": no default to tell.
OFF_WHEN_LEFT_OUT = {"--glob", "--save-edges", "--report", "--json", "--plot", "--dask", "--files-from"}


@pytest.mark.parametrize("command", [c[0] for c in COMMANDS if c])
def test_every_option_that_takes_a_value_says_its_default(command):
    """--bands said what it takes, not what happens without it (the image's own bands, up to 4)."""
    import typer.main

    for param in typer.main.get_command(app).commands[command].params:
        if param.param_type_name != "option" or param.is_flag or param.required or param.opts[0] in OFF_WHEN_LEFT_OUT:
            continue
        shown = param.show_default and param.default is not None
        assert shown or "default" in param.help.lower(), (command, param.opts[0])


@pytest.mark.parametrize("command", [c[0] for c in COMMANDS if c])
def test_every_option_a_commands_help_names_is_one_of_its_options(command):
    """verify's --workers help said "decode processes (with --decode processes, ...)": verify has no
    --decode, and a user who followed the help got "No such option: --decode"."""
    import typer.main

    found = typer.main.get_command(app).commands[command]
    options = {name for param in found.params for name in (*param.opts, *getattr(param, "secondary_opts", []))}
    texts = [found.help or "", *(getattr(param, "help", None) or "" for param in found.params)]
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(texts)))
    assert named - options == set(), (command, sorted(named - options))


def test_verify_batch_size_says_it_is_a_cap_as_verify_md_does():
    """docs/verify.md: chunks of at most --batch-size images and 16 megapixels; the help said
    "Images per backend call", as if each call took 64."""
    from gpu_pipeline.diagnostics.verify import CHUNK_PIXELS

    text = " ".join(invoke("verify", "--help").output.replace("│", " ").split())
    assert f"Most images per backend call (and at most {CHUNK_PIXELS // 2 ** 20} MP a call)." in text


@pytest.mark.parametrize("columns", [80, 150])
def test_the_command_list_is_wrapped_to_the_terminal_not_to_the_source(columns):
    """The group's list of commands shows each first paragraph, wrapped at the terminal: bench's kept
    its docstring's line break ("... and the scikit-image" / "pool: compute, ...")."""
    result = runner.invoke(app, ["--help"], env={"COLUMNS": str(columns)})
    panel = result.stdout[result.stdout.index("─ Commands ─"):].splitlines()[1:-1]
    rows: list[list[str]] = []
    for line in (line.strip("│ ") for line in panel if line.startswith("│")):
        if line.split()[0] in ("run", "verify", "bench", "info", "fit", "evaluate"):
            rows.append([line.split(None, 1)[1]])
        else:
            rows[-1].append(line)
    assert len(rows) == 6
    for lines in rows:
        for line, following in zip(lines, lines[1:]):
            assert len(line) + 1 + len(following.split()[0]) > columns - 20, (line, following)


def test_a_run_called_in_a_programs_process_gives_back_the_codecs_loggers_as_they_were(tmp_path, register):
    """A run quiets tifffile's and imagecodecs' loggers (their messages are the files' error records);
    called in a program's own process (a scheduler calling the command line, a test's CliRunner),
    it left them quiet for the rest of the program, whose own TIFF reading then warned of nothing."""
    import logging

    loggers = [logging.getLogger(name) for name in ("tifffile", "imagecodecs")]

    def state():
        return [(logger.level, logger.propagate, list(logger.handlers)) for logger in loggers]

    during = []

    class Watching(ReferenceBackend):
        name = "watching-codecs"

        def process(self, images, config, keep_images=False):
            during.append([(logger.level, logger.propagate) for logger in loggers])
            return super().process(images, config, keep_images)

    register(Watching)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    before = state()
    result = invoke("run", str(folder), "--out", str(tmp_path / "out.jsonl"), "--backend", "watching-codecs", "-q")
    assert result.exit_code == 0, result.output
    assert during and all(seen == [(logging.ERROR, False)] * 2 for seen in during)
    assert state() == before


def test_a_damaged_tiffs_codec_message_stays_off_every_commands_stderr(tmp_path):
    """tifffile logs "invalid offset to first page" for a TIFF whose header points past its end:
    `run` kept it off stderr (the file's error record says it), but `verify` printed it as a
    stray line of its own, beside its table."""
    import tifffile

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "good.png")
    tifffile.imwrite(folder / "damaged.tif", np.zeros((8, 8), np.uint8))
    damaged = bytearray((folder / "damaged.tif").read_bytes())
    damaged[4:8] = (10**6).to_bytes(4, "little")  # the first page's offset, past the end of the file
    (folder / "damaged.tif").write_bytes(bytes(damaged))
    out = tmp_path / "out.jsonl"
    for command in (["run", str(folder), "--out", str(out), "--backend", "reference", "-q"],
                    ["verify", str(folder), "--backends", "numba"]):
        done = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", *command], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode in (0, 1), done.stderr
        assert "invalid offset" not in done.stderr, (command[0], done.stderr)
    assert '"stage":"decode"' in out.read_text().replace(" ", "")  # (run: the error record says it)
    assert "damaged.tif: decode error" in done.stdout  # (verify: its skip says it)
