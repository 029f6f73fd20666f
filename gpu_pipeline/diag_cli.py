"""The diagnostic commands, ``verify`` and ``info``: thin, they parse and delegate.

``register(app)`` adds them to the main typer app (gpu_pipeline/cli.py calls it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from gpu_pipeline.config import BLUR_SIZES, STRETCHES, DecodeOptions, PipelineConfig
from gpu_pipeline.io import UsageError


def verify(
    paths: Optional[List[Path]] = typer.Argument(
        None, help="Image files or folders (searched recursively). Default: the bundled sample set.",
        show_default=False),
    backends: Optional[str] = typer.Option(
        None, "--backends", "-b",
        help="Comma-separated backends to compare with the reference, e.g. numba,cuda. Default: every "
             "registered backend (those that cannot run here are listed with the reason).", show_default=False),
    against_opencv: bool = typer.Option(False, "--against-opencv",
                                        help="Also compare OpenCV, the contract's definition, with the reference."),
    report: Optional[Path] = typer.Option(None, "--report",
                                          help="Write every difference and error to this JSON file."),
    low: float = typer.Option(PipelineConfig.low_threshold, "--low",
                              help="Canny low threshold (as cv2.Canny; swapped if above --high)."),
    high: float = typer.Option(PipelineConfig.high_threshold, "--high", help="Canny high threshold."),
    l2: bool = typer.Option(False, "--l2/--no-l2", help="Canny L2 gradient magnitude instead of L1."),
    blur: int = typer.Option(PipelineConfig.blur_ksize, "--blur",
                             help=f"Gaussian blur kernel size before Canny: one of {BLUR_SIZES}."),
    bands: Optional[str] = typer.Option(None, "--bands",
                                        help="1-based bands to use, e.g. 4,3,2 (RGB) or 1 (gray)."),
    stretch: str = typer.Option("percentile", "--stretch",
                                help=f"How data wider than 8 bits becomes 8-bit: {', '.join(STRETCHES)}."),
    glob: Optional[str] = typer.Option(None, "--glob", help="Only files whose name matches, e.g. '*.tif'."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode threads. Default: one per core."),
    threads: Optional[int] = typer.Option(None, "--threads",
                                          help="Compute threads of CPU backends. Default: all cores."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per backend call."),
) -> None:
    """Check that every backend gives the reference's bytes: histogram, equalized, edges, edge count, label.

    Exit status: 0 when all identical, 1 on any difference or backend error, 2 on bad usage.
    """
    from gpu_pipeline.cli import bundled_data_dir, fail_usage, parse_bands
    from gpu_pipeline.runner import progress_bar
    from gpu_pipeline.verify import parse_backend_list, print_report, run_verify

    try:
        for name, value in (("--workers", workers), ("--threads", threads), ("--batch-size", batch_size)):
            if value is not None and value < 1:
                raise UsageError(f"{name} must be >= 1, got {value}")
        try:
            config = PipelineConfig(low_threshold=low, high_threshold=high, l2_gradient=l2, blur_ksize=blur)
            decode_options = DecodeOptions(bands=parse_bands(bands), stretch=stretch)
        except ValueError as exc:
            raise UsageError(str(exc))
        arguments = {
            "paths": list(paths) if paths else [bundled_data_dir()], "requested": parse_backend_list(backends),
            "against_opencv": against_opencv, "config": config, "decode_options": decode_options, "glob": glob,
            "threads": threads, "batch_size": batch_size, "workers": workers or os.cpu_count() or 2,
            "report_path": report,
        }
        if sys.stderr.isatty():
            with progress_bar(Console(stderr=True)) as bar:
                task = bar.add_task("verifying", total=None, rate="-")

                def advance(n: int, total: int) -> None:
                    bar.update(task, total=total, advance=n)
                    speed = bar.tasks[task].speed
                    bar.update(task, rate=f"{speed:.0f}" if speed else "-")

                outcome = run_verify(**arguments, progress=advance)
        else:
            outcome = run_verify(**arguments)
    except UsageError as exc:
        fail_usage(str(exc))
    print_report(Console(soft_wrap=True, highlight=False), outcome, report)
    if outcome.exit_status == 2:
        fail_usage(f"none of the {outcome.found} files could be decoded; nothing was compared")
    raise typer.Exit(outcome.exit_status)


def info(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for machines."),
) -> None:
    """Describe this machine: versions, backends (and why one cannot run), GPU, CPU threads, numba setup."""
    from gpu_pipeline.info import collect_info, print_info

    collected = collect_info()
    if as_json:
        typer.echo(json.dumps(collected, indent=2))
    else:
        print_info(Console(soft_wrap=True, highlight=False), collected)


def register(app: typer.Typer) -> None:
    """Add ``verify`` and ``info`` to ``app``."""
    app.command()(verify)
    app.command()(info)
