"""One `gpu-pipeline run`: discover, pick the backend, open the sink, stream, report.

Everything that can be wrong with the arguments is checked before the first image is decoded,
and raised as ``UsageError`` (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from gpu_pipeline.backends import BackendUnavailable, create
from gpu_pipeline.classify import label_function
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine import Engine, RunSummary
from gpu_pipeline.io import UsageError, discover
from gpu_pipeline.sinks import SinkError, open_sink

#: Exit statuses after a signal, as a shell reports them (128 + signal number).
EXIT_ON_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def open_backend(name: str, threads: int | None):
    try:
        return create(name, threads=threads)
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None
    except BackendUnavailable as exc:
        raise UsageError(str(exc)) from None


def edge_saver(folder: Path, files: Sequence[Path]) -> Callable[[Path, np.ndarray], None]:
    """Write edge maps as PNG under ``folder``, mirroring the inputs' layout below their common folder."""
    from PIL import Image

    resolved = [path.resolve() for path in files]
    root = Path(os.path.commonpath([path.parent for path in resolved]))

    def save(path: Path, edges: np.ndarray) -> None:
        target = folder / path.resolve().relative_to(root)
        target = target.with_name(target.name + ".edges.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(edges).save(target)

    return save


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console,
    )


def print_summary(console: Console, summary: RunSummary, backend: str, out: str) -> None:
    console.print(
        f"[bold]{summary.total}[/] images with backend [bold]{backend}[/] in {summary.seconds:.2f} s: "
        f"[green]{summary.ok} ok[/], " + (f"[red]{summary.failed} failed[/]" if summary.failed else "0 failed")
        + f" ({summary.images_per_second:.0f} images/s, {summary.megapixels_per_second:.1f} MP/s)"
    )
    if summary.failures_by_stage:
        stages = ", ".join(f"{stage}: {n}" for stage, n in summary.failures_by_stage.most_common())
        console.print(f"failures by stage: {stages}")
    if summary.labels:
        console.print("labels: " + ", ".join(f"{label} {n}" for label, n in summary.labels.most_common()))
    console.print(f"results: {out if out == '-' else os.path.abspath(out)}")


def model_identity(model: str | None) -> str | None:
    """The label model as settings see it: the SHA-256 of its file (labels depend on its content)."""
    if model is None:
        return None
    from gpu_pipeline.model import resolve_model_path

    return "sha256:" + hashlib.sha256(resolve_model_path(model).read_bytes()).hexdigest()


def settings_path(out: str) -> Path:
    return Path(out + ".settings.json")


def check_settings(out: str, settings: dict, resuming: bool) -> None:
    """Refuse to resume an output computed with other settings; record the settings of this run.

    Results do not depend on the backend (they are the same bytes), so switching backends between
    runs is fine; thresholds, blur, bands, stretch or the label model are not.
    """
    if out == "-":
        return
    settings = json.loads(json.dumps(settings))  # compare as stored: tuples become lists
    path = settings_path(out)
    if resuming and path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = None
        if earlier != settings:
            changed = [key for key in settings
                       if not isinstance(earlier, dict) or earlier.get(key) != settings[key]]
            raise UsageError(f"{out} holds results computed with other settings (changed: {', '.join(changed)}; "
                             f"see {path}); use --overwrite or another --out")
    try:
        path.write_text(json.dumps(settings, indent=2) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT / SIGTERM end the run after the batches in flight; a second signal acts at once."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handle(signum: int, frame) -> None:
        received.append(signum)
        stop.set()
        signal.signal(signum, signal.SIG_DFL)

    previous = {sig: signal.signal(sig, handle) for sig in EXIT_ON_SIGNAL}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_job(*, paths: list[Path], out: str, backend_name: str, config: PipelineConfig,
            decode_options: DecodeOptions, glob: str | None, workers: int | None, threads: int | None,
            batch_size: int, save_edges: Path | None, quiet: bool, output_format: str | None = None,
            overwrite: bool = False, retry_failed: bool = False, model: str | None = None,
            dask: str | None = None) -> int:
    """Run the whole job; returns the exit status (0 all ok, 1 some failed, 130/143 on a signal).

    Paths are recorded absolute, so a rerun from another folder still resumes. With ``dask`` (a
    scheduler address or ``local:N``) the images are processed on a Dask cluster, which stands
    where the backend would (:mod:`gpu_pipeline.distributed`).
    """
    # A damaged TIFF becomes that file's error record; tifffile's own warnings would only add noise.
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    files = [path.absolute() for path in discover(paths, glob=glob)]
    if not files:
        raise UsageError("no image files found in " + ", ".join(str(p) for p in paths)
                         + (f" matching {glob!r}" if glob else ""))
    labels_of = label_function(model, config)
    settings = {"pipeline": asdict(config), "decode": asdict(decode_options), "model": model_identity(model)}
    if dask is None:
        backend, engine_class = open_backend(backend_name, threads), Engine
        workers = workers or os.cpu_count() or 2
    else:
        from gpu_pipeline.distributed import DaskCluster, DaskEngine

        backend, engine_class = DaskCluster(dask, backend_name, threads), DaskEngine
    try:
        sink = open_sink(out, output_format, resume=not overwrite, retry_failed=retry_failed)
        resuming = bool(sink.existing.succeeded or sink.existing.failed)
        check_settings(out, settings, resuming)
    except (SinkError, UsageError) as exc:
        backend.close()
        raise UsageError(str(exc)) from None

    done = sink.existing.succeeded | sink.existing.failed
    todo = [path for path in files if str(path) not in done]
    earlier_failures = sum(str(path) in sink.existing.failed for path in files)
    engine = engine_class(backend=backend, config=config, decode_options=decode_options, batch_size=batch_size,
                          workers=workers, labels_of=labels_of,
                          on_edges=edge_saver(save_edges, files) if save_edges else None)
    console = Console(stderr=True, soft_wrap=True)
    if dask is None and todo:
        started = time.perf_counter()
        backend.warm_up(config)
        if not quiet and (seconds := time.perf_counter() - started) > 1:
            console.print(f"backend {backend.name} ready in {seconds:.1f} s (kernels compiled once, then cached)")
    if not quiet and done:
        console.print(f"resuming {out}: {len(files) - len(todo)} of {len(files)} images already recorded"
                      + (f" ({earlier_failures} failed; --retry-failed redoes them)" if earlier_failures else ""))
    stop = threading.Event()
    with backend, sink, stop_on_signals(stop) as signals:
        if not quiet and sys.stderr.isatty():
            with progress_bar(console) as bar:
                task = bar.add_task("processing", total=len(todo), rate="-")

                def advance(n: int) -> None:
                    bar.advance(task, n)
                    speed = bar.tasks[task].speed
                    bar.update(task, rate=f"{speed:.0f}" if speed else "-")

                summary = engine.run(todo, sink, progress=advance, stop=stop)
        else:
            summary = engine.run(todo, sink, stop=stop)
    if not quiet:
        print_summary(console, summary, backend.name, out)
        if summary.interrupted:
            console.print(f"interrupted: {len(todo) - summary.total} images not processed; "
                          "run the same command again to resume")
    if signals:
        return EXIT_ON_SIGNAL[signals[0]]
    return 0 if summary.failed + earlier_failures == 0 else 1
