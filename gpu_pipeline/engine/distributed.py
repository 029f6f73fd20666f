"""``gpu-pipeline run --dask``: the same job on a Dask cluster, each record written exactly once.

The client (this process) discovers the files, opens the sink and filters what is already recorded,
exactly as a local run does. It then cuts ``todo`` into chunks of paths and submits one task per
chunk, a bounded number at a time. On a worker a task decodes its paths and runs the backend through
the same :class:`~gpu_pipeline.engine.stream.Engine` as a local run, and returns records only: pixels never
travel through the scheduler. The client writes each chunk's records through the sink when the
chunk's future completes. A future completes once, even when Dask reruns its task because a worker
died, so every path is written once; a rerun resumes from the sink like a local run. A chunk whose
workers die every time (past Dask's allowed failures) is run again in halves until the one image
that kills them is alone; that image then runs with nothing else in flight, and once it has killed
its workers so, twice, it gets an error record and the run goes on.

Chunks aim at :data:`TARGET_CHUNK_SECONDS` of work each, from the throughput measured on the
chunks already done: long enough that the scheduler sees a few tasks per second per worker, short
enough that a killed worker loses little and the last chunks end together.

Dask is optional (the ``dask`` extra) and imported only when ``--dask`` is used.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from gpu_pipeline import __version__
from gpu_pipeline.backends import Backend, BackendUnavailable, create
from gpu_pipeline.backends.base import DeviceFailed
from gpu_pipeline.backends.registry import backend_names, resolve, unavailable_reason
from gpu_pipeline.labels.labeller import Labeller
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine.cores import usable_cores, usable_memory
from gpu_pipeline.engine.decoding import decoding_budget
from gpu_pipeline.engine.stream import Engine, RunSummary
from gpu_pipeline.errors import UsageError, counted, one_line
from gpu_pipeline.outputs.sink import RecordList, SinkWriteError  # (the worker returns its records, unwritten)

INSTALL_HINT = "--dask needs Dask distributed: pip install 'gpu-pipeline[dask]'"
#: How long to wait for the scheduler to answer and for a first worker to join it (``--dask-timeout``).
CONNECT_TIMEOUT_S = 10.0
#: Work per chunk the client aims at, once it has measured the workers' throughput.
TARGET_CHUNK_SECONDS = 2.0
#: Chunk sizes before any measurement, and the bounds of the measured ones. 4096 records are
#: about 6 MB of results per task, still a small message.
FIRST_CHUNK, MIN_CHUNK, MAX_CHUNK = 128, 16, 4096
#: Chunks in flight per worker thread: one running, one waiting, so no worker idles between tasks.
IN_FLIGHT_PER_THREAD = 2
#: Times an image must kill its workers while it runs alone on the cluster before it gets an error
#: record. Alone: a worker's death also fails the tasks queued behind the one it was running, so an
#: innocent image in a one-image chunk dies beside a poisonous one. Twice: a death alone can still be
#: a coincidence (a node lost, another program's memory).
LONE_DEATHS_TO_BLAME = 2
#: How often the client looks at ``stop`` while no chunk completes.
POLL_SECONDS = 0.1
#: How often the client asks the scheduler how many workers there are (they may come and go).
SLOTS_REFRESH_SECONDS = 5.0
#: How long the run waits for a worker when the cluster has none left before it stops (resumable).
NO_WORKERS_TIMEOUT_S = 60.0


class ChunkFailed(RuntimeError):
    """A chunk could not run on a worker; the message names the worker and says why."""


@dataclass(frozen=True)
class ClusterFailure:
    """Why the cluster cannot go on with the run, and what to fix before the same command resumes it
    (a lost scheduler was answered "fix the workers")."""

    reason: str
    fix: str = "fix the workers"


@dataclass(frozen=True)
class ChunkJob:
    """Everything a worker needs besides the paths: the Engine's settings, sent with every task."""

    backend_name: str
    threads: int | None
    config: PipelineConfig
    decode_options: DecodeOptions
    batch_size: int
    decode_workers: int | None  # None: as many as the worker's compute threads, or its cores
    labels_of: Labeller
    on_edges: Callable[[Path, np.ndarray], None] | None
    version: str = __version__  # the client's gpu-pipeline: a worker of another one refuses the job


# ---------------------------------------------------------------- worker side

#: The backend of this worker process, kept across tasks (JIT loading and GPU setup happen once),
#: with the (name, threads) it was made for.
_worker_backend: tuple[tuple[str, int | None], Backend] | None = None
#: One chunk at a time per worker process: a chunk is parallel already (decode pool, backend threads),
#: and GPU backends keep one set of buffers.
_worker_lock = threading.Lock()


@dataclass
class ChunkResult:
    """What a task returns: the chunk's records (one per path, in order) and the seconds they took."""

    records: list[dict]
    seconds: float


#: What a terminal sends its whole process group: Ctrl-C, and a hangup when it closes.
TERMINAL_SIGNALS = {signal.SIGINT} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())


def dask_setup(worker) -> None:
    """Preload hook of the worker processes that ``local:N`` starts (and restarts).

    They share the terminal's process group, so Ctrl-C and a hangup reach them too; the client alone
    handles them (it cancels what is pending and closes the cluster), instead of every worker dying.
    """
    for signum in TERMINAL_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextmanager
def workers_ignore_the_terminal() -> Iterator[None]:
    """SIGINT and SIGHUP blocked in this thread while a local cluster starts: the cluster's IO-loop
    thread, which starts (and restarts) its worker processes, inherits the mask, and so does every worker from
    its first instruction. :func:`dask_setup` comes only after Python and Dask are imported, and a
    Ctrl-C before it printed the workers' KeyboardInterrupt tracebacks under the run's own message
    (5 of 14 Ctrl-Cs 0.6-1 s after the start; one at any time after a worker died and was being
    restarted). A Ctrl-C meanwhile reaches this process once the cluster is up."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to share a Ctrl-C
        yield
        return
    start_quiet_resource_tracker()  # started on first use, it unblocks SIGINT in the thread that starts it
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextmanager
def sigterm_held(held: list[int]) -> Iterator[None]:
    """A SIGTERM noted in ``held``, not acted on, while a local cluster starts (in the main thread;
    elsewhere Python runs no signal handler). One that interrupted ``LocalCluster``'s constructor
    left a cluster half made to Dask's own clean-up at exit, which printed its scheduler's log lines
    on the run's stderr. The caller closes the cluster, then sends it again (:func:`send_again`).
    Not blocked, as SIGINT is (:func:`workers_ignore_the_terminal`): the workers would inherit the mask,
    and their nannies stop them with SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:  # (None: a handler set outside Python, which Python cannot put back)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def send_again(held: list[int]) -> None:
    """The first signal that :func:`sigterm_held` noted, sent to this process again: its own handler
    (the command line's: exit 143) or the system's default acts on it now."""
    if held:
        os.kill(os.getpid(), held[0])


def start_quiet_resource_tracker() -> None:
    """Multiprocessing's resource tracker, started (unless it runs already) without its warnings.

    It outlives this process and unlinks the semaphores this process left: when the client dies at
    once (a second Ctrl-C, kill -9), those of Dask's nannies, and it printed "UserWarning:
    resource_tracker: There appear to be 12 leaked semaphore objects to clean up at shutdown" on the
    user's terminal. It takes this process's -W options as it starts, and its signal mask: it ignores
    Ctrl-C itself, not the hangup of a terminal that closed, which killed it (its relaunch warned)."""
    from multiprocessing import resource_tracker

    quiet = "ignore:::multiprocessing.resource_tracker"
    sys.warnoptions.append(quiet)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS) if hasattr(signal, "pthread_sigmask") else None
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(quiet)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _this_worker() -> str:
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:  # not inside a Dask worker (a direct call in a test)
        return f"pid {os.getpid()}"


def _worker_memory() -> int | None:
    """The memory this worker may use: its process's, capped by the worker's Dask memory limit
    (a local cluster gives each worker an equal share of the machine, and its nanny kills a worker
    near its limit)."""
    from distributed import get_worker

    memory = usable_memory()
    try:
        limit = get_worker().memory_manager.memory_limit
    except (ValueError, AttributeError):  # not inside a Dask worker (a direct call in a test), an older Dask
        limit = None
    limits = [size for size in (memory, limit) if size]
    return min(limits) if limits else None


def _backend_for(job: ChunkJob) -> Backend:
    """This process's backend for ``job``, created on first use; ChunkFailed if it cannot run here."""
    global _worker_backend
    key = (job.backend_name, job.threads)
    if _worker_backend is not None and _worker_backend[0] == key:
        return _worker_backend[1]
    if _worker_backend is not None:
        with _worker_backend[1]:  # closed; a failed GPU's close raises nothing (a CPU job may follow)
            _worker_backend = None
    try:
        backend = create(job.backend_name, threads=job.threads)
    except (KeyError, BackendUnavailable) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) else str(exc)
        raise ChunkFailed(f"worker {_this_worker()} cannot run the job: {reason}") from None
    _worker_backend = (key, backend)
    return backend


def process_chunk(job: ChunkJob, paths: Sequence[str]) -> ChunkResult:
    """Run one chunk of paths on this worker."""
    if job.version != __version__:  # its records could differ from the others' (a kernel fixed since)
        raise ChunkFailed(f"worker {_this_worker()} runs gpu-pipeline {__version__}, the client {job.version}: "
                          "install the same version on every worker")
    with _worker_lock:
        backend = _backend_for(job)
        engine = Engine(backend=backend, config=job.config, decode_options=job.decode_options,
                        batch_size=job.batch_size,
                        workers=job.decode_workers or job.threads or usable_cores(), labels_of=job.labels_of,
                        on_edges=job.on_edges, processes=False,  # Dask's worker processes are the scale-out here
                        decoding_budget_bytes=decoding_budget(_worker_memory()))
        records = RecordList()
        try:
            summary = engine.run([Path(path) for path in paths], records)
        except SinkWriteError as exc:  # (--save-edges on a full disk: the client exits 3, as a local run)
            raise SinkWriteError(exc.errno, f"worker {_this_worker()}: {exc.strerror}") from None
        except DeviceFailed as exc:  # (its GPU failed for good: the client exits 4, as a local run)
            raise DeviceFailed(f"worker {_this_worker()}: {exc}") from None
        except Exception as exc:  # the engine turns per-image trouble into records; this is not that
            raise ChunkFailed(f"worker {_this_worker()}: {one_line(exc)}") from exc
    return ChunkResult(list(records), summary.seconds)


# ---------------------------------------------------------------- client side


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return distributed


def without_gil_monitor():
    """Dask settings for the clusters this process starts: no GIL-contention monitor.

    Where gilknocker is installed, Dask's scheduler and each nanny (all in this process for a local
    cluster) start its native thread that knocks on the GIL. One still knocking while the interpreter
    shuts down aborts the process ("FATAL: exception not rethrown", exit 134) after every record was
    written: 5 of 153 ``--dask local:2`` runs on a loaded 2-core machine did. The workers inherit the
    settings.
    """
    import dask

    return dask.config.set({"distributed.admin.system-monitor.gil.enabled": False})


@contextmanager
def dask_logs_off() -> Iterator[None]:
    """No log records from Dask's scheduler and nannies in this process while they close.

    A local cluster's scheduler runs in this process and logs, at the CRITICAL level and with a
    traceback, a result it could not send to the client that has just closed ("Closed comm ...
    while trying to write"): after a Ctrl-C, when results were still arriving, a user saw a Dask
    traceback under the run's own message. The run is over by then and its records are written.
    (The client's own logger is off for as long as it is connected: :func:`loggers_off`.)
    """
    restore = loggers_off(("distributed",))
    try:
        yield
    finally:
        restore()


#: Loggers of Dask's client in this process ("distributed.client" has a level of its own in Dask's
#: logging config): a scheduler lost during a run made the client log each failed reconnection, a
#: chained traceback, above the run's own line saying what happened and how to resume. The client's
#: event loop is tornado's: a result being fetched when the scheduler goes ("Stream is closed") is
#: logged by "tornado.application" as an exception in a callback, a traceback of its own.
CLIENT_LOGGERS = ("distributed", "distributed.client", "tornado.application")


def loggers_off(names: Sequence[str] = CLIENT_LOGGERS) -> Callable[[], None]:
    """Turn the loggers ``names`` off; returns what puts their levels back."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)

    def restore() -> None:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)

    return restore


#: ``local:N`` takes at most this many worker processes per core.
LOCAL_WORKERS_PER_CORE = 4
LOCAL_CUDA = "local-cuda"
DASK_CUDA_HINT = "--dask local-cuda needs dask-cuda: pip install 'gpu-pipeline[dask-cuda]'"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (else numbered from 0)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [name.strip() for name in listed.split(",") if name.strip() and not name.strip().startswith("-")]
    from gpu_pipeline.backends.registry import cuda_driver_loads

    if not cuda_driver_loads():
        return []
    try:
        from numba import cuda

        return [str(number) for number in range(len(cuda.gpus))]
    except Exception:  # a driver without a usable device
        return []


def local_cuda_cluster_options(gpus: Sequence[str]) -> dict:
    """LocalCUDACluster's arguments: one single-threaded worker process per GPU (dask-cuda gives
    worker k CUDA_VISIBLE_DEVICES starting with gpus[k], so its backends bind their device 0)."""
    if not gpus:
        raise UsageError("--dask local-cuda: no GPU is visible here")
    return dict(CUDA_VISIBLE_DEVICES=",".join(gpus), n_workers=len(gpus), threads_per_worker=1,
                dashboard_address=":0", silence_logs=logging.CRITICAL, preload=[__name__])


def worker_visible_devices(gpus: Sequence[str]) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each LocalCUDACluster worker (dask-cuda's rotation): the worker's own
    GPU first, which the backends bind as device 0."""
    return [",".join([*gpus[k:], *gpus[:k]]) for k in range(len(gpus))]


def _local_cuda_cluster():
    try:
        import dask_cuda
    except ImportError:
        raise UsageError(DASK_CUDA_HINT) from None
    options = local_cuda_cluster_options(visible_gpus())
    try:
        with without_gil_monitor(), workers_ignore_the_terminal():
            return dask_cuda.LocalCUDACluster(**options)
    except Exception as exc:
        raise UsageError(f"cannot start a local Dask cluster of {options['n_workers']} GPU workers: "
                         f"{one_line(exc)}") from None


def _local_workers(spec: str) -> int | None:
    """N of ``local:N``; None for a scheduler address."""
    if not spec.startswith("local:"):
        return None
    count = spec.removeprefix("local:")
    # isdecimal, not isdigit: int() refuses digits such as "²", which isdigit takes
    if not count.isdecimal() or int(count) < 1:
        raise UsageError(f"--dask local:N takes a number of worker processes >= 1, got {spec!r}")
    cores = usable_cores()
    if int(count) > LOCAL_WORKERS_PER_CORE * cores:
        # each is a Python process with its own backend: local:200 on 2 cores started for over a
        # minute, and a Ctrl-C then printed tracebacks from the processes still starting
        raise UsageError(f"--dask {spec} starts {int(count)} worker processes on {cores} cores; take at most "
                         f"{LOCAL_WORKERS_PER_CORE * cores} (one per core is the usual choice)")
    return int(count)


def _scheduler_address(spec: str) -> str:
    """``spec`` as a full address (``host:port`` means tcp), checked before any connection attempt.

    A malformed address must not reach ``Client``: it fails half-built there and then hangs a minute
    in its destructor.
    """
    from distributed.comm import get_address_host_port, parse_address
    from distributed.comm.registry import get_backend

    address = spec if "://" in spec else "tcp://" + spec
    try:
        scheme, _ = parse_address(address, strict=True)
        get_backend(scheme)
        if scheme in ("tcp", "tls") and not 0 < get_address_host_port(address)[1] < 65536:
            raise ValueError("ports are 1 to 65535")  # (it waited the whole --dask-timeout for port 99999)
    except ValueError as exc:
        raise UsageError(f"--dask takes local:N or a scheduler address such as tcp://host:8786, "
                         f"got {spec!r} ({exc})") from None
    return address


def _check_scheduler(address: str, spec: str, timeout: float) -> None:
    """Ask ``address`` who it is, within ``timeout`` seconds; UsageError unless a Dask scheduler answers.

    ``Client`` alone can wait far longer than its timeout when something that is not a scheduler
    (an HTTP server) accepts the connection and never answers, or fail with a confusing error when
    it answers garbage.
    """
    import asyncio

    from distributed.comm import connect
    from distributed.security import Security

    connection_args = Security().get_connection_args("client")  # TLS settings from Dask's config, as Client

    async def identity():
        comm = await connect(address, timeout=timeout, **connection_args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    async def bounded():
        return await asyncio.wait_for(identity(), timeout)

    try:
        answer = asyncio.run(bounded())
    except (Exception, asyncio.CancelledError) as exc:  # refused, timed out, or garbage (even a MemoryError)
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            reason = "no answer"
        elif isinstance(exc, OSError):
            reason = one_line(exc)
        else:
            reason = "what answers there does not speak Dask's protocol"
        raise UsageError(f"cannot connect to the Dask scheduler at {spec} within {timeout:g} s: {reason}") from None
    if not isinstance(answer, dict) or answer.get("type") != "Scheduler":
        raise UsageError(f"{spec} answered, but not as a Dask scheduler")


class DaskCluster:
    """The client's connection to a cluster; in ``run_job`` it stands where the backend would.

    It has the backend's ``name`` (for the summary) and ``close()``. ``local:N`` starts a
    LocalCluster of N worker processes, one thread each, and closes it with the connection.
    """

    def __init__(self, spec: str, backend_name: str, threads: int | None, timeout: float | None = None) -> None:
        distributed = _import_distributed()
        timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
        if backend_name != "auto" and backend_name not in backend_names():
            raise UsageError(f"unknown backend {backend_name!r}; choose from auto, {', '.join(backend_names())}")
        self.spec = spec
        self.backend_name = backend_name
        self.cluster = None
        local_workers = None if spec == LOCAL_CUDA else _local_workers(spec)
        if local_workers is not None and backend_name != "auto":
            # its workers run here: a backend that cannot run here is refused before anything is
            # written, as a local run refuses it (the workers once wrote an empty output, then failed)
            if (reason := unavailable_reason(backend_name)) is not None:
                raise UsageError(f"backend {backend_name!r} is unavailable: {reason}")
        if spec == LOCAL_CUDA:
            self.cluster = _local_cuda_cluster()
            address = self.cluster
        elif local_workers is not None:
            # The processes share this machine's cores: give each its share unless --threads says otherwise.
            threads = threads or max(1, usable_cores() // local_workers)
            # Failed tasks reach the user through the client's message; the workers' own logs would repeat them.
            held: list[int] = []
            try:
                with without_gil_monitor(), workers_ignore_the_terminal(), sigterm_held(held):
                    self.cluster = distributed.LocalCluster(
                        n_workers=local_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                        silence_logs=logging.CRITICAL, preload=[__name__])
            except Exception as exc:  # e.g. worker processes that cannot start: out of memory or processes
                send_again(held)  # (a SIGTERM meanwhile wins)
                raise UsageError(f"cannot start a local Dask cluster of {local_workers} workers: "
                                 f"{one_line(exc)}") from None
            if held:  # the cluster is closed before the signal acts
                with dask_logs_off():
                    self._close_cluster()
                send_again(held)
            address = self.cluster
        else:
            address = _scheduler_address(spec)
            _check_scheduler(address, spec, timeout)
        self.threads = threads
        self._logs_back = loggers_off()  # (put back by close)
        try:
            self.client = distributed.Client(address, timeout=timeout, set_as_default=False)
        except Exception as exc:  # OSError or TimeoutError: nothing answers there
            self._close_cluster()
            self._logs_back()
            raise UsageError(f"cannot connect to the Dask scheduler at {spec} within {timeout:.0f} s: "
                             f"{one_line(exc)}") from None
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except Exception as exc:
            self.close()
            if not isinstance(exc, TimeoutError):  # the scheduler was lost (its failed reconnection): not workerless
                raise UsageError(f"lost the Dask scheduler at {spec} while waiting for a worker: "
                                 f"{one_line(exc)}") from None
            raise UsageError(f"the Dask scheduler at {spec} has no workers (waited {timeout:.0f} s); "
                             "start some with `dask worker " + spec + " --nthreads 1`") from None
        workers = len(self.client.nthreads())
        if backend_name == "auto" and local_workers is not None:  # its workers choose here, as this process would
            backend_name = resolve("auto")
        self.name = f"{backend_name} on {counted(workers, 'Dask worker')} ({spec})"
        self._slots = (0.0, 1)  # (when counted, task slots)

    def worker_threads(self) -> int:
        """Task slots in the cluster (workers x threads each; 0 when it has no worker), asked of the
        scheduler every few seconds. A local cluster gets back the workers Dask gave up on."""
        counted_at, slots = self._slots
        if time.monotonic() - counted_at > SLOTS_REFRESH_SECONDS:
            self._replace_lost_workers()
            slots = sum(self.client.nthreads().values())
            self._slots = (time.monotonic(), slots)
        return slots

    def _replace_lost_workers(self) -> None:
        """Dask's local clusters drop a worker (its nanny) that has not come back within
        ``distributed.deploy.lost-worker-timeout`` (15 s), and never start it again: a file that kills
        workers as they start could leave none, and the run waiting for ever. Asking for as many
        workers as were started starts new ones in their place."""
        cluster = self.cluster
        wanted = len(getattr(cluster, "worker_spec", ()))
        if cluster is not None and len(cluster.workers) < wanted:
            cluster.scale(wanted)

    def _close_cluster(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def close(self) -> None:
        try:
            if self.cluster is None:  # someone else's scheduler: only the client's logs are ours
                self._close_client()
                return
            with dask_logs_off():
                self._close_client()
                self._close_cluster()
        finally:
            self._logs_back()

    def _close_client(self) -> None:
        """Close the client; one whose scheduler is gone can fail to (Dask's own race as it closes its
        connections: "RuntimeError: Cannot change state of expiring Timeout", once in a full test run),
        which replaced the run's message on what happened with a traceback. Nothing of the run's is
        lost with it."""
        try:
            self.client.close()
        except Exception:
            pass

    def __enter__(self) -> "DaskCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ChunkSizer:
    """Chunk sizes from the measured images per second of one worker thread."""

    images_per_second: float | None = None

    def measured(self, images: int, seconds: float) -> None:
        if images and seconds > 0:
            rate = images / seconds
            # a moving average: one slow chunk (a cold cache, a big scene) does not swing the size
            self.images_per_second = rate if self.images_per_second is None else (
                0.7 * self.images_per_second + 0.3 * rate)

    def next_size(self, remaining: int, slots: int) -> int:
        wanted = FIRST_CHUNK if self.images_per_second is None else self.images_per_second * TARGET_CHUNK_SECONDS
        tail = math.ceil(remaining / (slots * IN_FLIGHT_PER_THREAD))  # the last chunks end together
        return max(1, min(remaining, max(MIN_CHUNK, min(int(wanted), MAX_CHUNK, tail))))


class _Chunks:
    """The chunks of one run: cut from ``paths`` as they are submitted, followed until they complete."""

    def __init__(self, client, job: ChunkJob, paths: Sequence[Path], completed=None) -> None:
        """``completed``: Dask's ``as_completed`` over the client's futures unless given (tests give a stand-in)."""
        if completed is None:
            from distributed import as_completed

            completed = as_completed(loop=client.loop, with_results=True, raise_errors=False)
        self.client, self.job, self.paths = client, job, paths
        self.sizer = ChunkSizer()
        self.cursor = 0  # paths[:cursor] are submitted
        self.in_flight: dict = {}  # future -> its paths
        self.completed = completed
        self.key_prefix = f"gpu-pipeline-{uuid.uuid4().hex[:8]}-"  # readable task names in the dashboard
        self.submitted = 0
        self.again: list[list[str]] = []  # halves of chunks whose workers died, to run first
        self.suspects: list[str] = []  # images whose one-image chunk lost its worker, each to run alone
        self.alone = None  # the future of the suspect running with nothing else in flight
        self.lone_deaths: dict[str, int] = {}  # path -> times it lost its worker while it ran alone

    @property
    def all_submitted(self) -> bool:
        return self.cursor >= len(self.paths) and not self.again and not self.suspects

    def killed(self, chunk: list[str], alone: bool) -> bool:
        """The workers of ``chunk`` died: run it again, in halves (halving isolates an image that kills
        its worker), and a single image alone on the cluster; True when it is one image that has now
        killed its workers often enough, running alone, to blame."""
        if len(chunk) > 1:
            middle = len(chunk) // 2
            self.again += [chunk[:middle], chunk[middle:]]
            return False
        if alone:
            deaths = self.lone_deaths[chunk[0]] = self.lone_deaths.get(chunk[0], 0) + 1
            if deaths >= LONE_DEATHS_TO_BLAME:
                return True
        self.suspects.append(chunk[0])
        return False

    def submit(self, slots: int) -> None:
        """Submit chunks until ``slots`` x IN_FLIGHT_PER_THREAD are in flight or none is left. A suspect
        waits until nothing is in flight, then runs alone: its worker's death is then its own."""
        while not self.all_submitted and len(self.in_flight) < slots * IN_FLIGHT_PER_THREAD:
            if self.alone is not None or (self.suspects and self.in_flight):
                return
            alone = bool(self.suspects)
            if alone:
                chunk = [self.suspects.pop()]
            elif self.again:
                chunk = self.again.pop()
            else:
                size = self.sizer.next_size(len(self.paths) - self.cursor, slots)
                chunk = [str(path) for path in self.paths[self.cursor:self.cursor + size]]
                self.cursor += size
            future = self.client.submit(process_chunk, self.job, chunk, key=f"{self.key_prefix}{self.submitted}")
            self.in_flight[future] = chunk
            self.completed.add(future)
            self.submitted += 1
            if alone:
                self.alone = future

    def ready(self) -> list[tuple[object, list[str], bool]]:
        """(ChunkResult or what went wrong, paths, whether it ran alone) of the chunks completed since
        the last call; does not wait.

        The outcome, not ``future.status``, says how a chunk ended: a finished future whose worker has
        died since is pending again, while its result is already here.
        """
        ready = []
        for future, outcome in self.completed.next_batch(block=False):
            if future in self.in_flight:  # (else taken below already)
                ready.append(self._done(future, outcome))
        # Dask's as_completed never yields a future whose result was lost with its worker before it
        # reached this client and whose rerun then failed (its fetch raises inside as_completed):
        # the run waited for ever on a KilledWorker it would never see. The future itself says it.
        for future in [future for future in self.in_flight if future.status == "error"]:
            error = future.exception()
            ready.append(self._done(future, (type(error), error, None)))
        return ready

    def _done(self, future, outcome) -> tuple[object, list[str], bool]:
        alone = future is self.alone
        if alone:
            self.alone = None
        return outcome, self.in_flight.pop(future), alone

    def cancel(self) -> None:
        if self.in_flight:
            self.client.cancel(list(self.in_flight))


@dataclass
class DaskEngine(Engine):
    """:class:`~gpu_pipeline.engine.stream.Engine`'s settings, run on the cluster that stands in for the backend."""

    backend: DaskCluster
    workers: int | None = None  # decode threads per worker; None: each worker chooses

    def run(self, paths: Sequence[Path], sink, progress: Callable[[int], None] | None = None,
            stop: threading.Event | None = None) -> RunSummary:
        """Process ``paths`` on the cluster into ``sink``.

        Setting ``stop`` stops submitting, cancels the chunks not done and returns once the
        completed ones are written. A chunk that fails on a worker (no such backend there) stops the
        run the same way, then raises UsageError, and so does a cluster left without workers for
        :data:`NO_WORKERS_TIMEOUT_S`; a chunk whose workers died is run again in halves.
        """
        cluster = self.backend
        job = ChunkJob(cluster.backend_name, cluster.threads, self.config, self.decode_options,
                       self.batch_size, self.workers, self.labels_of, self.on_edges)
        stop = stop or threading.Event()
        summary = RunSummary()
        start = time.perf_counter()
        chunks = _Chunks(cluster.client, job, paths)
        failure: ClusterFailure | SinkWriteError | DeviceFailed | None = None
        workers_seen = time.monotonic()
        try:
            while failure is None and not stop.is_set():
                slots = cluster.worker_threads()
                if slots:
                    workers_seen = time.monotonic()
                elif time.monotonic() - workers_seen > NO_WORKERS_TIMEOUT_S:
                    failure = ClusterFailure(f"the Dask cluster has had no workers for {NO_WORKERS_TIMEOUT_S:.0f} s",
                                             "start workers")
                    break
                chunks.submit(max(1, slots))
                if not chunks.in_flight:
                    break
                ready = chunks.ready()
                failure = self._write_chunks(ready, chunks, sink, summary, progress)
                if not ready:
                    stop.wait(POLL_SECONDS)
            self._write_chunks(chunks.ready(), chunks, sink, summary, progress)  # what completed meanwhile
        finally:  # a stop, a failure or an exception: what is not written is redone by a resumed run
            chunks.cancel()
        summary.seconds = time.perf_counter() - start
        # (a chunk that failed as a signal came: its images have no records either)
        summary.interrupted = not chunks.all_submitted or bool(chunks.in_flight) or failure is not None
        if isinstance(failure, (SinkWriteError, DeviceFailed)) and not stop.is_set():
            raise failure  # (a full disk: exit 3; a failed GPU: exit 4; the records written before kept)
        if failure is not None and not stop.is_set():  # after a signal, its exit status wins
            raise UsageError(f"{failure.reason}; stopped after {summary.total:,} of {len(paths):,} images "
                             f"({summary.ok:,} ok, {summary.failed:,} failed) were recorded; "
                             f"{failure.fix} and run the same command again to resume")
        return summary

    @staticmethod
    def _write_chunks(ready, chunks: _Chunks, sink, summary: RunSummary,
               progress: Callable[[int], None] | None) -> ClusterFailure | SinkWriteError | DeviceFailed | None:
        """Write the records of the completed chunks; returns why the first failed one failed, if any
        (its SinkWriteError where a worker could not write an edge map: a full disk; its DeviceFailed
        where a worker's GPU failed for good).

        A chunk whose workers kept dying is run again in halves, down to the one image that kills
        them, which gets an error record: one poisonous file does not stop the night's run.
        """
        failure = None
        for outcome, chunk, alone in ready:
            if _killed_its_workers(outcome):
                if not chunks.killed(chunk, alone):
                    continue
                outcome = ChunkResult([_killer_record(chunk[0], outcome)], 0.0)
            if not isinstance(outcome, ChunkResult):
                failure = failure or _chunk_failure(outcome, chunk)
                continue
            chunks.sizer.measured(len(outcome.records), outcome.seconds)
            sink.write(outcome.records)  # whole lines, one write per chunk
            for record in outcome.records:
                summary.add(record)
            if progress is not None:
                progress(len(outcome.records))
        return failure


def _killed_its_workers(outcome) -> bool:
    from distributed import KilledWorker

    return isinstance(outcome, tuple) and isinstance(outcome[1], KilledWorker)


def _killer_record(path: str, outcome) -> dict:
    deaths = (getattr(outcome[1], "allowed_failures", 0) + 1) * LONE_DEATHS_TO_BLAME
    return {"path": path, "stage": "compute",
            "error": f"{deaths} worker processes died processing this image alone (a crash in a decoder or a "
                     "backend, or out of memory)"}


def _chunk_failure(outcome, paths: Sequence[str]) -> ClusterFailure | SinkWriteError | DeviceFailed:
    """Why a chunk failed, naming the worker. ``outcome``: a CancelledError, or (type, error, traceback)."""
    if isinstance(outcome, BaseException):
        return ClusterFailure(f"a chunk of {len(paths)} images was cancelled (the scheduler was lost or restarted)",
                              "start the scheduler and its workers again")
    _, exc, _ = outcome
    if isinstance(exc, (SinkWriteError, DeviceFailed)):
        return exc
    if isinstance(exc, ChunkFailed):
        return ClusterFailure(str(exc))
    return ClusterFailure(f"a chunk of {len(paths)} images failed on the cluster: {one_line(exc)}")
