"""The ``gpu-pipeline`` command line: thin, it parses, checks and delegates to the engine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from gpu_pipeline import __version__
from gpu_pipeline.cli_options import (L2, Backend, Bands, BatchSize, Blur, Glob, High, Low,
                                      Paths, Stretch, Threads, Workers, bundled_data_dir, check_counts,
                                      decode_options, fail_usage, pipeline_config)
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine import Engine
from gpu_pipeline.io import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Batch image analysis: histogram, equalization, Canny edges, edge count and a label per image, "
    "byte-identical on every CPU and GPU backend.",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gpu-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """Batch image analysis on every CPU core and on CUDA GPUs, identical bytes on every path."""


@app.command()
def run(
    paths: Paths = None,
    out: str = typer.Option("results.jsonl", "--out", "-o",
                            help="Output file (.jsonl, .csv or .parquet), or - for stdout. An existing output is "
                            "resumed: images already recorded are skipped."),
    output_format: Optional[str] = typer.Option(None, "--format",
                                                help="jsonl, csv or parquet. Default: from --out's extension."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the output afresh instead of resuming."),
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="When resuming, redo the images whose record is an error."),
    backend: Backend = "auto",
    low: Low = PipelineConfig.low_threshold,
    high: High = PipelineConfig.high_threshold,
    l2: L2 = False,
    blur: Blur = PipelineConfig.blur_ksize,
    bands: Bands = None,
    stretch: Stretch = "percentile",
    max_pixels: int = typer.Option(DecodeOptions.max_pixels, "--max-pixels",
                                   help="Refuse images larger than this (decompression-bomb guard)."),
    glob: Glob = None,
    workers: Workers = None,
    threads: Threads = None,
    batch_size: BatchSize = Engine.batch_size,
    save_edges: Optional[Path] = typer.Option(None, "--save-edges",
                                              help="Also write each edge map as a PNG under this folder."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Label with a model from `gpu-pipeline fit` (or the shipped one: eurosat) instead of the default rule."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
    dask: Optional[str] = typer.Option(None, "--dask", metavar="ADDRESS",
                                       help="Run on a Dask cluster: a scheduler address (tcp://host:8786) or "
                                       "local:N (N worker processes here). Needs gpu-pipeline[dask]."),
) -> None:
    """Process images: one JSON record per image (a result or an error).

    Exit status: 0 when every image succeeded, 1 when some failed, 2 on bad usage,
    130 / 143 when stopped by SIGINT (Ctrl-C) / SIGTERM after flushing what was done.
    """
    from gpu_pipeline.runner import run_job

    try:
        check_counts(workers=workers, threads=threads, batch_size=batch_size)
        code = run_job(
            paths=list(paths) if paths else [bundled_data_dir()],
            out=out, backend_name=backend, config=pipeline_config(low, high, l2, blur),
            decode_options=decode_options(bands, stretch, max_pixels), glob=glob,
            workers=workers, threads=threads, batch_size=batch_size,
            save_edges=save_edges, quiet=quiet, output_format=output_format, overwrite=overwrite,
            retry_failed=retry_failed, model=model, dask=dask,
        )
    except UsageError as exc:
        fail_usage(str(exc))
    raise typer.Exit(code)


from gpu_pipeline.diag_cli import register as register_diagnostics  # noqa: E402
from gpu_pipeline.labels_cli import register as register_label_commands  # noqa: E402

register_diagnostics(app)
register_label_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
