"""The Python API: the README's example runs, and the API gives the command line's bytes."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpu_pipeline
from gpu_pipeline import api
from gpu_pipeline.backends import registry
from gpu_pipeline.backends.reference import ReferenceBackend
from gpu_pipeline.config import PipelineConfig
from tests.runs import wait_until
from tests.strategies import examples, image_shapes

REPO = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    section = (REPO / "README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    exec(compile(readme_example(), "README.md", "exec"), {})
    first, second, third = capsys.readouterr().out.splitlines()
    assert first.startswith("(100, 256)")
    assert second.startswith(str(REPO / "data" / "eurosat"))
    assert third == "50 (50, 256) True ['textured', 'textured']"  # (what the README's comment says)


def test_verify_mds_example_of_digging_into_one_image_runs(monkeypatch, capsys):
    example = re.search(r"```python\n(.*?)```", (REPO / "docs" / "verify.md").read_text(), re.S).group(1)
    monkeypatch.chdir(REPO)
    exec(compile(example, "docs/verify.md", "exec"), {})
    assert capsys.readouterr().out == "0 edge pixels differ\n"  # (what the page's comment says)


def test_process_gives_the_reference_results_in_order():
    rng = np.random.default_rng(3)
    # more than one CPU batch (1 MP), mixed shapes and gray
    images = [rng.integers(0, 256, shape, dtype=np.uint8)
              for shape in [(300, 400, 3), (64, 64), (900, 700, 3), (50, 80, 3), (600, 600)]]
    got = gpu_pipeline.process(images, backend="numba", low=50, high=150, keep_images=True)
    want = ReferenceBackend().process(images, PipelineConfig(50, 150), keep_images=True)
    assert np.array_equal(got.histograms, want.histograms)
    assert np.array_equal(got.edge_counts, want.edge_counts)
    assert all(np.array_equal(a, b) for a, b in zip(got.edges, want.edges))
    assert len(got.labels) == len(images) and got.equalized is not None


def test_run_yields_the_records_the_command_line_writes(tmp_path):
    from typer.testing import CliRunner

    from gpu_pipeline.cli import app

    out = tmp_path / "out.jsonl"
    assert CliRunner().invoke(app, ["run", str(REPO / "data"), "--out", str(out), "-q"]).exit_code == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(gpu_pipeline.run([REPO / "data"])) == written


def test_a_name_that_is_not_utf8_comes_as_the_command_line_writes_it(tmp_path):
    """``path`` shows the bytes as \\xNN and ``path_bytes`` holds them: the records carried a lone
    surrogate, which no JSON, CSV or Parquet text holds (``pd.DataFrame(...).to_parquet`` raised)."""
    import base64

    import pandas as pd
    from typer.testing import CliRunner

    from gpu_pipeline.cli import app

    tile = next((REPO / "data" / "eurosat" / "Forest").iterdir())
    (tmp_path / os.fsdecode(b"caf\xe9.jpg")).write_bytes(tile.read_bytes())
    (tmp_path / os.fsdecode(b"broken\xff.png")).write_bytes(b"not a png")  # an error record
    (tmp_path / "plain.jpg").write_bytes(tile.read_bytes())
    result = CliRunner().invoke(app, ["run", str(tmp_path), "--out", "-", "-q", "--backend", "reference"])
    assert result.exit_code == 1, result.output  # (1: a file failed)
    written = [json.loads(line) for line in result.stdout_bytes.decode("utf-8").splitlines()]
    records = list(gpu_pipeline.run(tmp_path, backend="reference"))
    assert records == written
    assert [record.get("path_bytes") for record in records] == [
        base64.b64encode(os.fsencode(tmp_path) + name).decode("ascii") if name else None
        for name in (b"/broken\xff.png", b"/caf\xe9.jpg", None)]
    assert records[1]["path"] == f"{tmp_path}/caf\\xe9.jpg" and "error" not in records[1]
    pd.DataFrame(records).to_parquet(tmp_path / "records.parquet")  # UnicodeEncodeError before


def engine_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith(("compute", "decode_", "batches"))]


def test_closing_run_early_stops_the_engine():
    assert engine_threads() == []
    records = gpu_pipeline.run([REPO / "data"], backend="numba", workers=2)
    assert "path" in next(records)
    assert engine_threads()  # the engine computes and decodes ahead while the caller reads
    records.close()  # returns once the engine has stopped
    assert engine_threads() == []


def fork_servers() -> list[int]:
    """This process's children that are fork servers of decode processes."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == os.getpid() and b"--fork-server" in cmdline.read():
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.parametrize("decode", ["threads", "processes"])
@pytest.mark.parametrize("where", ["as the engine starts", "as the decode threads start", "as the batch thread starts"])
def test_an_interrupt_before_the_first_record_stops_the_engine(monkeypatch, tmp_path, decode, where):
    """A notebook's interrupt (KeyboardInterrupt) between the decode pool's start and the engine's
    first part left the decode threads, their decoded pixels and the fork server running for the
    life of the process: the pool was closed only by a generator that had not started (found by a review).
    One that struck as the batch thread started (``Thread.start`` waits for it to run) left that
    thread waiting for ever for a request (found by the race soak: Ctrl-C at random moments)."""
    from gpu_pipeline.engine import stream

    from gpu_pipeline.inputs.processes import available

    if decode == "processes" and not available():
        pytest.skip("decode processes are not available here")
    real_thread = threading.Thread
    started = []

    class InterruptedSecondDecodeThread(real_thread):
        def start(self):
            if self.name.startswith("decode_"):
                started.append(self.name)
                if len(started) == 2:
                    raise KeyboardInterrupt
            super().start()

    class InterruptedAsBatchThreadStarts(real_thread):
        def start(self):
            super().start()
            if self.name == "batches":
                raise KeyboardInterrupt  # (as in start()'s wait for the new thread to run)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    tile = tmp_path / "tile.jpg"  # (a copy: the links of every run would add up on the bundled file's inode)
    tile.write_bytes(next((REPO / "data" / "eurosat").rglob("*.jpg")).read_bytes())
    for index in range(6000):  # more than the pool decodes ahead: its threads would wait for room for ever
        os.link(tile, tmp_path / f"{index:04d}.jpg")
    with monkeypatch.context() as patch:
        if where == "as the engine starts":
            patch.setattr(stream, "ThreadPoolExecutor", interrupted)
        elif where == "as the batch thread starts":
            patch.setattr(stream.threading, "Thread", InterruptedAsBatchThreadStarts)
        else:
            patch.setattr(stream.threading, "Thread", InterruptedSecondDecodeThread)
        with pytest.raises(KeyboardInterrupt):
            next(gpu_pipeline.run([tmp_path], backend="numba", decode=decode, workers=2))
    wait_until(lambda: engine_threads() == [] and fork_servers() == [], "the engine's threads and processes ending", 10)


def test_a_run_closed_as_a_decode_thread_asks_for_a_process_leaves_nothing_to_the_collector(monkeypatch, tmp_path):
    """The decode thread's "the fork server was closed" was kept as the decode pool's failure, which
    no one raised: its traceback held the pool in a cycle, with its decoded parts and its decode
    processes' arenas (5 MB of shared memory and a descriptor a run closed early, found by dropping
    runs in a loop), until the garbage collector found it."""
    import weakref

    from gpu_pipeline.engine import decoding
    from gpu_pipeline.inputs import processes

    if not processes.available():
        pytest.skip("decode processes are not available here")
    real_answer, real_pool = processes.Decoder.answer, decoding._DecodePool.__init__
    answers, pools = [], []

    def answer_once_the_run_closed(self):
        answers.append(self)
        if len(answers) < 4:  # (3 parts: the first batch, the caller's first record)
            return real_answer(self)
        wait_until(lambda: self._server._closed, "the run closing", 10)
        self._process.close()  # (as when it dies with its fork server: a fresh one is asked for)
        self._process = None
        return self.decode(*self._asked)

    def pool(self, *args, **kwargs):
        pools.append(weakref.ref(self))
        real_pool(self, *args, **kwargs)

    monkeypatch.setattr(processes.Decoder, "answer", answer_once_the_run_closed)
    monkeypatch.setattr(decoding._DecodePool, "__init__", pool)
    tile = tmp_path / "tile.jpg"  # (a copy: the links of every run would add up on the bundled file's inode)
    tile.write_bytes(next((REPO / "data" / "eurosat").rglob("*.jpg")).read_bytes())
    for index in range(3000):  # (more than one part)
        os.link(tile, tmp_path / f"{index:04d}.jpg")
    gc.disable()
    try:
        records = gpu_pipeline.run(tmp_path, backend="numba", decode="processes", workers=1)
        next(records)
        wait_until(lambda: len(answers) == 4, "the fourth part asked for", 10)
        records.close()
        del records, answers[:]
        assert [made() for made in pools] == [None]
    finally:
        gc.enable()


def test_an_error_of_the_run_reaches_the_caller_and_stops_the_engine(monkeypatch):
    from gpu_pipeline.engine.stream import Engine

    def broken_labels(self, images, result):
        raise RuntimeError("labeller broke")

    monkeypatch.setattr(Engine, "_labels", broken_labels)
    with pytest.raises(RuntimeError, match="labeller broke"):
        list(gpu_pipeline.run([REPO / "data"], backend="numba", workers=2))
    assert engine_threads() == []


def test_a_stack_of_images_goes_to_the_backend_as_it_lies_in_memory(monkeypatch):
    """An (N, H, W[, 3]) array is one batch over its memory, cut at the backend's batch size, with the
    results of the same images as a list; a list still works, image by image."""
    from gpu_pipeline.images import ImageBatch

    rng = np.random.default_rng(5)
    stack = rng.integers(0, 256, (70, 40, 30, 3), dtype=np.uint8)
    numba = api.shared_backend("numba")
    calls = []

    class Recording:
        name = "recording"

        def batch_pixels(self):
            return 25 * 40 * 30  # 25 images a call: 3 calls

        def process(self, images, config, keep_images=False):
            calls.append(images)
            return numba.process(images, config, keep_images)

    monkeypatch.setattr(api, "shared_backend", lambda name, threads: Recording())
    got = gpu_pipeline.process(stack, low=50, high=150, keep_images=True)
    assert [len(images) for images in calls] == [25, 25, 20]
    assert all(isinstance(images, ImageBatch) and np.shares_memory(images.buffers[0], stack) for images in calls)
    want = ReferenceBackend().process(list(stack), PipelineConfig(50, 150), keep_images=True)
    assert np.array_equal(got.histograms, want.histograms)
    assert np.array_equal(got.edge_counts, want.edge_counts)
    assert all(np.array_equal(a, b) for a, b in zip(got.edges, want.edges))
    calls.clear()
    listed = gpu_pipeline.process(list(stack), low=50, high=150)
    assert got.labels == listed.labels and np.array_equal(got.histograms, listed.histograms)
    assert [len(images) for images in calls] == [25, 25, 20]  # cut alike: its pixels counted image by image
    gray = gpu_pipeline.process(stack[:, :, :, 1])  # (N, H, W): gray, and not contiguous
    assert np.array_equal(gray.edge_counts, gpu_pipeline.process(list(stack[:, :, :, 1])).edge_counts)
    assert len(gpu_pipeline.process(stack[:0]).labels) == 0


def test_images_may_come_as_any_sequence_python_can_list():
    """A map-style dataset (only __len__ and __getitem__, as torch's) was refused as not iterable."""
    class Dataset:
        def __len__(self):
            return 2

        def __getitem__(self, index):
            if index >= 2:
                raise IndexError(index)
            return np.full((16, 16), 40 * index, np.uint8)

    assert gpu_pipeline.process(Dataset(), backend="reference").histograms[:, [0, 40]].tolist() == [[256, 0], [0, 256]]


def test_an_object_array_of_images_is_a_list_of_images():
    """A DataFrame column of images as an array (``df["image"].to_numpy()``: one object a row) was
    refused as "expected a stack ... or a list of images, got shape (2,)", where the column itself was taken."""
    images = np.empty(2, object)
    images[:] = [np.full((16, 16), 40, np.uint8), np.full((8, 12, 3), 80, np.uint8)]
    want = gpu_pipeline.process(list(images), backend="reference")
    got = gpu_pipeline.process(images, backend="reference")
    assert np.array_equal(got.histograms, want.histograms) and got.histograms[:, [40, 80]].tolist() == [[256, 0], [0, 96]]
    with pytest.raises(ValueError, match="image 1: expected a uint8 array, got <class 'NoneType'>"):
        gpu_pipeline.process(np.array([images[0], None], object), backend="reference")


def test_a_stack_of_the_wrong_kind_is_refused_as_an_image_would_be():
    with pytest.raises(ValueError, match="expected a uint8 array, got float32"):
        gpu_pipeline.process(np.zeros((2, 8, 8, 3), np.float32), backend="numba")
    with pytest.raises(ValueError, match=r"RGB \(H, W, 3\) image, got shape \(8, 8, 4\)"):
        gpu_pipeline.process(np.zeros((2, 8, 8, 4), np.uint8), backend="numba")
    with pytest.raises(ValueError, match="empty image"):
        gpu_pipeline.process(np.zeros((2, 0, 8), np.uint8), backend="numba")


def test_what_is_not_a_stack_or_a_list_of_images_is_refused_saying_what_to_pass():
    rgb = np.zeros((32, 40, 3), np.uint8)
    with pytest.raises(ValueError, match=r"shape \(32, 40, 3\) is one RGB image, or a stack of gray images 3 pixels wide"):
        gpu_pipeline.process(rgb, backend="numba")  # it gave 32 results, one per row
    assert len(gpu_pipeline.process([rgb], backend="numba").labels) == 1
    with pytest.raises(ValueError, match=r"shape \(32, 40\) is one image: pass \[image\]"):
        gpu_pipeline.process(rgb[:, :, 0], backend="numba")
    for images, message in [([[1, 2], [3, 4]], "image 0: expected a uint8 array, got <class 'list'>"),
                            ([rgb, None], "image 1: expected a uint8 array"),
                            ([np.zeros(5, np.uint8)], r"image 0: expected a gray \(H, W\) or RGB"),
                            (np.zeros((0, 4, 4), np.float32), "expected a uint8 array, got float32"),
                            (np.zeros((0, 4, 4, 4), np.uint8), r"got shape \(4, 4, 4\)"),
                            (np.zeros((2, 2, 2, 2, 3), np.uint8), "expected a stack"),
                            # Python's TypeError, and a path read as images, a character each
                            (None, "a list of images, got NoneType"), (3, "a list of images, got int"),
                            ("tile.png", "got str: gpu_pipeline.run reads files"),
                            (REPO / "data", "got PosixPath: gpu_pipeline.run reads files")]:
        with pytest.raises(ValueError, match=message):
            gpu_pipeline.process(images, backend="numba")


def test_an_array_of_another_library_is_refused_naming_its_type_not_its_dtype():
    """A dask array (or a torch tensor) of uint8 was refused as "expected a uint8 array, got uint8"."""
    class OtherArray:  # what dask, torch or xarray give: a dtype, a shape, __array__, no ndarray
        dtype, shape, ndim = np.dtype(np.uint8), (8, 8), 2

        def __array__(self, dtype=None, copy=None):
            return np.zeros(self.shape, np.uint8)

    for images in ([OtherArray()], [np.zeros((8, 8), np.uint8), OtherArray()]):
        with pytest.raises(ValueError, match=r"^image \d: expected a uint8 array, got <class '.*OtherArray'>: "
                                             r"np.asarray\(image\) makes one$"):
            gpu_pipeline.process(images, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_an_image_of_an_ndarray_subclass_gives_the_results_of_its_pixels(backend):
    """A masked RGB image gave the reference backend other edges than numba's (its gray conversion
    honoured the mask), and an np.matrix failed there ("object too deep for desired array")."""
    rgb = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    for image, pixels in [(np.ma.masked_array(rgb, mask=rgb < 60), rgb), (rgb[..., 0].view(np.matrix), rgb[..., 0])]:
        got, want = (gpu_pipeline.process([one], backend=backend, keep_images=True) for one in (image, pixels))
        assert np.array_equal(got.histograms, want.histograms) and np.array_equal(got.edge_counts, want.edge_counts)
        assert np.array_equal(got.edges[0], want.edges[0]) and type(got.edges[0]) is np.ndarray


def test_bad_settings_are_value_errors_that_name_them():
    image = [np.zeros((4, 4), np.uint8)]
    for options, message in [({"backend": "nope"}, "unknown backend 'nope'; choose from auto"),
                              ({"threads": 0, "backend": "reference"}, "threads must be >= 1, got 0"),
                              ({"low": "abc"}, "low threshold must be a number, got 'abc'"),
                              ({"blur": "5"}, r"blur size must be one of \(3, 5, 7\), got '5'"),
                              # 5.0 in (3, 5, 7): a numba TypingError from the kernel
                              ({"blur": 5.0, "backend": "numba"}, r"blur size must be one of \(3, 5, 7\), got 5.0"),
                              ({"threads": 1.5}, "threads must be a whole number, got 1.5"),
                              ({"threads": True}, "threads must be a whole number, got True"),
                              ({"threads": 100_000}, "threads must be at most 1024, got 100000"),
                              # compared in float32 (where it is 2**31) and float16: they passed
                              ({"low": 0, "high": np.float32(2**31 - 1)}, "high threshold must be between 0 and"),
                              ({"low": 0, "high": np.float16("inf")}, "high threshold must be between 0 and"),
                              ({"low": np.float32("nan")}, "low threshold must be between 0 and"),
                              ({"bands": (1.5,)}, "each of bands must be a whole number, got 1.5")]:
        with pytest.raises(ValueError, match=message):
            if "bands" in options:
                next(gpu_pipeline.run([REPO / "data" / "eurosat"], **options))
            else:
                gpu_pipeline.process(image, **options)
    for workers, message in [(0, "workers must be >= 1, got 0"), (1.5, "workers must be a whole number, got 1.5"),
                             (2**63 - 1, "workers must be at most 1024")]:
        with pytest.raises(ValueError, match=message):
            next(gpu_pipeline.run([REPO / "data" / "eurosat"], workers=workers))
    whole = gpu_pipeline.process(image, blur=np.int64(7), threads=np.int32(1), backend="numba")  # NumPy ints are whole
    assert whole.edge_counts.tolist() == [0]
    assert gpu_pipeline.process(image, low=np.float32(2**31 - 128), high=np.uint64(2**31 - 1)).edge_counts.tolist() == [0]


def test_the_largest_thread_and_worker_counts_are_taken():
    """MOST_THREADS (1024) is the most, not one past it: the command line's --workers 1024 --threads 1024
    is a run, and so is the API's."""
    records = gpu_pipeline.run(REPO / "data" / "eurosat", threads=1024, workers=1024)  # checked, not started
    records.close()
    assert engine_threads() == []


def test_settings_compute_alike_as_cv2_canny_uses_them():
    """computes_as, which says whether a model fitted with some settings may label with others: the
    thresholds as cv2.Canny uses them (swapped when low > high), and every other setting the same."""
    assert PipelineConfig(200, 100).computes_as(PipelineConfig(100, 200))
    assert PipelineConfig(100, 200, True, 7).computes_as(PipelineConfig(100.0, 200.0, True, 7))
    for other in (PipelineConfig(100, 201), PipelineConfig(101, 200), PipelineConfig(l2_gradient=True),
                  PipelineConfig(blur_ksize=3), PipelineConfig(200, 200)):
        assert not PipelineConfig(100, 200).computes_as(other), other


@pytest.mark.parametrize("low, high", [(np.uint8(42), np.uint8(85)), (np.float16(300), np.float16(400)),
                                       (np.float32(12.083045959472656), np.float32(12.083045959472656)),
                                       (np.int16(150), np.float32(333.3))])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_numpy_thresholds_give_opencvs_edges_with_the_l2_gradient(backend, low, high):
    """cv2.Canny takes doubles. The thresholds were squared in the caller's NumPy type: uint8 42 gave
    1764 % 256 = 228, float16 300 overflowed to inf (every candidate pixel strong), float32 lost a
    unit: 6,349 edges where OpenCV finds 6,229, or 0."""
    cv2 = pytest.importorskip("cv2")
    image = np.random.default_rng(0).integers(0, 256, (128, 128), np.uint8)
    blurred = cv2.GaussianBlur(cv2.equalizeHist(image), (5, 5), 0, borderType=cv2.BORDER_REFLECT_101)
    expected = cv2.Canny(blurred, float(low), float(high), apertureSize=3, L2gradient=True)
    result = gpu_pipeline.process([image], backend=backend, l2=True, low=low, high=high, keep_images=True)
    assert result.edges[0].tobytes() == expected.tobytes()
    assert result.edge_counts.tolist() == [cv2.countNonZero(expected)]


def test_a_backend_that_cannot_run_here_is_a_value_error_too(register):
    """The README promises one ValueError for bad arguments: backend="cuda" without a GPU raised a
    RuntimeError only (it still is one, for code that caught that)."""
    from gpu_pipeline.backends import BackendUnavailable

    class Absent(ReferenceBackend):
        name = "absent"

        @classmethod
        def unavailable_reason(cls):
            return "no such device here"

    register(Absent)
    image = [np.zeros((4, 4), np.uint8)]
    for call in (lambda: gpu_pipeline.process(image, backend="absent"),
                 lambda: list(gpu_pipeline.run(REPO / "data" / "eurosat", backend="absent"))):
        with pytest.raises(ValueError, match="backend 'absent' is unavailable: no such device here") as caught:
            call()
        assert isinstance(caught.value, BackendUnavailable) and isinstance(caught.value, RuntimeError)


BAD_RUN_ARGUMENTS = [
    ({"threads": 0}, "threads must be >= 1, got 0"),
    ({"workers": 1.5}, "workers must be a whole number, got 1.5"),
    ({"bands": (1, 2)}, r"^bands takes 1 or 3 band numbers, got 2: \(1, 2\)"),  # the keyword, not --bands
    ({"bands": 3.0}, r"bands takes 1-based band numbers such as \(4, 3, 2\), \"4,3,2\" or 1, got 3.0"),
    ({"bands": "4;3;2"}, "bands takes 1-based band numbers such as"),  # (a confusing "got 5" before)
    ({"bands": (0, 1, 2)}, r"band numbers are 1-based and must be >= 1, got \(0, 1, 2\)"),
    ({"stretch": "log"}, "stretch must be one of percentile, minmax, bitdepth, got 'log'"),
    ({"decode": "fibers"}, "^decode must be one of auto, threads, processes, got 'fibers'"),  # not --decode
    ({"model": 3}, "model must be a model file or a shipped model's name"),  # a TypeError before
    ({"model": ""}, "model must be a model file"),
    ({"model": "no-such-model"}, "model file no-such-model does not exist"),
    ({"backend": "nope"}, "unknown backend 'nope'"),
    ({"backend": ["numba"]}, "backend must be a backend's name"),
    ({"high": np.float32(2**31 - 1)}, "high threshold must be between 0 and"),
    ({"blur": 4}, r"blur size must be one of \(3, 5, 7\), got 4"),
    ({"l2": "false"}, "l2 must be True or False, got 'false'"),
    ({"glob": 3}, "glob must be a file name pattern such as '\\*.tif', got 3"),  # an AttributeError before
    ({"glob": ""}, "glob must be a file name pattern"),
]


@pytest.mark.parametrize("options, message", BAD_RUN_ARGUMENTS)
def test_run_checks_its_arguments_when_it_is_called(options, message):
    """run(...) raises at once, not at the first next(): a bad argument was found only when the
    records were read, somewhere else in the caller's program."""
    with pytest.raises(ValueError, match=message):
        gpu_pipeline.run(REPO / "data" / "eurosat", **options)
    assert engine_threads() == []


@pytest.mark.parametrize("paths, message", [
    ("", r"paths: an empty path \(a shell variable left unset\?\)"),  # walked the current folder
    ([REPO / "data", ""], "paths: an empty path"),
    (b"", "paths: an empty path"),
    (3, "paths must be a file or folder name or a list of them, got 3"),
    ([3], "paths: 3 is not a file or folder name"),
])
def test_run_refuses_what_names_no_file(paths, message):
    with pytest.raises(ValueError, match=message):
        gpu_pipeline.run(paths)


def test_run_takes_bytes_paths_as_the_file_system_names_them(tmp_path):
    forest = REPO / "data" / "eurosat" / "Forest"
    want = list(gpu_pipeline.run(forest, backend="numba"))
    assert list(gpu_pipeline.run(os.fsencode(forest), backend="numba")) == want  # a TypeError before
    assert list(gpu_pipeline.run([os.fsencode(forest)], backend="numba")) == want


def test_bands_as_the_command_line_spells_them_or_one_int():
    forest = REPO / "data" / "eurosat" / "Forest"
    rgb = list(gpu_pipeline.run(forest, backend="numba", bands=(3, 2, 1)))
    assert rgb != list(gpu_pipeline.run(forest, backend="numba"))
    assert list(gpu_pipeline.run(forest, backend="numba", bands="3,2,1")) == rgb  # "--bands takes 1 or 3, got 5"
    gray = list(gpu_pipeline.run(forest, backend="numba", bands=(2,)))
    assert {record["bands"] for record in gray} == {1}
    assert list(gpu_pipeline.run(forest, backend="numba", bands="2")) == gray  # "must be a whole number, got '2'"
    assert list(gpu_pipeline.run(forest, backend="numba", bands=2)) == gray  # a TypeError before
    assert list(gpu_pipeline.run(forest, backend="numba", bands=np.array([2]))) == gray


def test_switches_are_true_or_false_only():
    """l2="false" switched L2 on, as any value that is true would."""
    image = [np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)]
    for options in ({"l2": "false"}, {"l2": 0}, {"l2": None}, {"keep_images": "no"}, {"keep_images": 1}):
        name = next(iter(options))
        with pytest.raises(ValueError, match=f"^{name} must be True or False, got "):
            gpu_pipeline.process(image, backend="numba", **options)
    l2 = gpu_pipeline.process(image, backend="numba", l2=np.True_, keep_images=np.bool_(True))
    assert l2.edges is not None
    assert np.array_equal(l2.edge_counts, gpu_pipeline.process(image, backend="numba", l2=True).edge_counts)


def test_the_api_names_its_keywords_where_the_command_line_names_its_options():
    """A model fitted with other settings is refused naming low=..., not --low ..."""
    image = [np.zeros((8, 8), np.uint8)]
    with pytest.raises(ValueError, match="^the model was fitted with low=100, high=200, l2=False, blur=5 but these "
                                         "settings are low=50, high=200, l2=True, blur=5;"):
        gpu_pipeline.process(image, model="eurosat", low=50, l2=True)
    with pytest.raises(ValueError, match="model must be a model file"):
        gpu_pipeline.process(image, model=3)
    assert len(gpu_pipeline.process(image, model=REPO / "gpu_pipeline" / "labels" / "models" / "eurosat.json").labels) == 1


def test_dir_lists_the_api():
    """The API is imported on first use (a module __getattr__): dir() and completion did not show it."""
    assert {"process", "run", "run_batches", "Results", "Batch", "__version__"} <= set(dir(gpu_pipeline))


def test_run_takes_one_path_as_one_path(monkeypatch):
    """A str is one path, not its characters: run("./") walked "." and "/", the whole file system."""
    monkeypatch.chdir(REPO / "data" / "eurosat")
    one = list(gpu_pipeline.run("Forest", backend="numba"))
    assert len(one) == len(list((REPO / "data" / "eurosat" / "Forest").iterdir())) > 1
    assert list(gpu_pipeline.run(Path("Forest"), backend="numba")) == one
    assert list(gpu_pipeline.run(["Forest"], backend="numba")) == one


def test_the_api_benchmark_runs_both_ways(capsys):
    """scripts/bench_api.py, whose figures the README quotes: both forms, and the null-device host side."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_api", REPO / "scripts" / "bench_api.py")
    bench_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_api)
    assert bench_api.main([str(REPO / "data" / "eurosat"), "--count", "64", "--repeats", "1", "--threads", "1"]) == 0
    assert bench_api.main([str(REPO / "data" / "eurosat"), "--count", "64", "--repeats", "1", "--null-device"]) == 0
    out = capsys.readouterr().out
    for form in ("list ", "stack ", "ImageBatch.of "):
        assert re.search(rf"^{form}.*\d+\.\d+ (min|us/tile)", out, re.M), (form, out)


@settings(max_examples=examples(25), deadline=None)
@given(st.integers(0, 5), image_shapes(max_side=24), st.booleans(), st.integers(0, 2**32 - 1))
def test_stacks_of_odd_shapes_give_the_reference_results(count, shape, rgb, seed):
    stack = np.random.default_rng(seed).integers(0, 256, (count, *shape, 3) if rgb else (count, *shape), dtype=np.uint8)
    if stack.ndim == 3 and stack.shape[-1] == 3:  # gray images 3 pixels wide, or one RGB image: as a list
        with pytest.raises(ValueError, match="pass \\[image\\] for one image"):
            gpu_pipeline.process(stack, backend="numba")
        got = gpu_pipeline.process(list(stack), backend="numba", keep_images=True)
    else:
        got = gpu_pipeline.process(stack, backend="numba", keep_images=True)
    want = ReferenceBackend().process(list(stack), PipelineConfig(), keep_images=True)
    assert np.array_equal(got.histograms, want.histograms.reshape(-1, 256))
    assert np.array_equal(got.edge_counts, want.edge_counts)
    assert [e.tobytes() for e in got.edges] == [e.tobytes() for e in want.edges or []]


# ---------------------------------------------------------------- as notebooks and services call it

FORKED_CHILD = """
import os, sys, time
import numpy as np
import gpu_pipeline

tiles = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
before = gpu_pipeline.process(tiles, backend=sys.argv[1], model=sys.argv[2] or None)
pid = os.fork()
if pid == 0:
    after = gpu_pipeline.process(tiles, backend=sys.argv[1], model=sys.argv[2] or None)
    same = after.histograms.tobytes() == before.histograms.tobytes() and after.labels == before.labels
    os._exit(0 if same else 3)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    print("child hung")
"""


@pytest.mark.parametrize("backend, model", [("numba", ""), ("reference", "eurosat"), ("reference", "eurosat-cnn")])
def test_a_forked_child_can_use_the_api_after_its_parent(backend, model):
    """multiprocessing's default start method on Linux: the numba backend's helper pool stayed in the
    parent (the child waited for it for ever), and GNU OpenMP, started by the label kernels, killed
    the child ("fork() called from a process already using GNU OpenMP")."""
    reason = registry.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    result = subprocess.run([sys.executable, "-c", FORKED_CHILD, backend, model], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, NUMBA_NUM_THREADS="2"))
    assert result.stdout.strip().splitlines()[-1:] == ["child 0"], (result.stdout, result.stderr)


CHILD_OF_A_RUN = """
import os, sys, time
import gpu_pipeline

records = gpu_pipeline.run(sys.argv[1], backend="reference", decode=sys.argv[2], workers=1)
next(records)
pid = os.fork()
if pid == 0:
    try:
        sum(1 for _ in records)
        os._exit(3)
    except RuntimeError as exc:
        print(exc, flush=True)
        os._exit(0)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child", os.waitstatus_to_exitcode(status), "parent", 1 + sum(1 for _ in records))
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    print("child hung")
"""


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_a_forked_child_cannot_go_on_with_its_parents_run(tmp_path, decode):
    """A run its parent had started hung the child that went on with it (its engine's threads, which
    compute the next batch, stayed in the parent): the child is told instead, and the parent goes on."""
    from gpu_pipeline.inputs.processes import available

    if decode == "processes" and not available():
        pytest.skip("decode processes are not available here")
    tile = tmp_path / "tile.jpg"  # (a copy: the links of every run would add up on the bundled file's inode)
    tile.write_bytes(next((REPO / "data" / "eurosat").rglob("*.jpg")).read_bytes())
    for index in range(600):  # (batches of 256 tiles: the parent's run is not over at its first record)
        os.link(tile, tmp_path / f"{index:04d}.jpg")
    result = subprocess.run([sys.executable, "-c", CHILD_OF_A_RUN, str(tmp_path), decode], capture_output=True,
                            text=True, timeout=120)
    told, ended = (result.stdout.splitlines() + ["", ""])[:2]
    assert re.fullmatch(r"this run was started in process \d+: a forked child cannot go on with it \(its engine "
                        r"stayed in that process\); start a run of the child's own", told), (result.stdout, result.stderr)
    assert ended == "child 0 parent 601", (result.stdout, result.stderr)


def test_overlapping_runs_give_the_gil_switch_interval_back():
    """Each run restored the interval it found: the second saved the first's 1 ms, and closing them
    in order left the whole process at 1 ms."""
    before = sys.getswitchinterval()
    first = gpu_pipeline.run(REPO / "data" / "eurosat", backend="reference", decode="threads")
    second = gpu_pipeline.run(REPO / "data" / "eurosat", backend="reference", decode="threads")
    next(first), next(second)
    assert sys.getswitchinterval() < before
    first.close()
    assert sys.getswitchinterval() < before  # the second is still open
    second.close()
    assert sys.getswitchinterval() == before


def test_threads_that_ask_at_once_share_one_backend(register):
    """lru_cache does not hold back a second miss: 8 threads made 8 backends (8 GPU set-ups on cupy)."""
    made = []

    class Counted(ReferenceBackend):
        name = "counted"

        def __init__(self, threads=None):
            made.append(self)
            time.sleep(0.2)  # a slow set-up, as a GPU backend's
            super().__init__()

    register(Counted)
    start = threading.Barrier(8)
    got = []

    def ask():
        start.wait()
        got.append(api.shared_backend("counted"))

    workers = [threading.Thread(target=ask) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(made) == 1 and all(backend is made[0] for backend in got)


# ---------------------------------------------------------------- run_batches: the same run, a batch of arrays at a time


@pytest.mark.parametrize("images_a_batch", [None, 7])
def test_run_batches_gives_the_golden_records_as_arrays(tmp_path, monkeypatch, images_a_batch):
    """Held to the golden records (tests/fixtures/golden/data.jsonl, written by the code before the
    batch data plane) on the bundled data and three broken files, in one batch and in batches of 7:
    each array row is that record's field, a failed file's row is zeros (its label None, its error
    record at its position), and ``records()`` gives the golden lines themselves."""
    from gpu_pipeline.engine import stream
    from tests.test_golden import GOLDEN, golden_corpus, portable

    if images_a_batch is not None:
        batched = stream.part_batches
        monkeypatch.setattr(stream, "part_batches", lambda parts, _, pixels: batched(parts, images_a_batch, pixels))
    folder = golden_corpus(tmp_path)
    golden = [json.loads(line) for line in (GOLDEN / "data.jsonl").read_text().splitlines()]
    batches = list(gpu_pipeline.run_batches(folder, backend="numba"))
    assert len(batches) == 1 if images_a_batch is None else len(batches) > 5  # (errors ride along: not 10)
    rows = [(batch, position) for batch in batches for position in range(len(batch))]
    assert len(rows) == len(golden) and sum(len(batch.errors) for batch in batches) == 3
    for (batch, k), record in zip(rows, golden):
        assert portable(batch.paths[k], folder) == record["path"]
        if "error" in record:
            assert not batch.ok[k] and batch.labels[k] is None
            assert {**batch.errors[k], "path": portable(batch.errors[k]["path"], folder)} == record
            assert not batch.histograms[k].any() and (batch.edge_counts[k], batch.widths[k]) == (0, 0)
            continue
        assert batch.ok[k] and k not in batch.errors
        assert batch.histograms[k].tolist() == record["histogram"]
        assert [int(batch.edge_counts[k]), int(batch.widths[k]), int(batch.heights[k]), int(batch.bands[k]),
                batch.labels[k], batch.backend] == [record[name] for name in (
                    "edge_count", "width", "height", "bands", "label", "backend")]
    for batch in batches:
        assert batch.histograms.shape == (len(batch), 256) and batch.histograms.dtype == np.int64
        assert all(column.shape == (len(batch),) and column.dtype == np.int64
                   for column in (batch.edge_counts, batch.widths, batch.heights, batch.bands))
    lines = [json.dumps(record, separators=(",", ":")) for batch in batches for record in batch.records()]
    assert portable("\n".join(lines) + "\n", folder) == (GOLDEN / "data.jsonl").read_text()


def test_closing_run_batches_early_stops_the_engine():
    assert engine_threads() == []
    batches = gpu_pipeline.run_batches([REPO / "data"], backend="numba", workers=2)
    assert len(next(batches)) > 0
    batches.close()  # returns once the engine has stopped
    assert engine_threads() == []


@pytest.mark.parametrize("options, message", BAD_RUN_ARGUMENTS)
def test_run_batches_checks_its_arguments_when_it_is_called(options, message):
    with pytest.raises(ValueError, match=message):
        gpu_pipeline.run_batches(REPO / "data" / "eurosat", **options)
    assert engine_threads() == []


def test_a_batch_shows_its_size_not_its_contents():
    (batch,) = gpu_pipeline.run_batches(REPO / "data" / "eurosat" / "Forest", backend="numba")
    assert repr(batch) == f"Batch({len(batch)} files, 0 failed, backend='numba')"


def test_a_batch_and_results_compare_by_identity_as_containers_of_arrays_do():
    """``batch in seen`` or ``batch == other`` raised "the truth value of an array ... is ambiguous"
    (the dataclass compared its arrays field by field), and neither could go in a set."""
    (batch,) = gpu_pipeline.run_batches(REPO / "data" / "eurosat" / "Forest", backend="numba")
    (again,) = gpu_pipeline.run_batches(REPO / "data" / "eurosat" / "Forest", backend="numba")
    assert batch in [again, batch] and batch != again and len({batch, again}) == 2
    results = gpu_pipeline.process([np.zeros((4, 4), np.uint8)], backend="numba")
    assert results in [results] and results != gpu_pipeline.process([np.zeros((4, 4), np.uint8)], backend="numba")


def test_run_of_no_path_or_of_folders_without_images_yields_no_record(tmp_path):
    """README: an empty name is refused; a list naming no path, or folders holding no image, gives no
    record (the command line refuses those: a program may well pass an empty list)."""
    assert list(gpu_pipeline.run([])) == [] and list(gpu_pipeline.run_batches([])) == []
    assert list(gpu_pipeline.run([tmp_path])) == []


@pytest.mark.parametrize("name, bands", [("formats/gray16.png", None), ("formats/palette.gif", None),
                                         ("formats/four_band_planar.tif", None), ("formats/rgba.png", None),
                                         ("multiband/rio-tiler_rgb.tif", "3,2,1"), ("formats/gray16.png", 1)])
def test_read_image_gives_the_pixels_run_computes_on(name, bands):
    """verify.md: to dig into one image, process() what read_image gives: the record run wrote. For 16-bit
    samples, a palette or four bands, Pillow's or tifffile's own pixels give other results."""
    path = REPO / "data" / name
    (record,) = gpu_pipeline.run(path, backend="reference", bands=bands)
    image = gpu_pipeline.read_image(path, bands=bands)
    assert image.dtype == np.uint8 and image.flags.c_contiguous and image.shape[:2] == (record["height"], record["width"])
    results = gpu_pipeline.process([image], backend="reference", keep_images=True)
    assert results.histograms[0].tolist() == record["histogram"] and results.edge_counts[0] == record["edge_count"]
    assert results.labels[0] == record["label"] and int(results.edges[0].astype(bool).sum()) == record["edge_count"]


def test_read_image_raises_what_runs_error_record_says(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")
    (record,) = gpu_pipeline.run(broken, backend="reference")
    with pytest.raises(gpu_pipeline.DecodeError) as info:
        gpu_pipeline.read_image(broken)
    assert (info.value.stage, str(info.value)) == (record["stage"], record["error"])
    for bad, message in ((b"", "paths: an empty path"), ([broken], "path must be a file name"),
                         (broken, "stretch")):
        with pytest.raises(ValueError, match=message):
            gpu_pipeline.read_image(bad, stretch="bogus" if bad is broken else "percentile")


def test_read_images_error_crosses_a_process_pool_as_itself(tmp_path):
    """``ProcessPoolExecutor().map(gpu_pipeline.read_image, paths)``: a damaged file's DecodeError is
    pickled back to the caller. It could not be unpickled (two arguments, one in ``args``): the pool
    broke ("BrokenProcessPool: a process ... terminated abruptly") for one bad file."""
    import concurrent.futures
    import multiprocessing
    import pickle

    error = pickle.loads(pickle.dumps(gpu_pipeline.DecodeError("decode", "damaged or truncated image data")))
    assert (type(error), error.stage, error.message, str(error)) == (
        gpu_pipeline.DecodeError, "decode", "damaged or truncated image data", "damaged or truncated image data")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
        with pytest.raises(gpu_pipeline.DecodeError) as info:
            pool.submit(gpu_pipeline.read_image, broken).result(timeout=120)
    with pytest.raises(gpu_pipeline.DecodeError) as here:
        gpu_pipeline.read_image(broken)
    assert (info.value.stage, str(info.value)) == (here.value.stage, str(here.value))


class SlowLoading:
    """Loading (numba's import, the kernels' compile) stood in for by a wait the test releases; it
    records whether a KeyboardInterrupt cut it half-way (``cut``) or it ran to its end (``finished``)."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()
        self.cut, self.finished = [], []

    def around(self, load):
        """``load(name, ...)``, after the wait."""
        def slow(name, *args, **kwargs):
            self.started.set()
            try:
                self.release.wait(30)
            except KeyboardInterrupt:
                self.cut.append(name)
                raise
            loaded = load(name, *args, **kwargs)
            self.finished.append(name)
            return loaded

        return slow

    def ctrl_c_once_started(self) -> None:
        """A Ctrl-C (SIGINT) to the main thread as it waits for the loading."""
        import signal

        def ctrl_c():
            self.started.wait(30)
            time.sleep(0.1)  # (the caller is waiting)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        threading.Thread(target=ctrl_c, daemon=True).start()


@pytest.fixture
def slow_loading():
    """A :class:`SlowLoading`, with Ctrl-C raising KeyboardInterrupt (a background job ignores it)."""
    import signal

    loading = SlowLoading()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield loading
    loading.release.set()
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_the_backend_loads_stops_the_wait_not_the_loading(slow_loading, monkeypatch):
    """A notebook's first call imports numba and compiles the kernels (15 s after an install); a
    Ctrl-C then used to land inside them, and numba stayed broken for the session ("module 'numba'
    has no attribute 'core'", "no compiled object yet for <Library 'equalize_lut'>"). Now the Ctrl-C
    ends the call at once, the loading goes on in its own thread, and the next call gets the backend."""
    real_create = registry.create
    api._forget_backends()
    monkeypatch.setattr(api.registry, "create", slow_loading.around(
        lambda name, threads=None: real_create("reference", threads=threads)))
    monkeypatch.setattr(api, "_backend_name", lambda name: name)
    try:
        image = np.zeros((8, 8), np.uint8)
        slow_loading.ctrl_c_once_started()
        with pytest.raises(KeyboardInterrupt):
            gpu_pipeline.process([image], backend="slow")
        assert slow_loading.cut == [] and slow_loading.finished == []  # the loading goes on
        slow_loading.release.set()
        results = gpu_pipeline.process([image], backend="slow")
        assert results.edge_counts.tolist() == [0] and slow_loading.finished == ["slow"] and slow_loading.cut == []
        again = gpu_pipeline.process([image], backend="slow")
        assert again.labels == results.labels and slow_loading.finished == ["slow"]  # loaded once
    finally:
        slow_loading.release.set()
        api._forget_backends()


def test_a_ctrl_c_while_a_models_kernels_load_stops_the_wait_not_the_loading(slow_loading, monkeypatch):
    """The same for a label model's kernels (numba imported by the model's module): `model=` alone
    made the first call import numba in the caller's thread."""
    monkeypatch.setattr(api, "_warm_model", slow_loading.around(api._warm_model))
    monkeypatch.setattr(api, "_models", {})
    image = np.zeros((8, 8), np.uint8)
    slow_loading.ctrl_c_once_started()
    with pytest.raises(KeyboardInterrupt):
        gpu_pipeline.process([image], backend="reference", model="eurosat")
    assert slow_loading.cut == [] and slow_loading.finished == []
    slow_loading.release.set()
    wait_until(lambda: slow_loading.finished == ["eurosat"], "the model's kernels loaded")
    assert len(gpu_pipeline.process([image], backend="reference", model="eurosat").labels) == 1
    assert slow_loading.finished == ["eurosat"] and slow_loading.cut == []  # loaded once


FORK_WHILE_LOADING = """
from gpu_pipeline import api  # (first, as a notebook's first call imports it; then a thread pool's module,
import logging, multiprocessing, threading  # which the numba backend imports: their fork hooks come later)
from concurrent.futures import ThreadPoolExecutor
from gpu_pipeline.backends.reference import ReferenceBackend

compiler_lock = threading.Lock()  # numba's, held while the kernels load
started, release = threading.Event(), threading.Event()

def create(name, threads=None):  # numba's import and compile, in short
    if not compiler_lock.acquire(timeout=5):  # (in numba, for ever)
        raise RuntimeError("the compiler lock is held by a thread this process does not have")
    try:
        started.set()
        release.wait(30)
        logging.getLogger("numba")  # (the locks other fork hooks take: logging's, the thread pools')
        with ThreadPoolExecutor(1) as helpers:
            helpers.submit(int).result()
    finally:
        compiler_lock.release()
    return ReferenceBackend()

def in_child(_):
    return type(api.shared_backend("slow")).__name__

api.registry.create, api._backend_name = create, lambda name: name
threading.Thread(target=api.shared_backend, args=("slow",), daemon=True).start()
started.wait(30)
threading.Timer(0.2, release.set).start()  # (the fork comes first: it must wait for this)
with multiprocessing.get_context("fork").Pool(1) as pool:
    print(pool.map_async(in_child, [0]).get(20))
"""


def test_a_fork_while_a_backend_loads_waits_for_it():
    """A fork (a multiprocessing 'fork' pool) while a backend loads in its thread: the child got the
    locks the loading held (numba's compiler lock, as it loads the kernels) held by a thread it does
    not have, and its first call hung for ever. The fork waits for the loading (before another fork
    hook takes a lock the loading needs); the child has the backend."""
    result = subprocess.run([sys.executable, "-c", FORK_WHILE_LOADING], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "['ReferenceBackend']", (result.stdout, result.stderr[-2000:])


def test_threads_that_ask_for_a_model_at_once_load_it_once(monkeypatch):
    """As a backend: a model's kernels are loaded once however many threads make the first call at
    once (each loaded them, compiling the same kernels side by side)."""
    real_warm = api._warm_model
    loads, second = [], threading.Event()

    def warm(name, keyword):
        loads.append(name)
        if len(loads) == 1:
            second.wait(0.5)  # (does another thread load it too meanwhile?)
        else:
            second.set()
        real_warm(name, keyword)

    monkeypatch.setattr(api, "_warm_model", warm)
    monkeypatch.setattr(api, "_models", {})
    both = threading.Barrier(2)
    labelled = []

    def first_call():
        both.wait(30)
        labelled.append(api._labeller("eurosat", PipelineConfig()))

    threads = [threading.Thread(target=first_call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(labelled) == 2 and loads == ["eurosat"]


def test_a_backend_whose_warm_up_fails_raises_its_own_error_and_is_made_again(monkeypatch):
    """Only an unknown name is a ValueError: a KeyError of a backend's own (its first batch, now its
    warm-up) became "ValueError: 'the kernel for uint16'", as if the name were unknown; and the next
    call makes the backend again."""
    made = []

    class FailsFirst(ReferenceBackend):
        def __init__(self):
            super().__init__()
            made.append(self)

        def process(self, images, config, keep_images=False):
            if len(made) == 1:
                raise KeyError("the kernel for uint16")
            return super().process(images, config, keep_images)

    api._forget_backends()
    monkeypatch.setattr(api.registry, "create", lambda name, threads=None: FailsFirst())
    monkeypatch.setattr(api, "_backend_name", lambda name: name)
    try:
        image = np.zeros((8, 8), np.uint8)
        with pytest.raises(KeyError, match="the kernel for uint16"):
            gpu_pipeline.process([image], backend="fails-first")
        assert gpu_pipeline.process([image], backend="fails-first").edge_counts.tolist() == [0] and len(made) == 2
    finally:
        api._forget_backends()
