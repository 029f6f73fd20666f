"""``run --dask``: the same records as a local run, exactly once, through kills, resumes and bad workers.

The clusters here are LocalClusters of 2 worker processes on the reference backend (numba would JIT-load in
every fresh worker process). Most tests share one module cluster and reach it by its address, as a user
reaches a remote scheduler; the command line starts its own (``local:2``) in two, and the test that needs
Dask's retry limit at 0 has its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import gpu_pipeline
from gpu_pipeline.engine.cores import usable_cores
from gpu_pipeline.engine import distributed as dask_run
from gpu_pipeline.backends import Backend, registry
from gpu_pipeline.labels.labeller import Features, default_label
from gpu_pipeline.labels.model import load_model
from gpu_pipeline.cli import app
from gpu_pipeline.errors import UsageError
from gpu_pipeline.outputs.plan import open_sink, read_records

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


def run(*args: str, backend: str = "reference"):
    return runner.invoke(app, ["run", *args, "--backend", backend, "-q"])


def by_path(records: list[dict]) -> dict[str, dict]:
    paths = [record["path"] for record in records]
    assert len(paths) == len(set(paths)), "a path was recorded twice"
    return {record["path"]: record for record in records}


def local_records(folder: Path, out: Path) -> dict[str, dict]:
    result = run(str(folder), "--out", str(out))
    assert result.exit_code == 0, result.output  # every sample image decodes and computes
    return by_path(read_records(out))


def assert_match_opencv(records: dict[str, dict]) -> None:
    """Each record's histogram and edge count are OpenCV's own, not only those of a local run."""
    import cv2

    from gpu_pipeline.config import DecodeOptions
    from gpu_pipeline.inputs.decode import decode_image

    for path, record in records.items():
        image = decode_image(path, DecodeOptions())
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        edges = cv2.Canny(cv2.GaussianBlur(cv2.equalizeHist(gray), (5, 5), 0), 100, 200, apertureSize=3)
        assert record["histogram"] == cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(int).tolist()
        assert record["edge_count"] == cv2.countNonZero(edges), path


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes (with nannies, which restart a killed worker)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as local_cluster, \
            Client(local_cluster, set_as_default=False) as client:
        yield client


def _dask_memory_limit(dask_worker) -> int:
    return dask_worker.memory_manager.memory_limit


def test_a_worker_bounds_its_large_images_by_its_share_of_the_memory(cluster, monkeypatch):
    """A local cluster gives each worker an equal share of the machine's memory, and its nanny kills
    a worker near it: a worker's decoding budget is taken from that share, not from the machine."""
    from gpu_pipeline.config import DecodeOptions, PipelineConfig
    from gpu_pipeline.engine.cores import usable_memory
    from gpu_pipeline.engine.decoding import decoding_budget
    from gpu_pipeline.engine.stream import RunSummary
    from gpu_pipeline.labels.labeller import default_labels

    shares = cluster.run(_dask_memory_limit)
    for worker, share in shares.items():  # (as a task, where process_chunk runs)
        assert cluster.submit(dask_run._worker_memory, workers=[worker], pure=False).result() == \
            min(share, usable_memory())
    assert all(share < usable_memory() for share in shares.values())  # (two workers: half each)
    assert dask_run._worker_memory() == usable_memory()  # (not in a worker)
    budgets = []

    class Recorded:  # the engine a chunk makes, with the settings it was given
        def __init__(self, **settings):
            budgets.append(settings["decoding_budget_bytes"])

        def run(self, paths, sink):
            return RunSummary()

    monkeypatch.setattr(dask_run, "_worker_memory", lambda: 700 << 20)
    monkeypatch.setattr(dask_run, "Engine", Recorded)
    job = dask_run.ChunkJob("reference", 1, PipelineConfig(), DecodeOptions(), 64, 1, default_labels, None)
    dask_run.process_chunk(job, [])
    assert budgets == [decoding_budget(700 << 20)]


def test_a_worker_of_another_gpu_pipeline_version_refuses_the_job(monkeypatch):
    """docs/distributed.md: every worker runs the client's version. A worker of another one computed
    its chunks all the same: records of two versions in one output, maybe not byte-identical."""
    from gpu_pipeline.config import DecodeOptions, PipelineConfig
    from gpu_pipeline.labels.labeller import default_labels

    monkeypatch.setattr(dask_run, "Engine", lambda **settings: pytest.fail("a chunk ran"))
    job = dask_run.ChunkJob("reference", 1, PipelineConfig(), DecodeOptions(), 64, 1, default_labels, None,
                            version="0.0.1")
    with pytest.raises(dask_run.ChunkFailed, match=rf"^worker pid \d+ runs gpu-pipeline {gpu_pipeline.__version__}, "
                                                   r"the client 0\.0\.1: install the same version on every worker$"):
        dask_run.process_chunk(job, [])


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """200 small random RGB tiles: several chunks on 2 workers."""
    folder = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(9)
    for index in range(200):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            folder / f"tile{index:04d}.png", compress_level=0)
    return folder


def test_a_local_cluster_starts_no_gil_knocker_in_this_process(monkeypatch):
    """Dask's GIL monitor (gilknocker, where installed) starts a native thread in the scheduler and in
    each nanny, all in this process; one still knocking while Python shuts down aborts the run (exit
    134) after its records are written."""
    started = []

    class KnockKnock:  # gilknocker's interface, as Dask's SystemMonitor uses it
        contention_metric = 0.0

        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            started.append(self)

        def stop(self):
            pass

        def reset_contention_metric(self):
            pass

    monkeypatch.setitem(sys.modules, "gilknocker", types.SimpleNamespace(KnockKnock=KnockKnock))
    with dask_run.DaskCluster("local:2", "reference", None) as cluster:
        assert not cluster.cluster.scheduler.monitor.monitor_gil_contention
        assert started == []
        # distributed.md: each of the N processes gets cores / N compute threads, one task slot
        assert cluster.threads == max(1, usable_cores() // 2)  # (a CPU quota counts)
        assert cluster.worker_threads() == 2
        # distributed.md: the web server takes a free port, leaving Dask's 8787 to a dashboard already there
        assert cluster.cluster.scheduler.http_server.port != 8787


def test_local_n_takes_at_most_4_workers_per_core(monkeypatch):
    """distributed.md: N at most 4 per core (each worker is a Python process with its own backend)."""
    monkeypatch.setattr(dask_run, "usable_cores", lambda: 2)
    assert dask_run._local_workers("local:8") == 8 and dask_run._local_workers("local:1") == 1
    with pytest.raises(UsageError, match="starts 9 worker processes on 2 cores; take at most 8"):
        dask_run._local_workers("local:9")


def test_a_local_cluster_closes_without_dask_log_records():
    """After Ctrl-C a local cluster's scheduler (in this process) could log a CRITICAL traceback,
    "Closed comm ... while trying to write", for a result that reached a closed client: on the
    user's stderr, under the run's own message."""
    import distributed  # noqa: F401  (which sets the level of Dask's loggers)

    distributed_logger = logging.getLogger("distributed")
    level = distributed_logger.level  # (put back by close, as before the connection turned it off)
    cluster = dask_run.DaskCluster("local:1", "reference", None)
    local_close = cluster.cluster.close

    def close_logging(*args, **kwargs):  # what the scheduler does when the race is lost
        logging.getLogger("distributed.scheduler").critical("Closed comm %r while trying to write %s",
                                                            "planted", {"op": "key-in-memory"})
        return local_close(*args, **kwargs)

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    kept = Kept()
    logging.getLogger("distributed.scheduler").addHandler(kept)
    try:
        cluster.cluster.close = close_logging
        cluster.close()
    finally:
        logging.getLogger("distributed.scheduler").removeHandler(kept)
    assert [record.getMessage() for record in kept.records] == []
    assert distributed_logger.level == level


@pytest.fixture(scope="module")
def tile_records(tiles, tmp_path_factory) -> dict[str, dict]:
    return local_records(tiles, tmp_path_factory.mktemp("local") / "local.jsonl")


def test_local_cluster_gives_the_records_of_a_local_run(bundled_data_dir, tmp_path):
    expected = local_records(bundled_data_dir, tmp_path / "local.jsonl")
    result = run(str(bundled_data_dir), "--out", str(tmp_path / "dask.jsonl"), "--dask", "local:2")
    assert result.exit_code == 0, result.output
    records = by_path(read_records(tmp_path / "dask.jsonl"))
    assert records == expected
    assert len(expected) > 50
    assert_match_opencv(records)


def test_a_scheduler_address_gives_the_records_of_a_local_run(shared_data_dir, cluster, tmp_path):
    expected = local_records(shared_data_dir, tmp_path / "local.jsonl")
    result = run(str(shared_data_dir), "--out", str(tmp_path / "dask.jsonl"), "--dask", cluster.scheduler.address)
    assert result.exit_code == 0, result.output
    assert by_path(read_records(tmp_path / "dask.jsonl")) == expected
    assert len(expected) > 1000


class PerImage:
    """A batch labeller that calls a one-image label function ``label_of(Features)`` per image."""

    def __init__(self, label_of) -> None:
        self.label_of = label_of

    def __call__(self, images, histograms, edge_counts) -> list[str]:
        return [self.label_of(Features(histogram, int(count), image.shape[0] * image.shape[1], image))
                for image, histogram, count in zip(images, histograms, edge_counts)]


class KillAfter:
    """A label function that SIGKILLs its worker process at the ``victim``-th label of the whole cluster.

    Each call appends one byte to ``counter``; appends are atomic, so exactly one call sees the size
    reach ``victim``, and the rerun of the lost chunk, which sees a larger size, labels normally.
    """

    def __init__(self, counter: str, victim: int) -> None:
        self.counter = counter
        self.victim = victim

    def __call__(self, features) -> str:
        descriptor = os.open(self.counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(descriptor, b".")
            calls = os.fstat(descriptor).st_size
        finally:
            os.close(descriptor)
        if calls == self.victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return default_label(features)


def test_a_killed_worker_still_yields_one_record_per_path(cluster, tiles, tile_records, tmp_path):
    counter = tmp_path / "labels-counted"
    todo = sorted(Path(path) for path in tile_records)
    pids_before = set(cluster.run(os.getpid).values())
    with dask_run.DaskCluster(cluster.scheduler.address, "reference", None) as dask_cluster, \
            open_sink(str(tmp_path / "dask.jsonl"), resume=False) as sink:
        engine = dask_run.DaskEngine(dask_cluster, workers=2, labels_of=PerImage(KillAfter(str(counter), victim=70)))
        summary = engine.run(todo, sink)
    assert summary.total == len(todo) and not summary.interrupted
    assert by_path(read_records(tmp_path / "dask.jsonl")) == tile_records
    # the kill did happen: the labels of the lost chunk were computed twice, and a worker was replaced
    assert counter.stat().st_size > len(todo)
    cluster.wait_for_workers(2, timeout=30)
    assert set(cluster.run(os.getpid).values()) != pids_before


class KillOnConstantImage:
    """A label function that SIGKILLs its worker on every constant image, as a decoder crash would."""

    def __call__(self, features) -> str:
        if np.count_nonzero(features.histogram) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return default_label(features)


def test_an_image_that_kills_every_worker_gets_an_error_record_and_the_run_goes_on(tiles, tile_records,
                                                                                    tmp_path, monkeypatch):
    import dask
    from distributed import LocalCluster

    folder = tmp_path / "tiles"
    shutil.copytree(tiles, folder)
    poison = folder / "tile0077.png"
    Image.fromarray(np.full((24, 24, 3), 77, np.uint8)).save(poison)
    monkeypatch.setattr(dask_run, "FIRST_CHUNK", 40)  # fewer halvings: each costs a worker restart
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                         silence_logs=logging.CRITICAL) as local_cluster, \
            dask_run.DaskCluster(local_cluster.scheduler_address, "reference", None) as dask_cluster, \
            open_sink(str(tmp_path / "dask.jsonl"), resume=False) as sink:
        engine = dask_run.DaskEngine(dask_cluster, workers=2, labels_of=PerImage(KillOnConstantImage()))
        summary = engine.run(sorted(folder.iterdir()), sink)
    records = by_path(read_records(tmp_path / "dask.jsonl"))
    assert summary.total == 200 and summary.failed == 1 and not summary.interrupted
    assert records.pop(str(poison)) == {
        "path": str(poison), "stage": "compute",
        "error": f"{dask_run.LONE_DEATHS_TO_BLAME} worker processes died processing this image alone (a crash "
                 "in a decoder or a backend, or out of memory)"}
    expected = {str(folder / Path(path).name): record for path, record in tile_records.items()}
    expected.pop(str(poison))
    assert {path: {**record, "path": path} for path, record in records.items()} == {
        path: {**record, "path": path} for path, record in expected.items()}


RealChunks = dask_run._Chunks


class Pending:
    """A future of the stand-in cluster below: it ends through ``next_batch``."""

    status = "pending"


class Workers:
    """Stands in for the client and its ``as_completed``: ``n`` workers, each given the next chunk
    when it holds the fewest. Each runs the first chunk it holds while the others queue behind it,
    one worker a step, in turn; a worker whose running chunk holds one of ``poisons`` dies, failing
    every chunk it holds, as Dask does with ``allowed-failures`` 0."""

    def __init__(self, n: int, poisons: set[str]) -> None:
        self.poisons, self.held, self.turn, self.lone_runs = poisons, [[] for _ in range(n)], 0, []

    def submit(self, function, job, chunk, key):
        future = Pending()
        min(self.held, key=len).append((future, chunk))
        return future

    def add(self, future) -> None:
        pass

    def cancel(self, futures) -> None:
        for held in self.held:
            held[:] = [(future, chunk) for future, chunk in held if future not in futures]

    def next_batch(self, block: bool):
        from distributed import KilledWorker

        if not any(self.held):  # what is in flight ends elsewhere, if at all
            return []
        while not self.held[self.turn % len(self.held)]:
            self.turn += 1
        held = self.held[self.turn % len(self.held)]
        self.turn += 1
        future, chunk = held[0]
        if sum(map(len, self.held)) == 1 and len(chunk) == 1:
            self.lone_runs.append(chunk[0])
        if self.poisons.intersection(chunk):
            dead = held[:]
            held.clear()
            return [(future, (KilledWorker, KilledWorker(key, None, 0), None)) for key, (future, _) in enumerate(dead)]
        del held[0]
        return [(future, dask_run.ChunkResult([{"path": path, "width": 1, "height": 1, "label": "smooth"}
                                               for path in chunk], 0.01))]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_an_innocent_image_that_dies_beside_a_poisonous_one_is_not_blamed(workers):
    """Halving puts innocent images in one-image chunks too; queued on the poisonous one's worker,
    they die with it. Only deaths while an image runs with nothing else in flight count."""
    paths = [f"tile{i:02d}.png" for i in range(40)]
    for poisons in [{paths[i], paths[j]} for i in range(len(paths)) for j in range(i, len(paths), 3)]:
        cluster = Workers(workers, poisons)
        chunks = dask_run._Chunks(cluster, None, paths, completed=cluster)
        records, summary = [], dask_run.RunSummary()
        sink = type("Sink", (), {"write": lambda self, batch: records.extend(batch)})()
        while True:
            chunks.submit(slots=workers)
            if not chunks.in_flight:
                break
            assert dask_run.DaskEngine._write_chunks(chunks.ready(), chunks, sink, summary, None) is None
        assert chunks.all_submitted and sorted(record["path"] for record in records) == paths
        assert {record["path"] for record in records if "error" in record} == poisons
        for poison in poisons:  # each death counted against it was a run with nothing beside it
            assert cluster.lone_runs.count(poison) >= chunks.lone_deaths[poison] == dask_run.LONE_DEATHS_TO_BLAME
        assert summary.failed == len(poisons) and summary.ok == len(paths) - len(poisons)


def test_a_local_cluster_gets_back_the_workers_dask_gave_up_on():
    """Dask's local cluster drops a nanny whose worker has not come back within its lost-worker
    timeout and never starts it again; a file that kills workers as they start left a run with no
    workers, waiting for ever."""
    with dask_run.DaskCluster("local:1", "reference", None) as cluster:
        local = cluster.cluster
        (name,) = local.workers
        local.sync(local.workers.pop(name).close)  # what Dask does once the timeout has passed
        deadline = time.monotonic() + 60
        while cluster.client.nthreads() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not cluster.client.nthreads()
        while time.monotonic() < deadline:
            cluster._slots = (0.0, 0)  # count again now
            # the new worker registers with the scheduler a moment before the cluster lists it
            if cluster.worker_threads() == 1 and len(local.workers) == 1:
                break
            time.sleep(0.5)
        assert cluster.worker_threads() == 1 and len(local.workers) == 1


def test_a_cluster_left_without_workers_stops_the_run_resumably(monkeypatch):
    """When no worker comes back, the run stops with the counts and the way to resume, instead of
    waiting for ever."""
    paths = [f"tile{i:02d}.png" for i in range(8)]
    stalled = Workers(1, poisons=set())
    stalled.next_batch = lambda block: []  # nothing completes: no worker runs anything
    monkeypatch.setattr(dask_run, "_Chunks", lambda client, job, todo: RealChunks(stalled, job, todo, stalled))
    monkeypatch.setattr(dask_run, "NO_WORKERS_TIMEOUT_S", 0.3)
    monkeypatch.setattr(dask_run, "POLL_SECONDS", 0.01)
    no_workers = type("NoWorkers", (), {"backend_name": "reference", "threads": 1, "client": None,
                                        "worker_threads": lambda self: 0})()
    engine = dask_run.DaskEngine(no_workers, workers=1, labels_of=PerImage(default_label))
    with pytest.raises(UsageError, match=r"the Dask cluster has had no workers for 0 s; stopped after 0 of 8 "
                                         r"images .*; start workers and run the same command again to resume"):
        engine.run(paths, sink=None)


class LostThenKilled:
    """A future whose result was lost with its worker before the client fetched it, and whose rerun then
    lost its workers too: Dask's ``as_completed`` never yields it (its fetch raises inside it)."""

    status = "error"

    def exception(self):
        from distributed import KilledWorker

        return KilledWorker("key", None, 0)


def test_a_chunk_whose_result_was_lost_and_whose_rerun_died_is_not_waited_for_for_ever(monkeypatch):
    """Reproduced with real workers: a task that finished, whose worker was killed while its result
    travelled and whose rerun was killed too, ended in status "error" and as_completed never
    yielded it; the run polled for it for ever. It is run again in halves, as any killed chunk."""
    import threading

    paths = [f"tile{i:02d}.png" for i in range(8)]
    cluster = Workers(1, poisons=set())
    submit = cluster.submit
    lost = []

    def submit_losing_the_first(function, job, chunk, key):
        if lost:
            return submit(function, job, chunk, key)
        lost.append(LostThenKilled())
        return lost[0]

    cluster.submit = submit_losing_the_first
    monkeypatch.setattr(dask_run, "_Chunks", lambda client, job, todo: RealChunks(cluster, job, todo, cluster))
    monkeypatch.setattr(dask_run, "POLL_SECONDS", 0.01)
    one_slot = type("OneSlot", (), {"backend_name": "reference", "threads": 1, "client": None,
                                    "worker_threads": lambda self: 1})()
    records, stop, summaries = [], threading.Event(), []
    sink = type("Sink", (), {"write": lambda self, batch: records.extend(batch)})()
    engine = dask_run.DaskEngine(one_slot, workers=1, labels_of=PerImage(default_label))
    run = threading.Thread(target=lambda: summaries.append(engine.run(paths, sink, stop=stop)))
    run.start()
    run.join(timeout=30)
    stop.set()  # (ends the run that waits for ever)
    run.join()
    assert summaries[0].total == 8 and not summaries[0].interrupted
    assert sorted(record["path"] for record in records) == paths
    assert not any("error" in record for record in records)


class Scripted(Workers):
    """The stand-in cluster, whose ``next_batch`` answers ``script[k]()`` at its k-th call (then nothing),
    and which notes the futures cancelled."""

    def __init__(self, script) -> None:
        super().__init__(1, poisons=set())
        self.script, self.cancelled = list(script), []

    def cancel(self, futures) -> None:
        self.cancelled += futures
        super().cancel(futures)

    def next_batch(self, block: bool):
        return self.script.pop(0)() if self.script else []

    def complete_first(self):
        """The first chunk held, done: one result record per path."""
        (future, chunk) = self.held[0].pop(0)
        return [(future, dask_run.ChunkResult([{"path": path, "width": 1, "height": 1, "label": "smooth"}
                                               for path in chunk], 0.01))]


def scripted_engine(monkeypatch, script, slots=lambda: 1):
    """A DaskEngine on a :class:`Scripted` stand-in whose task slots are ``slots()``, and the stand-in."""
    cluster = Scripted(script)
    monkeypatch.setattr(dask_run, "_Chunks", lambda client, job, todo: RealChunks(cluster, job, todo, cluster))
    monkeypatch.setattr(dask_run, "POLL_SECONDS", 0.01)
    slotted = type("Slotted", (), {"backend_name": "reference", "threads": 1, "client": None,
                                   "worker_threads": lambda self: slots()})()
    return dask_run.DaskEngine(slotted, workers=1, labels_of=PerImage(default_label)), cluster


def test_a_stop_writes_the_chunks_completed_meanwhile_and_cancels_the_others(monkeypatch):
    """docs/distributed.md, Ctrl-C: the client writes the chunks that have completed and cancels the
    rest; the run is interrupted even though every path was submitted (the second chunk never came)."""
    import threading

    paths = [f"tile{i:02d}.png" for i in range(32)]  # two chunks of 16 on one slot: both in flight
    stop = threading.Event()
    engine, cluster = scripted_engine(monkeypatch, [lambda: stop.set() or [], lambda: cluster.complete_first()])
    records = []
    sink = type("Sink", (), {"write": lambda self, batch: records.extend(batch)})()
    summary = engine.run(paths, sink, stop=stop)
    assert [record["path"] for record in records] == paths[:16]  # the chunk that completed as the run stopped
    assert summary.total == 16 and summary.interrupted
    assert len(cluster.cancelled) == 1 and cluster.held == [[]]  # the second chunk, cancelled


@pytest.mark.parametrize("error", [dask_run.ChunkFailed("worker tcp://w:1 cannot run the job: no such backend"),
                                   dask_run.SinkWriteError(errno.ENOSPC, "cannot write the edge map e.png: full")])
def test_after_a_signal_a_failed_chunk_does_not_change_the_exit_status(monkeypatch, error):
    """A chunk that fails as a signal stops the run: the run returns its summary (the command line then
    exits 130 / 143, "after a signal, its exit status wins"), not exit 2 or 3; interrupted, which
    prints how many images were not processed (it was not when that chunk was the last)."""
    import threading

    stop = threading.Event()

    def failed_as_the_signal_came():
        stop.set()
        (future, _) = cluster.held[0].pop(0)
        return [(future, (type(error), error, None))]

    engine, cluster = scripted_engine(monkeypatch, [failed_as_the_signal_came])
    summary = engine.run([f"tile{i}.png" for i in range(8)], sink=None, stop=stop)  # (raised before)
    assert summary.total == 0 and summary.interrupted


def test_chunks_that_fail_together_stop_the_run_naming_the_first(monkeypatch):
    first = dask_run.ChunkFailed("worker tcp://w:1 cannot run the job: backend 'cuda' is unavailable: no GPU")
    second = dask_run.ChunkFailed("worker tcp://w:2: ValueError: something else")

    def both_failed():  # two chunks of 16 on one slot
        (one, _), (two, _) = cluster.held[0]
        cluster.held[0].clear()
        return [(one, (type(first), first, None)), (two, (type(second), second, None))]

    engine, cluster = scripted_engine(monkeypatch, [both_failed])
    with pytest.raises(UsageError, match=r"^worker tcp://w:1 cannot run the job: backend 'cuda' is unavailable: "
                                         r"no GPU; stopped after 0 of 32 images .*; fix the workers and run the "
                                         r"same command again to resume$"):
        engine.run([f"tile{i:02d}.png" for i in range(32)], sink=None)


def test_the_no_workers_timeout_counts_from_the_last_time_the_cluster_had_workers(monkeypatch):
    """A run that has had workers for longer than the timeout and loses them a moment (a worker
    restarting) goes on: the time without workers counts from when they were last seen, not from the start."""
    monkeypatch.setattr(dask_run, "NO_WORKERS_TIMEOUT_S", 1.0)
    slots = iter([1, 1, 0])  # seen at 0 s and 0.6 s, none at 1.2 s: 0.6 s without, 1.2 s since the start
    engine, cluster = scripted_engine(monkeypatch, [lambda: time.sleep(0.6) or [], lambda: time.sleep(0.6) or [],
                                                    lambda: cluster.complete_first()], slots=lambda: next(slots, 1))
    records = []
    sink = type("Sink", (), {"write": lambda self, batch: records.extend(batch)})()
    summary = engine.run([f"tile{i}.png" for i in range(8)], sink)
    assert summary.total == 8 and not summary.interrupted and len(records) == 8


def test_a_chunk_taken_by_its_error_status_is_not_taken_again_when_as_completed_yields_it(monkeypatch):
    """A chunk whose workers died may show its "error" status before ``as_completed`` yields it: it is
    taken then (and run again in halves), and the later yield is ignored, not taken a second time."""
    from distributed import KilledWorker

    killed, lost = KilledWorker("key", None, 0), []

    def error_status_first():
        future, _ = cluster.held[0].pop(0)
        future.status, future.exception = "error", lambda: killed
        lost.append(future)
        return []

    engine, cluster = scripted_engine(monkeypatch, [
        error_status_first, lambda: [(lost[0], (KilledWorker, killed, None))],
        lambda: cluster.complete_first(), lambda: cluster.complete_first()])
    records = []
    sink = type("Sink", (), {"write": lambda self, batch: records.extend(batch)})()
    summary = engine.run([f"tile{i}.png" for i in range(8)], sink)
    assert sorted(record["path"] for record in records) == [f"tile{i}.png" for i in range(8)]
    assert summary.ok == 8 and not summary.interrupted


def test_the_error_record_counts_the_deaths_with_dasks_default_retries():
    from distributed import KilledWorker

    record = dask_run._killer_record("a.png", (KilledWorker, KilledWorker("key", None, 3), None))
    assert record["path"] == "a.png" and record["stage"] == "compute"
    assert record["error"].startswith("8 worker processes died processing this image alone")  # docs/distributed.md


def test_edges_model_auto_and_unreadable_files_behave_as_in_a_local_run(cluster, tiles, tmp_path):
    """distributed.md: a worker that cannot read a path gives it an error record, --save-edges is
    written by the workers, --model travels with every task, --backend auto is resolved on each worker."""
    folder = tmp_path / "images"
    shutil.copytree(tiles, folder)
    (folder / "torn.png").write_bytes((tiles / "tile0000.png").read_bytes()[:100])
    os.mkfifo(folder / "fifo.png")
    options = ["--model", "eurosat", "--backend", "auto", "-q"]
    local = runner.invoke(app, ["run", str(folder), "--out", str(tmp_path / "local.jsonl"),
                                "--save-edges", str(tmp_path / "local-edges"), *options])
    dask = runner.invoke(app, ["run", str(folder), "--out", str(tmp_path / "dask.jsonl"),
                               "--save-edges", str(tmp_path / "dask-edges"), "--dask", cluster.scheduler.address,
                               *options])
    assert local.exit_code == dask.exit_code == 1, (local.output, dask.output)  # the two files that fail
    records, expected = by_path(read_records(tmp_path / "dask.jsonl")), by_path(read_records(tmp_path / "local.jsonl"))
    assert len(records) == 202 and records.keys() == expected.keys()
    differing = {key for path in records for key in records[path] if records[path][key] != expected[path].get(key)}
    assert records == expected, (differing, next(iter(records.values())), next(iter(expected.values())))
    assert records[str(folder / "fifo.png")]["stage"] == "read"
    assert records[str(folder / "torn.png")]["stage"] == "decode"
    assert {record.get("backend") for record in records.values()} == {None, registry.resolve("auto")}
    assert {record.get("label") for record in records.values()} <= {None, *load_model("eurosat").classes}
    edges = sorted(path.relative_to(tmp_path / "dask-edges") for path in (tmp_path / "dask-edges").rglob("*.png"))
    assert len(edges) == 200
    assert edges == sorted(path.relative_to(tmp_path / "local-edges")
                           for path in (tmp_path / "local-edges").rglob("*.png"))
    for name in edges:
        assert (tmp_path / "dask-edges" / name).read_bytes() == (tmp_path / "local-edges" / name).read_bytes()


def test_each_worker_chooses_the_decode_threads_not_given(monkeypatch):
    """distributed.md: --workers defaults to the worker's compute threads, or to its cores."""
    from gpu_pipeline.config import DecodeOptions, PipelineConfig

    chosen = []

    class Recorder:
        def __init__(self, **settings):
            chosen.append(settings["workers"])

        def run(self, paths, sink):
            return types.SimpleNamespace(seconds=0.0)

    monkeypatch.setattr(dask_run, "Engine", Recorder)
    monkeypatch.setattr(dask_run, "usable_cores", lambda: 13)  # a worker's cores, its CPU quota counted
    for threads, decode_workers in [(None, None), (3, None), (3, 5), (None, 5)]:
        job = dask_run.ChunkJob("reference", threads, PipelineConfig(), DecodeOptions(), 64, decode_workers,
                                default_label, None)
        dask_run.process_chunk(job, [])
    assert chosen == [13, 3, 5, 5]


def test_a_worker_keeps_its_backend_between_tasks(monkeypatch, tmp_path):
    """distributed.md: each worker process keeps its backend between tasks (JIT loading and GPU
    set-up once per process); a task for another backend or thread count replaces it, closed."""
    from gpu_pipeline.backends.reference import ReferenceBackend
    from gpu_pipeline.config import DecodeOptions, PipelineConfig
    from gpu_pipeline.labels.labeller import default_labels

    made, closed = [], []

    class Counted(ReferenceBackend):
        name = "counted"

        def __init__(self, threads=None):
            super().__init__(threads=threads)
            made.append(threads)

        def close(self):
            closed.append(self)

    Image.fromarray(np.full((6, 5, 3), 90, np.uint8)).save(tmp_path / "a.png")
    registry.register("counted", lambda: Counted)
    monkeypatch.setattr(dask_run, "_worker_backend", None)
    try:
        for threads in (1, 1, 1, 2):
            job = dask_run.ChunkJob("counted", threads, PipelineConfig(), DecodeOptions(), 64, 1, default_labels, None)
            (record,) = dask_run.process_chunk(job, [str(tmp_path / "a.png")]).records
            assert record["backend"] == "counted" and "error" not in record
    finally:
        registry.unregister("counted")
    assert made == [1, 2] and len(closed) == 1


def test_a_worker_whose_gpu_failed_still_runs_a_job_for_another_backend(monkeypatch, tmp_path, register):
    """The worker closed its cached backend, whose GPU had failed, to make the next job's: the close
    raised the GPU's error again, so every chunk of a CPU job sent to that worker failed with it."""
    from gpu_pipeline.backends.base import DeviceFailed
    from gpu_pipeline.config import DecodeOptions, PipelineConfig
    from gpu_pipeline.labels.labeller import default_labels
    from tests.backend_doubles import FailingDevice, failing_after

    Image.fromarray(np.full((6, 5, 3), 90, np.uint8)).save(tmp_path / "a.png")
    register(FailingDevice)
    monkeypatch.setattr(dask_run, "_worker_backend", None)
    failing_after(0)
    try:
        on_gpu = dask_run.ChunkJob("failing-device", 1, PipelineConfig(), DecodeOptions(), 64, 1, default_labels, None)
        with pytest.raises(DeviceFailed):
            dask_run.process_chunk(on_gpu, [str(tmp_path / "a.png")])
        on_cpu = dask_run.ChunkJob("reference", 1, PipelineConfig(), DecodeOptions(), 64, 1, default_labels, None)
        (record,) = dask_run.process_chunk(on_cpu, [str(tmp_path / "a.png")]).records
    finally:
        failing_after(None)
    assert record["backend"] == "reference" and "error" not in record


def test_a_worker_labels_with_the_cnn_on_its_host(monkeypatch, tmp_path, bundled_data_dir):
    """backends.md: a worker's backend serves every task, of any client, so the CNN is never
    attached to it (it would leak into the next task); the labels are the network's, from the host."""
    from gpu_pipeline.backends.reference import ReferenceBackend
    from gpu_pipeline.config import DecodeOptions, PipelineConfig
    from gpu_pipeline.inputs.decode import decode_image

    offered = []

    class Offered(ReferenceBackend):
        name = "offered"

        def attach_label_model(self, model):
            offered.append(model)
            return True

    model = load_model("eurosat-cnn")
    paths = sorted(str(path) for path in (bundled_data_dir / "eurosat" / "River").iterdir())
    registry.register("offered", lambda: Offered)
    monkeypatch.setattr(dask_run, "_worker_backend", None)
    try:
        job = dask_run.ChunkJob("offered", 1, PipelineConfig(), DecodeOptions(), 64, 1, model.labels, None)
        records = dask_run.process_chunk(job, paths).records
    finally:
        registry.unregister("offered")
    assert offered == []
    from cpu_reference import cnn as reference_cnn

    expected = reference_cnn.predict(model.network, [decode_image(Path(path), DecodeOptions()) for path in paths])
    assert [record["label"] for record in records] == [model.classes[k] for k in expected]


def test_resume_with_dask_completes_a_partial_output_without_duplicates(cluster, tiles, tile_records, tmp_path):
    out = tmp_path / "dask.jsonl"
    local = tmp_path / "first.jsonl"
    assert run(str(tiles), "--out", str(local)).exit_code == 0
    lines = local.read_bytes().splitlines(keepends=True)
    partial = b"".join(lines[:70]) + lines[70][:40]  # 70 whole records and a torn one
    out.write_bytes(partial)
    (tmp_path / "dask.jsonl.settings.json").write_bytes((tmp_path / "first.jsonl.settings.json").read_bytes())
    result = run(str(tiles), "--out", str(out), "--dask", cluster.scheduler.address)
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"".join(lines[:70]))
    assert by_path(read_records(out)) == tile_records


def many_tiles(tmp_path: Path, count: int = 2000) -> Path:
    """``count`` hard links to one 64x64 tile: enough work that a signal lands mid-run."""
    folder = tmp_path / "many"
    folder.mkdir()
    first = folder / "tile00000.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(first)
    for index in range(1, count):
        os.link(first, folder / f"tile{index:05d}.png")
    return folder


def start_local_cluster_run(folder: Path, out: Path) -> subprocess.Popen:
    """``run --dask local:2`` in a session of its own, returned once its first records are written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", str(out), "--backend", "reference",
         "--dask", "local:2"], cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return process


@pytest.mark.parametrize("sig, group, code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143),
                                              (signal.SIGHUP, True, 129)])
def test_a_signal_stops_a_local_cluster_run_cleanly_keeping_whole_records(tmp_path, sig, group, code, hangups_heard):
    """Ctrl-C reaches the client and its worker processes (a terminal signals the group), and so does
    the hangup of a terminal that closed; `kill` or a service manager's SIGTERM may reach the client alone."""
    folder = many_tiles(tmp_path)
    out = tmp_path / "dask.jsonl"
    process = start_local_cluster_run(folder, out)
    if group:
        os.killpg(process.pid, sig)
    else:
        os.kill(process.pid, sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    recorded = len(by_path(read_records(out)))
    assert 0 < recorded < 2000
    assert f"interrupted: {2000 - recorded:,} images not processed; run the same command again to resume" in stderr


#: A ``sitecustomize`` for the client of a run: the file ``$CLUSTER_STARTING_MARK`` appears as
#: ``LocalCluster``'s constructor starts.
CLUSTER_STARTING_MARKER = """
import os
mark = os.environ.pop("CLUSTER_STARTING_MARK", None)  # (the client's alone: its workers do not get it)
if mark:
    import gpu_pipeline.engine.distributed as dask_run

    imported = dask_run._import_distributed

    def marking():
        distributed = imported()
        real = distributed.LocalCluster.__init__
        if not hasattr(real, "marking"):
            def starting(self, *args, **kwargs):
                open(mark, "a").close()
                real(self, *args, **kwargs)

            starting.marking = True
            distributed.LocalCluster.__init__ = starting
        return distributed

    dask_run._import_distributed = marking
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="finds the run's processes in Linux's /proc")
@pytest.mark.parametrize("sig, group, code", [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)])
def test_a_signal_as_the_local_cluster_starts_closes_it_quietly(tmp_path, sig, group, code):
    """A SIGTERM to the client as ``LocalCluster`` starts (a service stopped as the nightly job
    begins; or a Ctrl-C) interrupted its constructor: the cluster, half made, was left to Dask's own clean-up at
    exit, which printed its scheduler's log lines on the run's stderr ("Closing scheduler. Reason:
    unknown") or aborted (exit 134). The run now holds the signal until the cluster is its own, closes
    it, and exits 143 (130), quietly, with nothing written and no process left. (A race: the unfixed code
    failed about one try in three, so three tries.)"""
    from tests.runs import sitecustomize, wait_until

    folder = many_tiles(tmp_path)
    for attempt in range(3):
        out = tmp_path / f"dask{attempt}.jsonl"
        mark = tmp_path / f"cluster-starting{attempt}"
        env = dict(os.environ, CLUSTER_STARTING_MARK=str(mark),
                   **sitecustomize(tmp_path / "site", CLUSTER_STARTING_MARKER))
        process = subprocess.Popen(
            [sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", str(out), "--backend",
             "reference", "--dask", "local:2"], cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=env)
        try:
            wait_until(mark.exists, "the local cluster starting")
            if group:  # (a terminal's Ctrl-C: the whole group)
                os.killpg(process.pid, sig)
            else:
                os.kill(process.pid, sig)
            _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
        assert process.returncode == code, stderr
        assert stderr == ""
        assert not out.exists()
        deadline = time.monotonic() + 30
        while session_processes(process.pid):
            assert time.monotonic() < deadline, f"left behind: {session_processes(process.pid)}"
            time.sleep(0.1)


def session_processes(session: int) -> list[int]:
    """The processes still alive in ``session`` (Linux's /proc)."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat[stat.rindex(")") + 2:].split()[3]) == session:
            alive.append(int(entry.name))
    return alive


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="finds the run's processes in Linux's /proc")
def test_a_client_that_dies_at_once_leaves_no_noise_and_no_process(tmp_path):
    """A second Ctrl-C a second after the first (docs/nightly.md), or kill -9, ends the client at once,
    without Python's clean-up. Multiprocessing's resource tracker, a process that outlives it, then
    printed "UserWarning: resource_tracker: There appear to be 12 leaked semaphore objects to clean up
    at shutdown" (the queues of Dask's nannies) on the user's terminal. The run resumes."""
    folder = many_tiles(tmp_path)
    out = tmp_path / "dask.jsonl"
    process = start_local_cluster_run(folder, out)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)  # to the end: the processes that share the stream closed it
    assert process.returncode == -signal.SIGKILL
    assert stderr == ""
    deadline = time.monotonic() + 30
    while session_processes(process.pid):  # the workers see their parent die
        assert time.monotonic() < deadline, f"left behind: {session_processes(process.pid)}"
        time.sleep(0.1)
    result = subprocess.run(
        [sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", str(out), "--backend", "reference",
         "--dask", "local:2", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert len(by_path(read_records(out))) == 2000 == len(read_records(out))


def signals_blocked(pid: int) -> int:
    """The signal mask of process ``pid``'s main thread (Linux's /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk for {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks in Linux's /proc")
def test_local_cluster_workers_ignore_the_terminal_from_their_first_instruction():
    """A Ctrl-C while a worker of ``local:N`` started (the first second of a run, or after a worker
    died and was restarted) printed its KeyboardInterrupt traceback, or "Fatal Python error:
    init_import_site", under the run's own message: the preload that ignores SIGINT comes after
    Python's and Dask's imports. Each worker starts with SIGINT blocked, restarted ones too; and
    SIGHUP, which the terminal sends its process group as it closes (it killed every worker)."""
    terminal = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGHUP - 1))
    with dask_run.DaskCluster("local:1", "reference", None) as cluster:
        assert not signals_blocked(os.getpid()) & terminal  # this process still takes Ctrl-C
        (first,) = cluster.client.run(os.getpid).values()
        assert signals_blocked(first) & terminal == terminal
        os.kill(first, signal.SIGKILL)  # its nanny starts another
        deadline = time.monotonic() + 60
        while (pids := list(cluster.client.run(os.getpid, on_error="ignore").values())) in ([], [first]):
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(0.2)
        assert signals_blocked(pids[0]) & terminal == terminal


class NowhereBackend(Backend):
    """A backend that no worker can run, as a GPU backend on CPU-only workers."""

    name = "nowhere"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return "this worker has no nowhere device"

    def process(self, images, config, keep_images=False):
        raise AssertionError("never called")


@contextlib.contextmanager
def here_and_on_the_workers(cluster, setup, teardown):
    """``setup`` in this process and on every worker of ``cluster`` for the block, ``teardown`` after."""
    setup()
    cluster.run(setup)
    try:
        yield
    finally:
        cluster.run(teardown)
        teardown()


def register_nowhere() -> None:
    registry.register("nowhere", lambda: NowhereBackend)


def unregister_nowhere() -> None:
    registry.unregister("nowhere")


def test_a_backend_the_workers_lack_exits_2_naming_the_worker_and_the_reason(cluster, tiles, tmp_path):
    out = tmp_path / "dask.jsonl"
    with here_and_on_the_workers(cluster, register_nowhere, unregister_nowhere):
        result = run(str(tiles), "--out", str(out), "--dask", cluster.scheduler.address, backend="nowhere")
    assert result.exit_code == 2
    assert "this worker has no nowhere device" in result.stderr
    assert any(f"worker {address}" in result.stderr for address in cluster.nthreads())
    assert "0 of 200 images" in result.stderr and "Traceback" not in result.output
    assert read_records(out) == []


def fill_the_disk() -> None:
    """On a worker: every edge map meets a full disk (the saver, which the client sends, is pickled
    with its module's names: the disk is filled one module lower, where the map's bytes are written)."""
    from gpu_pipeline.outputs import files

    def no_space(descriptor, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    files.real_write_all, files.write_all = files.write_all, no_space


def empty_the_disk() -> None:
    from gpu_pipeline.outputs import files

    files.write_all = getattr(files, "real_write_all", files.write_all)


def test_a_full_disk_under_save_edges_on_the_workers_exits_3_as_a_local_run_does(cluster, tiles, tmp_path):
    """It said "fix the workers" and exited 2 (a refusal, nothing written) where a local run exits 3."""
    out = tmp_path / "dask.jsonl"
    cluster.run(fill_the_disk)
    try:
        result = run(str(tiles), "--out", str(out), "--dask", cluster.scheduler.address,
                     "--save-edges", str(tmp_path / "edges"))
    finally:
        cluster.run(empty_the_disk)
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1, result.stderr
    assert "cannot write the edge map" in result.stderr and os.strerror(errno.ENOSPC) in result.stderr
    assert any(f"worker {address}" in result.stderr for address in cluster.nthreads())
    assert "the records written before are kept" in result.stderr
    resumed = run(str(tiles), "--out", str(out), "--dask", cluster.scheduler.address,
                  "--save-edges", str(tmp_path / "edges"))
    assert resumed.exit_code == 0, resumed.output
    assert len(by_path(read_records(out))) == 200 and len(list((tmp_path / "edges").iterdir())) == 200


def register_failing_device() -> None:
    """Here or on a worker: the backend ``failing-device``, whose GPU fails at its first call."""
    from tests.backend_doubles import FailingDevice, failing_after

    registry.register("failing-device", lambda: FailingDevice)
    failing_after(0)


def unregister_failing_device() -> None:
    from tests.backend_doubles import failing_after

    failing_after(None)
    registry.unregister("failing-device")


def test_a_workers_gpu_that_fails_for_good_exits_4_as_a_local_run_does(cluster, tiles, tmp_path):
    """Each image of the chunks on that worker got a compute error record (the worker's engine retried
    each alone), and no resume redid them."""
    out = tmp_path / "dask.jsonl"
    with here_and_on_the_workers(cluster, register_failing_device, unregister_failing_device):
        result = run(str(tiles), "--out", str(out), "--dask", cluster.scheduler.address, backend="failing-device")
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1, result.stderr
    assert "the GPU of backend failing-device failed: StickyError: cudaErrorIllegalAddress" in result.stderr
    assert any(f"worker {address}: " in result.stderr for address in cluster.nthreads())
    assert "the records written before are kept" in result.stderr
    assert not any("error" in record for record in read_records(out))
    resumed = run(str(tiles), "--out", str(out), "--dask", cluster.scheduler.address)
    assert resumed.exit_code == 0, resumed.output
    assert len(by_path(read_records(out))) == 200


def test_a_relative_edge_folder_is_the_clients_not_each_workers(tmp_path, monkeypatch):
    """The maps of a --dask run with --save-edges edges went to each worker's own working folder."""
    from gpu_pipeline.outputs.edges import edge_saver

    (tmp_path / "client").mkdir()
    (tmp_path / "worker").mkdir()
    monkeypatch.chdir(tmp_path / "client")
    save = edge_saver(Path("edges"), str(tmp_path))
    monkeypatch.chdir(tmp_path / "worker")  # where the saver runs: a worker started elsewhere
    save(str(tmp_path / "a.png"), np.zeros((2, 2), np.uint8))
    assert os.listdir(tmp_path / "client" / "edges") == ["a.png.edges.png"]
    assert os.listdir(tmp_path / "worker") == []


def test_without_the_dask_extra_exits_2_with_the_install_hint(tiles, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed raises ImportError
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"), "--dask", "local:2")
    assert result.exit_code == 2
    assert "pip install 'gpu-pipeline[dask]'" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("spec, message", [
    ("local:0", "local:N takes"),
    ("local:two", "local:N takes"),
    ("local:\u00b2", "local:N takes"),  # a digit to str.isdigit, not to int(): it was a ValueError traceback
    (f"local:{4 * usable_cores() + 1}", "take at most"),  # each a Python process: far too many
    ("tcp://127.0.0.1:9", "cannot connect to the Dask scheduler at tcp://127.0.0.1:9"),
    ("127.0.0.1:9", "cannot connect to the Dask scheduler at 127.0.0.1:9"),  # host:port means tcp
    ("nonsense://x", "--dask takes local:N or a scheduler address such as tcp://host:8786, got 'nonsense://x'"),
    ("justahost", "--dask takes local:N or a scheduler address such as tcp://host:8786, got 'justahost'"),
    ("tcp://127.0.0.1", "--dask takes local:N or a scheduler address such as tcp://host:8786"),
    ("tcp://127.0.0.1:99999", "ports are 1 to 65535"),  # (it waited the whole --dask-timeout)
    ("127.0.0.1:0", "ports are 1 to 65535"),
])
def test_a_bad_cluster_address_exits_2(tiles, tmp_path, spec, message):
    # (--dask-timeout, not CONNECT_TIMEOUT_S: the option's default is its own 10 s)
    result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"), "--dask", spec, "--dask-timeout", "1")
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_a_scheduler_without_workers_exits_2_after_the_timeout(tiles, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0",
                      silence_logs=logging.ERROR) as empty:
        started = time.monotonic()
        result = run(str(tiles), "--out", str(tmp_path / "o.jsonl"), "--dask", empty.scheduler_address,
                     "--dask-timeout", "2")
        waited = time.monotonic() - started
    assert result.exit_code == 2, result.output
    assert f"the Dask scheduler at {empty.scheduler_address} has no workers (waited 2 s)" in result.stderr
    assert "dask worker" in result.stderr and "Traceback" not in result.output
    assert 2 <= waited < 30
    assert not (tmp_path / "o.jsonl").exists()


def refused_by_an_empty_cluster(match: str) -> None:
    """A DaskCluster on a scheduler without workers is refused (UsageError matching ``match``), and
    the client's loggers, off while it was connected, are as they were."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0", silence_logs=logging.ERROR) as empty:
        levels = [logging.getLogger(name).level for name in dask_run.CLIENT_LOGGERS]
        with pytest.raises(UsageError, match=match):
            dask_run.DaskCluster(empty.scheduler_address, "reference", None, timeout=1)
        assert [logging.getLogger(name).level for name in dask_run.CLIENT_LOGGERS] == levels


def test_a_scheduler_without_workers_leaves_no_client_open(monkeypatch):
    """The refusal closes the connection it made (with local:N, the cluster it started too)."""
    import distributed

    made = []

    class Noted(distributed.Client):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(distributed, "Client", Noted)
    refused_by_an_empty_cluster("has no workers")
    assert len(made) == 1 and made[0].status == "closed"


def test_the_client_and_its_event_loop_log_nothing_while_connected(cluster):
    """A scheduler lost mid-run: Dask's client logs its failed reconnections and tornado, its event
    loop, a fetch of a result that failed ("Exception in callback ... Stream is closed"), each with a
    traceback above the run's own line. Both are off while the client is connected, back after."""
    names = ("distributed.client", "tornado.application")
    before = [logging.getLogger(name).isEnabledFor(logging.ERROR) for name in names]
    with dask_run.DaskCluster(cluster.scheduler.address, "reference", None):
        assert [logging.getLogger(name).isEnabledFor(logging.CRITICAL) for name in names] == [False, False]
    assert [logging.getLogger(name).isEnabledFor(logging.ERROR) for name in names] == before == [True, True]


def test_a_client_that_fails_to_close_leaves_the_refusal_as_it_was(monkeypatch):
    """Dask's client, its scheduler lost as it waited for a worker, failed to close ("RuntimeError:
    Cannot change state of expiring Timeout", a race in Dask): that error replaced the one line
    saying what happened."""
    import distributed

    failed: list = []

    class FailsToClose(distributed.Client):  # (a subclass: clients of other tests collected meanwhile close as ever)
        def close(self, *args, **kwargs):
            super().close(*args, **kwargs)
            if not failed:  # (once: its __del__ closes it again)
                failed.append(self)
                raise RuntimeError("Cannot change state of expiring Timeout")

    monkeypatch.setattr(distributed, "Client", FailsToClose)
    refused_by_an_empty_cluster("has no workers")
    assert len(failed) == 1  # its close was tried, and failed


def test_a_client_that_cannot_connect_leaves_the_loggers_as_they_were(monkeypatch):
    import distributed

    def refused(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(distributed, "Client", refused)
    refused_by_an_empty_cluster("cannot connect to the Dask scheduler")


def test_an_unknown_backend_is_refused_before_any_task(cluster, tiles, tmp_path):
    with pytest.raises(UsageError, match="unknown backend 'nope'"):
        dask_run.DaskCluster(cluster.scheduler.address, "nope", None)


@pytest.mark.parametrize("total, slots", [(1, 1), (17, 2), (5000, 2), (100_000, 80)])
def test_chunk_sizes_cover_the_work_and_adapt_to_the_measured_rate(total, slots):
    sizer = dask_run.ChunkSizer()
    sizes, remaining = [], total
    while remaining:
        size = sizer.next_size(remaining, slots)
        assert 1 <= size <= min(remaining, dask_run.MAX_CHUNK)
        sizes.append(size)
        remaining -= size
        sizer.measured(size, size / 1000)  # 1000 images/s per worker
    assert sum(sizes) == total
    if total >= 4 * slots * dask_run.TARGET_CHUNK_SECONDS * 1000:  # plenty of work: about 2 s per chunk
        assert max(sizes) == int(1000 * dask_run.TARGET_CHUNK_SECONDS)
    assert sizes[0] <= dask_run.FIRST_CHUNK  # nothing measured yet


def test_chunk_sizes_are_the_documented_numbers():
    """distributed.md, "Chunk size": the first chunks hold 128 images; then about 2 s of work at the
    moving average of the measured rates, between 16 and 4,096 images, smaller near the end (the
    remaining images spread over two chunks per worker thread)."""
    assert dask_run.ChunkSizer().next_size(10**6, 4) == 128
    sizer = dask_run.ChunkSizer()
    sizer.measured(1000, 1.0)
    assert sizer.next_size(10**6, 4) == 2000  # 1000 images/s x 2 s
    sizer.measured(3000, 1.0)  # 0.7 x 1000 + 0.3 x 3000 = 1600 images/s: an average, not the last rate
    assert sizer.next_size(10**6, 4) == 3200
    sizer.measured(10**6, 1.0)
    assert sizer.next_size(10**6, 4) == 4096  # the most
    slow = dask_run.ChunkSizer()
    slow.measured(1, 1.0)
    assert slow.next_size(10**6, 4) == 16  # the fewest, though 2 s is 2 images
    assert sizer.next_size(1000, 4) == 125  # near the end: 1000 images over 4 workers x 2 chunks
    assert sizer.next_size(10, 4) == 10  # what is left, if fewer than 16


def test_two_chunks_per_worker_thread_are_in_flight():
    """distributed.md: one running, one waiting, so the client holds at most 2 x workers chunks."""
    cluster = Workers(3, poisons=set())
    chunks = dask_run._Chunks(cluster, None, [f"tile{i:05d}.png" for i in range(10_000)], completed=cluster)
    chunks.submit(slots=3)
    assert len(chunks.in_flight) == 6 and sum(map(len, cluster.held)) == 6


# --- several GPUs: --dask local-cuda (dask-cuda's LocalCUDACluster), tested without a GPU ---------

def test_local_cuda_cluster_has_one_single_threaded_worker_per_visible_gpu():
    from gpu_pipeline.engine.distributed import local_cuda_cluster_options, worker_visible_devices

    gpus = ["0", "1", "2", "3"]
    options = local_cuda_cluster_options(gpus)
    assert options["n_workers"] == 4 and options["threads_per_worker"] == 1
    assert options["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    # each worker sees its own GPU first, which the backends bind as their default device 0
    assert [devices.split(",")[0] for devices in worker_visible_devices(gpus)] == gpus
    assert worker_visible_devices(["2", "5"]) == ["2,5", "5,2"]


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    from gpu_pipeline.engine.distributed import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 1")
    assert visible_gpus() == ["3", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # CUDA's way of hiding every GPU
    assert visible_gpus() == []


def test_local_cuda_without_gpus_or_dask_cuda_is_a_clear_usage_error(monkeypatch):
    import sys
    import types

    from gpu_pipeline.engine import distributed as dist
    from gpu_pipeline.errors import UsageError

    with pytest.raises(UsageError, match="no GPU is visible"):
        dist.local_cuda_cluster_options([])
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # not installed
    with pytest.raises(UsageError, match=r"needs dask-cuda: pip install 'gpu-pipeline\[dask-cuda\]'"):
        dist._local_cuda_cluster()
    import dask

    started, gil_monitor = [], []

    def local_cuda_cluster(**options):
        gil_monitor.append(dask.config.get("distributed.admin.system-monitor.gil.enabled"))
        started.append(options)
        return "cluster"

    fake = types.SimpleNamespace(LocalCUDACluster=local_cuda_cluster)
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert dist._local_cuda_cluster() == "cluster"
    assert started[0]["n_workers"] == 2 and started[0]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert gil_monitor == [False]  # see test_a_local_cluster_starts_no_gil_knocker_in_this_process


def test_a_local_cluster_refuses_a_backend_that_cannot_run_here_before_writing(tiles, tmp_path):
    """``local:N`` runs its workers here: the workers found out, after an empty output and its
    settings were written, and advised a resume that could never work."""
    if registry.unavailable_reason("cuda") is None:
        pytest.skip("cuda can run here")
    out = tmp_path / "x.jsonl"
    result = run(str(tiles), "--out", str(out), "--dask", "local:1", backend="cuda")
    assert result.exit_code == 2 and "backend 'cuda' is unavailable" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no output, no settings record


def test_a_local_cluster_names_the_backend_auto_chose():
    """Its workers run here and choose as this process would: the summary said "backend auto"."""
    from distributed.core import Status

    with dask_run.DaskCluster("local:1", "auto", None) as cluster:
        assert cluster.name.startswith(f"{registry.resolve('auto')} on 1 Dask worker (local:1)")
        local = cluster.cluster
    assert local.status == Status.closed and cluster.client.status == "closed"  # closed with the connection


def start_scheduler(folder: Path) -> tuple[subprocess.Popen, str]:
    """A Dask scheduler in a process of its own, as a user's (its file ``folder / "s.json"``), and its
    address once it has written it."""
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--no-dashboard",
                                  "--port", "0", "--scheduler-file", str(folder / "s.json")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # (the scheduler writes its file as it starts: whole, then)
        with contextlib.suppress(OSError, ValueError):
            return scheduler, json.loads((folder / "s.json").read_text())["address"]
        time.sleep(0.1)
    scheduler.kill()
    scheduler.wait()
    raise AssertionError("the Dask scheduler did not write its address within 60 s")


@pytest.mark.slow
def test_a_scheduler_lost_mid_run_ends_it_in_one_line_and_keeps_the_records(tmp_path):
    """A scheduler that dies (SIGKILL) during a run: exit 2 with the run's one line, the records written
    before kept whole for the resume, and none of Dask's client log records (tracebacks) on stderr."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for index in range(3000):  # (the reference backend: a few seconds of work for one worker thread)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(folder / f"t{index:04d}.png",
                                                                           compress_level=0)
    scheduler, address = start_scheduler(tmp_path)
    started = [scheduler]
    try:
        started.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                         str(tmp_path / "s.json"), "--nthreads", "1", "--no-dashboard"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = tmp_path / "o.jsonl"
        process = subprocess.Popen([sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", str(out),
                                    "--dask", address, "--backend", "reference", "-q", "--dask-timeout", "30"],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(process)
        deadline = time.monotonic() + 120
        while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.05)
        started[0].kill()  # the scheduler
        _, stderr = process.communicate(timeout=120)
    finally:
        for each in started:
            each.kill()
            each.wait()
    assert process.returncode == 2, stderr
    assert "the scheduler was lost or restarted" in stderr  # not "fix the workers": nothing is wrong with them
    assert "start the scheduler and its workers again and run the same command again to resume" in stderr
    assert "Traceback" not in stderr and "distributed" not in stderr, stderr
    assert stderr.count("\n") == 1, stderr
    records = read_records(out)
    assert 0 < len(records) < 3000 and len(by_path(records)) == len(records)


def test_a_scheduler_lost_while_waiting_for_a_worker_is_not_said_to_have_no_workers(tmp_path, monkeypatch):
    """A scheduler that dies (SIGKILL) while the client waits for its first worker: the line says the
    scheduler was lost, not that it "has no workers (waited N s)", which sent the user to start
    workers against an address where nothing listens any more."""
    import distributed

    scheduler, address = start_scheduler(tmp_path)
    try:
        wait_for_workers = distributed.Client.wait_for_workers

        def scheduler_killed_first(client, *args, **kwargs):
            scheduler.kill()
            scheduler.wait()
            return wait_for_workers(client, *args, **kwargs)

        monkeypatch.setattr(distributed.Client, "wait_for_workers", scheduler_killed_first)
        with pytest.raises(UsageError) as refused:
            dask_run.DaskCluster(address, "reference", None, timeout=2)
    finally:
        scheduler.kill()
        scheduler.wait()
    assert str(refused.value).startswith(f"lost the Dask scheduler at {address} while waiting for a worker: ")
    assert "has no workers" not in str(refused.value)
