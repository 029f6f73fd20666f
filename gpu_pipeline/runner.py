"""One `gpu-pipeline run`: discover, pick the backend, open the sink, stream, report.

Everything that can be wrong with the arguments is checked before the first image is decoded,
and raised as ``UsageError`` (exit 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from gpu_pipeline.backends import BackendUnavailable, create
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine import Engine, RunSummary
from gpu_pipeline.io import UsageError, discover
from gpu_pipeline.sinks import JsonlSink, SinkError


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


def run_job(*, paths: list[Path], out: str, backend_name: str, config: PipelineConfig,
            decode_options: DecodeOptions, glob: str | None, workers: int, threads: int | None,
            batch_size: int, save_edges: Path | None, quiet: bool) -> int:
    """Run the whole job; returns the exit status (0 all ok, 1 some failed)."""
    files = discover(paths, glob=glob)
    if not files:
        raise UsageError("no image files found in " + ", ".join(str(p) for p in paths)
                         + (f" matching {glob!r}" if glob else ""))
    backend = open_backend(backend_name, threads)
    try:
        sink = JsonlSink(out)
    except SinkError as exc:
        backend.close()
        raise UsageError(str(exc)) from None

    engine = Engine(backend=backend, config=config, decode_options=decode_options, batch_size=batch_size,
                    workers=workers, on_edges=edge_saver(save_edges, files) if save_edges else None)
    console = Console(stderr=True, soft_wrap=True)
    show_progress = not quiet and sys.stderr.isatty()
    with backend, sink:
        if show_progress:
            with progress_bar(console) as bar:
                task = bar.add_task("processing", total=len(files), rate="-")

                def advance(n: int) -> None:
                    bar.advance(task, n)
                    speed = bar.tasks[task].speed
                    bar.update(task, rate=f"{speed:.0f}" if speed else "-")

                summary = engine.run(files, sink, progress=advance)
        else:
            summary = engine.run(files, sink)
    if not quiet:
        print_summary(console, summary, backend.name, out)
    return 0 if summary.failed == 0 else 1
