"""``gpu-pipeline bench``: the corpus, the statistics, every contender in table and JSON, usage errors.

Timings themselves are never asserted (they belong to benchmarks, not tests); what is checked is
that each number is where it should be, computed from what was measured, and that the command
says why a contender did not run. CLI runs use a tiny corpus and one repeat.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gpu_pipeline import bench
from gpu_pipeline.backends import registry
from gpu_pipeline.backends.reference import ReferenceBackend
from gpu_pipeline.bench import BenchReport, BenchSettings, Contender, Corpus, Timing
from gpu_pipeline.bench.measuring import _device_phases
from gpu_pipeline.cli import app
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.errors import UsageError
from gpu_pipeline.inputs.decode import decode_image
from gpu_pipeline.inputs.discover import discover
from tests.backend_doubles import NeverAvailable

runner = CliRunner()
TINY = ("--count", "2", "--size", "40x32", "--tiles", "3", "--repeat", "1")


class BrandNew(ReferenceBackend):
    """A backend the bench has never heard of: it must be measured like the others."""

    name = "brand-new"


class BreaksOnRealImages(ReferenceBackend):
    name = "breaks"

    def process(self, images, config, keep_images=False):
        raise RuntimeError("kernel launch failed")


class FailsOnTwoThreads(ReferenceBackend):
    """Works on one thread, breaks on two: the scaling table must say so, not crash."""

    name = "fails-on-two"
    failing_threads, failure = 2, "kernel launch failed"

    def process(self, images, config, keep_images=False):
        if self.threads == self.failing_threads:
            raise RuntimeError(self.failure)
        return super().process(images, config, keep_images)


class FailsOnOneThread(FailsOnTwoThreads):
    name = "fails-on-one"
    failing_threads, failure = 1, "needs two threads"


@dataclass
class FakeDeviceTimes:
    kernels: float = 0.0
    pixels: int = 0


class TimesItsKernels(ReferenceBackend):
    """Reports GPU time per phase the way the cuda backend does (``device_times``)."""

    name = "times-kernels"

    def __init__(self, threads=None):
        super().__init__(threads)
        self.device_times = FakeDeviceTimes()

    def process(self, images, config, keep_images=False):
        self.device_times.kernels += 0.5
        self.device_times.pixels += sum(im.shape[0] * im.shape[1] for im in images)
        return super().process(images, config, keep_images)


def run_bench(tmp_path: Path, *args) -> tuple[object, dict]:
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", *map(str, args), "--json", str(out)])
    return result, (json.loads(out.read_text()) if out.exists() else {})


# --- statistics ------------------------------------------------------------------------------


def test_median_spread_and_ratio_of_fixed_numbers():
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert bench.spread([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert bench.ratio(30.0, 12.0) == 2.5
    assert bench.ratio(None, 12.0) is None and bench.ratio(3.0, None) is None and bench.ratio(3.0, 0.0) is None


def test_timing_rates_come_from_median_fastest_and_slowest_repeat():
    timing = Timing(seconds=[0.5, 0.25, 1.0], images=10, pixels=2_000_000)
    assert timing.megapixels_per_second == {"median": 4.0, "min": 2.0, "max": 8.0}
    assert timing.images_per_second == {"median": 20.0, "min": 10.0, "max": 40.0}
    as_json = timing.to_json()
    assert as_json["median_s"] == 0.5 and as_json["min_s"] == 0.25 and as_json["max_s"] == 1.0
    assert as_json["megapixels"] == 2.0 and as_json["images"] == 10


def _measured(name: str, compute_s: list[float], e2e_s: list[float], pixels: int = 1_000_000) -> Contender:
    return Contender(name, "backend", compute=Timing(compute_s, 1, pixels), end_to_end=Timing(e2e_s, 1, pixels))


def test_ratios_are_median_rates_over_the_baseline_and_the_decode_pool():
    fast = _measured("fast", [0.02, 0.01, 0.005], [0.04, 0.03, 0.2])
    slow = _measured("slow", [0.4, 0.5, 0.9], [1.0, 3.0, 0.9], pixels=500_000)
    decode = Contender(bench.DECODE_IO, "decode", decode=Timing([0.02, 0.03, 0.025], 1, 1_000_000))
    report = BenchReport(Corpus([], []), BenchSettings(), [fast, slow], [decode],
                         bench.choose_baseline([fast, slow], ("slow",)))
    assert report.baseline == "slow"
    ratios = report.ratios(fast)
    # medians: fast 100 MP/s compute, 25 MP/s e2e; slow 1 and 0.5 MP/s; decode 40 MP/s
    assert ratios["compute_vs_baseline"] == pytest.approx(100.0)
    assert ratios["end_to_end_vs_baseline"] == pytest.approx(50.0)
    assert ratios["end_to_end_vs_decode_only"] == pytest.approx(25.0 / 40.0)
    assert report.ratios(slow)["compute_vs_baseline"] == 1.0
    assert BenchReport(Corpus([], []), BenchSettings(), [fast], [], None).ratios(fast) == {
        "compute_vs_baseline": None, "end_to_end_vs_baseline": None, "end_to_end_vs_decode_only": None}


def test_the_baseline_is_the_first_measured_of_the_order():
    pool, reference = _measured(bench.SKIMAGE_POOL, [1.0], [1.0]), _measured("reference", [1.0], [1.0])
    missing = Contender(bench.SKIMAGE_POOL, "baseline", status="not installed", reason="no skimage")
    assert bench.choose_baseline([reference, pool]) == bench.SKIMAGE_POOL
    assert bench.choose_baseline([reference, missing]) == "reference"
    assert bench.choose_baseline([missing]) is None


def test_spread_subset_takes_every_kth_image_within_the_budget():
    assert bench.spread_step([100] * 10, 1e-3) == 1  # 1000 pixels fit
    assert bench.spread_step([100] * 10, 0.5e-3) == 2  # 5 of 10
    assert bench.spread_step([100] * 10, 0.3e-3) == 4  # 3 of 10 (every 3rd would be 4)
    assert bench.spread_step([100] * 10, 1e-9) == 10  # the first image alone
    corpus = Corpus([Path(str(i)) for i in range(6)], [np.zeros((10, 10), np.uint8)] * 6)
    subset = corpus.spread_subset(300e-6)
    assert [p.name for p in subset.paths] == ["0", "2", "4"] and subset.pixels == 300


def test_device_phases_per_repeat_and_kernel_rate():
    phases = _device_phases(FakeDeviceTimes(kernels=2.0, pixels=8_000_000), repeats=4)
    assert phases == {"kernels_per_repeat": 0.5, "pixels_per_repeat": 2_000_000, "kernels_mp_per_s": 4.0}


# --- the corpus ------------------------------------------------------------------------------


def test_synthetic_scenes_are_seeded_and_structured_not_noise():
    first = bench.synthetic_scene(np.random.default_rng(5), 96, 128)
    assert first.shape == (96, 128, 3) and first.dtype == np.uint8
    assert np.array_equal(first, bench.synthetic_scene(np.random.default_rng(5), 96, 128))
    assert not np.array_equal(first, bench.synthetic_scene(np.random.default_rng(6), 96, 128))
    gray = first.mean(axis=2)
    neighbours = np.abs(np.diff(gray, axis=1))
    noise = np.abs(np.diff(np.random.default_rng(0).integers(0, 256, gray.shape).astype(float), axis=1))
    assert np.median(neighbours) < np.median(noise) / 10  # smooth inside the parcels
    assert neighbours.max() > 40  # and sharp between them
    scene = bench.synthetic_scene(np.random.default_rng(1), 256, 256)
    edges = ReferenceBackend().process([scene], PipelineConfig())[0].edge_count
    assert 0.005 < edges / scene[..., 0].size < 0.15


def test_cut_tiles_walks_the_scenes_in_order():
    scenes = [np.full((130, 200, 3), value, np.uint8) for value in (1, 2, 3)]
    tiles = bench.cut_tiles(iter(scenes), 7, size=64)  # 2 x 3 tiles per scene
    assert [t.shape for t in tiles] == [(64, 64, 3)] * 7
    assert [int(t[0, 0, 0]) for t in tiles] == [1] * 6 + [2]
    assert all(t.flags.c_contiguous for t in tiles)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_generated_corpus_has_the_scenes_then_tiles_from_the_given_sources(tmp_path, bundled_data_dir, fmt):
    sources = discover([bundled_data_dir / "scenes" / "ucmerced"])[:1]  # a 256x256 scene: 16 tiles
    paths, details = bench.generate_corpus(tmp_path, count=2, width=40, height=30, tiles=20, fmt=fmt,
                                           tile_sources=sources)
    assert len(paths) == 22 and all(p.suffix == bench.FORMATS[fmt][0] for p in paths)
    shapes = [decode_image(p, DecodeOptions()).shape for p in paths]
    assert shapes == [(30, 40, 3)] * 2 + [(64, 64, 3)] * 20
    assert details["tiles"] == {"count": 20, "size": 64, "from_bundled_scenes": 16, "from_synthetic_scenes": 4}
    if fmt == "png":  # lossless: the first tile is the scene's corner
        corner = decode_image(sources[0], DecodeOptions())[:64, :64]
        assert np.array_equal(decode_image(paths[2], DecodeOptions()), corner)


def test_load_corpus_skips_undecodable_files_and_caps_pixels(tmp_path):
    for index in range(3):
        Image.fromarray(np.full((10, 10), index, np.uint8)).save(tmp_path / f"{index}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    paths = discover([tmp_path])
    corpus = bench.load_corpus(paths, {}, DecodeOptions(), workers=2)
    assert [p.name for p in corpus.paths] == ["0.png", "1.png", "2.png"]
    assert [record["path"] for record in corpus.skipped] == [str(tmp_path / "broken.png")]
    capped = bench.load_corpus(paths, {}, DecodeOptions(), workers=2, max_pixels=250)
    assert len(capped.images) == 2 and "the first 2 of 4 files" in capped.details["truncated"]


# --- the command ------------------------------------------------------------------------------


def test_default_contenders_all_appear_in_table_and_json(tmp_path, register):
    register(NeverAvailable, BrandNew)
    result, report = run_bench(tmp_path, *TINY)
    assert result.exit_code == 0, result.output
    assert report["schema"] == bench.SCHEMA
    assert report["corpus"]["source"] == "generated" and report["corpus"]["images"] == 5
    assert report["corpus"]["shapes"] == {"40x32x3": 2, "64x64x3": 3}
    assert list(report["contenders"]) == [*registry.backend_names(), "opencv-pool", "opencv", "skimage-pool"]
    for name, entry in report["contenders"].items():
        assert name in result.stdout
        reason = bench.unavailable_reason(name)
        if reason is None:
            assert entry["status"] == "measured", entry
            for mode in ("compute", "end_to_end"):
                assert entry[mode]["images"] == 5 and len(entry[mode]["seconds"]) == 1
                assert entry[mode]["megapixels_per_s"]["median"] > 0
            assert entry["warmup"]["startup_s"] >= 0 and entry["warmup"]["first_pass_s"] > 0
        else:  # listed with the reason, not silently skipped
            assert entry["status"] in ("unavailable", "not installed") and entry["reason"] == reason
            assert reason in result.stdout
    assert report["contenders"]["brand-new"]["status"] == "measured"
    assert report["contenders"]["never-available"]["reason"] == NeverAvailable.REASON
    # the anchor is OpenCV in a process pool, one process per core: what a user replaces
    if report["contenders"]["opencv-pool"]["status"] == "measured":
        assert report["baseline"] == "opencv-pool"
        assert "multiprocessing.Pool" in report["contenders"]["opencv-pool"]["description"]
        assert report["contenders"]["opencv-pool"]["ratios"]["compute_vs_baseline"] == 1.0
    elif report["contenders"]["skimage-pool"]["status"] == "measured":
        assert report["baseline"] == "skimage-pool"
    for name in (bench.DECODE_IO, bench.DECODE_OPENCV):
        assert name in report["decode_only"]
    assert report["decode_only"][bench.DECODE_IO]["decode"]["images"] == 5
    assert report["machine"]["packages"]["numpy"]["version"] == np.__version__
    assert report["settings"]["repeats"] == 1 and report["settings"]["config"] == {
        "low_threshold": 100.0, "high_threshold": 200.0, "l2_gradient": False, "blur_ksize": 5}


def test_json_schema_of_a_measured_contender(tmp_path):
    result, report = run_bench(tmp_path, *TINY, "--backends", "reference")
    assert result.exit_code == 0, result.output
    assert set(report) == {"schema", "machine", "settings", "corpus", "baseline", "contenders", "decode_only",
                           "scaling"}
    assert report["scaling"] == {}  # the reference runs on one thread: not scaled
    entry = report["contenders"]["reference"]
    assert set(entry) == {"kind", "description", "status", "reason", "subset", "warmup", "compute", "end_to_end",
                          "decode", "device", "ratios"}
    assert set(entry["compute"]) == {"images", "megapixels", "seconds", "median_s", "min_s", "max_s",
                                     "megapixels_per_s", "images_per_s"}
    assert set(entry["compute"]["megapixels_per_s"]) == {"median", "min", "max"}
    assert set(entry["ratios"]) == {"compute_vs_baseline", "end_to_end_vs_baseline", "end_to_end_vs_decode_only"}
    assert report["baseline"] == "reference"  # the pool was not asked for
    # the ratio in the JSON is the one computed from the JSON's own medians
    decode = report["decode_only"][bench.DECODE_IO]["decode"]["megapixels_per_s"]["median"]
    assert entry["ratios"]["end_to_end_vs_decode_only"] == pytest.approx(
        entry["end_to_end"]["megapixels_per_s"]["median"] / decode)


def test_missing_opencv_and_scikit_image_are_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    monkeypatch.setitem(sys.modules, "skimage", None)
    names = [name for name in registry.backend_names() if name not in ("numba", "cuda", "cupy")]
    monkeypatch.setattr(registry, "backend_names", lambda: names)  # keep it to the quick reference
    result, report = run_bench(tmp_path, *TINY)
    assert result.exit_code == 0, result.output
    for name, package in (("opencv-pool", "opencv-python-headless"), ("opencv", "opencv-python-headless"),
                          ("skimage-pool", "scikit-image")):
        entry = report["contenders"][name]
        assert entry["status"] == "not installed" and package in entry["reason"]
        assert f"{name}: not installed" in result.stdout
    assert report["decode_only"][bench.DECODE_OPENCV]["status"] == "not installed"
    assert report["baseline"] == "reference"


def test_slow_contenders_run_on_a_subset_and_say_so(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SUBSET_MEGAPIXELS, "reference", 0.006)  # 6,000 pixels: images 1 and 4 of 5
    result, report = run_bench(tmp_path, *TINY, "--backends", "reference")
    assert result.exit_code == 0, result.output
    entry = report["contenders"]["reference"]
    assert entry["compute"]["images"] == entry["end_to_end"]["images"] == 2
    assert entry["subset"].startswith("2 of 5 images")
    assert "reference*: on 2 of 5 images" in result.stdout


def test_paths_mode_times_the_given_images(tmp_path, bundled_data_dir):
    files = discover([bundled_data_dir / "eurosat"])[:3]
    result, report = run_bench(tmp_path, *files, "--backends", "reference,numba", "--repeat", "2")
    assert result.exit_code == 0, result.output
    corpus = report["corpus"]
    assert corpus["source"] == "paths" and corpus["images"] == 3 and corpus["shapes"] == {"64x64x3": 3}
    assert corpus["unlisted"] == []
    pixels = sum(decode_image(f, DecodeOptions()).size // 3 for f in files)
    for name in ("reference", "numba"):
        entry = report["contenders"][name]
        assert entry["compute"]["megapixels"] == entry["end_to_end"]["megapixels"] == pixels / 1e6
        assert len(entry["compute"]["seconds"]) == 2
    assert "3 images (given files: 3 x 64x64x3)" in result.stdout


def test_a_folder_that_cannot_be_listed_is_named_and_recorded(tmp_path, bundled_data_dir, locked):
    """Its images were left out of the corpus without a word."""
    folder = tmp_path / "images"
    (folder / "locked").mkdir(parents=True)
    files = discover([bundled_data_dir / "eurosat"])[:3]
    for index, file in enumerate(files):
        shutil.copy(file, folder / ("locked" if index else "") / file.name)
    locked("locked")
    result, report = run_bench(tmp_path, folder, "--backends", "reference", "--repeat", "1", "--no-scaling")
    assert result.exit_code == 0, result.output
    warning = f"warning: cannot list {folder / 'locked'} (Permission denied); its images are not processed"
    assert warning in result.stderr.splitlines()
    assert report["corpus"]["images"] == 1
    assert report["corpus"]["unlisted"] == [{"folder": str(folder / "locked"), "reason": "Permission denied"}]
    result = runner.invoke(app, ["bench", str(folder / "locked")])
    assert result.exit_code == 2 and f"cannot list {folder / 'locked'}: Permission denied" in result.stderr


def test_files_cv2_cannot_read_are_left_out_of_the_opencv_decoding_rows_and_named(tmp_path, bundled_data_dir):
    """A float TIFF failed the whole opencv-pool row (the anchor: no ratio left) and the cv2.imread
    row, and bench exited 1. Now they are timed on the files cv2 reads, and say which it did not."""
    pytest.importorskip("cv2")
    tifffile = pytest.importorskip("tifffile")
    folder = tmp_path / "images"
    folder.mkdir()
    for file in discover([bundled_data_dir / "eurosat"])[:2]:
        shutil.copy(file, folder / file.name)
    tifffile.imwrite(folder / "float.tif", np.random.default_rng(0).random((64, 64), dtype=np.float32))
    result, report = run_bench(tmp_path, folder, "--backends", "reference,opencv-pool", "--repeat", "1",
                               "--no-scaling")
    assert result.exit_code == 0, result.output
    assert report["corpus"]["images"] == 3 and report["corpus"]["opencv_unreadable"] == [str(folder / "float.tif")]
    pool, imread = report["contenders"]["opencv-pool"], report["decode_only"][bench.DECODE_OPENCV]
    for row, timing in ((pool, "end_to_end"), (pool, "compute"), (imread, "decode")):
        assert row["status"] == "measured" and row[timing]["images"] == 2
        assert row["subset"] == f"2 of 3 images (0.0 MP): cv2.imread cannot read the other 1 (first: {folder / 'float.tif'})"
    assert report["baseline"] == "opencv-pool" and report["contenders"]["reference"]["end_to_end"]["images"] == 3
    assert "opencv-pool*: on 2 of 3 images" in result.stdout and "decode (cv2)*" in result.stdout
    for file in discover([folder])[:2]:
        file.unlink()
    result, report = run_bench(tmp_path, folder, "--backends", "reference,opencv-pool", "--repeat", "1",
                               "--no-scaling")
    assert result.exit_code == 0, result.output
    reason = f"cv2.imread cannot read any of the 1 files (first: {folder / 'float.tif'})"
    for row in (report["contenders"]["opencv-pool"], report["decode_only"][bench.DECODE_OPENCV]):
        assert (row["status"], row["reason"]) == ("unavailable", reason)
    assert f"opencv-pool: unavailable: {reason}" in result.stdout


def test_a_file_cv2_cannot_read_leaves_nothing_on_stderr(tmp_path, capfd):
    """OpenCV's own log printed "[ WARN:0@0.18] global grfmt_tiff.cpp:811 readData OpenCV TIFF: ...
    Sorry, can not handle images with 32-bit samples" on bench's stderr for a float TIFF, which bench
    reads once with cv2.imread to leave it out of the opencv rows (naming it itself)."""
    pytest.importorskip("cv2")
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "float.tif", np.random.default_rng(0).random((64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="cv2.imread cannot read"):
        bench.read_with_opencv(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="cv2.imread cannot read"):
        bench.read_with_opencv(tmp_path / "missing.png")
    assert capfd.readouterr().err == ""


def test_a_file_whose_name_is_not_utf8_is_timed_by_the_opencv_rows_too(tmp_path, bundled_data_dir):
    """cv2.imread crashed on such a name (a segmentation fault: bench gone, exit 139, no --json),
    even with -b numba, as every file is first tried with it. In a process of its own, so that a
    crash fails the test and not the test run."""
    pytest.importorskip("cv2")
    folder = tmp_path / "images"
    folder.mkdir()
    tile = discover([bundled_data_dir / "eurosat"])[0]
    (folder / os.fsdecode(b"ok\xfe.jpg")).write_bytes(tile.read_bytes())
    (folder / os.fsdecode(b"bad\xfd.jpg")).write_bytes(b"")  # not decoded: skipped, and named in the JSON
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "bench", str(folder), "-b", "numba,opencv-pool",
                           "--repeat", "1", "--no-scaling", "--json", str(out)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["corpus"]["opencv_unreadable"] == []
    assert report["contenders"]["opencv-pool"]["end_to_end"]["images"] == 1
    assert report["decode_only"][bench.DECODE_OPENCV]["decode"]["images"] == 1
    (skipped,) = report["corpus"]["skipped"]  # named as run's records name it: no lone surrogate escape
    assert skipped["path"] == f"{folder}/bad\\xfd.jpg" and "\\ud" not in out.read_text()
    assert base64.b64decode(skipped["path_bytes"]) == os.fsencode(folder) + b"/bad\xfd.jpg"
    assert f"(first: {folder}/bad\\xfd.jpg: " in done.stdout  # (the raw byte was printed)


def test_a_backend_that_fails_is_reported_and_exits_1(tmp_path, register):
    register(BreaksOnRealImages)
    result, report = run_bench(tmp_path, *TINY, "--backends", "reference,breaks")
    assert result.exit_code == 1, result.output
    entry = report["contenders"]["breaks"]
    assert entry["status"] == "failed" and "kernel launch failed" in entry["reason"]
    assert report["contenders"]["reference"]["status"] == "measured"


def test_a_decoder_that_fails_is_reported_and_exits_1(tmp_path, monkeypatch):
    """The decode-only rows count for the exit status as the contenders do: a decode pool that
    fails while timed is a failed bench, not a quiet gap in its table."""
    from gpu_pipeline.bench import measuring

    def broken(paths, settings):
        raise OSError("disk read error")

    monkeypatch.setattr(measuring, "decode_with_io", broken)
    result, report = run_bench(tmp_path, *TINY, "--backends", "reference")
    assert result.exit_code == 1, result.output
    entry = report["decode_only"][bench.DECODE_IO]
    assert entry["status"] == "failed" and "disk read error" in entry["reason"], entry
    assert report["contenders"]["reference"]["status"] == "measured"


def test_a_backend_whose_gpu_fails_while_measured_is_reported_failed(tmp_path, register):
    """Its close on the failed GPU raised the sticky error again, out of the bench: a traceback."""
    from tests.backend_doubles import FailingDevice, failing_after

    register(FailingDevice)
    failing_after(2)  # the warm-up and the first pass
    try:
        result, report = run_bench(tmp_path, *TINY, "--backends", "reference,failing-device")
    finally:
        failing_after(None)
    assert result.exit_code == 1, result.output
    entry = report["contenders"]["failing-device"]
    assert entry["status"] == "failed", entry
    assert "StickyError: cudaErrorIllegalAddress" in entry["reason"]
    assert report["contenders"]["reference"]["status"] == "measured"


def test_gpu_phase_times_are_reported(tmp_path, register):
    register(TimesItsKernels)
    result, report = run_bench(tmp_path, *TINY, "--backends", "times-kernels", "--repeat", "2")
    assert result.exit_code == 0, result.output
    assert report["settings"]["batch_size"] == 2  # 5 images: at least 4 batches, so 3 calls of 0.5 "GPU seconds"
    device = report["contenders"]["times-kernels"]["device"]
    pixels = report["corpus"]["megapixels"] * 1e6
    assert device["pixels_per_repeat"] == pixels and device["kernels_per_repeat"] == 1.5
    assert device["kernels_mp_per_s"] == pytest.approx(pixels / 1e6 / 1.5)
    assert "kernels alone" in result.stdout


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    result, _ = run_bench(tmp_path, *TINY, "--backends", "reference", "--plot", plot)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(plot).size[0] > 300


def test_plot_without_matplotlib_exits_2_before_timing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("timed before checking --plot"))
    result = runner.invoke(app, ["bench", *TINY, "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 2, result.output
    assert "--plot needs matplotlib" in result.stderr and "pip install 'gpu-pipeline[plot]'" in result.stderr
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--size", "abc"], "--size takes WIDTHxHEIGHT"),
    (["--size", "0x5"], "--size must be at least 1x1"),
    (["--size", "5x"], "--size takes WIDTHxHEIGHT"),
    (["--count", "0"], "--count must be >= 1"),
    (["--tiles", "-1"], "--tiles must be >= 0"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--repeat", "99999999999999999999"], "--repeat must be at most 1000, got 99999999999999999999"),  # ran for ever
    (["--repeat", "1000", "--count", "0"], "--count must be >= 1"),  # 1000 itself is allowed
    (["--threads", "0"], "--threads must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--format", "gif"], "--format must be one of jpeg, png"),
    (["--backends", "numba,warp-drive"], "unknown backend 'warp-drive'"),
    (["--backends", "numba,"], "--backends takes comma-separated names"),
    (["--size", "20000x20000"], "bench keeps it decoded in memory"),
    (["--size", "65501x16"], "a JPEG is at most 65500 pixels a side"),  # a traceback from Pillow, exit 1
    (["--size", ""], "--size takes WIDTHxHEIGHT"),  # (the default, taken without a word)
    (["--format", ""], "--format must be one of jpeg, png, got ''"),
    (["/no/such/folder"], "no such file or folder"),
    (["--json", "/no/such/folder/out.json"], "--json /no/such/folder/out.json: the folder /no/such/folder does not exist"),
    (["--plot", "/no/such/folder/out.png"], "--plot /no/such/folder/out.png: the folder /no/such/folder does not exist"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_json_and_plot_naming_one_file_are_refused_before_the_measurements(tmp_path):
    """Not after them (one file replaced the other), however the name is spelled. In tmp_path: under
    /tmp, a run this refusal let through wrote its JSON there, and the next test run was refused."""
    (tmp_path / "sub").mkdir()
    result = runner.invoke(app, ["bench", "--json", str(tmp_path / "b.png"), "--plot", str(tmp_path / "sub" / ".." / "b.png")])
    assert result.exit_code == 2 and "--json and --plot name one file" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


@pytest.mark.parametrize("option, value", [("--size", "8x8"), ("--count", "3"), ("--tiles", "2"), ("--format", "png")])
def test_generation_options_do_not_apply_to_paths(bundled_data_dir, option, value):
    result = runner.invoke(app, ["bench", str(bundled_data_dir / "eurosat"), option, value])
    assert result.exit_code == 2 and f"{option} describes the generated corpus" in result.stderr


def test_an_unavailable_backend_named_explicitly_is_a_usage_error(register):
    register(NeverAvailable)
    result = runner.invoke(app, ["bench", "--backends", "never-available"])
    assert result.exit_code == 2 and NeverAvailable.REASON in result.stderr


def test_a_folder_without_images_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["bench", str(tmp_path)])
    assert result.exit_code == 2 and "no image files found" in result.stderr


def test_a_folder_of_files_that_cannot_be_decoded_is_a_usage_error(tmp_path):
    """Nothing to time: one line, and no report (a --json of no measurement read as a benchmark)."""
    (tmp_path / "in").mkdir()
    for name in ["a.png", "b.jpg"]:
        (tmp_path / "in" / name).write_bytes(b"not an image\n" * 10)
    result = runner.invoke(app, ["bench", str(tmp_path / "in"), "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 2, result.output
    assert result.stderr == "gpu-pipeline: error: none of the 2 files could be decoded; nothing to time\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_parse_helpers():
    assert bench.parse_size("640x480") == (640, 480) and bench.parse_size("64") == (64, 64)
    assert bench.parse_contenders(None) == [*registry.backend_names(), *bench.BASELINES]
    assert bench.parse_contenders("reference, reference") == ["reference"]
    with pytest.raises(UsageError):
        bench.generation_request("8x8", 1, 0, "tiff")
    assert bench.default_batch_size(5) == 2 and bench.default_batch_size(100_000) == 25_000


def test_importing_the_command_line_loads_no_optional_package():
    code = ("import sys, gpu_pipeline.bench, gpu_pipeline.cli; "
            "print(sorted(m for m in ('cv2', 'skimage', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_thread_counts_double_up_to_the_cores():
    assert bench.thread_counts(1) == [1]
    assert bench.thread_counts(2) == [1, 2]
    assert bench.thread_counts(6) == [1, 2, 4, 6]
    assert bench.thread_counts(16) == [1, 2, 4, 8, 16]


def test_the_scaling_table_times_each_backend_by_thread_count(tmp_path):
    result, report = run_bench(tmp_path, *TINY, "--backends", "numba", "--threads", "2")
    assert result.exit_code == 0, result.output
    rows = report["scaling"]["numba"]
    assert [row["threads"] for row in rows] == [1, 2]
    for row in rows:
        for mode in ("compute", "end_to_end"):
            assert row[mode]["images"] == 5 and row[mode]["megapixels_per_s"]["median"] > 0
    assert "scaling by threads" in result.stdout
    _, without = run_bench(tmp_path, *TINY, "--backends", "numba", "--no-scaling")
    assert without["scaling"] == {}


def test_a_thread_count_that_fails_is_a_row_with_its_reason(register):
    """Measured as a backend is (errors caught), a failing thread count is a row with its reason,
    and the table says "failed" there instead of crashing."""
    from rich.console import Console

    from gpu_pipeline.bench.measuring import measure_scaling
    from gpu_pipeline.bench.report import scaling_table

    register(FailsOnTwoThreads)
    files = discover([Path(__file__).resolve().parent.parent / "data" / "eurosat"])[:3]
    corpus = bench.load_corpus(files, {}, bench.BenchSettings().decode_options, 1)
    contender = bench.Contender("fails-on-two", "backend")
    rows = measure_scaling([contender], corpus, bench.BenchSettings(repeats=1, threads=2))["fails-on-two"]
    assert [row["threads"] for row in rows] == [1, 2]
    assert rows[0]["compute"] is not None and rows[0]["reason"] is None
    assert rows[1]["compute"] is None and "kernel launch failed" in rows[1]["reason"]
    report = bench.BenchReport(corpus, bench.BenchSettings(repeats=1, threads=2), [contender], [], None,
                               {"fails-on-two": rows})
    console = Console(record=True, width=200)
    console.print(scaling_table(report))
    assert "failed" in console.export_text()


def test_a_thread_count_that_works_where_one_thread_failed_shows_its_rate_and_the_failure_why(register):
    """Every row of a backend whose one-thread run failed said "failed" (its 2-thread rate was in the
    JSON), and the reason a thread count failed was in the JSON only."""
    from rich.console import Console

    from gpu_pipeline.bench.measuring import measure_scaling
    from gpu_pipeline.bench.report import notes, scaling_table

    register(FailsOnOneThread)
    files = discover([Path(__file__).resolve().parent.parent / "data" / "eurosat"])[:3]
    corpus = bench.load_corpus(files, {}, bench.BenchSettings().decode_options, 1)
    contender = bench.Contender("fails-on-one", "backend")
    rows = measure_scaling([contender], corpus, bench.BenchSettings(repeats=1, threads=2))["fails-on-one"]
    report = bench.BenchReport(corpus, bench.BenchSettings(repeats=1, threads=2), [contender], [], None,
                               {"fails-on-one": rows})
    console = Console(record=True, width=200)
    console.print(scaling_table(report))
    lines = {line.split()[0]: line.split()[1:] for line in console.export_text().splitlines()
             if line.strip()[:1].isdigit()}
    assert lines["1"] == ["failed", "failed"] and len(lines["2"]) == 2, lines
    assert all(cell.replace(",", "").replace(".", "").isdigit() for cell in lines["2"]), lines  # rates, no ratio
    assert "fails-on-one with 1 thread: failed: cannot start: RuntimeError: needs two threads" in notes(report)


def test_the_json_is_written_even_when_the_table_cannot_be(tmp_path):
    """`bench --json f | head` or stdout on a full disk: exit 3, and the measurements were lost with
    the table (the JSON was written after printing it)."""
    out = tmp_path / "bench.json"
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "bench", *TINY, "-b", "reference",
                               "--no-scaling", "--json", str(out)], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=600)
    assert done.returncode == 3, done.stderr
    assert json.loads(out.read_text())["contenders"]


@pytest.mark.parametrize("signum, status", [(15, 143), (2, 130), (1, 129)])
def test_a_bench_stopped_by_a_signal_leaves_no_corpus_behind(tmp_path, signum, status, hangups_heard):
    """SIGTERM (a `timeout`) ended bench by the default action: its generated corpus stayed in the
    temporary folder, about 700 KB a run; and so did SIGHUP, the terminal closing."""
    import os
    import time

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "gpu_pipeline.cli", "bench", "--count", "8", "--size", "512x512",
                                "--tiles", "16", "--repeat", "3", "-b", "reference"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.monotonic() + 120
    while not any(scratch.glob("gpu-pipeline-bench-*/*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # measuring now
    process.send_signal(signum)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == status, stderr
    assert list(scratch.glob("gpu-pipeline-bench-*")) == [] and "Traceback" not in stderr


def test_a_corpus_folder_a_killed_bench_left_is_removed_by_the_next(tmp_path, monkeypatch):
    """A SIGKILL runs no clean-up: each killed bench left its generated corpus in the temporary
    folder for good (4 of 4 kills in a hunt)."""
    import os
    import re
    import subprocess
    import tempfile
    import time

    from gpu_pipeline.bench import corpus

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    child = subprocess.Popen(["true"])
    child.wait()  # its PID runs nothing now
    old = time.time() - 3600
    left = tmp_path / "tmp" / f"gpu-pipeline-bench-{child.pid}-abcd1234"
    kept = [tmp_path / "tmp" / f"gpu-pipeline-bench-{os.getpid()}-efgh5678",  # a bench still running
            tmp_path / "tmp" / "gpu-pipeline-bench-ijkl9012",  # no PID in its name: not ours to judge
            tmp_path / "tmp" / "gpu-pipeline-bench-2024-06-results"]  # the user's, named alike, unmarked
    for folder in (left, *kept):
        (folder / "scenes").mkdir(parents=True)
        (folder / "scenes" / "s.jpg").write_bytes(b"jpeg")
        pid = re.match(r"gpu-pipeline-bench-([0-9]+)-", folder.name)
        if pid and not folder.name.startswith("gpu-pipeline-bench-2024"):
            (folder / corpus.CORPUS_MARK).write_text(pid[1] + "\n")
            os.utime(folder / corpus.CORPUS_MARK, (old, old))
        os.utime(folder, (old, old))
    result, _ = run_bench(tmp_path, *TINY, "--backends", "reference", "--no-scaling")
    assert result.exit_code == 0, result.output
    assert not left.exists() and all(folder.exists() for folder in kept)
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == sorted(p.name for p in kept)  # its own gone too


def test_without_a_usable_temporary_folder_bench_says_so_or_needs_none(tmp_path, monkeypatch, bundled_data_dir):
    """No writable TMPDIR, /tmp or /var/tmp: a traceback, even with PATHS, which need no folder."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    result, _ = run_bench(tmp_path, *TINY, "--backends", "reference", "--no-scaling")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("gpu-pipeline: error: bench writes the corpus it generates into a temporary folder")
    assert "set TMPDIR to a writable folder" in result.stderr and "Traceback" not in result.output
    given, _ = run_bench(tmp_path, bundled_data_dir / "eurosat" / "Forest", "--backends", "reference", "--repeat", "1",
                         "--no-scaling")
    assert given.exit_code == 0, given.output


class CountsBuffers(ReferenceBackend):
    """Notes how many buffers the images of each call lie in, while ``timing`` is set."""

    name = "counts-buffers"
    timing = False
    buffers: list[int] = []

    def process(self, images, config, keep_images=False):
        if CountsBuffers.timing:
            CountsBuffers.buffers.append(len(images.buffers))
        return super().process(images, config, keep_images)


def test_bench_times_the_compute_of_tiles_packed_in_one_buffer(tmp_path, register, monkeypatch, bundled_data_dir):
    from gpu_pipeline.bench import measuring

    register(CountsBuffers)
    CountsBuffers.buffers = []
    real = measuring.run_compute

    def timed(*args):
        CountsBuffers.timing = True
        try:
            return real(*args)
        finally:
            CountsBuffers.timing = False

    monkeypatch.setattr(measuring, "run_compute", timed)
    result, _ = run_bench(tmp_path, bundled_data_dir / "eurosat" / "Forest", "--repeat", "2",
                          "--backends", "counts-buffers", "--no-scaling")
    assert result.exit_code == 0, result.output
    assert len(CountsBuffers.buffers) >= 3 and set(CountsBuffers.buffers) == {1}  # first pass, 2 repeats


def test_compute_is_timed_on_images_packed_as_the_engine_hands_them_over():
    """Tiles in one buffer, as a decode process or a decode thread packs them (an array per tile cost
    each backend call an address per tile: the numba backend's compute rate on tiles read half what
    it is); scenes as they are, each decoded into an array of its own. The pixels are the same."""
    from gpu_pipeline.bench.measuring import packed
    from gpu_pipeline.inputs.processes import placed_at

    rng = np.random.default_rng(5)
    tiles = [rng.integers(0, 256, (64, 64, 3) if k % 3 else (64, 64), np.uint8) for k in range(9)]
    batch = packed(tiles)
    assert len(batch.buffers) == 1
    assert [(image.shape, image.tobytes()) for image in batch] == [(image.shape, image.tobytes()) for image in tiles]
    assert all(offset == placed_at(offset) for offset in batch.offsets.tolist())
    scenes = [rng.integers(0, 256, (600, 600, 3), np.uint8) for _ in range(2)]
    assert packed(scenes) is scenes and packed([]) == []
    mixed = [tiles[0], scenes[0], *tiles[1:3], scenes[1]]
    batch = packed(mixed)
    assert len(batch.buffers) == 3 and batch.buffer_of.tolist() == [0, 1, 0, 0, 2]  # the scenes as they are
    assert [(image.shape, image.tobytes()) for image in batch] == [(image.shape, image.tobytes()) for image in mixed]


def test_a_json_that_cannot_be_written_at_the_end_prints_the_table_then_exit_3(tmp_path, monkeypatch):
    """--json on a full disk, found after the measurements: the table is printed, then one line,
    exit 3 (a write that failed, as for standard output), and no report or temporary is left."""
    import errno

    real_write_text = Path.write_text

    def disk_full(path, *args, **kwargs):
        if path.name.startswith(".bench.json"):  # the report's temporary
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    result, written = run_bench(tmp_path, *TINY, "--backends", "reference", "--no-scaling")
    assert result.exit_code == 3, result.output
    assert "reference" in result.stdout and written == {}
    assert result.stderr == f"gpu-pipeline: error: --json: cannot write {tmp_path / 'bench.json'}: {os.strerror(errno.ENOSPC)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- what is timed, and with how many threads (no timings: the clock and the work are faked) ---


def test_time_repeats_times_each_call_by_the_clock_given():
    """Each repeat is the clock after the call less the clock before it: a fake clock that the two
    calls move on by 2 s and 0.5 s."""
    now, steps = [100.0], iter([2.0, 0.5])

    def run():
        now[0] += next(steps)

    assert bench.time_repeats(2, run, clock=lambda: now[0]) == [2.0, 0.5]


def test_a_contender_that_failed_end_to_end_is_not_the_baseline():
    """Its compute was measured, its end to end not: as the baseline, every e2e ratio was null."""
    half = Contender(bench.OPENCV_POOL, "baseline", status="failed", reason="failed while measured: x",
                     compute=Timing([1.0], 1, 1_000_000))
    reference = _measured("reference", [1.0], [1.0])
    assert bench.choose_baseline([half, reference]) == "reference"


class FakePool:
    """A ``multiprocessing.Pool`` that notes what it is asked to run, and runs nothing."""

    def __init__(self, processes=None, initializer=None, initargs=()):
        self.processes, self.initializer, self.initargs, self.maps = processes, initializer, initargs, []

    def map(self, function, items, chunksize=None):
        self.maps.append((function, list(items)))
        return []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.mark.timeout(120)
def test_an_image_removed_while_bench_runs_fails_the_pool_row_and_bench_goes_on(tmp_path, bundled_data_dir,
                                                                              monkeypatch):
    """A file removed after the corpus was read (its folder deleted mid-bench): each pool worker reads
    the images in its initializer, which raised; multiprocessing replaced the worker, whose
    initializer raised again, forever: bench hung, a worker's traceback after another on stderr."""
    pytest.importorskip("cv2")
    from gpu_pipeline.bench import measuring

    folder = tmp_path / "images"
    folder.mkdir()
    for file in discover([bundled_data_dir / "eurosat"])[:2]:
        shutil.copy(file, folder / file.name)
    removed = discover([folder])[0]
    start_pool = measuring.start_pool

    def remove_then_start(kind, processes, paths, options):
        removed.unlink(missing_ok=True)
        return start_pool(kind, processes, paths, options)

    monkeypatch.setattr(measuring, "start_pool", remove_then_start)
    result, report = run_bench(tmp_path, folder, "--backends", "opencv-pool", "--repeat", "1", "--no-scaling",
                               "--threads", "1")
    assert result.exit_code == 1, result.output
    pool = report["contenders"]["opencv-pool"]
    assert pool["status"] == "failed"
    assert pool["reason"] == (f"cannot start the pool: RuntimeError: {removed}: cannot read the file: "
                              "No such file or directory")


def test_a_pool_has_one_process_per_thread_and_its_tasks_cover_the_corpus(monkeypatch):
    from gpu_pipeline.bench import baselines

    contexts = []

    class Spawn:
        def Pool(self, *args):
            return FakePool(*args)

    monkeypatch.setattr(baselines.multiprocessing, "get_context", lambda method: contexts.append(method) or Spawn())
    paths = [Path("a.jpg"), Path("b.jpg")]
    pool = baselines.start_pool("opencv", 3, paths, DecodeOptions())
    assert contexts == ["spawn"] and pool.processes == 3 and pool.initargs == ("opencv", paths, DecodeOptions())
    baselines.pool_compute(pool, 10, 3)
    baselines.pool_files(pool, paths, 3)
    assert pool.maps[1:] == [(baselines._pipeline_on_image, list(range(10))), (baselines._pipeline_on_file, paths)]


def test_the_pool_rows_start_the_pipeline_they_name_with_a_process_per_thread(monkeypatch):
    """opencv-pool runs the contract's cv2 calls, skimage-pool scikit-image's, each in a pool of
    --threads processes, on every image of the corpus."""
    pytest.importorskip("cv2")
    pytest.importorskip("skimage")
    from gpu_pipeline.bench import measuring

    started = []
    monkeypatch.setattr(measuring, "start_pool", lambda kind, processes, paths, options: started.append(
        (kind, processes, list(paths))) or FakePool(processes))
    paths = [Path("a.jpg"), Path("b.jpg")]
    corpus = Corpus(paths, [np.zeros((10, 10), np.uint8)] * 2)
    for name in (bench.OPENCV_POOL, bench.SKIMAGE_POOL):
        result = measuring.measure_pool(name, corpus, BenchSettings(repeats=2, threads=3))
        assert result.status == "measured" and "multiprocessing.Pool(3)" in result.description
        assert (result.compute.images, result.end_to_end.images, len(result.compute.seconds)) == (2, 2, 2)
    assert started == [("opencv", 3, paths), ("skimage", 3, paths)]


def test_an_opencv_pool_worker_runs_the_contracts_calls_and_reads_with_cv2(monkeypatch):
    cv2 = pytest.importorskip("cv2")
    from gpu_pipeline.bench import baselines

    monkeypatch.setattr(baselines.signal, "signal", lambda *args: None)  # (this process keeps its Ctrl-C)
    monkeypatch.setattr(baselines, "_WORKER", {})
    threads = cv2.getNumThreads()
    cv2.setNumThreads(4)
    try:
        baselines._worker_init("opencv", [], DecodeOptions())
        assert cv2.getNumThreads() == 1  # one process per core: cv2's own threads off
    finally:
        cv2.setNumThreads(threads)
    assert baselines._WORKER["pipeline"] is baselines.opencv_edge_count
    assert baselines._WORKER["read"] is baselines.read_with_opencv


def test_the_opencv_row_runs_one_image_per_thread_on_as_many_threads_as_asked(monkeypatch):
    """Three images meet at a barrier of three: only three threads at once get past it."""
    import threading

    cv2 = pytest.importorskip("cv2")
    from gpu_pipeline.bench import baselines
    from gpu_pipeline.diagnostics.verify import OpenCvOracle

    barrier = threading.Barrier(3, timeout=10)

    def one_call(self, images, config, keep_images=False):
        barrier.wait()
        return [len(images)]

    monkeypatch.setattr(OpenCvOracle, "process", one_call)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(4)
    try:
        opencv = baselines.OpenCvThreads(3)
        assert cv2.getNumThreads() == 1  # cv2's own threads off: they would oversubscribe the cores
    finally:
        cv2.setNumThreads(threads)
    try:
        assert opencv.process([np.zeros((4, 4), np.uint8)] * 3, PipelineConfig()) == [1, 1, 1]
    finally:
        opencv.close()


def test_a_slow_contender_is_timed_on_its_subset_compute_and_end_to_end_alike(monkeypatch):
    from gpu_pipeline.bench import measuring

    monkeypatch.setitem(bench.SUBSET_MEGAPIXELS, "reference", 250e-6)  # 250 pixels: images 0 and 2 of 4
    corpus = Corpus([Path(f"{k}.png") for k in range(4)], [np.full((10, 10), k, np.uint8) for k in range(4)])
    ran = {"compute": [], "end_to_end": []}
    monkeypatch.setattr(measuring, "run_compute", lambda backend, images, settings: ran["compute"].append(
        [int(image[0, 0]) for image in images]))
    monkeypatch.setattr(measuring, "run_end_to_end", lambda backend, paths, settings: ran["end_to_end"].append(
        [path.name for path in paths]))
    result = measuring.measure_backend(Contender("reference", "backend"), ReferenceBackend, corpus,
                                       BenchSettings(repeats=2))
    assert ran == {"compute": [[0, 2]] * 3, "end_to_end": [["0.png", "2.png"]] * 2}  # a first pass, 2 repeats
    assert [(t.images, t.pixels) for t in (result.compute, result.end_to_end)] == [(2, 200), (2, 200)]
    monkeypatch.setitem(bench.SUBSET_MEGAPIXELS, "reference", 400e-6)  # exactly the corpus: all of it, no note
    assert measuring._subset_for("reference", corpus) == (corpus, None)


def test_each_contender_is_created_with_the_threads_asked_for(register, monkeypatch):
    cv2 = pytest.importorskip("cv2")
    from gpu_pipeline.bench import measuring

    register(BrandNew)
    made = []
    monkeypatch.setattr(measuring, "measure_backend", lambda result, make, corpus, settings: made.append(make()) or result)
    threads = cv2.getNumThreads()
    try:
        for name in ("brand-new", bench.OPENCV):
            measuring.measure(name, Corpus([], []), BenchSettings(threads=3))
    finally:
        cv2.setNumThreads(threads)
        for backend in made:
            backend.close()
    assert [(type(backend).__name__, backend.threads) for backend in made] == [("BrandNew", 3), ("OpenCvThreads", 3)]


def test_the_start_counts_construction_and_warm_up_and_is_reported_as_such(monkeypatch):
    """startup_s: construction (1 s on a fake clock) and the warm-up hook (2 s: a JIT compile, a
    cache load); the first pass apart (docs/benchmarks.md, "Timing")."""
    from types import SimpleNamespace

    from gpu_pipeline.bench import measuring

    now = [0.0]

    class SlowToStart(ReferenceBackend):
        def __init__(self, threads=None):
            now[0] += 1.0
            super().__init__(threads)

        def warm_up(self, config=None):
            now[0] += 2.0

    monkeypatch.setattr(measuring, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(measuring, "run_compute", lambda *args: None)
    monkeypatch.setattr(measuring, "run_end_to_end", lambda *args: None)
    corpus = Corpus([Path("a.png")], [np.zeros((10, 10), np.uint8)])
    result = measuring.measure_backend(Contender("slow", "backend"), SlowToStart, corpus, BenchSettings(repeats=1))
    assert result.startup_s == 3.0 and result.first_pass_s < 3.0
    report = BenchReport(corpus, BenchSettings(repeats=1), [result], [], None).to_json()
    assert report["contenders"]["slow"]["warmup"] == {"startup_s": 3.0, "first_pass_s": result.first_pass_s}


def test_scaling_runs_each_row_with_its_thread_count_compute_and_decoders_alike(register, monkeypatch):
    from gpu_pipeline.bench import measuring

    register(BrandNew, BreaksOnRealImages)
    runs = []

    def measured(result, make, corpus, settings):
        runs.append((result.name, make().threads, settings.threads))
        result.compute = result.end_to_end = Timing([1.0], 1, 1_000_000)
        return result

    monkeypatch.setattr(measuring, "measure_backend", measured)
    contenders = [Contender("brand-new", "backend"), Contender("breaks", "backend", status="failed", reason="x"),
                  Contender("reference", "backend"), Contender(bench.OPENCV, "baseline")]
    scaling = measuring.measure_scaling(contenders, Corpus([], []), BenchSettings(repeats=1, threads=3))
    assert list(scaling) == ["brand-new"] and [row["threads"] for row in scaling["brand-new"]] == [1, 2, 3]
    assert runs == [("brand-new", 1, 1), ("brand-new", 2, 2), ("brand-new", 3, 3)]


def test_the_decoders_and_the_engine_run_with_the_threads_asked_for(monkeypatch):
    """decode (io) and end to end: the engine's --threads decoders; decode (cv2): cv2.imread in as
    many threads, three files meeting at a barrier of three."""
    import threading
    from types import SimpleNamespace

    pytest.importorskip("cv2")
    from gpu_pipeline.bench import measuring

    workers, engines = [], []
    monkeypatch.setattr(measuring, "decode_stream", lambda paths, options, threads: workers.append(threads) or iter(()))
    barrier = threading.Barrier(3, timeout=10)
    monkeypatch.setattr(measuring, "read_with_opencv", lambda path: barrier.wait())

    class Engine:
        def __init__(self, **settings):
            engines.append(settings["workers"])

        def run(self, paths, sink):
            return SimpleNamespace(failed=0)

    monkeypatch.setattr(measuring, "Engine", Engine)
    settings = BenchSettings(repeats=1, threads=3)
    corpus = Corpus([Path("a"), Path("b"), Path("c")], [np.zeros((4, 4), np.uint8)] * 3)
    decoders = measuring.measure_decoders(corpus, settings)
    assert [(d.name, d.status) for d in decoders] == [(bench.DECODE_IO, "measured"), (bench.DECODE_OPENCV, "measured")]
    assert workers == [3, 3] and decoders[1].description == "cv2.imread in 3 threads"
    measuring.run_end_to_end(None, corpus.paths, settings)
    assert engines == [3]


def test_the_table_shows_each_number_in_its_column():
    """Hand-worked: fast computes 2 MP in 0.25, 0.5 and 1 s (4 MP/s at the median, 2 to 8: ±75%;
    10 images: 20 img/s), runs end to end in 1 s (2 MP/s); slow, the baseline, 1 and 0.25 MP/s;
    the decode pool 4 MP/s. Scaling: 1 thread 2 and 1 MP/s, 2 threads 4 and 1.6 MP/s."""
    from rich.console import Console

    from gpu_pipeline.bench.report import legend, results_table, scaling_table

    def timing(*seconds):
        return Timing(list(seconds), 10, 2_000_000)

    fast = Contender("fast", "backend", startup_s=0.5, first_pass_s=0.25, compute=timing(0.5, 0.25, 1.0),
                     end_to_end=timing(1.0, 1.0, 1.0))
    slow = Contender("slow", "baseline", startup_s=2.0, first_pass_s=1.0, compute=timing(2.0), end_to_end=timing(8.0))
    decode = Contender(bench.DECODE_IO, "decode", decode=timing(0.5))
    scaling = {"fast": [{"threads": n, "reason": None, "compute": timing(c).to_json(), "end_to_end": timing(e).to_json()}
                        for n, c, e in ((1, 1.0, 2.0), (2, 0.5, 1.25))]}
    report = BenchReport(Corpus([], []), BenchSettings(repeats=3, threads=2), [fast, slow], [decode], "slow", scaling)
    console = Console(record=True, width=200)
    console.print(results_table(report))
    console.print(scaling_table(report))
    rows = [" ".join(line.split()) for line in console.export_text().splitlines()]
    assert "fast 4.00 ±75% 20.0 2.00 ±0% 10.0 4x / 8x 0.5x" in rows
    assert "slow 1.00 5.00 0.25 1.25 1x / 1x 0.062x" in rows
    assert "decode (io) 4.00 20.0" in rows
    assert "1 2.00 (1.0x) 1.00 (1.0x)" in rows and "2 4.00 (2.0x) 1.60 (1.6x)" in rows
    lines = legend(report)
    assert "x baseline: median MP/s over slow's. e2e / decode: e2e MP/s over decode (io)'s." in lines
    assert lines[3].endswith("in s: fast 0.50 + 0.25, slow 2.00 + 1.00.")


def test_the_plot_draws_each_median_with_its_min_max_range(tmp_path, monkeypatch):
    """fast computes 2 MP in 0.25, 0.5 and 1 s: 4 MP/s, from 2 to 8 (a bar 2 below, 4 above); end to
    end in 1, 2 and 4 s: 1 MP/s, from 0.5 to 2 (0.5 below, 1 above)."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from gpu_pipeline.bench.report import plot_report

    drawn, bar = [], Axes.bar

    def noted(self, x, height, width, **kwargs):
        drawn.append((height.tolist(), kwargs["yerr"].tolist()))
        return bar(self, x, height, width, **kwargs)

    monkeypatch.setattr(Axes, "bar", noted)
    fast = Contender("fast", "backend", compute=Timing([0.5, 0.25, 1.0], 10, 2_000_000),
                     end_to_end=Timing([1.0, 2.0, 4.0], 10, 2_000_000))
    plot_report(BenchReport(Corpus([], []), BenchSettings(), [fast], [], None), tmp_path / "bench.png")
    assert drawn == [([4.0], [[2.0], [4.0]]), ([1.0], [[0.5], [1.0]])]


def test_the_corpus_cap_counts_the_tiles_too():
    """16000 x 16000 is 256,000,000 pixels: the cap, 268,435,456, leaves room for 3,036 tiles of 4,096."""
    assert bench.generation_request("16000x16000", 1, 3036, "png")["tiles"] == 3036
    with pytest.raises(UsageError, match="the corpus would hold 268 MP"):
        bench.generation_request("16000x16000", 1, 3037, "png")


def test_threads_default_to_the_usable_cores(monkeypatch):
    from gpu_pipeline.cli.diagnostics import _bench_request

    monkeypatch.setattr(bench, "usable_cores", lambda: 3)
    assert _bench_request(None, "reference", None, None, None, None, 1, None, None, None, None)["threads"] == 3
    assert _bench_request(None, "reference", None, None, None, None, 1, 2, None, None, None)["threads"] == 2


def test_a_ratio_just_under_100_reads_100x_not_in_scientific_notation():
    """A backend 99.7 times the baseline read "1e+02x" in the table: 99.7 to two significant digits
    in the g format."""
    from gpu_pipeline.bench.report import _times

    assert [_times(v) for v in (0.054, 0.7, 7.6, 33.3, 99.4, 99.5, 99.7, 120.4)] == [
        "0.054x", "0.7x", "7.6x", "33x", "99x", "100x", "100x", "120x"]
    assert _times(None) == "-"


def test_rates_read_with_three_significant_digits_where_they_round_up():
    """99.96 MP/s read "100.0" and 9.996 "10.00": a digit more than the others, from the rounding."""
    from gpu_pipeline.bench.report import _number

    assert [_number(v) for v in (1.234, 9.994, 9.996, 12.34, 99.94, 99.96, 123.4, 12345.6)] == [
        "1.23", "9.99", "10.0", "12.3", "99.9", "100", "123", "12,346"]


@pytest.mark.parametrize("batch_size, said", [(1, "batches of up to 1 image "), (4096, "batches of up to 4,096 images "),
                                              (None, "batches of up to any number of images ")])
def test_the_legend_counts_the_batch_size_in_images(batch_size, said):
    from gpu_pipeline.bench.report import legend

    report = BenchReport(Corpus([], []), BenchSettings(repeats=1, threads=2, batch_size=batch_size), [], [], None)
    assert said in legend(report)[0]


@pytest.mark.parametrize("threads, said", [(1, "1 thread"), (2, "2 threads")])
def test_the_legend_counts_the_threads(threads, said):
    """"1 threads" read as a typo on a one-core machine (bench --threads 1)."""
    from gpu_pipeline.bench.report import legend

    lines = legend(BenchReport(Corpus([], []), BenchSettings(repeats=1, threads=threads), [], [], None))
    assert lines[0].startswith(f"{said}, batches") and lines[-1].endswith(f"cv2.imread in {said}.")
