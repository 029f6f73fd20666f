"""The streaming engine: order, batching, bounded prefetch, one record per image, fault isolation."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cpu_reference
from gpu_pipeline.backends.base import CPU_BATCH_PIXELS, GPU_BATCH_PIXELS
from gpu_pipeline.backends.reference import ReferenceBackend
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine.decoding import Decoded, DecodedPart, decode_stream
from gpu_pipeline.engine.stream import Engine, part_batches
from gpu_pipeline.images import ImageBatch
from tests.runs import count_budget_grants, decoding_charge


class ListSink:
    def __init__(self):
        self.records: list[dict] = []
        self.writes = 0

    def write(self, records):
        self.records.extend(records)
        self.writes += 1


def write_pngs(folder: Path, shapes, seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for index, shape in enumerate(shapes):
        path = folder / f"img{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class ExplodingBackend(ReferenceBackend):
    """Fails on any image whose first pixel is 13, like a backend bug that hits one image."""

    name = "exploding"

    def process(self, images, config, keep_images=False):
        if any(image.flat[0] == 13 for image in images):
            raise RuntimeError("kernel failed\nsecond line of noise")
        return super().process(images, config, keep_images)


def test_records_in_input_order_and_equal_to_reference(tmp_path):
    paths = write_pngs(tmp_path, [(8, 9), (8, 9, 3), (1, 1), (20, 3), (8, 9)])
    sink = ListSink()
    summary = Engine(ReferenceBackend(), batch_size=2, workers=3).run(paths, sink)
    assert [r["path"] for r in sink.records] == [str(p) for p in paths]
    assert summary.ok == 5 and summary.failed == 0
    assert summary.pixels == 3 * 8 * 9 + 1 + 20 * 3  # height * width of each: the summary's MP/s
    config = PipelineConfig()
    for path, record in zip(paths, sink.records):
        image = np.asarray(Image.open(path))
        stages = cpu_reference.process_image(image, config)
        assert record["histogram"] == stages.histogram.tolist()
        assert record["edge_count"] == stages.edge_count
        assert (record["height"], record["width"]) == image.shape[:2]
        assert record["bands"] == (1 if image.ndim == 2 else 3)
        assert record["backend"] == "reference"
    assert sink.writes == 3  # batches of 2, 2, 1: flushed per batch


def test_failing_image_gets_compute_error_and_others_survive(tmp_path):
    paths = write_pngs(tmp_path, [(6, 6)] * 4)
    bad = np.full((6, 6), 13, np.uint8)
    Image.fromarray(bad).save(paths[2])
    sink = ListSink()
    summary = Engine(ExplodingBackend(), batch_size=4, workers=2).run(paths, sink)
    assert summary.ok == 3 and summary.failed == 1
    error = sink.records[2]
    assert error == {"path": str(paths[2]), "stage": "compute", "error": "RuntimeError: kernel failed"}
    assert all("histogram" in r for i, r in enumerate(sink.records) if i != 2)


def test_the_summary_rate_counts_every_image_the_megapixels_those_that_went_through():
    """The summary line's "(N images/s, M MP/s)": 3 ok images of 2 MP in all and 1 failed, in 2 s, are
    2 images/s (the failed one was handled too) and 1.0 MP/s; no time, no rate."""
    from gpu_pipeline.engine.stream import RunSummary

    summary = RunSummary(ok=3, failed=1, pixels=2_000_000, seconds=2.0)
    assert (summary.total, summary.images_per_second, summary.megapixels_per_second) == (4, 2.0, 1.0)
    assert (RunSummary(ok=3).images_per_second, RunSummary(ok=3).megapixels_per_second) == (0.0, 0.0)


def test_the_summary_groups_thousands_as_the_progress_lines_do():
    """A night of 50,000 images: the summary's counts, rate, failures and labels read 50,000, not
    50000, as the progress lines and `resuming ...: 12,000 of 50,000` do."""
    from collections import Counter

    from rich.console import Console

    from gpu_pipeline.engine.job import print_summary
    from gpu_pipeline.engine.stream import RunSummary

    summary = RunSummary(ok=48_500, failed=1_500, pixels=8_000_000_000, seconds=4.0,
                         labels=Counter({"busy": 30_000, "smooth": 18_500}),
                         failures_by_stage=Counter({"decode": 1_200, "read": 300}))
    console = Console(width=200, no_color=True, highlight=False)
    with console.capture() as captured:
        print_summary(console, summary, "numba", "-")
    assert captured.get().splitlines() == [
        "50,000 images with backend numba in 4.00 s: 48,500 ok, 1,500 failed (12,500 images/s, 2,000.0 MP/s)",
        "failures by stage: decode: 1,200, read: 300", "labels: busy 30,000, smooth 18,500", "results: -"]
    with console.capture() as captured:
        print_summary(console, RunSummary(ok=1, pixels=64, seconds=1.0, labels=Counter({"busy": 1})), "numba", "-")
    assert captured.get().splitlines()[0] == "1 image with backend numba in 1.00 s: 1 ok, 0 failed (1 images/s, 0.0 MP/s)"


def test_progress_counts_every_record_of_a_batch_its_errors_too(tmp_path):
    """The progress bar reaches the number of files: a file that did not decode and an image the
    backend failed on are handled too (batches of 2 images: 0, 1 (empty), 2 (fails); then 3, 4)."""
    paths = write_pngs(tmp_path, [(6, 6)] * 5)
    paths[1].write_bytes(b"")
    Image.fromarray(np.full((6, 6), 13, np.uint8)).save(paths[2])
    counts = []
    summary = Engine(ExplodingBackend(), batch_size=2, workers=1).run(paths, ListSink(), progress=counts.append)
    assert counts == [3, 2] and (summary.ok, summary.failed) == (3, 2)


def test_failing_image_alone_in_its_batch_gets_an_error(tmp_path):
    """... and is not run a second time alone: it was alone already (a GPU kernel fault costs seconds)."""
    paths = write_pngs(tmp_path, [(6, 6)] * 3)
    Image.fromarray(np.full((6, 6), 13, np.uint8)).save(paths[1])
    calls = []

    class Counted(ExplodingBackend):
        def process(self, images, config, keep_images=False):
            calls.append(len(images))
            return super().process(images, config, keep_images)

    sink = ListSink()
    summary = Engine(Counted(), batch_size=1, workers=1).run(paths, sink)
    assert summary.ok == 2 and summary.failed == 1
    assert sink.records[1]["stage"] == "compute"
    assert calls == [1, 1, 1]


class ForgetfulBackend(ReferenceBackend):
    """Returns one result too few: a backend bug the engine must not turn into a crash or a lost record."""

    name = "forgetful"

    def process(self, images, config, keep_images=False):
        return super().process(images, config, keep_images)[:-1]


class OneResultPerImage(ReferenceBackend):
    """A plug-in backend written before BatchResult: a list of StageResult, one per image."""

    name = "one-per-image"

    def process(self, images, config, keep_images=False):
        return list(super().process(images, config, keep_images))


def test_a_backend_returning_a_list_of_results_is_converted(tmp_path):
    """backends.md: a backend that still returns a list is converted by the engine."""
    paths = write_pngs(tmp_path, [(8, 9), (8, 9, 3), (1, 1), (20, 3)])
    expected, converted = ListSink(), ListSink()
    Engine(ReferenceBackend(), batch_size=3).run(paths, expected)
    summary = Engine(OneResultPerImage(), batch_size=3).run(paths, converted)
    assert summary.ok == 4 and summary.failed == 0
    assert [{**r, "backend": ""} for r in converted.records] == [{**r, "backend": ""} for r in expected.records]


def test_a_backend_returning_too_few_results_gives_error_records(tmp_path):
    paths = write_pngs(tmp_path, [(6, 6)] * 3)
    sink = ListSink()
    summary = Engine(ForgetfulBackend(), batch_size=3).run(paths, sink)
    assert summary.total == 3 and summary.failed == 3
    assert all(r["stage"] == "compute" and "returned 0 results for 1 images" in r["error"] for r in sink.records)


def test_decode_errors_keep_their_place(tmp_path):
    paths = write_pngs(tmp_path, [(5, 5)] * 3)
    paths[1].write_bytes(b"")  # zero-byte file
    sink = ListSink()
    summary = Engine(ReferenceBackend(), batch_size=8).run(paths, sink)
    assert [("error" in r) for r in sink.records] == [False, True, False]
    assert sink.records[1]["path"] == str(paths[1])
    assert summary.failures_by_stage and summary.failed == 1


class CountedPaths:
    """Paths, counting how many the decoder has taken so far."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.pulled = 0

    def __iter__(self):
        for path in self.paths:
            self.pulled += 1
            yield path


def test_prefetch_is_bounded(tmp_path):
    """The decoder never runs far ahead of the consumer: `prefetch` images wait ready, plus what
    each thread is decoding (a chunk, itself at most `prefetch` images) and the part being read."""
    paths = CountedPaths(write_pngs(tmp_path, [(4, 4)] * 200))
    consumed = 0
    for item in decode_stream(paths, DecodeOptions(), workers=4, prefetch=5):
        consumed += 1
        assert paths.pulled - consumed <= 5 + 5 + 4 * 5
        assert item.image is not None
    assert consumed == 200


def test_prefetch_is_bounded_by_pixels(tmp_path):
    """Memory is bounded by pixels: `prefetch_pixels` wait ready, each thread holds one part of
    about `chunk_pixels` (at most one image more)."""
    paths = CountedPaths(write_pngs(tmp_path, [(64, 64)] * 200))
    consumed = 0
    # 4,096-pixel images: 4 fit in 20,000 pixels; parts of 2 images; chunks of 2 once sizes are known
    for _ in decode_stream(paths, DecodeOptions(), workers=2, prefetch_pixels=20_000, chunk_pixels=8192):
        consumed += 1
        assert paths.pulled - consumed <= 4 + 2 + 2 * 2
    assert consumed == 200


def test_a_part_ends_once_it_holds_its_pixels(tmp_path):
    """A decode thread hands its part over as soon as it holds ``chunk_pixels`` pixels: one tiny
    image first (the first chunk), then a chunk of all the 4,096-pixel images cut in parts of two."""
    from gpu_pipeline.engine.decoding import decode_parts

    paths = write_pngs(tmp_path, [(1, 1)] + [(64, 64)] * 8)
    parts = decode_parts(paths, DecodeOptions(), workers=1, chunk_pixels=8192)
    assert [len(part.paths) for part in parts] == [1, 2, 2, 2, 2]


def test_a_decode_error_in_a_later_part_of_a_chunk_keeps_its_place_in_that_part(tmp_path):
    """The chunk of 64x64 images cut in parts of two images: the empty file between the third and
    the fourth rides in their part, at its second position there (not at its place in the chunk)."""
    from gpu_pipeline.engine.decoding import decode_parts

    paths = write_pngs(tmp_path, [(1, 1)] + [(64, 64)] * 8)
    paths[4].write_bytes(b"")
    parts = list(decode_parts(paths, DecodeOptions(), workers=1, chunk_pixels=8192))
    assert [part.paths for part in parts] == [paths[:1], paths[1:3], paths[3:6], paths[6:8], paths[8:]]
    assert [sorted(part.errors) for part in parts] == [[], [], [1], [], []]
    assert parts[2].errors[1]["path"] == str(paths[4]) and len(parts[2].images) == 2


class _Waiter:
    """A decoder waiting for room, as the pool sees it: a condition that records whether it was woken."""

    def __init__(self) -> None:
        self.woken = False

    def notify(self) -> None:
        self.woken = True


@pytest.mark.parametrize("limit", ["pixels", "images"])
def test_taking_a_part_wakes_the_wanted_part_and_the_earliest_that_fit(limit):
    """Room freed wakes the decoder of the part now wanted (room or not) and the earliest waiting
    parts that fit together, up to the limit exactly; no other (each wake-up costs GIL)."""
    from gpu_pipeline.engine.decoding import _DecodePool

    by_pixels = limit == "pixels"
    pool = _DecodePool([], DecodeOptions(), threads=1, prefetch_pixels=100 if by_pixels else 10**9,
                       prefetch_images=None if by_pixels else 10, chunk_pixels=10)
    pool._threads[0].join()  # (no path: its decoder is done)
    pool._wanted = (3, 0)
    pool._held_pixels, pool._held_images = (40, 0) if by_pixels else (0, 4)
    # (key, pixels, images): the wanted one does not fit; of the others, the second would pass the limit
    parts = [((3, 0), 200, 20), ((3, 1), 30, 3), ((4, 0), 40, 4), ((5, 0), 30, 3), ((6, 0), 1, 1)]
    waiters = {}
    for key, pixels, images in parts:
        waiters[key] = _Waiter()
        pool._waiting[key] = (waiters[key], pixels if by_pixels else 1, images if not by_pixels else 1)
    with pool._lock:
        pool._wake_decoders()
    # 40 + 30 + 30 = 100 pixels, or 4 + 3 + 3 = 10 images: exactly the limit; 40 or 4 more would pass it
    assert {key for key, waiter in waiters.items() if waiter.woken} == {(3, 0), (3, 1), (5, 0)}


def test_the_room_a_part_holds_is_given_back_when_it_is_taken(tmp_path):
    """Error records count as images while they wait (``prefetch``), and give their room back when
    taken: a run ends holding nothing, whatever failed to decode (the room they kept shrank the
    prefetch of ``verify`` until only the wanted part could be decoded)."""
    from gpu_pipeline.engine.decoding import decode_parts

    paths = write_pngs(tmp_path, [(4, 4)] * 30)
    for path in paths[::3]:
        path.write_bytes(b"")
    parts = decode_parts(paths, DecodeOptions(), workers=2, prefetch=4)
    assert sum(len(part.errors) for part in parts) == 10
    assert (parts._pool._held_images, parts._pool._held_pixels) == (0, 0)


def test_big_images_go_one_per_thread(tmp_path, monkeypatch):
    """Scenes larger than a chunk are decoded on every thread at once, not queued on one."""
    import threading
    import time

    from gpu_pipeline.engine import decoding
    paths = write_pngs(tmp_path, [(16, 16)] * 8)
    running, most = [0], [0]
    lock = threading.Lock()
    real = decoding.decode_each

    def slow_decode(paths, options, into=None):
        for outcome in real(paths, options, into):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            yield outcome

    monkeypatch.setattr(decoding, "decode_each", slow_decode)
    stream = decode_stream(paths, DecodeOptions(), workers=2, prefetch_pixels=10**6, chunk_pixels=100)
    assert [item.path for item in stream] == paths
    assert most[0] == 2


@pytest.mark.parametrize("budget_images", [0, 2])
def test_large_images_decoding_or_waiting_fit_the_decoding_budget(tmp_path, monkeypatch, budget_images):
    """Eight decoders of 1-MP images and a slow consumer: without a budget all eight decode at once
    and then wait, holding their images, for the consumer (16 decoders of 12-MP scenes: 1 GB, and a
    run killed in a 700 MB container). A decoder now waits before it decodes until the images
    decoding and waiting leave room; the image the consumer waits for goes on, so a budget smaller
    than one image still ends (one image at a time), in order."""
    import threading
    import time

    from gpu_pipeline.engine import decoding

    paths = write_pngs(tmp_path, [(1024, 1024)] * 16)  # (each holds over decode.BUDGETED_FROM_BYTES)
    charge = max(map(decoding_charge, paths))  # (their files differ by a few bytes)
    started = count_budget_grants(monkeypatch)
    taken, ahead, finished = [], [], threading.Event()  # ahead: images decoding or waiting, as each part is taken

    def consume():
        for part in decoding.decode_parts(paths, DecodeOptions(), workers=8, prefetch_pixels=10**9,
                                          budget_bytes=budget_images * charge):
            time.sleep(0.02)
            taken.extend(part.paths)
            ahead.append(started[0] - len(taken))
        finished.set()

    threading.Thread(target=consume, daemon=True).start()
    assert finished.wait(30), "the decode pool stalled"
    assert [str(p) for p in taken] == [str(p) for p in paths]
    assert max(ahead) <= budget_images + 1
    assert max(ahead[len(ahead) // 2:]) >= budget_images  # the room is used, and given back


def test_decoders_waiting_for_the_decoding_budget_decode_nothing_once_the_parts_are_closed(tmp_path, monkeypatch):
    """A decoder waiting for room in the decoding budget when the parts are closed (a stop, an
    interrupt, an API caller that stops early) ends there: it decoded its large image anyway, all
    such decoders at once, the very peak the budget is there to prevent, and closing waited for them."""
    import time

    from gpu_pipeline.engine import decoding

    paths = write_pngs(tmp_path, [(1024, 1024)] * 8)  # (each holds over decode.BUDGETED_FROM_BYTES)
    granted = count_budget_grants(monkeypatch)
    parts = decoding.decode_parts(paths, DecodeOptions(), workers=6, budget_bytes=0)
    first = next(parts)  # the consumer now waits for the second image: its decoder goes on, four others wait
    assert [str(p) for p in first.paths] == [str(paths[0])]
    time.sleep(0.5)
    parts.close()
    for thread in parts._pool._threads:
        thread.join(10)
    assert granted[0] <= 2  # the first image, and the second if its decoder got to it before the close


def test_the_decoding_budget_is_half_the_memory_a_run_may_use(monkeypatch):
    from gpu_pipeline.engine import decoding

    monkeypatch.setattr(decoding, "usable_memory", lambda: 700 << 20)
    parts = decoding.decode_parts([], DecodeOptions(), workers=1)
    assert parts._pool._budget == 350 << 20
    monkeypatch.setattr(decoding, "usable_memory", lambda: None)
    assert decoding.decode_parts([], DecodeOptions(), workers=1)._pool._budget is None


def test_a_failing_path_source_is_raised_to_the_consumer():
    def paths():
        yield Path("missing.png")
        raise OSError("the listing broke")

    with pytest.raises(OSError, match="the listing broke"):
        list(decode_stream(paths(), DecodeOptions(), workers=2))


def test_a_consumer_waiting_for_a_part_is_woken_when_the_decoders_end_with_none(monkeypatch):
    """The last decoder to end wakes the consumer: the parts end (with no path left, its part never
    comes). A consumer already waiting when they ended waited for ever."""
    import threading

    from gpu_pipeline.engine import decoding
    from tests.runs import wait_until

    listed, real_take_chunk = threading.Event(), decoding._DecodePool._take_chunk
    monkeypatch.setattr(decoding._DecodePool, "_take_chunk", lambda self: listed.wait() and real_take_chunk(self))
    parts = decoding.decode_parts([], DecodeOptions(), workers=2)
    got = []
    consumer = threading.Thread(target=lambda: got.append(list(parts)), daemon=True)
    consumer.start()
    wait_until(lambda: len(parts._pool._consumer._waiters) == 1, "the consumer waiting for its part")
    listed.set()  # the decoders find no path, and end
    consumer.join(60)
    woken = not consumer.is_alive()
    parts.close()
    assert woken and got == [[]]



def _fake(shape):
    return Decoded(Path("x"), image=np.zeros(shape, np.uint8))


def test_batches_respect_size_and_pixel_budget():
    """Five 10x10 images, an error, a 100x100 image, in parts of three inputs."""
    paths = [f"/{i}.png" for i in range(7)]
    images = [np.zeros((10, 10), np.uint8)] * 5 + [np.zeros((100, 100), np.uint8)]
    error = {"path": "/5.png", "stage": "decode", "error": "x"}
    parts = [DecodedPart(paths[:3], ImageBatch.of(images[:3])),
             DecodedPart(paths[3:6], ImageBatch.of(images[3:5]), {2: error}),
             DecodedPart(paths[6:], ImageBatch.of(images[5:]))]
    got = list(part_batches(iter(parts), batch_size=2, batch_pixels=1000))
    # 2 images, 2 images, then the fifth image with the error record, then the big one alone
    assert [batch.paths for batch in got] == [paths[:2], paths[2:4], paths[4:6], paths[6:]]
    assert [len(batch.images) for batch in got] == [2, 2, 1, 1]
    assert got[2].errors == {1: error}
    # a batch that the images fill exactly takes them: 200 pixels are two 10x10 images, not one
    exact = list(part_batches(iter(parts), batch_size=None, batch_pixels=200))
    assert [len(batch.images) for batch in exact] == [2, 2, 1, 1]
    whole = list(part_batches(iter(parts), batch_size=3, batch_pixels=10**9))
    assert [path for batch in whole for path in batch.paths] == paths


def test_a_part_that_fills_a_batch_is_handed_on_before_the_next_part_is_taken():
    """A decode process's part of tiles is a whole CPU batch (1 MP): it waited for the next part to be
    decoded before it went to the backend, a part's decoding late and a part more held."""
    taken = []

    def parts():
        for index in range(3):
            taken.append(index)
            yield DecodedPart([f"/{index}a.png", f"/{index}b.png"], ImageBatch.of([np.zeros((10, 10), np.uint8)] * 2))

    batches = part_batches(parts(), batch_size=None, batch_pixels=200)
    assert next(batches).paths == ["/0a.png", "/0b.png"] and taken == [0]
    assert [batch.paths for batch in batches] == [["/1a.png", "/1b.png"], ["/2a.png", "/2b.png"]]
    taken.clear()  # two parts that fill a batch together: handed on with the second, not the third
    batches = part_batches(parts(), batch_size=None, batch_pixels=400)
    assert len(next(batches).paths) == 4 and taken == [0, 1]


@pytest.mark.parametrize("chosen", [slice(2, 5), np.array([6, 1, 1, 4]), np.arange(7) % 3 == 0, slice(3, 3)])
def test_a_batch_taken_from_another_holds_only_the_buffers_of_its_images(chosen):
    """A batch cut from a part of images in buffers of their own kept every buffer of the part, and
    each backend call took the address of each (half the numba backend's time on 4,096 tiles)."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (4 + k, 5, 3) if k % 2 else (4 + k, 5), np.uint8) for k in range(7)]
    batch = ImageBatch.concatenate([ImageBatch.of(images[:3]), ImageBatch.stacked(np.stack([images[3]] * 2)),
                                    ImageBatch.of(images[5:])])
    everything = list(batch)
    taken = batch.take(chosen)
    expected = [everything[k] for k in np.arange(len(everything))[chosen]]
    assert [(image.shape, image.tobytes()) for image in taken] == [(image.shape, image.tobytes()) for image in expected]
    used = {id(buffer) for buffer in batch.buffers if any(np.shares_memory(buffer, image) for image in expected)}
    assert {id(buffer) for buffer in taken.buffers} == used and len(taken.buffers) == len(used)
    assert taken.addresses().tolist() == [image.ctypes.data for image in expected]


def test_a_batch_of_images_gives_them_back_and_groups_their_shapes_in_first_seen_order():
    """ImageBatch.of: gray (H, W) images as channels 0, RGB as 3, each given back with its shape and
    bytes; shape_groups: the positions of each shape, shapes in first-seen order (what the GPU
    backends launch a shape at a time, and group_by_shape promises)."""
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, shape, np.uint8) for shape in [(5, 7, 3), (4, 4), (5, 7, 3), (3, 3), (4, 4)]]
    batch = ImageBatch.of(images)
    assert batch.channels.tolist() == [3, 0, 3, 0, 0] and batch.bands.tolist() == [3, 1, 3, 1, 1]
    assert [(image.shape, image.tobytes()) for image in batch] == [(image.shape, image.tobytes()) for image in images]
    groups = batch.shape_groups()
    assert list(groups) == [(5, 7, 3), (4, 4), (3, 3)]
    assert [positions.tolist() for positions in groups.values()] == [[0, 2], [1, 4], [3]]


def test_copy_into_gathers_images_of_one_shape_and_refuses_an_output_it_cannot_fill():
    """copy_into: the images at the positions, in their order, from runs back to back in one buffer and
    from apart; an output that is not C-contiguous is refused (a reshape of it would be a copy, filled
    in its place and dropped: the output would keep its old bytes)."""
    from tests.strategies import packed_batch

    rng = np.random.default_rng(6)
    images = [rng.integers(0, 256, (3, 4, 3), np.uint8) for _ in range(5)]
    batch = packed_batch(images, [0, 0, 5, 0, 0])
    positions = np.array([0, 1, 2, 4, 3])
    out = np.zeros((5, 3, 4, 3), np.uint8)
    batch.copy_into(positions, out)
    assert all(np.array_equal(out[k], images[p]) for k, p in enumerate(positions))
    strided = np.zeros((2, 3, 8, 3), np.uint8)[:, :, ::2]
    with pytest.raises(ValueError, match="C-contiguous output"):
        batch.copy_into(np.array([0, 1]), strided)


class KeepSpy(ReferenceBackend):
    """Notes whether the engine asked the backend to keep the images (edge maps) of each batch."""

    name = "keep-spy"

    def __init__(self):
        self.asked: list[bool] = []

    def process(self, images, config, keep_images=False):
        self.asked.append(keep_images)
        return super().process(images, config, keep_images)


def test_a_batch_result_slices_and_builds_as_its_images_say():
    """BatchResult: a slice keeps each image's own equalized image and edges (the reference's, image by
    image); built from no result it holds no image lists, as a call that did not keep images."""
    from gpu_pipeline.backends.base import BatchResult

    rng = np.random.default_rng(9)
    images = [rng.integers(0, 256, shape, np.uint8) for shape in [(12, 10), (9, 14, 3), (16, 16)]]
    config = PipelineConfig(30, 90)
    results = ReferenceBackend().process(images, config, keep_images=True)[1:]
    assert len(results) == 2 and results.edge_counts.shape == (2,)
    for got, image in zip(results, images[1:]):
        want = cpu_reference.process_image(image, config)
        assert np.array_equal(got.edges, want.edges) and np.array_equal(got.equalized, want.equalized)
        assert np.array_equal(got.histogram, want.histogram) and got.edge_count == want.edge_count
    nothing = BatchResult.from_results([])
    assert nothing.histograms.shape == (0, 256) and nothing.equalized is None and nothing.edges is None
    for images in ([], images):
        unkept = ReferenceBackend().process(images, config)
        assert unkept.equalized is None and unkept.edges is None


def test_a_backend_warms_up_on_a_gray_and_an_rgb_image_and_wants_its_share_of_pixels():
    """base.py: warm_up compiles for both kinds of image (the RGB kernels too: not in the middle of a
    run), keeping the images (those kernels too); a CPU backend wants 1 MP a call, a GPU one 32 MP."""
    calls = []

    class Spy(ReferenceBackend):
        def process(self, images, config, keep_images=False):
            calls.append(([image.shape for image in images], keep_images))
            return super().process(images, config, keep_images)

    Spy().warm_up()
    ((shapes, keep),) = calls
    assert sorted(len(shape) for shape in shapes) == [2, 3] and keep is True

    class OnAGpu(ReferenceBackend):
        uses_gpu = True

    assert ReferenceBackend().batch_pixels() == 2**20 and OnAGpu().batch_pixels() == 32 * 2**20


@pytest.mark.parametrize("keep", [False, True])
def test_on_edges_receives_reference_edges(tmp_path, keep):
    """Edge maps are kept (and copied back from a GPU) only when someone takes them."""
    paths = write_pngs(tmp_path, [(12, 17, 3)])
    seen = {}
    backend = KeepSpy()
    engine = Engine(backend, on_edges=(lambda p, e: seen.__setitem__(p, e)) if keep else None)
    engine.run(paths, ListSink())
    assert backend.asked == [keep]
    if keep:
        expected = cpu_reference.process_image(np.asarray(Image.open(paths[0])), PipelineConfig()).edges
        assert np.array_equal(seen[paths[0]], expected)
    else:
        assert seen == {}


def test_an_edge_map_that_cannot_be_saved_turns_that_record_into_an_error(tmp_path):
    paths = write_pngs(tmp_path, [(8, 9), (10, 7, 3), (6, 6)])

    def save(path, edges):
        if path == paths[1]:
            raise OSError("disk full\nmore")

    sink = ListSink()
    summary = Engine(ReferenceBackend(), on_edges=save).run(paths, sink)
    assert [r["path"] for r in sink.records] == [str(p) for p in paths]
    assert sink.records[1] == {"path": str(paths[1]), "stage": "save-edges", "error": "OSError: disk full"}
    assert sink.records[2]["histogram"] == cpu_reference.process_image(
        np.asarray(Image.open(paths[2])), PipelineConfig()).histogram.tolist()
    assert summary.ok == 2 and summary.failed == 1 and summary.failures_by_stage == {"save-edges": 1}


def test_edge_maps_are_saved_on_threads_of_their_own_each_map_once(tmp_path, monkeypatch):
    """On 2 cores, two saver threads each save one run of a batch's maps, at the same time."""
    import threading

    from gpu_pipeline.engine import stream

    monkeypatch.setattr(stream, "usable_cores", lambda: 2)
    paths = write_pngs(tmp_path, [(8, 9)] * 40)
    saved, lock, both = [], threading.Lock(), threading.Barrier(2, timeout=10)

    def save(path, edges):
        if path in (paths[0], paths[20]):
            both.wait()  # the first map of each half in flight at once, or this times out
        with lock:
            saved.append((path, threading.current_thread().name))

    sink = ListSink()
    Engine(ReferenceBackend(), on_edges=save, batch_size=64).run(paths, sink)
    assert sorted(path for path, _ in saved) == sorted(paths) and "error" not in str(sink.records)
    threads = [name for _, name in sorted(saved)]
    assert {name.rpartition("_")[0] for name in threads} == {"save-edges"}
    assert len(set(threads[:20])) == len(set(threads[20:])) == 1 and threads[0] != threads[20]


@pytest.mark.parametrize("good", [0, 1, 3])
def test_saver_threads_take_batches_with_fewer_maps_than_threads(tmp_path, monkeypatch, good):
    """A batch whose images all failed to decode has no map to save; one with a map or three, fewer than the threads."""
    from gpu_pipeline.engine import stream

    monkeypatch.setattr(stream, "usable_cores", lambda: 16)
    paths = write_pngs(tmp_path, [(5, 6)] * 4)
    for path in paths[good:]:
        path.write_bytes(b"")
    saved = []
    sink = ListSink()
    Engine(ReferenceBackend(), on_edges=lambda path, edges: saved.append(path), batch_size=64).run(paths, sink)
    assert sorted(saved) == paths[:good] and [r.get("stage") for r in sink.records] == [None] * good + ["read"] * (4 - good)


@pytest.mark.parametrize("cores, threads", [(1, 2), (4, 4), (64, 8)])
def test_saver_threads_one_a_core_two_at_least_eight_at_most(monkeypatch, cores, threads):
    """Two on one core too: on a network file system a map waits for round trips with the GIL free."""
    from gpu_pipeline.engine import stream

    monkeypatch.setattr(stream, "usable_cores", lambda: cores)
    assert Engine(ReferenceBackend()).edge_savers == threads


def test_edge_maps_go_to_their_own_images_past_decode_errors_and_compute_failures(tmp_path):
    """Each map is handed on with its own image's name, whatever failed before it in the batch."""
    paths = write_pngs(tmp_path, [(6, 7)] * 6)
    paths[0].write_bytes(b"")
    Image.fromarray(np.full((6, 7), 13, np.uint8)).save(paths[2])
    seen = {}
    sink = ListSink()
    Engine(ExplodingBackend(), batch_size=8, on_edges=seen.__setitem__).run(paths, sink)
    assert [r.get("stage", "ok") for r in sink.records] == ["read", "ok", "compute", "ok", "ok", "ok"]
    assert sorted(seen) == [paths[1], *paths[3:]]
    for path, edges in seen.items():
        assert np.array_equal(edges, cpu_reference.process_image(np.asarray(Image.open(path)), PipelineConfig()).edges)


def test_a_mixed_batch_keeps_results_errors_and_labels_in_place(tmp_path):
    """Decode errors, a compute failure and results in one batch: every record at its input position."""
    paths = write_pngs(tmp_path, [(6, 6)] * 5)
    paths[0].write_bytes(b"")
    Image.fromarray(np.full((6, 6), 13, np.uint8)).save(paths[3])
    sink = ListSink()
    summary = Engine(ExplodingBackend(), batch_size=8).run(paths, sink)
    stages = [r.get("stage", "ok") for r in sink.records]
    assert stages == ["read", "ok", "ok", "compute", "ok"]
    assert summary.ok == 3 and summary.failed == 2 and sum(summary.labels.values()) == 3
    assert all(r["path"] == str(p) for r, p in zip(sink.records, paths))


@pytest.mark.parametrize("seed", range(4))
def test_many_decoders_a_small_prefetch_and_odd_sizes_keep_order_without_stalling(seed, monkeypatch):
    """16 decoders that mostly wait for room, images from 1 pixel to twice the prefetch limit (the
    part the consumer wants goes on whatever its size), a consumer that is sometimes slow: every
    image comes, in order, and the pool never stalls (each change wakes only some waiters)."""
    import random
    import threading
    import time

    from gpu_pipeline.engine import decoding

    rng = random.Random(seed)
    sides = [rng.choice([1, 3, 8, 16, 40, 64, 100]) for _ in range(600)]
    by_path = {f"/nowhere/{i:04d}.png": np.full((side, side), i % 251, np.uint8) for i, side in enumerate(sides)}

    def decode_each(paths, options, into=None):
        for path in paths:
            if rng.random() < 0.05:
                time.sleep(0.001)
            yield by_path[str(path)]

    monkeypatch.setattr(decoding, "decode_each", decode_each)
    paths = [Path(p) for p in by_path]
    got, finished = [], threading.Event()

    def consume():
        parts = decoding.decode_parts(paths, DecodeOptions(), workers=16, prefetch_pixels=5_000,
                                      chunk_pixels=2_000)
        for part in parts:
            if rng.random() < 0.1:
                time.sleep(0.002)
            got.extend(part.images)
        finished.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    assert finished.wait(20), "the decode pool stalled"
    assert len(got) == len(paths)
    assert all(image.shape == by_path[str(p)].shape and image[0, 0] == by_path[str(p)][0, 0]
               for image, p in zip(got, paths))


@pytest.mark.parametrize("failing", [False, True])
def test_a_batch_frees_its_pixels_before_its_records_are_written(failing, monkeypatch):
    """The batch being written holds no pixels: they are freed once computed and labelled (a
    third of what a run holds with GPU-sized batches). Labels still come from the pixels."""
    import weakref

    from gpu_pipeline.engine import decoding
    from gpu_pipeline.labels.labeller import default_labels

    decoded: dict[str, weakref.ref] = {}

    def decode_each(paths, options, into=None):  # fresh arrays, so that only the engine holds them
        for path in paths:
            value = int(Path(path).stem)
            image = np.full((8, 8), 13 if failing and value % 7 == 3 else 20 + value % 200, np.uint8)  # 13 fails
            decoded[str(path)] = weakref.ref(image)
            yield image

    monkeypatch.setattr(decoding, "decode_each", decode_each)
    # parts of 32 images, batches of 32: no part is shared by two batches
    monkeypatch.setattr(decoding, "FIRST_CHUNK_IMAGES", 32)
    monkeypatch.setattr(decoding, "MOST_CHUNK_IMAGES", 32)
    alive_at_write = []

    class CheckingSink(ListSink):
        def write(self, records):
            records = list(records)
            alive_at_write.append(sum(decoded[record["path"]]() is not None for record in records))
            super().write(records)

    paths = [Path(f"/nowhere/{i}.png") for i in range(320)]
    sink = CheckingSink()
    Engine(ExplodingBackend(), batch_size=32, workers=1).run(paths, sink)
    assert alive_at_write == [0] * 10

    def label(image):  # each image labelled alone, from the reference's results
        stages = cpu_reference.process_image(image, PipelineConfig())
        return default_labels([image], stages.histogram[None], np.array([stages.edge_count]))[0]

    expected = [label(np.full((8, 8), 20 + i % 200, np.uint8)) for i in range(320)]
    assert len(set(expected)) > 1
    assert [r.get("label") for r in sink.records] == [None if failing and i % 7 == 3 else want
                                                       for i, want in enumerate(expected)]


@pytest.mark.parametrize("count, interrupted", [(16, False), (24, True)])
def test_a_stop_after_the_last_batch_is_taken_is_no_interruption(tmp_path, monkeypatch, count, interrupted):
    """A signal while the second batch is written: every image was taken and is written, so the
    summary says the run was not interrupted; with a third batch still to take (its first image
    decodes only after the signal), it was."""
    import threading

    from gpu_pipeline.engine import decoding

    paths = write_pngs(tmp_path, [(5, 6)] * count)
    stop = threading.Event()
    real = decoding.decode_each

    def after_the_stop(chunk, options, into=None):
        if any(path.endswith("img016.png") for path in map(str, chunk)):
            stop.wait(10)
        return real(chunk, options, into=into)

    class StoppingSink(ListSink):
        def write(self, records):
            if any(record["path"] == str(paths[15]) for record in records):
                stop.set()
            super().write(records)

    monkeypatch.setattr(decoding, "decode_each", after_the_stop)
    monkeypatch.setattr(decoding, "MOST_CHUNK_IMAGES", 1)  # img016's chunk holds no other
    sink = StoppingSink()
    summary = Engine(ReferenceBackend(), batch_size=8, workers=1).run(paths, sink, stop=stop)
    assert summary.interrupted is interrupted
    assert [r["path"] for r in sink.records] == [str(p) for p in paths[:16]]


def test_a_stop_once_the_last_batch_is_taken_is_no_interruption(tmp_path, monkeypatch):
    """A signal while the first batch is written, the second and last one taken and the end of the
    batches known: both batches are written, and the summary says the run was not interrupted."""
    import threading

    from gpu_pipeline.engine import stream

    real_take = stream._Taker.take

    def take_when_ready(self):  # each batch (and the end) known before the engine goes on
        future = real_take(self)
        future.exception()
        return future

    monkeypatch.setattr(stream._Taker, "take", take_when_ready)
    paths = write_pngs(tmp_path, [(5, 6)] * 16)
    stop = threading.Event()

    class StoppingSink(ListSink):
        def write(self, records):
            stop.set()
            super().write(records)

    sink = StoppingSink()
    summary = Engine(ReferenceBackend(), batch_size=8, workers=1).run(paths, sink, stop=stop)
    assert [r["path"] for r in sink.records] == [str(p) for p in paths]
    assert summary.interrupted is False


def test_decoders_that_fail_for_good_keep_the_batch_computed_before(tmp_path, monkeypatch):
    """The batch computed when the decoders fail for good (a fork server that kept dying; here the
    listing) is written before the failure is raised: its records are kept, the resume starts after."""
    from gpu_pipeline.engine import decoding

    paths = write_pngs(tmp_path, [(5, 6)] * 8)

    class BreakingListing(list):
        def __iter__(self):
            yield from super().__iter__()
            raise OSError("the listing broke")

    monkeypatch.setattr(decoding, "MOST_CHUNK_IMAGES", 1)  # every image decoded before the failure
    sink = ListSink()
    with pytest.raises(OSError, match="the listing broke"):
        Engine(ReferenceBackend(), batch_size=4, workers=1).run(BreakingListing(paths), sink)
    assert [r["path"] for r in sink.records] == [str(p) for p in paths]


def engine_threads_ended(timeout: float = 10) -> None:
    """Wait for the engine's threads (batches, compute, decoders) to end, and fail naming them if they do
    not: a test that released a stuck decoder in its ``finally`` left its thread ending, and the next test
    in that process (pytest-xdist's order) found it among its own."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name.startswith(("batches", "compute", "decode_")):
            thread.join(max(0.0, deadline - time.monotonic()))
    left = [thread.name for thread in threading.enumerate() if thread.name.startswith(("batches", "compute", "decode_"))]
    assert left == [], left


def test_closing_a_run_whose_decoder_is_stuck_waits_for_it_once(tmp_path, monkeypatch):
    """Closed through its parts (their generator's end, then the pool itself) and by the engine's own
    clean-up, the pool waited CLOSE_WAIT_S for a stuck decoder at each close: 30 s instead of 10."""
    import threading
    import time

    from gpu_pipeline.engine import decoding

    paths = write_pngs(tmp_path, [(8, 8)] * 12)
    stuck, release = threading.Event(), threading.Event()
    real = decoding.decode_each

    def stuck_on_the_last(chunk, options, into=None):
        if any(path.endswith("img011.png") for path in map(str, chunk)):
            stuck.set()
            release.wait(60)  # a read from a hung network mount
        return real(chunk, options, into=into)

    monkeypatch.setattr(decoding, "decode_each", stuck_on_the_last)
    monkeypatch.setattr(decoding, "CLOSE_WAIT_S", 1.0)
    # a chunk an image: the stuck file's chunk holds no other (a thread that took img001 to img011
    # as one chunk held the first batch's records until the stuck read ended: the close then
    # waited for nothing, and the test passed without testing)
    monkeypatch.setattr(decoding, "MOST_CHUNK_IMAGES", 1)
    engine = Engine(ReferenceBackend(), PipelineConfig(), DecodeOptions(), batch_size=1, workers=2, processes=False)
    batches = engine.record_batches(paths)
    try:
        assert next(batches).paths
        assert stuck.wait(10)
        started = time.monotonic()
        batches.close()
        assert time.monotonic() - started < 1.9  # one wait of 1 s (three before)
    finally:
        release.set()
        engine_threads_ended()


def test_a_computed_batch_is_handed_on_while_the_next_one_is_still_decoding(tmp_path, monkeypatch):
    """The records of a computed batch waited until the next batch was decoded: a read stuck on a
    hung network mount held them (unwritten, the progress bar still, lost to a kill), and every
    scene's record waited for the next scene's decode."""
    import threading

    from gpu_pipeline.engine import decoding

    paths = write_pngs(tmp_path, [(8, 8)] * 8)
    stuck, release, released = threading.Event(), threading.Event(), threading.Event()
    real = decoding.decode_each

    def stuck_on_the_fourth(chunk, options, into=None):
        if any(path.endswith("img003.png") for path in map(str, chunk)):
            stuck.set()
            release.wait(10)  # a read from a hung network mount
            released.set()
        return real(chunk, options, into=into)

    monkeypatch.setattr(decoding, "decode_each", stuck_on_the_fourth)
    monkeypatch.setattr(decoding, "MOST_CHUNK_IMAGES", 1)  # the stuck file's chunk holds no other
    engine = Engine(ReferenceBackend(), PipelineConfig(), DecodeOptions(), batch_size=1, workers=2, processes=False)
    with contextlib.closing(engine.record_batches(paths)) as batches:
        firsts = [next(batches).paths for _ in range(3)]  # img002 computed while img003 is stuck
        assert stuck.is_set() and not released.is_set()
        release.set()
        assert firsts == [[str(path)] for path in paths[:3]]
        assert [batch.paths for batch in batches] == [[str(path)] for path in paths[3:]]


def test_a_program_that_leaves_a_run_unfinished_while_a_decode_hangs_still_exits(tmp_path):
    """A notebook or script that takes some batches and ends without closing the run, a decoder
    stuck on a hung mount: the thread that takes the next batch waits for that decoder, and Python
    waits at exit for the threads of its thread pools. It must not hold the exit."""
    import subprocess
    import sys
    import time

    paths = write_pngs(tmp_path, [(8, 8)] * 8)
    script = f"""
import time
from pathlib import Path
from gpu_pipeline.backends.reference import ReferenceBackend
from gpu_pipeline.engine import decoding, stream

real = decoding.decode_each

def stuck_on_the_fourth(chunk, options, into=None):
    if any(str(path).endswith("img003.png") for path in chunk):
        time.sleep(3600)  # a read from a hung network mount
    return real(chunk, options, into=into)

decoding.decode_each = stuck_on_the_fourth
decoding.MOST_CHUNK_IMAGES = 1
decoding.CLOSE_WAIT_S = 0.5
batches = stream.Engine(ReferenceBackend(), batch_size=1, workers=2, processes=False).record_batches(
    [Path(name) for name in {[str(path) for path in paths]!r}])
print([next(batches).paths for _ in range(3)], flush=True)  # the third while img003 hangs
"""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr([[str(path)] for path in paths[:3]])
    assert time.monotonic() - started < 30
    assert done.stderr == ""  # (closing the parts while the batch taker ran in them: "generator already executing")


def test_parts_close_while_another_thread_waits_in_them(tmp_path, monkeypatch):
    """As Python exits with a run left unfinished, the batch taker may be stopped for good inside the
    parts' generator: closing the parts then printed "Exception ignored ... ValueError: generator
    already executing" on the program's stderr. They close the pool, and the waiting thread returns."""
    import threading

    from gpu_pipeline.engine import decoding

    paths = write_pngs(tmp_path, [(8, 8)] * 3)
    release = threading.Event()
    real = decoding.decode_each

    def stuck_on_the_first(chunk, options, into=None):
        if any(str(path).endswith("img000.png") for path in chunk):
            release.wait(10)  # a read from a hung network mount
        return real(chunk, options, into=into)

    monkeypatch.setattr(decoding, "decode_each", stuck_on_the_first)
    monkeypatch.setattr(decoding, "CLOSE_WAIT_S", 0.2)
    parts = decoding.decode_parts(paths, DecodeOptions(), 1)
    taken = []
    waiting = threading.Thread(target=lambda: taken.append(next(parts, None)))
    waiting.start()
    try:
        while not parts._parts.gi_running:  # (the thread is in the generator, waiting for img000)
            waiting.join(0.01)
        parts.close()
        waiting.join(5)
        assert not waiting.is_alive() and taken == [None]
    finally:
        release.set()


def test_a_stop_with_the_next_batch_ready_waits_for_a_stuck_decoder_only_the_stop_wait(tmp_path, monkeypatch):
    """A stop (SIGTERM) seen by the engine between batches, the next one already decoded, closed the
    pool as if no stop had come: CLOSE_WAIT_S (10 s) for a decoder stuck further on, not STOP_WAIT_S,
    and ``docker stop`` kills after 10 s (a loaded machine, whose consumer lags its decoders)."""
    import threading
    import time

    from gpu_pipeline.engine import decoding

    paths = write_pngs(tmp_path, [(8, 8)] * 12)
    stuck, release, next_ready = threading.Event(), threading.Event(), threading.Event()
    real_decode, real_hand_over = decoding.decode_each, decoding._DecodePool._hand_over

    def stuck_on_the_last(chunk, options, into=None):
        if any(path.endswith("img011.png") for path in map(str, chunk)):
            stuck.set()
            release.wait(60)  # a read from a hung network mount
        return real_decode(chunk, options, into=into)

    def hand_over(pool, key, decoded, pixels, last, *budgeted):
        handed = real_hand_over(pool, key, decoded, pixels, last, *budgeted)
        if any(str(path).endswith("img002.png") for path in decoded.paths):
            next_ready.set()  # the batch the engine takes next is ready: it takes it without waiting
        return handed

    monkeypatch.setattr(decoding, "decode_each", stuck_on_the_last)
    monkeypatch.setattr(decoding._DecodePool, "_hand_over", hand_over)
    monkeypatch.setattr(decoding, "CLOSE_WAIT_S", 5.0)
    monkeypatch.setattr(decoding, "MOST_CHUNK_IMAGES", 1)  # the stuck file's chunk holds no other
    stop = threading.Event()
    engine = Engine(ReferenceBackend(), PipelineConfig(), DecodeOptions(), batch_size=1, workers=2, processes=False)
    batches = engine.record_batches(paths, stop=stop)
    try:
        assert next(batches).paths == [str(paths[0])]  # img001 computes meanwhile, img002 is ready
        assert stuck.wait(10) and next_ready.wait(10)
        stop.set()
        started = time.monotonic()
        # img001 computing at the stop is written; taken after img000 was handed on, it is not taken
        assert [batch.paths for batch in batches] in ([[str(paths[1])]], [])
        assert time.monotonic() - started < 2.5  # STOP_WAIT_S (0.5 s), not CLOSE_WAIT_S (5 s)
    finally:
        release.set()
        engine_threads_ended()


@pytest.mark.parametrize("batch_pixels, held", [(GPU_BATCH_PIXELS, 96 << 20), (CPU_BATCH_PIXELS, 18 << 20)])
def test_decoded_pixels_held_by_a_run_are_bounded(tmp_path, monkeypatch, batch_pixels, held):
    """backends.md, where the host memory goes: the decode pool's prefetch (max(16 MP, batch)), the
    batch being filled and the batch computing: 96 MP with a GPU backend's 32-MP batches (288 MB of
    RGB tiles, within issue #20's 400 MB), 18 MP with a CPU backend's 1 MP."""
    from gpu_pipeline.engine import stream as engine_module

    class Wanting(ReferenceBackend):
        def batch_pixels(self):
            return batch_pixels

    asked = []
    real_decode_parts = engine_module.decode_parts

    def decode_parts(paths, options, workers, **settings):
        asked.append(settings)
        return real_decode_parts(paths, options, workers, **settings)

    monkeypatch.setattr(engine_module, "decode_parts", decode_parts)
    paths = write_pngs(tmp_path, [(6, 5, 3), (4, 4)])
    sink = ListSink()
    Engine(Wanting(), workers=1, processes=False).run(paths, sink)
    assert len(sink.records) == 2 and all("error" not in record for record in sink.records)
    (settings,) = asked
    assert settings["prefetch_pixels"] == max(16 << 20, batch_pixels)
    assert settings["prefetch_pixels"] + settings["consumer_pixels"] == held
    assert settings["budget_bytes"] is None  # (from the memory the process may use)
    Engine(Wanting(), workers=1, processes=False, decoding_budget_bytes=12345).run(paths, sink)
    assert asked[-1]["budget_bytes"] == 12345


def test_a_run_left_in_a_reference_cycle_and_collected_in_its_batch_thread_still_stops(tmp_path, monkeypatch):
    """An unfinished run dropped inside a reference cycle (an object that holds its iterator and
    itself, a notebook's namespace) is closed by the garbage collector in whichever thread allocates:
    one of the run's own. In the thread that takes the next batch, its clean-up waited for that very
    batch, for ever: the thread, the compute thread and the run's memory stayed for the life of the
    process."""
    import gc
    import threading
    import time

    from gpu_pipeline.engine import stream
    from gpu_pipeline.engine import decoding

    paths = write_pngs(tmp_path, [(8, 8)] * 8)
    asked, dropped, collected = threading.Event(), threading.Event(), threading.Event()
    real_part_batches = stream.part_batches
    taken = []

    def part_batches(parts, batch_size, batch_pixels):
        batches = real_part_batches(parts, batch_size, batch_pixels)
        while True:
            taken.append(1)
            if len(taken) == 2:  # held: the run hands the first batch's records on meanwhile
                asked.set()
                assert dropped.wait(10)
                gc.collect()  # (as an allocation here could)
                collected.set()
            batch = next(batches, None)
            if batch is None:
                return
            yield batch

    monkeypatch.setattr(stream, "part_batches", part_batches)
    monkeypatch.setattr(decoding, "MOST_CHUNK_IMAGES", 1)
    engine = Engine(ReferenceBackend(), PipelineConfig(), DecodeOptions(), batch_size=1, workers=2, processes=False)
    cycle = [engine.record_batches(paths)]
    cycle.append(cycle)
    assert next(cycle[0]).paths == [str(paths[0])]
    assert asked.wait(10)
    gc.disable()  # (the test's thread must not collect it first)
    try:
        del cycle
        dropped.set()
        assert collected.wait(10)
    finally:
        gc.enable()

    engine_threads_ended()
