"""Decoding in worker processes gives the images and errors that decoding in threads gives, and the
packed data plane (ImageBatch, parts, batches of parts) loses nothing on the way."""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gpu_pipeline.backends import create
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine.decoding import Decoded, DecodedPart, decode_stream
from gpu_pipeline.engine.stream import Engine, part_batches
from gpu_pipeline.images import ImageBatch
from gpu_pipeline.inputs import processes
from gpu_pipeline.inputs.decode import OFF_BOUNDARY, decode_image
from gpu_pipeline.inputs.discover import find_files
from gpu_pipeline.outputs.sink import RecordList
from tests.runs import count_decode_processes
from tests.strategies import examples, packed_batch

BUNDLED = Path(__file__).resolve().parent.parent / "data"
needs_processes = pytest.mark.skipif(not processes.available(), reason="decode processes need Linux (memfd)")


def hostile_folder(root: Path) -> Path:
    """The bundled data, a 16-bit 5-band TIFF, and files that must fail, each in its own way."""
    folder = root / "inputs"
    shutil.copytree(BUNDLED, folder)
    shutil.copy(Path(__file__).parent / "fixtures" / "five_band_uint16.tif", folder / "five_band_uint16.tif")
    jpeg = next(iter(sorted((folder / "eurosat").rglob("*.jpg"))))
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[:400])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_bytes(b"not a PNG\n")
    Image.fromarray(np.full((3, 700), 9, np.uint8)).save(folder / "wide_gray.png")
    os.mkfifo(folder / "pipe.png")
    jpeg_bomb(folder / "bomb.tif")
    (folder / os.fsdecode(b"odd-\xff\xfe.png")).write_bytes((folder / "wide_gray.png").read_bytes())
    return folder


def jpeg_bomb(path: Path) -> None:
    """A 64 x 64 JPEG-compressed TIFF whose strip says 3000 x 3000: tifffile decoded all of it, and
    its first rows became a normal record."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages.first.dataoffsets[0]
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0", offset)
    data[sof + 5:sof + 9] = (3000).to_bytes(2, "big") * 2
    path.write_bytes(data)


@needs_processes
def test_big_images_are_decoded_in_threads_even_with_processes(tmp_path, monkeypatch):
    """A scene costs little Python for its decoding time and would cost a copy into fresh shared
    memory: decoded in the pool's threads, with no decode process started."""
    for index in range(4):
        Image.fromarray(np.full((600, 700, 3), index, np.uint8)).save(tmp_path / f"scene{index}.png")
    started = count_decode_processes(monkeypatch)
    decoded = list(decode_stream(find_files([tmp_path]), DecodeOptions(), 2, processes=True))
    assert [item.image.shape for item in decoded] == [(600, 700, 3)] * 4
    assert not started


def same(a: Decoded, b: Decoded) -> bool:
    if a.path != b.path or a.error != b.error:
        return False
    if a.image is None or b.image is None:
        return a.image is None and b.image is None
    return a.image.dtype == b.image.dtype and a.image.shape == b.image.shape and np.array_equal(a.image, b.image)


@needs_processes
@pytest.mark.parametrize("chunk_pixels", [1, 5000, 1 << 18])
def test_processes_decode_what_threads_decode(tmp_path, chunk_pixels, monkeypatch):
    """Pixels (dtype, shape, bytes) and error records are the same, whatever the parts' size: a
    part of one image, parts that end inside a chunk, images carried over to the next slot."""
    files = find_files([hostile_folder(tmp_path)])
    options = DecodeOptions(bands=None)
    threads = list(decode_stream(files, options, 2, chunk_pixels=chunk_pixels))
    started = count_decode_processes(monkeypatch)
    in_processes = list(decode_stream(files, options, 2, chunk_pixels=chunk_pixels, processes=True))
    assert started, "no decode process ran"
    assert [item.path for item in in_processes] == files
    assert all(same(a, b) for a, b in zip(threads, in_processes))
    errors = {Path(item.path).name: item.error["stage"] for item in in_processes if item.error}
    assert errors == {"truncated.jpg": "decode", "empty.png": "read", "text.png": "decode", "pipe.png": "read",
                      "five_band_uint16.tif": "normalise", "bomb.tif": "decode"}


@needs_processes
def test_an_image_larger_than_a_slot_and_a_full_arena_still_decode(tmp_path):
    """A scene bigger than a slot comes in shared memory of its own, and so does a part when every
    slot is held; a slot is free again once no view of its pixels is left."""
    scenes = find_files([BUNDLED / "scenes"])[:3]
    tiles = find_files([BUNDLED / "eurosat"])[:6]
    # a slot of four tiles, each with its 8 to 15 bytes of alignment (processes.placed_at)
    process = processes.DecodeProcess(DecodeOptions(), slots=1, slot_bytes=(64 * 64 * 3 + 16) * 4)
    try:
        taken, held, errors = process.decode(tiles, 1 << 30)  # four tiles fill the only slot
        assert (taken, errors) == (4, {})
        taken_next, more, _ = process.decode(tiles[4:] + scenes, 1 << 30)  # no slot free: its own memory
        assert taken_next == 2 + len(scenes)
        for batch, paths in ((held, tiles[:4]), (more, tiles[4:] + scenes)):
            assert [image.tobytes() for image in batch] == [decode_image(p, DecodeOptions()).tobytes() for p in paths]
        assert process._slots.take() is None
        del held, batch
        gc.collect()
        assert process._slots.take() == 0  # the views are gone: the slot came back
    finally:
        process.close()


@pytest.fixture(params=["forked", "fresh interpreter"])
def fork_server(request):
    """Decode processes are forked by a fork server (the engine's way), or started on their own."""
    server = processes.ForkServer() if request.param == "forked" else None
    yield server
    if server is not None:
        server.close()


@needs_processes
def test_a_decode_process_keeps_tifffiles_warnings_off_the_runs_stderr(fork_server, tmp_path, capfd):
    """A damaged TIFF is its error record; the worker printed tifffile's warning ("invalid offset to
    first page") on the stderr it shares with the run."""
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(b"II*\x00\x08\x00\x00\x00")
    process = processes.DecodeProcess(DecodeOptions(), server=fork_server)
    try:
        taken, _, errors = process.decode([str(damaged)], 1 << 30)
    finally:
        process.close()
    assert (taken, errors) == (1, {0: ("decode", "damaged TIFF file: no image in it")})
    assert capfd.readouterr().err == ""


@needs_processes
def test_a_killed_worker_is_reported_not_waited_for(fork_server):
    process = processes.DecodeProcess(DecodeOptions(), server=fork_server)
    os.kill(process.pid, signal.SIGKILL)
    with pytest.raises(processes.DecoderDied, match="SIGKILL"):
        process.decode(find_files([BUNDLED / "eurosat"])[:2], 1 << 30)


@needs_processes
def test_workers_ignore_ctrl_c_and_end_when_closed(fork_server):
    """Ctrl-C reaches the whole process group: the main process decides, a worker keeps working."""
    process = processes.DecodeProcess(DecodeOptions(), server=fork_server)
    tiles = find_files([BUNDLED / "eurosat"])[:2]
    try:
        process.decode(tiles, 1 << 30)  # started and serving
        assert os.getpgid(process.pid) != os.getpgid(0)  # not in the terminal's process group
        os.kill(process.pid, signal.SIGINT)
        time.sleep(0.2)
        taken, images, _ = process.decode(tiles, 1 << 30)
        assert taken == 2 and len(images) == 2
    finally:
        process.close()
    assert process.returncode == 0


@needs_processes
def test_a_decode_process_its_fork_server_refuses_leaves_no_socket_open():
    """A run closed while a decode thread asked its closed fork server for a process (a generator of
    gpu_pipeline.run dropped, Ctrl-C) left the process's end of the socket pair open until the cyclic
    garbage collector ran: a descriptor and a ResourceWarning a run."""
    server = processes.ForkServer()
    server.close()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="closed") as refused:  # (its traceback holds the constructor's frame,
        processes.DecodeProcess(DecodeOptions(), server=server)  # as the engine's decode thread held it)
    assert len(os.listdir("/proc/self/fd")) == before
    del refused


def _own_memory_mib(pid: int) -> float:
    """Proportional set size: pages shared with other processes count in part."""
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no Pss line")


@needs_processes
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="reads /proc/PID/smaps_rollup")
def test_forked_decode_processes_share_the_imports():
    """Forked by the fork server, four decode processes that have decoded tiles hold far less of
    their own than a fresh interpreter with numpy, Pillow and tifffile (25-33 MB)."""
    server = processes.ForkServer()
    workers = [processes.DecodeProcess(DecodeOptions(), server=server) for _ in range(4)]
    try:
        tiles = find_files([BUNDLED / "eurosat"])
        for worker in workers:
            worker.decode(tiles, 1 << 30)
        assert all(_own_memory_mib(worker.pid) < 15 for worker in workers), \
            [_own_memory_mib(worker.pid) for worker in workers]
    finally:
        for worker in workers:
            worker.close()
        server.close()


class DiesOnPoison:
    """A stand-in for a decode process whose codec crashes on any file named poison*."""

    def __init__(self, options, slots, slot_bytes, server=None, time_limit=None, budgeted=False):
        self.paths = []
        self.died_with_server = False  # (its crash is the file's doing)

    def ask(self, paths, most_pixels):
        self.paths = paths

    def answer(self, budget=None):
        if any(Path(path).name.startswith("poison") for path in self.paths):
            raise processes.DecoderDied("the decode process died of SIGSEGV")
        return len(self.paths), ImageBatch.of([np.full((2, 2), i, np.uint8) for i in range(len(self.paths))]), {}

    def close(self):
        pass


def test_a_decoder_crash_costs_only_the_file_that_caused_it(monkeypatch):
    monkeypatch.setattr(processes, "DecodeProcess", DiesOnPoison)
    decoder = processes.Decoder(DecodeOptions())
    taken, images, errors = decoder.decode(["a.png", "b.png", "poison.png", "c.png"], 1 << 30)
    assert taken == 4 and len(images) == 3
    assert errors == {2: ("decode", "the decode process died of SIGSEGV while decoding this file")}


def test_a_part_redone_a_file_at_a_time_after_a_crash_still_ends_at_its_pixels(monkeypatch):
    """Each file of the part asked again alone: the part still ends once it holds the pixels asked
    for (four per image here), the rest left for the next request, as without a crash."""
    monkeypatch.setattr(processes, "DecodeProcess", DiesOnPoison)
    decoder = processes.Decoder(DecodeOptions())
    taken, images, errors = decoder.decode(["a.png", "poison.png", "b.png", "c.png", "d.png"], 8)
    assert (taken, len(images)) == (3, 2)
    assert errors == {1: ("decode", "the decode process died of SIGSEGV while decoding this file")}


@needs_processes
def test_a_run_in_processes_keeps_order_errors_and_labels(tmp_path):
    """The engine end to end, decoding in processes: the records of a run in threads, byte for byte."""
    files = find_files([hostile_folder(tmp_path)])
    backend = create("numba", threads=2)
    records = {}
    for mode in (False, True):
        sink = RecordList()
        Engine(backend, workers=2, processes=mode, batch_pixels=20_000).run(files, sink)
        records[mode] = list(sink)
    assert records[True] == records[False]
    assert [record["path"] for record in records[True]] == files


def test_auto_decodes_in_processes_only_for_long_runs_on_several_cores(monkeypatch):
    from gpu_pipeline.engine import decoding

    engine = Engine(create("reference"))
    monkeypatch.setattr(decoding, "usable_cores", lambda: 16)
    assert not engine.decodes_in_processes(10)
    assert engine.decodes_in_processes(5000) == processes.available()
    assert not Engine(create("reference"), processes=False).decodes_in_processes(5000)
    assert engine.decoders() == 16 and Engine(create("reference"), workers=3).decoders() == 3
    # README: 2,000 files or more on 8 cores or more, 10,000 or more on 2 to 7
    assert not engine.decodes_in_processes(1_999)
    assert engine.decodes_in_processes(2_000) == processes.available()
    monkeypatch.setattr(decoding, "usable_cores", lambda: 8)
    assert engine.decodes_in_processes(2_000) == processes.available()
    monkeypatch.setattr(decoding, "usable_cores", lambda: 7)
    assert not engine.decodes_in_processes(9_999)
    assert engine.decodes_in_processes(10_000) == processes.available()
    monkeypatch.setattr(decoding, "usable_cores", lambda: 2)  # threads were as fast on 2 cores below 10,000 files
    assert not engine.decodes_in_processes(9_999)
    assert engine.decodes_in_processes(10_000) == processes.available()
    monkeypatch.setattr(decoding, "usable_cores", lambda: 1)  # nothing to run in parallel
    assert not engine.decodes_in_processes(50_000)


def test_auto_decodes_in_threads_where_the_open_file_limit_is_too_low_for_processes(monkeypatch):
    """Decode processes need a few open files each: the soft limit is raised to what they need when
    the hard one allows it; else ``auto`` decodes in threads and asking for processes is refused."""
    import resource

    from gpu_pipeline.engine import decoding
    from gpu_pipeline.errors import UsageError

    monkeypatch.setattr(decoding, "usable_cores", lambda: 16)
    raised = []
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limits: raised.append(limits))
    needed = processes.descriptors_needed(16)
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (14, needed - 1))
    assert not Engine(create("reference")).decodes_in_processes(5000)
    with pytest.raises(UsageError, match=rf"16 decode processes need about {needed} open files; "
                                         rf"this process may open {needed - 1} \(ulimit -n\)"):
        Engine(create("reference"), processes=True).decodes_in_processes(5000)
    assert raised == []
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (14, needed))
    assert Engine(create("reference")).decodes_in_processes(5000) == processes.available()
    if processes.available():
        assert raised == [(needed, needed)]


@needs_processes
@pytest.mark.parametrize("hard, asked_by", [("low", ("--decode", "processes")), ("high", ("--decode", "processes")),
                                            ("low", ("--decode-timeout", "5"))])
def test_a_run_under_a_low_open_file_limit(tmp_path, hard, asked_by):
    """``ulimit -n 14``: decode processes once raised EMFILE mid-run (a traceback, no records). With
    room under the hard limit the run raises its soft one; without, it is refused before writing."""
    import resource
    import subprocess
    import sys

    def limited():
        soft, most = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (14, 14 if hard == "low" else most))

    out = tmp_path / "out" / "records.jsonl"
    out.parent.mkdir()
    run = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "run", str(BUNDLED / "eurosat"), "--out", str(out),
                          *asked_by, "--workers", "2", "-q"],
                         preexec_fn=limited, capture_output=True, text=True, timeout=300)
    if hard == "low":
        assert run.returncode == 2, run.stderr
        # (a time limit needs decode processes: threads are no way out)
        ways = ("raise the limit, use fewer --workers, or use --decode threads" if asked_by[0] == "--decode"
                else "raise the limit or use fewer --workers")
        assert run.stderr.strip().splitlines() == [
            f"gpu-pipeline: error: {asked_by[0]}{' processes' if asked_by[0] == '--decode' else ''}: 2 decode "
            f"processes need about 48 open files; this process may open 14 (ulimit -n); {ways}"]
        assert list(out.parent.iterdir()) == []
    else:
        assert run.returncode == 0, run.stderr
        assert len(out.read_text().splitlines()) == 50


# ------------------------------------------------------------------ the packed data plane


shapes = st.tuples(st.integers(1, 9), st.integers(1, 9), st.sampled_from([0, 3]))


def image_of(shape, seed) -> np.ndarray:
    height, width, channels = shape
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, channels) if channels else (height, width), dtype=np.uint8)


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(shapes, max_size=12), st.data())
def test_an_image_batch_is_its_images(shapes_drawn, data):
    images = [image_of(shape, seed) for seed, shape in enumerate(shapes_drawn)]
    batch = ImageBatch.of(images)
    assert len(batch) == len(images)
    assert all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(batch, images))
    cut = data.draw(st.integers(0, len(images)))
    joined = ImageBatch.concatenate([batch.take(slice(0, cut)), batch.take(slice(cut, None))])
    assert [image.tobytes() for image in joined] == [image.tobytes() for image in images]
    assert joined.pixels.tolist() == [image.shape[0] * image.shape[1] for image in images]
    assert [int(a) for a in batch.addresses()] == [image.ctypes.data for image in images]


@settings(max_examples=examples(25), deadline=None)
@given(st.lists(shapes, min_size=1, max_size=10))
def test_the_numba_backend_gives_the_same_bytes_for_a_batch_and_a_list(shapes_drawn):
    """The vectorised path (addresses from the batch's arrays) and the list path agree."""
    images = [image_of(shape, seed) for seed, shape in enumerate(shapes_drawn)]
    backend = create("numba", threads=2)
    listed = backend.process(images, PipelineConfig(), keep_images=True)
    packed = backend.process(ImageBatch.of(images), PipelineConfig(), keep_images=True)
    assert np.array_equal(listed.histograms, packed.histograms)
    assert np.array_equal(listed.edge_counts, packed.edge_counts)
    assert all(np.array_equal(a, b) for a, b in zip(listed.edges, packed.edges))


def part_of(paths, images, errors) -> DecodedPart:
    return DecodedPart(paths, ImageBatch.of(images), {p: {"path": paths[p], "stage": "decode", "error": "x"}
                                                       for p in errors})


def image_batches(decoded, batch_size, batch_pixels):
    """The oracle: the engine's batching when it went an image at a time (before parts), as it was.
    At most ``batch_size`` images and ``batch_pixels`` pixels, or one image alone; errors ride along."""
    most_images = batch_size if batch_size is not None else 1 << 62
    batch, images, pixels = [], 0, 0
    for item in decoded:
        image = item.image
        size = image.shape[0] * image.shape[1] if image is not None else 0
        if images and pixels + size > batch_pixels:
            yield batch
            batch, images, pixels = [], 0, 0
        batch.append(item)
        if image is not None:
            images += 1
            pixels += size
            if images >= most_images:
                yield batch
                batch, images, pixels = [], 0, 0
    if batch:
        yield batch


@settings(max_examples=examples(80), deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.booleans()), min_size=1, max_size=30),
       st.integers(1, 5), st.integers(1, 2000), st.one_of(st.none(), st.integers(1, 6)))
def test_batches_of_parts_group_as_batches_of_images(inputs, part_length, batch_pixels, batch_size):
    """Cut into parts anywhere, the inputs come out in the batches the image-at-a-time batching made."""
    items = [Decoded(f"/{i}.png", error=None if ok else {"path": f"/{i}.png", "stage": "decode", "error": "x"},
                     image=np.zeros((side, side), np.uint8) if ok else None)
             for i, (side, ok) in enumerate(inputs)]
    expected = [[item.path for item in batch] for batch in image_batches(iter(items), batch_size, batch_pixels)]
    expected_images = [sum(item.image is not None for item in batch) for batch in image_batches(iter(items), batch_size,
                                                                                          batch_pixels)]
    parts = []
    for start in range(0, len(items), part_length):
        chunk = items[start:start + part_length]
        parts.append(part_of([item.path for item in chunk], [item.image for item in chunk if item.image is not None],
                             [k for k, item in enumerate(chunk) if item.image is None]))
    got = list(part_batches(iter(parts), batch_size, batch_pixels))
    # every input once, in order, errors where they were; the same image groups as the oracle
    assert [path for batch in got for path in batch.paths] == [item.path for item in items]
    assert [len(batch.images) for batch in got if len(batch.images)] == [n for n in expected_images if n]
    for batch in got:
        for position, record in batch.errors.items():
            assert record["path"] == batch.paths[position]
    assert sum(len(batch.paths) for batch in got) == sum(len(paths) for paths in expected)


def test_a_long_run_of_files_that_do_not_decode_is_handed_on_in_batches():
    """100,000 empty files were held until an image came (or the end): no record written, the
    progress bar still, the memory growing, and a SIGTERM lost them all."""
    from gpu_pipeline.engine.stream import MOST_BATCH_ERRORS

    taken = []

    def parts():
        for index in range(3 * MOST_BATCH_ERRORS):
            taken.append(index)
            yield part_of([f"/{index}.png"], [], [0])
        yield part_of(["/image.png"], [np.zeros((4, 4), np.uint8)], [])

    batches = part_batches(parts(), None, 1 << 20)
    first = next(batches)
    assert len(first.errors) == len(first.paths) == MOST_BATCH_ERRORS and len(taken) == MOST_BATCH_ERRORS
    rest = list(batches)
    assert [path for batch in [first, *rest] for path in batch.paths] == [
        *(f"/{index}.png" for index in range(3 * MOST_BATCH_ERRORS)), "/image.png"]


def test_parts_given_before_a_failure_make_a_last_batch_before_it_is_raised():
    """Decoders that cannot go on (a fork server that kept dying): the parts they gave still get
    their records, the failure comes after them."""
    def parts():
        yield part_of(["/a.png", "/b.png"], [np.zeros((4, 4), np.uint8)], [1])
        raise processes.DecodeProcessesFailed("the fork server kept dying")

    batches = part_batches(parts(), None, 1 << 20)
    assert next(batches).paths == ["/a.png", "/b.png"]
    with pytest.raises(processes.DecodeProcessesFailed, match="kept dying"):
        next(batches)


def test_decode_processes_where_they_cannot_run_is_a_usage_error(tmp_path, monkeypatch):
    """Without memfd (not Linux) --decode processes is refused before anything is written."""
    from typer.testing import CliRunner

    from gpu_pipeline.cli import app

    monkeypatch.setattr(processes, "available", lambda: False)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["run", str(BUNDLED / "eurosat"), "--out", str(out), "--decode", "processes"])
    assert result.exit_code == 2
    assert "--decode processes needs Linux" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@needs_processes
def test_pixels_are_never_pickled():
    """What comes back over the socket is where the images lie and their errors: a few bytes an image."""
    process = processes.DecodeProcess(DecodeOptions())
    connection, received = process._connection, []

    def recv():
        data = connection.recv_bytes()
        received.append(len(data))
        return pickle.loads(data)

    process._connection = type("Counting", (), {"send_bytes": connection.send_bytes, "recv": staticmethod(recv),
                                                "close": connection.close})()
    try:
        taken, images, _ = process.decode(find_files([BUNDLED / "eurosat"]), 1 << 30)
        pixel_bytes = sum(image.nbytes for image in images)
        assert taken > 10 and pixel_bytes > 100_000
        assert sum(received) < 100 * taken  # a 64x64 RGB tile alone is 12,288 bytes
    finally:
        process.close()


@needs_processes
def test_a_chunks_paths_cross_over_once():
    """The first request of a chunk carries its paths; the requests for its later parts carry none,
    and the parts still come in order."""
    process = processes.DecodeProcess(DecodeOptions(), slots=4, slot_bytes=4 * (64 * 64 * 3 + 16))
    connection, sent = process._connection, []

    def send_bytes(data):
        first = pickle.loads(data)[0]
        if not isinstance(first, DecodeOptions):  # (the options go with the first request)
            sent.append(first)
        connection.send_bytes(data)

    process._connection = type("Counting", (), {"send_bytes": staticmethod(send_bytes), "recv": connection.recv,
                                                "close": connection.close})()
    paths = find_files([BUNDLED / "eurosat"])[:12]
    try:
        got, start = [], 0
        while start < len(paths):
            taken, images, errors = process.decode(paths[start:], 4 * 64 * 64)
            assert not errors and taken == len(images)
            got += [image.tobytes() for image in images]
            start += taken
        assert got == [decode_image(p, DecodeOptions()).tobytes() for p in paths]
        assert len(sent) == 3 and sent[0] == "\0".join(paths) and sent[1:] == [None, None]
        process.decode(paths[:2], 1 << 30)  # other paths: sent again
        assert sent[-1] == "\0".join(paths[:2])
    finally:
        process.close()


@pytest.mark.parametrize("in_processes, chunk_pixels", [
    (False, None), pytest.param(True, None, marks=needs_processes),
    pytest.param(True, 3 * 4096 + 8, marks=needs_processes)],  # slots of 8 bytes past a 16-byte multiple
    ids=["threads", "processes", "processes, odd part size"])
def test_decoded_jpegs_start_off_a_16_byte_boundary(in_processes, chunk_pixels):
    """libjpeg-turbo writes RGB rows that start on a 16-byte boundary with stores that bypass the
    caches (decode.OFF_BOUNDARY): no decoded tile, from a decode thread or from any slot of a
    decode process's shared memory, starts on one, and each has the pixels decode_image gives."""
    tiles = find_files([BUNDLED / "eurosat"])[:40]
    decoded = list(decode_stream(tiles, DecodeOptions(), 2, chunk_pixels=chunk_pixels, processes=in_processes))
    assert [path for path, item in zip(tiles, decoded) if item.image.ctypes.data % 16 == 0] == []
    assert [item.image.tobytes() for item in decoded] == [decode_image(p, DecodeOptions()).tobytes() for p in tiles]



@pytest.mark.parametrize("capacity", [4096, 3 * 4096 + 8, 1 << 20, 3 << 20])
def test_a_decode_threads_part_buffer_starts_on_a_64_byte_boundary(capacity):
    """Packer's buffer starts on a 64-byte boundary, as a decode process's slots do, so its first
    image lies 8 bytes past one (decode.OFF_BOUNDARY), whatever boundary numpy's memory has: only
    the 16-byte rule was tested, and numpy's 16-byte alignment kept it with the offset miscounted."""
    from gpu_pipeline.engine.decoding import Packer

    packer = Packer(capacity)
    first = packer.place((4, 4, 3))
    assert first is not None and first.ctypes.data % 64 == OFF_BOUNDARY
    assert packer._buffer.ctypes.data % 64 == 0 and packer._buffer.size == capacity

@needs_processes
def test_a_decode_process_is_asked_for_its_next_part_before_this_one_is_handed_over(monkeypatch):
    """So that the process decodes while its thread waits for the GIL, the lock or room: across
    parts of a chunk and across chunks, and the images still come in order."""
    from gpu_pipeline.engine import decoding

    events = []
    real_ask, real_answer = processes.Decoder.ask, processes.Decoder.answer
    real_hand_over = decoding._DecodePool._hand_over
    monkeypatch.setattr(processes.Decoder, "ask", lambda self, *a: events.append("ask") or real_ask(self, *a))
    monkeypatch.setattr(processes.Decoder, "answer", lambda self: events.append("answer") or real_answer(self))
    monkeypatch.setattr(decoding._DecodePool, "_hand_over",
                        lambda self, key, *a: events.append(key) or real_hand_over(self, key, *a))
    # chunks of 5 tiles (the first of one), parts of 2
    monkeypatch.setattr(decoding._DecodePool, "_chunk_length", lambda self: 5 if self._seen_images else 1)
    tiles = find_files([BUNDLED / "eurosat"])[:16]
    decoded = list(decode_stream(tiles, DecodeOptions(), 1, chunk_pixels=2 * 64 * 64, processes=True))
    assert [item.image.tobytes() for item in decoded] == [decode_image(p, DecodeOptions()).tobytes() for p in tiles]
    hand_overs = [index for index, event in enumerate(events) if isinstance(event, tuple) and event[0] > 0]
    assert {events[index] for index in hand_overs} >= {(1, 0), (1, 2), (2, 0)}  # parts of several chunks
    # the first chunk (one tile) is decoded by the thread; after it, each hand-over but the last
    # follows the request for the next part
    assert [events[index - 1] for index in hand_overs] == ["ask"] * (len(hand_overs) - 1) + ["answer"]


@needs_processes
def test_a_decode_thread_that_waits_for_room_has_not_asked_for_its_next_part(monkeypatch):
    """A part that must wait for room is handed over before its process is asked for the next one:
    a waiting thread holds one part, not that one and the next. Where compute was slower than
    decoding, 16 decoders of 1-MP parts held 16 parts more (48 MB), in slots whose pages stay."""
    from gpu_pipeline.engine import decoding
    from tests.runs import wait_until

    unanswered = []  # a request asked of a decode process and not yet answered, for each
    real_ask, real_answer = processes.Decoder.ask, processes.Decoder.answer

    def answer(self):
        try:
            return real_answer(self)
        finally:
            unanswered.pop()

    monkeypatch.setattr(processes.Decoder, "ask", lambda self, *a: unanswered.append(self) or real_ask(self, *a))
    monkeypatch.setattr(processes.Decoder, "answer", answer)
    monkeypatch.setattr(decoding._DecodePool, "_chunk_length", lambda self: 4)  # parts of 2 tiles
    tiles = find_files([BUNDLED / "eurosat"])[:24]
    # room for no part but the one the consumer waits for
    parts = decoding.decode_parts(tiles, DecodeOptions(), workers=2, processes=True, prefetch_pixels=1,
                                  chunk_pixels=2 * 64 * 64)
    with contextlib.closing(parts):
        first = next(parts)
        pool = parts._pool  # (the part wanted ready: no waiter is one just woken, before it asks)
        wait_until(lambda: len(pool._waiting) == 2 and pool._wanted in pool._ready,
                   "both decode threads waiting for room")
        assert unanswered == []
        images = [image for part in [first, *parts] for image in part.images]
    assert [image.tobytes() for image in images] == [decode_image(p, DecodeOptions()).tobytes() for p in tiles]


@needs_processes
def test_a_decode_thread_that_waited_for_room_goes_on_with_the_next_chunk(monkeypatch):
    """A part that waits for room is handed over before its process is asked for more: at the end of
    a chunk, the next chunk is taken then, and asked for. Every part but the one wanted waits here
    (the consumer takes the next only once the decoder waits), and every image still comes, in order."""
    from gpu_pipeline.engine import decoding
    from tests.runs import wait_until

    monkeypatch.setattr(decoding._DecodePool, "_chunk_length", lambda self: 4)  # parts of 2 tiles
    tiles = find_files([BUNDLED / "eurosat"])[:24]
    parts = decoding.decode_parts(tiles, DecodeOptions(), workers=1, processes=True, prefetch_pixels=1,
                                  chunk_pixels=2 * 64 * 64)
    pool = parts._pool

    def waits_for_room() -> bool:
        with pool._lock:
            return not pool._running or any(key != pool._wanted for key in pool._waiting)

    images = []
    with contextlib.closing(parts):
        for part in parts:
            images.extend(part.images)
            wait_until(waits_for_room, "the decoder waiting for room with a part not yet wanted")
    assert [image.tobytes() for image in images] == [decode_image(p, DecodeOptions()).tobytes() for p in tiles]


@needs_processes
def test_a_decode_process_killed_in_the_middle_of_a_run_loses_no_image(monkeypatch):
    """The part asked of a process that has died is asked again of a fresh one (a file at a time):
    every image still comes, in order, none with an error."""
    from gpu_pipeline.engine import decoding

    real_ask, pids = processes.Decoder.ask, []

    def ask(self, paths, most_pixels):
        if self._process is not None:
            pids.append(self._process.pid)
            if len(pids) == 1:  # the second part of the second chunk: three files to go
                os.kill(self._process.pid, signal.SIGKILL)
        return real_ask(self, paths, most_pixels)

    monkeypatch.setattr(processes.Decoder, "ask", ask)
    monkeypatch.setattr(decoding._DecodePool, "_chunk_length", lambda self: 5 if self._seen_images else 1)
    tiles = find_files([BUNDLED / "eurosat"])[:16]
    decoded = list(decode_stream(tiles, DecodeOptions(), 1, chunk_pixels=2 * 64 * 64, processes=True))
    assert [item.error for item in decoded] == [None] * len(tiles)
    assert [item.image.tobytes() for item in decoded] == [decode_image(p, DecodeOptions()).tobytes() for p in tiles]
    assert len(set(pids)) > 1  # a fresh process took over


def test_a_decode_process_copies_what_was_not_decoded_in_place():
    """An image decoded where the worker offered it a place is not copied again; one decoded
    elsewhere after a place was offered (a JPEG that libjpeg-turbo refused and the full path
    decoded) is copied to that place."""
    import mmap

    first, second = (np.arange(12, dtype=np.uint8).reshape(2, 2, 3) + k for k in (1, 100))

    def decode_each(paths, options, into, working=None):
        place = into(first.shape)
        place[...] = first
        yield place
        into(second.shape)
        yield second.copy()

    arena = mmap.mmap(-1, 64)
    worker = processes._Worker(None, arena, DecodeOptions())
    worker._decode_each = decode_each
    worker.queue(["in place", "elsewhere"])
    reply, to_copy, in_slot = worker.answer(1 << 30, 16, 48)
    worker.fill_slot(to_copy, 16)
    # each image 8 bytes past a 16-byte boundary of the slot (processes.placed_at)
    assert np.frombuffer(reply[1], np.int64).reshape(-1, 4)[:, 3].tolist() == [8, 24]
    assert in_slot and reply[0] == 2 and reply[3] == 36
    assert [offset for offset, _ in to_copy] == [24]
    assert bytes(arena[24:36]) == first.tobytes() and bytes(arena[40:52]) == second.tobytes()


def test_a_part_whose_first_image_is_larger_than_the_slot_takes_it_in_memory_of_its_own():
    """An image that does not fit the slot is carried over to the next request only when images are
    placed before it: first in its part, it is taken, in memory of its own (a request that took
    nothing was asked again for ever)."""
    import mmap

    scene = np.arange(300, dtype=np.uint8).reshape(10, 10, 3)

    def decode_each(paths, options, into, working=None):
        assert into(scene.shape) is None  # no place for it in the slot
        yield scene.copy()

    worker = processes._Worker(None, mmap.mmap(-1, 64), DecodeOptions())
    worker._decode_each = decode_each
    worker.queue(["scene"])
    reply, to_copy, in_slot = worker.answer(1 << 30, 0, 48)
    assert reply[0] == 1 and not in_slot and reply[4] == 8 + scene.size
    assert [(offset, image.tobytes()) for offset, image in to_copy] == [(8, scene.tobytes())]


def test_a_part_that_fills_its_slot_to_the_last_byte_is_handed_over_in_it():
    """Four tiles decoded in place, the last ending at the slot's end: the part is in the slot (said
    to be in memory of its own, the tiles decoded in place were never sent)."""
    import mmap

    tiles = find_files([BUNDLED / "eurosat"])[:4]
    slot_bytes = 8 + 4 * 64 * 64 * 3  # each tile 8 bytes past a 16-byte boundary: no room left
    arena = mmap.mmap(-1, slot_bytes)
    worker = processes._Worker(None, arena, DecodeOptions())
    worker.queue(tiles)
    reply, to_copy, in_slot = worker.answer(1 << 30, 0, slot_bytes)
    assert in_slot and reply[0] == 4 and (reply[3], reply[4]) == (slot_bytes, 0) and to_copy == []
    images = ImageBatch.packed(np.frombuffer(arena, np.uint8).copy(), np.frombuffer(reply[1], np.int64).reshape(-1, 4))
    assert [image.tobytes() for image in images] == [decode_image(p, DecodeOptions()).tobytes() for p in tiles]


def test_a_decode_process_reads_each_file_once_across_parts(monkeypatch):
    """Parts that end inside a group of files read ahead (and an image carried over to the next
    slot) still read every file once, and give every image in order."""
    import mmap

    from gpu_pipeline.inputs import decode

    monkeypatch.setattr(decode, "READ_AHEAD_FILES", 5)
    reads, real_read = [], decode._read_small_file
    monkeypatch.setattr(decode, "_read_small_file", lambda path: reads.append(path) or real_read(path))
    paths = find_files([BUNDLED / "eurosat"])[:13]
    tile = 64 * 64 * 3
    arena = mmap.mmap(-1, 3 * tile)
    worker = processes._Worker(None, arena, DecodeOptions())
    worker.queue(paths)
    got = []
    for part in range(7):  # a slot of 2.5 tiles: each part but the last ends with an image carried over
        reply, to_copy, in_slot = worker.answer(1 << 30, 0, 5 * tile // 2)
        worker.fill_slot(to_copy, 0)
        layout = np.frombuffer(reply[1], np.int64).reshape(-1, 4)
        assert in_slot and reply[0] == len(layout) == min(2, len(paths) - len(got))
        # tiles are decoded straight into the slot; only the one carried over is copied there
        assert [offset for offset, _ in to_copy] == ([] if part == 0 else [layout[0, 3]])
        images = ImageBatch.packed(np.frombuffer(arena, np.uint8)[:reply[3]].copy(), layout)
        got += [image.tobytes() for image in images]
    assert got == [decode_image(p, DecodeOptions()).tobytes() for p in paths]
    assert reads == paths


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(shapes, max_size=12), st.data())
def test_shape_groups_and_copy_into_see_a_batch_as_its_images(shapes_drawn, data):
    """Grouped from the shape arrays, copied a run at a time: the same as image by image, however
    the batch lies in memory (a buffer each, packed with gaps, or both joined)."""
    images = [image_of(shape, seed) for seed, shape in enumerate(shapes_drawn)]
    gaps = data.draw(st.lists(st.sampled_from([0, 0, 0, 3, 8]), min_size=len(images), max_size=len(images)))
    cut = data.draw(st.integers(0, len(images)))
    layouts = {"of": ImageBatch.of(images), "packed": packed_batch(images, gaps),
               "joined": ImageBatch.concatenate([packed_batch(images[:cut], gaps[:cut]), ImageBatch.of(images[cut:])])}
    expected: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):  # the oracle: one image at a time
        expected.setdefault(image.shape, []).append(position)
    for name, batch in layouts.items():
        groups = batch.shape_groups()
        assert list(groups) == list(expected), name  # shapes in first-seen order
        assert {shape: positions.tolist() for shape, positions in groups.items()} == expected, name
        for shape, positions in groups.items():
            chosen = data.draw(st.lists(st.sampled_from(positions.tolist()), min_size=1, max_size=6))
            for picked in (positions, np.array(chosen, np.int64)):
                out = np.zeros((len(picked), *shape), np.uint8)
                batch.copy_into(picked, out)
                assert np.array_equal(out, np.stack([images[p] for p in picked])), name


def test_copy_into_copies_a_run_of_packed_images_at_once():
    images = [image_of((4, 5, 3), seed) for seed in range(6)]
    batch = packed_batch(images, [8, 0, 0, 5, 0, 0])  # two runs: images 0-2 and 3-5
    copies = []

    class Counted(np.ndarray):
        def __setitem__(self, key, value):
            copies.append(key)
            super().__setitem__(key, value)

    out = np.zeros((6, 4, 5, 3), np.uint8)
    batch.copy_into(np.arange(6), out.reshape(6, -1).view(Counted).reshape(out.shape))
    assert np.array_equal(out, np.stack(images))
    assert len(copies) == 2


def test_a_stack_is_a_batch_over_its_memory():
    stack = np.random.default_rng(1).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    batch = ImageBatch.stacked(stack)
    assert np.shares_memory(batch.buffers[0], stack) and len(batch.buffers) == 1
    assert [image.tobytes() for image in batch] == [image.tobytes() for image in stack]
    gray = stack[:, ::2, :, 0]  # not contiguous: copied once
    assert [image.tobytes() for image in ImageBatch.stacked(gray)] == [image.tobytes() for image in gray]
    assert ImageBatch.stacked(gray).shape_groups().keys() == {(3, 7)}
    assert len(ImageBatch.stacked(np.zeros((0, 4, 4), np.uint8))) == 0


def _watched_fork_servers(monkeypatch) -> list:
    """Record each fork server made, its start and its close, in ``events``; returns ``events``."""
    events: list = []
    start, close = processes.ForkServer.start, processes.ForkServer.close

    def started(server):
        events.append(("start", server))
        start(server)

    def closed(server):
        events.append(("close", server))
        close(server)

    monkeypatch.setattr(processes.ForkServer, "start", started)
    monkeypatch.setattr(processes.ForkServer, "close", closed)
    return events


@needs_processes
def test_the_fork_server_starts_before_the_backend_loads_and_the_run_takes_it_over(tmp_path, monkeypatch):
    """Its interpreter imports the decoders while the backend loads; the run forks its decoders
    from that one server (no second one), and closes it."""
    from typer.testing import CliRunner

    from gpu_pipeline.cli import app
    from gpu_pipeline.engine import job

    events = _watched_fork_servers(monkeypatch)
    open_backend = job.open_backend
    monkeypatch.setattr(job, "open_backend", lambda *args: (events.append(("backend", None)), open_backend(*args))[1])
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["run", str(BUNDLED / "eurosat"), "--out", str(out), "--decode", "processes", "-q"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 50
    assert [kind for kind, _ in events] == ["start", "backend", "close"]
    server = events[0][1]
    assert events[2][1] is server and server._process.returncode is not None  # the run used it, then it ended


@needs_processes
def test_a_run_refused_after_the_fork_server_started_stops_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gpu_pipeline.cli import app
    from gpu_pipeline.engine import job
    from gpu_pipeline.errors import UsageError

    events = _watched_fork_servers(monkeypatch)

    def unavailable(*args):
        raise UsageError("backend 'numba' is unavailable: planted")

    monkeypatch.setattr(job, "open_backend", unavailable)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["run", str(BUNDLED / "eurosat"), "--out", str(out), "--decode", "processes"])
    assert result.exit_code == 2 and "planted" in result.stderr
    assert [kind for kind, _ in events] == ["start", "close"] and events[1][1]._process.returncode is not None
    assert not out.exists()


@needs_processes
def test_an_engine_gives_back_a_fork_server_no_run_took(tmp_path):
    """Started for a run that decodes in threads after all, or for none: closed, not left running."""
    files = [str(path) for path in sorted((BUNDLED / "eurosat").rglob("*.jpg"))[:3]]
    for run in (True, False):
        server = processes.ForkServer()
        server.start()
        engine = Engine(create("numba"), processes=False, fork_server=server)
        if run:
            sink = RecordList()
            engine.run(files, sink)
            assert len(sink) == 3
        engine.close()
        assert server._process.wait(timeout=10) is not None and engine.fork_server is None


@needs_processes
def test_the_python_api_starts_the_fork_server_before_the_backend_too(monkeypatch):
    import gpu_pipeline
    from gpu_pipeline import api

    events = _watched_fork_servers(monkeypatch)
    shared_backend = api.shared_backend
    monkeypatch.setattr(api, "shared_backend", lambda *args: (events.append(("backend", None)), shared_backend(*args))[1])
    records = list(gpu_pipeline.run([BUNDLED / "eurosat"], backend="numba", decode="processes"))
    assert len(records) == 50 and not any("error" in record for record in records)
    assert [kind for kind, _ in events] == ["start", "backend", "close"] and events[0][1] is events[2][1]
    events.clear()
    monkeypatch.setattr(api, "shared_backend", lambda *args: (_ for _ in ()).throw(RuntimeError("planted")))
    with pytest.raises(RuntimeError, match="planted"):
        list(gpu_pipeline.run([BUNDLED / "eurosat"], decode="processes"))
    assert [kind for kind, _ in events] == ["start", "close"]


@pytest.mark.parametrize("chunk_pixels", [1, 5000, None])
def test_decode_threads_pack_each_part_and_give_the_pixels_of_each_file(tmp_path, chunk_pixels):
    """A decode thread's part is one buffer for its plain JPEGs, decoded in place, and an array of its
    own for any other image or one past the part's room: pixels and errors are those of each file
    decoded alone (decode_or_error), in order."""
    from gpu_pipeline.engine.decoding import decode_parts
    from gpu_pipeline.inputs.decode import decode_or_error

    files = find_files([hostile_folder(tmp_path)])
    options = DecodeOptions()
    parts = list(decode_parts(files, options, 2, chunk_pixels=chunk_pixels))
    got = [item for part in parts for item in part.one_by_one()]
    assert [item.path for item in got] == files
    for item in got:
        alone = decode_or_error(item.path, options)
        if isinstance(alone, tuple):
            assert item.error is not None and item.error["stage"] == alone[0], item.path
        else:
            assert item.image.shape == alone.shape and item.image.tobytes() == alone.tobytes(), item.path
    if chunk_pixels is None:  # parts of 64 EuroSAT tiles: every tile in its part's buffer
        for part in parts:
            names = [path for k, path in enumerate(part.paths) if k not in part.errors]
            tiles = [k for k, path in enumerate(names) if "/eurosat/" in path]
            assert (part.images.buffer_of[tiles] == 0).all(), part.paths
            assert all(part.images.buffer_of[k] > 0 for k, path in enumerate(names) if path.endswith((".png", ".tif")))


def test_an_image_is_placed_8_bytes_past_16_and_only_where_it_fits():
    """place_in, where decode threads and decode processes put each decoded image: a hand-worked room
    of 100 bytes."""
    room = np.zeros(100, np.uint8)
    assert processes.place_in(room, 0, (92,)).ctypes.data == room.ctypes.data + 8  # 8..100: exactly full
    assert processes.place_in(room, 0, (93,)) is None
    assert processes.place_in(room, 10, (4, 19)).ctypes.data == room.ctypes.data + 24  # 24..100
    assert processes.place_in(room, 10, (77,)) is None
    assert processes.place_in(room, 24, (2, 3)).ctypes.data == room.ctypes.data + 24  # 24 is 8 past 16 already
    assert processes.place_in(room, 25, (2, 3)).ctypes.data == room.ctypes.data + 40
    assert processes.place_in(room, 25, (60,)).shape == (60,) and processes.place_in(room, 25, (61,)) is None


def test_closing_a_run_whose_decode_process_hangs_ends_that_process_and_its_fork_server(tmp_path, monkeypatch):
    """The Python API in a long-lived process: a generator closed while a decode process is stuck
    for good returned after the pool's wait, but left that process and its fork server running (and
    their descriptors open) for as long as the caller lived."""
    import gpu_pipeline
    from gpu_pipeline.engine import decoding
    from tests.runs import hanging_decoder, wait_until

    for name, value in hanging_decoder(tmp_path / "site", "img030").items():
        monkeypatch.setenv(name, value)  # the decode processes' interpreters take it up
    tag = f"api-hang-{os.getpid()}"
    monkeypatch.setenv("GPU_PIPELINE_TEST_TAG", tag)
    monkeypatch.setattr(decoding, "CLOSE_WAIT_S", 1.0)
    rng = np.random.default_rng(4)
    (tmp_path / "in").mkdir()
    for index in range(60):  # 350x350: decoded in processes, 2 or 3 a part
        Image.fromarray(rng.integers(0, 256, (350, 350, 3), np.uint8)).save(tmp_path / "in" / f"img{index:03d}.png")

    def ours() -> list[int]:  # the run's fork server and decode processes (not this process)
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if (entry.name.isdigit() and int(entry.name) != os.getpid()
                        and b"gpu_pipeline.inputs.processes" in (entry / "cmdline").read_bytes()
                        and f"GPU_PIPELINE_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes()):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    descriptors = len(os.listdir("/proc/self/fd"))
    records = gpu_pipeline.run(tmp_path / "in", backend="reference", workers=2, decode="processes")
    seen = [next(records) for _ in range(8)]  # (records come a batch behind: these are well before the stuck one)
    assert len(seen) == 8 and ours()
    started = time.monotonic()
    records.close()
    assert time.monotonic() - started < 10
    wait_until(lambda: not ours(), "the stuck decode process and its fork server ending", timeout=20)
    # (the parts decoded ahead hold the arenas' memory until a collection: gc.collect)
    wait_until(lambda: gc.collect() >= 0 and len(os.listdir("/proc/self/fd")) <= descriptors,
               "their descriptors closing", timeout=20)


def _resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _mapped_parts() -> int:
    """Parts in memory of their own (images larger than a slot) that this process maps."""
    with open("/proc/self/maps") as maps:
        return sum("gpu-pipeline-pixels" in line for line in maps)


@needs_processes
def test_a_decode_process_waiting_for_its_next_request_holds_no_image(tmp_path):
    """A decode process sent a scene in memory of its own and kept the decoded image until its next
    request came: under ``--decode-timeout`` sixteen idle processes held a 12-MP scene each."""
    from tests.runs import decoder_with_server, wait_until

    rng = np.random.default_rng(3)
    tile, scene = tmp_path / "tile.png", tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(tile)
    Image.fromarray(rng.integers(0, 256, (4096, 4096, 3), np.uint8)).save(scene, compress_level=1)  # 48 MB decoded
    with decoder_with_server() as (decoder, _):
        decoder.decode([str(tile)], 1 << 30)
        idle = _resident_mb(decoder._process.pid)
        taken, images, errors = decoder.decode([str(scene)], 1 << 30)
        assert taken == 1 and errors == {} and images.pixels.tolist() == [4096 * 4096]
        # (it lets go of the image once it has sent it, just after its reply)
        wait_until(lambda: _resident_mb(decoder._process.pid) - idle < 24, "the process letting go of the image",
                   timeout=5)


@needs_processes
def test_a_decode_thread_waiting_for_its_process_holds_no_part_it_handed_over(tmp_path, monkeypatch):
    """A thread that talks to a decode process kept the part it had handed over until its process
    answered the next request: 16 threads held a scene each after the engine had done with them."""
    from gpu_pipeline.engine import decoding
    from tests.runs import hanging_decoder, wait_until

    for name, value in hanging_decoder(tmp_path / "site", "stuck", seconds=30).items():
        monkeypatch.setenv(name, value)  # (the fork server's interpreter takes it up)
    scene, stuck = tmp_path / "scene.png", tmp_path / "stuck.png"
    side = 3 * int((decoding.PROCESS_CHUNK_PIXELS // 2) ** 0.5)  # more pixels than a slot holds: memory of its own
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (side // 2, side, 3), np.uint8)).save(scene)
    shutil.copy(scene, stuck)
    parts = decoding.decode_parts([scene, stuck], DecodeOptions(), workers=1, processes=True, time_limit=3)
    with contextlib.closing(parts):
        first = next(parts)  # its thread then waits for the stuck file, up to the time limit
        assert first.paths == [scene] and _mapped_parts() == 1
        del first
        wait_until(lambda: _mapped_parts() == 0, "the part's pixels given back", timeout=1.5)
        (second,) = parts
        assert list(second.errors.values())[0]["stage"] == "decode"


class ServedInAThread:
    """A stand-in for the fork server: the decode process's loop (``processes._serve``) runs in a
    thread of this process, so that a test can slow down its side."""

    def fork(self, connection, arena):
        threading.Thread(target=processes._serve, args=(os.dup(connection), os.dup(arena)), daemon=True).start()
        return os.getpid()

    def exit_status(self, pid):
        return 0


@needs_processes
def test_a_decode_process_fills_its_slot_before_its_reply_says_the_pixels_are_there(monkeypatch):
    """The reply hands the slot's pixels over: the images not decoded in place (every format but a
    plain JPEG) are copied there first, however long the copy takes."""
    real_fill = processes._Worker.fill_slot

    def slow_fill(worker, to_copy, slot):
        time.sleep(1)
        real_fill(worker, to_copy, slot)

    monkeypatch.setattr(processes.signal, "signal", lambda *args: None)  # (only the main thread may set one)
    monkeypatch.setattr(processes._Worker, "fill_slot", slow_fill)
    formats = sorted((BUNDLED / "formats").glob("*.png"))
    process = processes.DecodeProcess(DecodeOptions(), server=ServedInAThread())
    try:
        taken, images, errors = process.decode([str(path) for path in formats], 1 << 30)
        got = [image.tobytes() for image in images]  # as soon as the reply is in
    finally:
        process.close()
    assert (taken, errors) == (len(formats), {})
    assert got == [decode_image(path, DecodeOptions()).tobytes() for path in formats]


@pytest.mark.parametrize("images", [1, 2, 7, 128])
def test_a_slot_holds_its_part_however_its_images_fall_against_the_boundary(images):
    """slot_bytes_for: room for every image of a part even when each needs the most alignment (15
    bytes: 11-pixel RGB images, each ending 9 bytes past a 16-byte boundary), so no image of a part
    the pool asked for is carried over to the next request for want of room."""
    room = np.zeros(processes.slot_bytes_for(11 * images, images), np.uint8)
    used = 0
    for _ in range(images):
        place = processes.place_in(room, used, (1, 11, 3))
        assert place is not None
        used = processes.placed_at(used) + place.size
