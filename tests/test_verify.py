"""``gpu-pipeline verify``: identical backends pass, wrong ones are caught and named, usage errors exit 2.

The wrong backends are registered by the tests themselves: the reference with one edge pixel
flipped, one histogram bin off by one, an exception on gray images, and so on.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from typer.testing import CliRunner

import cpu_reference
import gpu_pipeline
from gpu_pipeline.diagnostics import verify
from gpu_pipeline.backends import registry
from gpu_pipeline.backends.reference import ReferenceBackend
from gpu_pipeline.cli import app
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine.cores import usable_cores
from gpu_pipeline.inputs.decode import decode_image
from gpu_pipeline.inputs.discover import discover
from tests.backend_doubles import NeverAvailable
from tests.strategies import examples

runner = CliRunner()

FLIPPED_AT = (3, 5)
WRONG_BIN = 17


class SameAsReference(ReferenceBackend):
    name = "same-as-reference"


class Compiling(ReferenceBackend):
    """The reference, as the numba backend on a fresh install: its warm-up compiles (noted here)."""

    name = "compiling"
    warmed: ClassVar[list[str]] = []

    def compiles_on_warm_up(self) -> bool:
        return True

    def warm_up(self, config=None) -> None:
        self.warmed.append(self.name)


class FailingWarmUp(ReferenceBackend):
    """A backend whose GPU fails as its kernels load."""

    name = "failing-warm-up"

    def warm_up(self, config=None) -> None:
        raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")


class FlippedEdgePixel(ReferenceBackend):
    """The reference, with the edge pixel at FLIPPED_AT flipped (edge_count left as computed)."""

    name = "flipped-edge"

    def process(self, images, config, keep_images=False):
        results = super().process(images, config, keep_images)
        for edges in results.edges:
            edges[FLIPPED_AT] ^= 255
        return results


class HistogramOffByOne(ReferenceBackend):
    name = "histogram-off-by-one"

    def process(self, images, config, keep_images=False):
        results = super().process(images, config, keep_images)
        results.histograms[:, WRONG_BIN] += 1
        return results


class RaisesOnGray(ReferenceBackend):
    name = "raises-on-gray"

    def process(self, images, config, keep_images=False):
        if any(image.ndim == 2 for image in images):
            raise RuntimeError("boom on a gray image")
        return super().process(images, config, keep_images)


class DropsLastResult(ReferenceBackend):
    name = "drops-last-result"

    def process(self, images, config, keep_images=False):
        return super().process(images, config, keep_images)[:-1]


class AddsAResult(ReferenceBackend):
    name = "adds-a-result"

    def process(self, images, config, keep_images=False):
        results = super().process(images, config, keep_images)
        return [*results, results[0]]


class NoEdgeCountOnGray(ReferenceBackend):
    """The reference, with no edge count (None) for gray images: the batch labeller raises TypeError."""

    name = "no-edge-count-on-gray"

    def process(self, images, config, keep_images=False):
        results = list(super().process(images, config, keep_images))
        for image, result in zip(images, results):
            if image.ndim == 2:
                result.edge_count = None
        return results


class FailsToStart(ReferenceBackend):
    name = "fails-to-start"

    def __init__(self, threads=None):
        raise MemoryError("cannot allocate the device buffers")


class RecordsCalls(ReferenceBackend):
    name = "records-calls"
    calls: ClassVar[list[int]] = []

    def process(self, images, config, keep_images=False):
        RecordsCalls.calls.append(len(images))
        return super().process(images, config, keep_images)


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """Two RGB images and two gray ones, noisy enough to have edges."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(11)
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(folder / "a_rgb.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "b_gray.png")
    Image.fromarray(rng.integers(0, 256, (9, 30, 3), dtype=np.uint8)).save(folder / "c_rgb.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (12, 7), dtype=np.uint8)).save(folder / "d_gray.png")
    return folder


def invoke(*args):
    return runner.invoke(app, ["verify", *map(str, args)])


def verify_with_report(tmp_path, *args):
    report_path = tmp_path / "report.json"
    result = invoke(*args, "--report", report_path)
    return result, json.loads(report_path.read_text())


def reference_stages(path: Path):
    return cpu_reference.process_image(decode_image(path, DecodeOptions()), PipelineConfig())


def tally(report: dict, name: str) -> dict:
    return next(backend for backend in report["backends"] if backend["name"] == name)


def test_a_folder_that_cannot_be_listed_is_named_and_recorded(tmp_path, image_dir, locked):
    """Its images were skipped without a word. A warning, as for run and decode errors: the verdict
    is on the images compared, and the report lists the folder."""
    hidden = image_dir / "locked"
    hidden.mkdir()
    (image_dir / "a_rgb.png").rename(hidden / "a_rgb.png")
    locked("locked")
    result, report = verify_with_report(tmp_path, image_dir, "--backends", "numba")
    assert result.exit_code == 0, result.output
    assert result.stderr == f"warning: cannot list {hidden} (Permission denied); its images are not processed\n"
    assert report["unlisted"] == [{"folder": str(hidden), "reason": "Permission denied"}]
    assert report["images"]["found"] == 3
    result = invoke(hidden, "--backends", "numba")  # nothing else: the refusal says why
    assert result.exit_code == 2 and f"cannot list {hidden}: Permission denied" in result.stderr


def test_a_folder_not_named_in_utf8_that_cannot_be_listed_has_its_bytes_in_the_report(tmp_path, image_dir, locked):
    """verify.md: a ``folder`` whose name is not valid UTF-8 has its exact bytes beside it (``folder_bytes``)."""
    import base64

    hidden = os.fsencode(image_dir) + b"/locked\xfd"
    os.mkdir(hidden)
    locked(os.fsdecode(b"locked\xfd"))
    result, report = verify_with_report(tmp_path, image_dir, "--backends", "numba")
    assert result.exit_code == 0, result.output
    (unlisted,) = report["unlisted"]
    assert unlisted["folder"] == f"{image_dir}/locked\\xfd" and base64.b64decode(unlisted["folder_bytes"]) == hidden


def test_a_report_that_cannot_be_written_after_the_run_still_prints_the_verdict(tmp_path, image_dir, monkeypatch):
    """A full disk at the end of a long verify lost its whole outcome: the report could not be
    written, and the command ended with that one line before printing the table. The table comes
    first now, then the line, exit 3 (a write that failed, as for standard output; it was 2, as if
    the command line had been wrong)."""
    report_path, real_write_text = tmp_path / "report.json", Path.write_text

    def disk_full(path, *args, **kwargs):
        if path.name.startswith(".report.json"):  # the report's temporary
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    result = invoke(image_dir, "--backends", "numba", "--report", report_path)
    assert result.exit_code == 3, result.output
    assert "identical" in result.stdout.lower() and "numba" in result.stdout and "report:" not in result.stdout
    assert result.stderr == (f"gpu-pipeline: error: --report: cannot write {report_path}: "
                             f"{os.strerror(errno.ENOSPC)}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no report, no temporary


def test_names_that_are_not_utf8_are_written_to_the_report_as_run_writes_them(tmp_path, image_dir, register):
    """They were lone surrogate escapes ("\\udcff"), which strict JSON readers refuse: now \\xNN, and
    their exact bytes in base64 beside them, as run's records have path_bytes."""
    import base64

    register(HistogramOffByOne)
    odd = os.fsencode(image_dir) + b"/odd\xff.png"
    (image_dir / "a_rgb.png").rename(os.fsdecode(odd))
    broken = os.fsencode(image_dir) + b"/broken\xfe.png"
    with open(broken, "wb"):
        pass
    result = invoke(image_dir, "--backends", HistogramOffByOne.name, "--report", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    text = (tmp_path / "r.json").read_text(encoding="utf-8")
    assert "\\ud" not in text
    report = json.loads(text)
    difference = next(d for d in report["differences"] if "odd" in d["image"])
    assert difference["image"] == f"{image_dir}/odd\\xff.png"
    assert base64.b64decode(difference["image_bytes"]) == odd
    (error,) = report["decode_errors"]
    assert error["image"] == f"{image_dir}/broken\\xfe.png" and base64.b64decode(error["image_bytes"]) == broken
    assert all("image_bytes" not in d for d in report["differences"] if "odd" not in d["image"])
    folder = os.fsencode(image_dir) + b"/sub\xfd"  # a path given that is not UTF-8: in inputs.paths
    os.mkdir(folder)
    (image_dir / "c_rgb.jpg").rename(os.fsdecode(folder + b"/c_rgb.jpg"))
    invoke(os.fsdecode(folder), image_dir / "d_gray.png", "--backends", "numba", "--report", tmp_path / "r.json")
    inputs = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["inputs"]
    assert inputs["paths"] == [f"{image_dir}/sub\\xfd", str(image_dir / "d_gray.png")]
    assert [base64.b64decode(b) if b else None for b in inputs["paths_bytes"]] == [folder, None]


# --- everything identical ---------------------------------------------------------------------


def test_default_set_on_bundled_data_is_identical_and_lists_every_backend(tmp_path, bundled_data_dir, register):
    register(NeverAvailable)
    result, report = verify_with_report(tmp_path)
    assert result.exit_code == 0, result.output
    assert "IDENTICAL" in result.stdout
    images = len(discover([bundled_data_dir]))
    assert report["images"] == {"found": images, "decoded": images, "compared": images}
    for name in registry.backend_names():
        assert name in result.stdout
        reason = registry.unavailable_reason(name)
        if name == verify.GROUND_TRUTH:
            continue
        entry = tally(report, name)
        if reason is None:
            assert entry["status"] == "compared" and entry["images"] == images
            assert all(counts == {"identical": images, "differs": 0} for counts in entry["stages"].values())
        else:  # listed with the reason, not silently skipped
            assert entry["status"] == "unavailable" and entry["reason"] == reason
            assert f"{name}: unavailable: {reason}" in result.stdout
    assert NeverAvailable.REASON in result.stdout
    assert report["identical"] is True and report["differences"] == [] and report["errors"] == []
    # the --report table of verify.md, key by key
    assert set(report) == {"schema", "gpu_pipeline_version", "identical", "exit_status", "ground_truth", "stages",
                           "config", "decode", "model", "inputs", "execution", "images", "backends", "differences",
                           "errors", "decode_errors", "unlisted"}
    assert (report["schema"], report["gpu_pipeline_version"]) == ("gpu-pipeline-verify/1", gpu_pipeline.__version__)
    assert (report["exit_status"], report["ground_truth"], report["decode_errors"]) == (0, "reference", [])
    assert report["unlisted"] == [] and report["model"] is None  # the default rule
    assert report["inputs"] == {"paths": [str(bundled_data_dir)], "glob": None}
    assert report["stages"] == ["histogram", "equalized", "edges", "edge_count", "label"]
    assert report["decode"] == {"bands": None, "stretch": "percentile", "max_pixels": DecodeOptions().max_pixels}
    # threads null: every usable core; workers: the decoders used
    assert report["execution"] == {"threads": None, "workers": usable_cores(), "batch_size": 64, "decode_timeout": None}
    assert verify.MAX_PRINTED == 20  # verify.md: "the first 20"; the test below prints 3


def test_against_opencv_is_identical(image_dir, tmp_path, bundled_data_dir):
    pytest.importorskip("cv2")
    result, report = verify_with_report(tmp_path, image_dir, bundled_data_dir, "--backends", "reference",
                                        "--against-opencv", "--l2", "--blur", "3", "--low", "40", "--high", "90")
    assert result.exit_code == 0, result.output
    assert [(b["name"], b["role"], b["status"]) for b in report["backends"]] == [("opencv", "oracle", "compared")]
    assert tally(report, "opencv")["images"] == report["images"]["compared"] > 60
    assert report["config"] == {"low_threshold": 40.0, "high_threshold": 90.0, "l2_gradient": True,
                                "blur_ksize": 3}


def test_against_opencv_reads_as_verify_mds_sample(image_dir):
    """docs/verify.md's (and the README's) ``verify --against-opencv``: the oracle's row after the
    backends', and the settings line saying what that row is."""
    pytest.importorskip("cv2")
    page = (Path(__file__).resolve().parent.parent / "docs" / "verify.md").read_text(encoding="utf-8")
    shown = page.split("$ gpu-pipeline verify --against-opencv --report verify.json\n", 1)[1].split("```")[0]
    expected = [" ".join(line.split()) for line in shown.splitlines() if line.startswith(("numba ", "opencv ", "Canny "))]
    result = invoke(image_dir, "--backends", "numba", "--against-opencv")
    assert result.exit_code == 0, result.output
    printed = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert len(expected) == 3 and [line for line in printed if line in expected] == expected, printed


@pytest.mark.parametrize("l2, low, high", [(False, 79.99999999, 159.99999999),
                                            (True, 111.08555261599052, 114.08555261599052)])
def test_against_opencv_is_identical_on_one_thread_with_fractional_thresholds(bundled_data_dir, l2, low, high):
    """OpenCV on one thread (a 1-CPU machine) takes IPP's Canny, which rounds such thresholds
    otherwise: "DIFFERENT" on 43 of 50 EuroSAT tiles before the oracle turned IPP off."""
    cv2 = pytest.importorskip("cv2")
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        result = invoke(bundled_data_dir / "eurosat", "--backends", "reference", "--against-opencv",
                        "--l2" if l2 else "--no-l2", "--low", repr(low), "--high", repr(high))
    finally:
        cv2.setNumThreads(threads)
    assert result.exit_code == 0, result.output
    assert "IDENTICAL" in result.stdout
    assert f"Canny {low!r}/{high!r}" in result.stdout  # as given, where :g printed 80/160


class KeepsImages(ReferenceBackend):
    name = "keeps-images"
    seen: ClassVar[list[bytes]] = []

    def process(self, images, config, keep_images=False):
        KeepsImages.seen.extend(np.ascontiguousarray(image).tobytes() for image in images)
        return super().process(images, config, keep_images)


def test_verify_takes_runs_decode_and_selection_options(tmp_path, register):
    """verify.md: --glob, --bands, --stretch, --max-pixels, --threads and --workers, as run takes them."""
    tifffile = pytest.importorskip("tifffile")
    folder = tmp_path / "scenes"
    folder.mkdir()
    rng = np.random.default_rng(5)
    tifffile.imwrite(folder / "five.tif", rng.integers(0, 4000, (20, 24, 5), dtype=np.uint16),
                     photometric="minisblack", planarconfig="contig")
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(folder / "other.png")
    register(KeepsImages)
    KeepsImages.seen = []
    result, report = verify_with_report(tmp_path, folder, "--glob", "*.tif", "--bands", "3,2,1", "--stretch",
                                        "minmax", "--max-pixels", "480", "--threads", "1", "--workers", "1",
                                        "--backends", "keeps-images")
    assert result.exit_code == 0, result.output
    assert report["images"] == {"found": 1, "decoded": 1, "compared": 1}  # five bands: only --bands decodes it
    assert report["decode"] == {"bands": [3, 2, 1], "stretch": "minmax", "max_pixels": 480}
    expected = decode_image(folder / "five.tif", DecodeOptions(bands=(3, 2, 1), stretch="minmax"))
    assert KeepsImages.seen == [expected.tobytes()]
    assert expected.tobytes() != decode_image(folder / "five.tif", DecodeOptions(bands=(3, 2, 1))).tobytes()



def test_verify_refuses_images_over_its_pixel_limit_as_run_does(tmp_path, register):
    """--max-pixels, as run's: an image over the limit is a decode error, skipped, and nothing is
    compared; at the limit it is compared. (verify had no --max-pixels: a nightly run's images above
    the default gigapixel could not be verified.)"""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((20, 24), 7, np.uint8)).save(folder / "a.png")
    register(KeepsImages)
    KeepsImages.seen = []
    over, report = verify_with_report(tmp_path, folder, "--max-pixels", "479", "--backends", "keeps-images")
    assert over.exit_code == 2 and "none of the 1 files could be decoded" in over.stderr
    assert report["images"] == {"found": 1, "decoded": 0, "compared": 0} and KeepsImages.seen == []
    assert "over the limit of 479" in json.dumps(report["decode_errors"])
    at, report = verify_with_report(tmp_path, folder, "--max-pixels", "480", "--backends", "keeps-images")
    assert at.exit_code == 0, at.output
    assert report["images"]["compared"] == 1 and report["decode"]["max_pixels"] == 480

def test_backend_calls_are_batched_in_bounded_chunks(image_dir, register):
    register(RecordsCalls)
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(image_dir / f"e{i}.png")
    RecordsCalls.calls = []
    result = invoke(image_dir, "--backends", "records-calls", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert RecordsCalls.calls == [4, 4, 2]


def test_a_chunk_also_holds_at_most_chunk_pixels(image_dir, register, monkeypatch):
    """verify.md: chunks of at most ``--batch-size`` images *and* 16 megapixels (here made 600 pixels:
    the fixture's images are 480, 256, 270 and 84 pixels), so memory stays bounded on large scenes."""
    register(RecordsCalls)
    monkeypatch.setattr(verify, "CHUNK_PIXELS", 600)
    RecordsCalls.calls = []
    result = invoke(image_dir, "--backends", "records-calls", "--batch-size", "64")
    assert result.exit_code == 0, result.output
    assert RecordsCalls.calls == [1, 2, 1]


# --- differences are caught and named -----------------------------------------------------------


def test_verify_md_names_every_option_of_verify():
    """docs/verify.md: run's image and pipeline options, "plus --threads, --workers, --batch-size and
    --decode-timeout", and the page's own (--against-opencv, --report, --backends): an option added to
    one and not the other fails here."""
    import re

    import typer.main

    page = (Path(__file__).resolve().parent.parent / "docs" / "verify.md").read_text(encoding="utf-8")
    listed = page[page.index("Your own images"):page.index("```console", page.index("Your own images"))]
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", listed)) | {"--against-opencv", "--report", "--backends"}
    command = typer.main.get_command(app).commands["verify"]
    options = {name for param in command.params for name in param.opts if name.startswith("--")} - {"--help"}
    assert named == options, named ^ options


def test_a_flipped_edge_pixel_is_named_with_both_values(image_dir, tmp_path, monkeypatch, register):
    register(FlippedEdgePixel, SameAsReference)
    monkeypatch.setattr(verify, "MAX_PRINTED", 3)
    result, report = verify_with_report(tmp_path, image_dir, "--backends", "flipped-edge,same-as-reference")
    assert result.exit_code == 1, result.output
    assert "DIFFERENT" in result.stdout
    files = discover([image_dir])
    edges = [d for d in report["differences"] if d["stage"] == "edges"]
    assert [d["image"] for d in edges] == [str(path) for path in files]
    for difference, path in zip(edges, files):
        expected = int(reference_stages(path).edges[FLIPPED_AT])
        assert difference == {
            "image": str(path), "backend": "flipped-edge", "stage": "edges", "kind": "pixels",
            "first": {"row": FLIPPED_AT[0], "col": FLIPPED_AT[1]}, "count": 1,
            "expected": expected, "actual": 255 - expected,
        }
    stages = tally(report, "flipped-edge")["stages"]
    assert stages["edges"] == {"identical": 0, "differs": len(files)}
    for stage in ("histogram", "equalized", "edge_count"):  # the backend keeps the true count
        assert stages[stage] == {"identical": len(files), "differs": 0}
    assert len(report["differences"]) == len(files) + stages["label"]["differs"]
    assert tally(report, "same-as-reference")["stages"]["edges"] == {"identical": len(files), "differs": 0}
    # the console shows the first few, names image, backend, stage, pixel and both values
    first = edges[0]
    assert (f"{first['image']}  flipped-edge  edges: 1 pixel differs, first at (row 3, col 5): "
            f"reference {first['expected']}, flipped-edge {first['actual']}") in result.stdout
    hidden = len(report["differences"]) - 3
    assert f"... and {hidden} more differences and errors" in result.stdout
    assert sum(line.startswith("differs ") for line in result.stdout.splitlines()) == 3  # not all, then the count


def test_a_histogram_bin_off_by_one_is_named(image_dir, tmp_path, register):
    register(HistogramOffByOne)
    result, report = verify_with_report(tmp_path, image_dir, "--backends", "histogram-off-by-one")
    assert result.exit_code == 1, result.output
    histograms = [d for d in report["differences"] if d["stage"] == "histogram"]
    assert len(histograms) == len(discover([image_dir]))
    for difference in histograms:
        expected = int(reference_stages(Path(difference["image"])).histogram[WRONG_BIN])
        assert (difference["kind"], difference["first"], difference["count"]) == ("bins", {"bin": WRONG_BIN}, 1)
        assert (difference["expected"], difference["actual"]) == (expected, expected + 1)
    assert f"first bin {WRONG_BIN}" in result.stdout


def test_the_console_reads_as_verify_mds_example(image_dir, tmp_path, monkeypatch, register):
    """docs/verify.md, "Reading a difference": the counts per backend and stage, an n/a row and a
    "not verified" line for each backend that cannot run, the settings under the table, the verdict
    with its counts, and where the report went."""
    register(FlippedEdgePixel, HistogramOffByOne)
    reason = registry.unavailable_reason
    monkeypatch.setattr(registry, "unavailable_reason", lambda name: "not on this machine"
                        if name in ("numba", "cuda", "cupy") else reason(name))
    report_path = tmp_path / "diff.json"
    result = invoke(image_dir, "--report", report_path)
    assert result.exit_code == 1, result.output
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert lines[0] == "4 images compared with the reference backend (ground truth)"
    for name in ("numba", "cuda", "cupy"):
        assert f"{name} n/a n/a n/a n/a n/a" in lines
        assert f"not verified: {name}: unavailable: not on this machine" in lines
    assert "flipped-edge identical identical 4 differ identical identical 0" in lines
    assert "Canny 100/200 L1, blur 5" in lines
    assert lines[-2:] == ["DIFFERENT: 8 differences and 0 errors on 4 of 4 images: flipped-edge (4 differences); "
                          "histogram-off-by-one (4 differences)", f"report: {report_path}"]
    result = invoke(image_dir, "--backends", "flipped-edge", "--l2", "--blur", "3", "--low", "50", "--high", "150")
    assert "Canny 50/150 L2, blur 3" in [" ".join(line.split()) for line in result.stdout.splitlines()]


def test_verify_mds_difference_example_is_what_it_prints(tmp_path, monkeypatch, register):
    """docs/verify.md, "Reading a difference": the example's command, run on the bundled scenes with
    the two wrong backends it names, prints the lines it shows (the table's long name aside, which
    wraps with the terminal's width)."""
    repo = Path(__file__).resolve().parent.parent
    command = "gpu-pipeline verify data/scenes -b numba,flipped-edge,histogram-off-by-one --report diff.json"
    shown = (repo / "docs" / "verify.md").read_text(encoding="utf-8").split(f"$ {command}\n", 1)[1].split("```")[0]
    expected = [" ".join(line.split()) for line in shown.splitlines()
                if line.startswith(("differs ", "DIFFERENT: ", "Canny ", "numba ", "flipped-edge ", "4 images"))]
    register(FlippedEdgePixel, HistogramOffByOne)
    monkeypatch.chdir(repo)
    result = invoke("data/scenes", "-b", "numba,flipped-edge,histogram-off-by-one", "--report", tmp_path / "diff.json")
    assert result.exit_code == 1, result.output
    printed = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert len(expected) == 13 and [line for line in printed if line in expected] == expected
    example = (repo / "docs" / "verify.md").read_text(encoding="utf-8").split("```json\n", 1)[1].split("```")[0]
    assert json.loads((tmp_path / "diff.json").read_text())["differences"][0] == json.loads(example)


def test_the_identical_verdict_names_every_backend_compared_and_the_images(image_dir, register):
    """README and docs/verify.md: "IDENTICAL: every stage (...) of numba and opencv is identical to
    the reference on all 62 images"."""
    register(SameAsReference)
    result = invoke(image_dir, "--backends", "numba,same-as-reference")
    assert result.exit_code == 0, result.output
    assert " ".join(result.stdout.split()).endswith(
        "IDENTICAL: every stage (histogram, equalized, edges, edge_count, label) of numba and same-as-reference "
        "is identical to the reference on all 4 images")
    one = invoke(next(image_dir.iterdir()), "--backends", "numba")
    assert " ".join(one.stdout.split()).endswith("is identical to the reference on its one image"), one.output


@pytest.mark.parametrize("batch_size", [1, 64])
def test_a_backend_that_raises_is_an_error_for_those_images_and_the_run_goes_on(image_dir, tmp_path, register,
                                                                               batch_size):
    register(RaisesOnGray)
    result, report = verify_with_report(tmp_path, image_dir, "--backends", "raises-on-gray",
                                        "--batch-size", batch_size)
    assert result.exit_code == 1, result.output
    gray = sorted(str(p) for p in discover([image_dir]) if "gray" in p.name)
    assert sorted(e["image"] for e in report["errors"]) == gray
    assert {(e["backend"], e["error"]) for e in report["errors"]} == {
        ("raises-on-gray", "RuntimeError: boom on a gray image")}
    entry = tally(report, "raises-on-gray")
    assert (entry["errors"], entry["images"]) == (2, 2)  # the RGB images were still compared
    assert report["differences"] == []
    assert (report["identical"], report["exit_status"]) == (False, 1)  # errors alone are no "identical"
    assert "raised RuntimeError: boom on a gray image" in result.stdout


def test_a_malformed_result_spoils_only_its_own_label(image_dir, tmp_path, register):
    """The labeller runs once per chunk; when that call raises (here TypeError, on a None edge count),
    each image is labelled alone: the good ones keep their labels, and the run goes on."""
    register(NoEdgeCountOnGray)
    result, report = verify_with_report(tmp_path, image_dir, "--backends", "no-edge-count-on-gray")
    assert result.exit_code == 1, result.output
    gray = sorted(str(p) for p in discover([image_dir]) if "gray" in p.name)
    assert sorted({(d["image"], d["stage"]) for d in report["differences"]}) == [
        (name, stage) for name in gray for stage in ("edge_count", "label")]
    assert {d["kind"] for d in report["differences"] if d["stage"] == "label"} == {"invalid"}
    assert tally(report, "no-edge-count-on-gray")["stages"]["label"] == {"identical": 2, "differs": 2}


@pytest.mark.parametrize("backend, returned", [(DropsLastResult, 3), (AddsAResult, 5)])
def test_a_wrong_number_of_results_is_an_error(image_dir, tmp_path, register, backend, returned):
    """One result too many was cut off unseen by the pairing of images and results: identical, exit 0."""
    register(backend)
    result, report = verify_with_report(tmp_path, image_dir, "--backends", backend.name)
    assert result.exit_code == 1, result.output
    assert len(report["errors"]) == len(discover([image_dir]))
    assert f"returned {returned} results for 4 images" in report["errors"][0]["error"]


def test_a_backend_that_fails_to_start_fails_the_run(image_dir, tmp_path, register):
    register(FailsToStart, SameAsReference)
    result, report = verify_with_report(tmp_path, image_dir, "--backends", "fails-to-start,same-as-reference")
    assert result.exit_code == 1, result.output
    entry = tally(report, "fails-to-start")
    assert entry["status"] == "failed" and "MemoryError: cannot allocate the device buffers" in entry["reason"]
    assert tally(report, "same-as-reference")["status"] == "compared"
    assert "fails-to-start (failed to start)" in result.output
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "fails-to-start failed failed failed failed failed" in lines  # verify.md: "shown as `failed`"
    assert any(line.startswith("not verified: fails-to-start: failed: ") for line in lines)


def test_an_image_the_reference_raises_on_is_an_error_and_not_compared(image_dir, tmp_path, register, monkeypatch):
    """Without the ground truth's outputs an image cannot be compared: it is the reference's error,
    counted apart from the images compared."""
    register(SameAsReference)
    create = registry.create
    monkeypatch.setattr(registry, "create", lambda name, threads=None: RaisesOnGray(threads)
                        if name == verify.GROUND_TRUTH else create(name, threads=threads))
    result, report = verify_with_report(tmp_path, image_dir, "--backends", "same-as-reference")
    assert result.exit_code == 1, result.output
    gray = sorted(str(p) for p in discover([image_dir]) if "gray" in p.name)
    assert sorted((e["image"], e["backend"]) for e in report["errors"]) == [(name, "reference") for name in gray]
    assert report["images"] == {"found": 4, "decoded": 4, "compared": 2}
    assert (tally(report, "same-as-reference")["images"], report["identical"]) == (2, False)
    assert "on 2 of 4 images: reference (2 errors)" in " ".join(result.stdout.split())


def test_a_backend_whose_gpu_failed_is_not_called_again(tmp_path, image_dir, register):
    """Each later chunk went to the failed GPU again, to fail alike."""
    from tests.backend_doubles import FailingDevice, failing_after

    register(FailingDevice)
    failing_after(1)
    try:
        result = invoke(image_dir, "--backends", "failing-device", "--batch-size", 1)
        calls = FailingDevice.calls
    finally:
        failing_after(None)
    assert result.exit_code == 1, result.output
    assert calls == 2  # the healthy one, the one that failed; none for the last two images


def test_decode_errors_are_listed_not_counted(image_dir, tmp_path, register):
    register(SameAsReference)
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result, report = verify_with_report(tmp_path, image_dir, "--backends", "same-as-reference")
    assert result.exit_code == 0, result.output
    assert [e["image"] for e in report["decode_errors"]] == [str(image_dir / "broken.png")]
    assert report["images"] == {"found": 5, "decoded": 4, "compared": 4}
    assert "skipped" in result.stdout and "broken.png" in result.stdout


# --- usage errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--backends", "nonesuch"], "unknown backend 'nonesuch'; known: reference"),
    (["--backends", "numba,opencv"], "unknown backend 'opencv'; known: reference"),
    (["--backends", "opencv"], "OpenCV is no backend: add --against-opencv to compare with it"),
    (["--backends", "numba,,cuda"], "comma-separated backend names"),
    (["--backends", "never-available"], f"'never-available' is unavailable here: {NeverAvailable.REASON}"),
    (["--backends", "reference"], "no available backend to compare"),
    (["--blur", "4"], "--blur must be one of"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "1025"], "--workers must be at most 1024, got 1025"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--decode-timeout", "0"], "--decode-timeout takes a number of seconds from 1 to 86400"),
    (["--decode-timeout", "nan"], "--decode-timeout takes a number of seconds from 1 to 86400"),
    (["--low", "nan"], "--low must be between 0 and 2147483647"),
    (["--bands", "1,2"], "--bands takes 1 or 3 band numbers"),
    (["--stretch", "magic"], "--stretch must be one of percentile, minmax, bitdepth"),
    (["--model", "no-such-model.json"], "model file no-such-model.json does not exist"),
])
def test_usage_errors_exit_2(image_dir, tmp_path, args, message, register):
    """One line, and no report: a usage error is found before the first image is read (verify.md)."""
    register(NeverAvailable)
    result = invoke(image_dir, *args, "--report", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def test_a_default_set_with_no_backend_available_exits_2(image_dir, tmp_path, monkeypatch):
    """Only the reference could run: nothing was compared, and that was "identical", exit 0."""
    reason = registry.unavailable_reason
    monkeypatch.setattr(registry, "unavailable_reason",
                        lambda name: reason(name) if name == verify.GROUND_TRUTH else "not on this machine")
    result = invoke(image_dir, "--report", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    # every other backend named with its reason, in the registry's order (whatever backends it holds)
    others = "; ".join(f"{name}: not on this machine" for name in registry.backend_names() if name != verify.GROUND_TRUTH)
    assert f"no available backend to compare with the reference ({others})" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def test_missing_path_exits_2(tmp_path, register):
    register(SameAsReference)
    result = invoke(tmp_path / "nowhere", "--backends", "same-as-reference")
    assert result.exit_code == 2 and "no such file or folder" in result.stderr


def test_a_folder_without_image_files_exits_2_and_writes_no_report(tmp_path, register):
    """verify.md, exit 2: "no image files", a usage error found before the first image is read: no report."""
    register(SameAsReference)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    result = invoke(empty, "--backends", "same-as-reference", "--report", tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    assert result.stderr == f"gpu-pipeline: error: no image files found in {empty}\n"
    assert not (tmp_path / "r.json").exists()


def test_report_in_a_missing_folder_exits_2(image_dir, tmp_path, register):
    register(SameAsReference)
    result = invoke(image_dir, "--backends", "same-as-reference", "--report", tmp_path / "no" / "r.json")
    assert result.exit_code == 2 and f"--report {tmp_path / 'no' / 'r.json'}: the folder" in result.stderr


def test_nothing_decodable_exits_2(tmp_path, register):
    register(SameAsReference)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = invoke(tmp_path / "broken.png", "--backends", "same-as-reference")
    assert result.exit_code == 2 and "nothing was compared" in result.stderr


def test_nothing_decodable_still_writes_the_report(tmp_path, register):
    """verify.md: the report is "written whatever the outcome, except for usage errors found before
    the first image is read": files that could not be decoded were read, and it says which."""
    register(SameAsReference)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result, report = verify_with_report(tmp_path, broken, "--backends", "same-as-reference")
    assert result.exit_code == 2 and "nothing was compared" in result.stderr
    assert (report["identical"], report["exit_status"]) == (False, 2)
    assert report["images"] == {"found": 1, "decoded": 0, "compared": 0}
    assert [(error["image"], error["stage"]) for error in report["decode_errors"]] == [(str(broken), "decode")]


def test_against_opencv_without_cv2_says_how_to_get_it(image_dir, monkeypatch, register):
    register(SameAsReference)
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    result = invoke(image_dir, "--backends", "same-as-reference", "--against-opencv")
    assert result.exit_code == 2, result.output
    assert "OpenCV (cv2) cannot be imported" in result.stderr and "pip install" in result.stderr


# --- the comparison itself ----------------------------------------------------------------------


@settings(max_examples=examples(50), deadline=None)
@given(
    expected=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=20)),
    data=st.data(),
)
def test_first_difference_is_the_first_in_row_major_order(expected, data):
    h, w = expected.shape
    changed = data.draw(st.sets(st.tuples(st.integers(0, h - 1), st.integers(0, w - 1)), max_size=8))
    actual = expected.copy()
    for position in changed:
        actual[position] ^= data.draw(st.integers(1, 255))
    found = verify._compare_arrays(expected, actual, "pixels")
    if not changed:
        assert found is None
        return
    row, col = min(changed)
    assert found == {"kind": "pixels", "first": {"row": row, "col": col}, "count": len(changed),
                     "expected": int(expected[row, col]), "actual": int(actual[row, col])}


@pytest.mark.parametrize("actual, kind", [
    (None, "missing"),
    (np.zeros((4, 5), np.uint8), "shape"),
    (np.zeros((5, 4), np.int16), "dtype"),
    ([[0] * 4] * 5, "invalid"),
])
def test_malformed_outputs_are_differences(actual, kind):
    assert verify._compare_arrays(np.zeros((5, 4), np.uint8), actual, "pixels")["kind"] == kind


@pytest.mark.parametrize("expected, actual, identical", [
    (7, 7, True), (7, np.int64(7), True), (7, 8, False), (7, 7.0, False), (7, True, False),
    ("busy", "busy", True), ("busy", "textured", False),
])
def test_values_must_be_equal_and_of_the_same_kind(expected, actual, identical):
    assert (verify._compare_values(expected, actual) is None) == identical


@pytest.mark.parametrize("fields, line", [
    ({"stage": "edge_count", "kind": "value", "expected": 521, "actual": 516},
     "edge_count: reference 521, numba 516"),
    ({"stage": "edges", "kind": "shape", "expected": [64, 64], "actual": [64, 63]},
     "edges: shape reference [64, 64], numba [64, 63]"),
    ({"stage": "equalized", "kind": "missing"}, "equalized: not returned by numba"),
    ({"stage": "label", "kind": "invalid", "actual": "ValueError: bad histogram"},
     "label: cannot be compared: ValueError: bad histogram"),
])
def test_each_kind_of_difference_reads_as_one_line(fields, line):
    assert verify.Difference(image="x.png", backend="numba", **fields).describe().startswith(line)


# --- labels of a model ------------------------------------------------------------------------


class EdgeCountHalved(ReferenceBackend):
    """The reference, with only the edge count halved (the edge map is left as computed)."""

    name = "edge-count-halved"

    def process(self, images, config, keep_images=False):
        results = super().process(images, config, keep_images)
        results.edge_counts //= 2
        return results


def test_model_labels_come_from_each_backends_own_outputs(tmp_path, bundled_data_dir, register):
    """A backend whose edge counts are wrong gets the labels its numbers give, not the reference's."""
    register(SameAsReference)
    register(EdgeCountHalved)
    tiles = bundled_data_dir / "eurosat"
    result, report = verify_with_report(tmp_path, tiles, "--model", "eurosat",
                                        "--backends", "same-as-reference,edge-count-halved")
    assert result.exit_code == 1, result.output
    assert all(counts["differs"] == 0 for counts in tally(report, "same-as-reference")["stages"].values())
    halved = tally(report, "edge-count-halved")["stages"]
    assert halved["edge_count"]["differs"] == len(discover([tiles]))
    assert 0 < halved["label"]["differs"]  # edge density is one of the model's features
    labels = [d for d in report["differences"] if d["stage"] == "label"]
    assert all(d["backend"] == "edge-count-halved" and d["expected"] != d["actual"] for d in labels)


def test_the_report_names_the_model_and_every_other_setting(tmp_path, bundled_data_dir):
    """The labels depend on --model, which the report left out: it could not say what was verified."""
    import hashlib

    from gpu_pipeline.labels.model import SHIPPED_MODELS

    tiles = bundled_data_dir / "eurosat" / "Forest"
    result, report = verify_with_report(tmp_path, tiles, "--model", "eurosat", "--backends", "numba", "--glob", "*.jpg",
                                        "--batch-size", "2", "--workers", "3", "--threads", "1", "--decode-timeout", "30")
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256(SHIPPED_MODELS["eurosat"].read_bytes()).hexdigest()
    assert report["model"] == {"given": "eurosat", "sha256": digest}
    assert report["inputs"] == {"paths": [str(tiles)], "glob": "*.jpg"}
    assert report["execution"] == {"threads": 1, "workers": 3, "batch_size": 2, "decode_timeout": 30}


def test_the_opencv_oracle_counts_a_bin_past_the_range_float32_counts_exactly():
    """cv2.calcHist counts in float32: 4097 x 4099 pixels of one value are 16,793,604 there, one too
    many. The oracle sums row slices under 2**24 pixels, their height from the width (not square)."""
    gray = np.zeros((4097, 4099), np.uint8)
    assert verify._cv_histogram(gray)[0] == 4097 * 4099


def test_a_model_that_does_not_fit_the_settings_exits_2(image_dir):
    result = invoke(image_dir, "--model", "eurosat", "--low", "30")
    assert result.exit_code == 2, result.output
    assert "the model was fitted with --low 100" in result.stderr


def test_an_image_named_with_a_newline_and_brackets_is_printed_on_one_line_as_it_is(image_dir, tmp_path):
    bad = image_dir / "bad\n[b]x.png"
    bad.write_bytes(b"not an image")
    result = invoke(image_dir, "--backends", "numba")
    (line,) = [line for line in result.stdout.splitlines() if "skipped" in line]
    assert f"skipped {image_dir}/bad\\n[b]x.png: decode error" in line


def test_a_backend_whose_gpu_fails_midway_is_reported_failed_not_an_error_per_image(tmp_path, image_dir, register):
    """Every later image was that backend's error (each tried alone, each failing alike); its close,
    on the failed GPU, could end the command in a traceback."""
    from tests.backend_doubles import FailingDevice, failing_after

    register(FailingDevice)
    failing_after(1)  # the first chunk of 2 images, then the GPU fails
    try:
        result, report = verify_with_report(tmp_path, image_dir, "--backends", "failing-device", "--batch-size", 2)
    finally:
        failing_after(None)
    assert result.exit_code == 1, result.output
    tally = next(t for t in report["backends"] if t["name"] == "failing-device")
    assert tally["status"] == "failed" and tally["images"] == 2 and tally["errors"] == 0, tally
    assert tally["reason"].startswith("the GPU of backend failing-device failed: StickyError: "), tally
    assert report["errors"] == [] and "Traceback" not in result.output
    assert "failing-device (its GPU failed)" in result.output


def test_on_a_terminal_a_compile_is_announced_before_the_images_and_a_failed_warm_up_is_a_failed_backend(
        image_dir, register):
    """A first verify after install sat at 0 images for 15-20 s (the numba kernels compiling) without a
    word, where run says so first. A backend whose warm-up fails is one that could not start."""
    import io

    from rich.console import Console

    from gpu_pipeline.diagnostics.verify import run_verify

    register(Compiling, FailingWarmUp)
    Compiling.warmed.clear()
    said = io.StringIO()
    report = run_verify(paths=[image_dir], requested=["compiling", "failing-warm-up"], against_opencv=False,
                        config=PipelineConfig(), decode_options=DecodeOptions(), glob=None, threads=None, batch_size=8,
                        workers=1, report_path=None, console=Console(file=said, width=300))
    assert Compiling.warmed == ["compiling"]
    assert said.getvalue().startswith("compiling the compiling kernels (first run after install, about 15 s; ")
    tallies = {tally.name: tally for tally in report.backends}
    assert tallies["compiling"].status == "compared"
    assert (tallies["failing-warm-up"].status, tallies["failing-warm-up"].reason) == (
        "failed", "could not start: RuntimeError: CUDA_ERROR_ILLEGAL_ADDRESS")


def test_verify_in_a_log_says_how_far_it_is_every_minute(tmp_path, monkeypatch, register):
    """A `verify` of a night's 50,000 files in a cron job's log said nothing for hours: as `run`, with
    stderr no terminal, a line every minute (30 s a chunk of one image here), none once done."""
    import gpu_pipeline.engine.job as job

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(6):
        Image.fromarray(np.full((8, 8), index * 40, np.uint8)).save(folder / f"{index}.png")
    ticks = iter(range(0, 10**6, 30))
    monkeypatch.setattr(job, "_clock", lambda: next(ticks))
    register(KeepsImages)
    result = runner.invoke(app, ["verify", str(folder), "--backends", "keeps-images", "--batch-size", "1",
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress:")]
    # (the first a minute after the first image, from which the rate counts)
    assert lines == ["progress: 3 of 6 images (50%) in 0:01:30, 0.03 images/s, about 0:01:30 left",
                     "progress: 5 of 6 images (83%) in 0:02:30, 0.03 images/s, about 0:00:30 left"], result.stderr


@pytest.mark.parametrize("command", ["verify", "run"])
def test_the_rate_in_a_log_counts_from_the_first_image_not_the_kernels_load(tmp_path, monkeypatch, register, command):
    """In a log, verify loads its kernels in its first chunk: its first lines said a fraction of the
    rate (a 10-minute load: "0.00 images/s, about 0:52:30 left"). The rate counts from the first chunk
    done, for run (its kernels loaded before its clock starts) as for verify; the time is the time."""
    import gpu_pipeline.engine.job as job

    called = []  # (its first call loads or compiles its kernels: 10 minutes)

    class SlowStart(ReferenceBackend):
        name = "slow-start"

        def process(self, images, config, keep_images=False):
            called.append(len(images))
            return super().process(images, config, keep_images)

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(6):
        Image.fromarray(np.full((8, 8), index * 40, np.uint8)).save(folder / f"{index}.png")
    ticks = iter(range(0, 10**6, 30))  # 30 s a chunk of one image, and the load once it began
    monkeypatch.setattr(job, "_clock", lambda: next(ticks) + (600 if called else 0))
    register(SlowStart)
    chosen = (["--backends", "slow-start"] if command == "verify" else
              ["--backend", "slow-start", "--out", str(tmp_path / "out.jsonl")])
    result = runner.invoke(app, [command, str(folder), *chosen, "--batch-size", "1", "--workers", "1"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress:")]
    loaded = 10 if command == "verify" else 0  # (minutes on the clock of the lines)
    assert lines == [f"progress: 3 of 6 images (50%) in 0:{loaded + 1:02d}:30, 0.03 images/s, about 0:01:30 left",
                     f"progress: 5 of 6 images (83%) in 0:{loaded + 2:02d}:30, 0.03 images/s, about 0:00:30 left"], \
        result.stderr


def test_the_verdict_and_the_table_read_one_image_and_thousands_as_run_does():
    """"1 image compared", and a night's counts grouped (1,000, not 1000) in the title, the verdict
    and the table, as `run`'s summary reads them: the verdict said "1,000 errors on 1000 of 2000 images"."""
    from rich.console import Console

    from gpu_pipeline.diagnostics.verify import BackendTally, VerifyReport, _summary, comparison_table

    def report(**counts) -> VerifyReport:
        tally = BackendTally("numba", "backend", "compared", images=counts.get("compared", 0),
                             errors=len(counts.get("errors", [])))
        return VerifyReport(PipelineConfig(), DecodeOptions(), [tally], **counts)

    assert comparison_table(report(found=1, decoded=1, compared=1)).title == (
        "1 image compared with the reference backend (ground truth)")
    assert _summary(report(found=1_234, decoded=1_234, compared=1_234)).endswith("on all 1,234 images")
    assert _summary(report(found=1_500)) == "[red bold]NOTHING COMPARED[/]: none of the 1,500 files could be decoded"
    errors = [{"image": f"/night/{index}.png", "backend": "numba", "error": "RuntimeError: lost"}
              for index in range(1_000)]
    failing = report(found=2_000, decoded=2_000, compared=1_000, errors=errors)
    failing.backends[0].stages["edges"]["differs"] = 1_000
    assert _summary(failing) == ("[red bold]DIFFERENT[/]: 0 differences and 1,000 errors on 1,000 of 2,000 images: "
                                 "numba (1,000 differences, 1,000 errors)")
    console = Console(width=200, no_color=True)
    with console.capture() as captured:
        console.print(comparison_table(failing))
    assert "numba - - 1,000 differ - - 1,000 Canny" in " ".join(captured.get().split())
