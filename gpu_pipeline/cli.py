"""The ``gpu-pipeline`` command line: thin, it parses, checks and delegates to the engine."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from gpu_pipeline import __version__
from gpu_pipeline.config import BLUR_SIZES, STRETCHES, DecodeOptions, PipelineConfig
from gpu_pipeline.io import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Batch image analysis: histogram, equalization, Canny edges, edge count and a label per image, "
    "byte-identical on every CPU and GPU backend.",
)


def fail_usage(message: str) -> None:
    typer.echo(f"gpu-pipeline: error: {message}", err=True)
    raise typer.Exit(2)


def bundled_data_dir() -> Path:
    """The sample set shipped with the package (data/ in a checkout, gpu_pipeline/sample_data when installed)."""
    checkout = Path(__file__).resolve().parent.parent / "data"
    if (checkout / "SOURCES.md").is_file():
        return checkout
    installed = Path(__file__).resolve().parent / "sample_data"
    if installed.is_dir():
        return installed
    raise UsageError("no bundled sample data found: pass image files or folders")


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--bands takes comma-separated 1-based band numbers such as 4,3,2, got {text!r}")


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
    paths: Optional[List[Path]] = typer.Argument(
        None, help="Image files or folders (searched recursively). Default: the bundled sample set.",
        show_default=False),
    out: str = typer.Option("results.jsonl", "--out", "-o",
                            help="Output file (.jsonl, .csv or .parquet), or - for stdout. An existing output is "
                            "resumed: images already recorded are skipped."),
    output_format: Optional[str] = typer.Option(None, "--format",
                                                help="jsonl, csv or parquet. Default: from --out's extension."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the output afresh instead of resuming."),
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="When resuming, redo the images whose record is an error."),
    backend: str = typer.Option("auto", "--backend", "-b",
                                help="reference, numba, cuda, cupy, or auto (the fastest available)."),
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
    max_pixels: int = typer.Option(DecodeOptions.max_pixels, "--max-pixels",
                                   help="Refuse images larger than this (decompression-bomb guard)."),
    glob: Optional[str] = typer.Option(None, "--glob", help="Only files whose name matches, e.g. '*.tif'."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode threads. Default: one per core."),
    threads: Optional[int] = typer.Option(None, "--threads",
                                          help="Compute threads of CPU backends. Default: all cores."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per backend call."),
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
        for name, value in (("--workers", workers), ("--threads", threads), ("--batch-size", batch_size)):
            if value is not None and value < 1:
                raise UsageError(f"{name} must be >= 1, got {value}")
        try:
            config = PipelineConfig(low_threshold=low, high_threshold=high, l2_gradient=l2, blur_ksize=blur)
            decode_options = DecodeOptions(bands=parse_bands(bands), stretch=stretch, max_pixels=max_pixels)
        except ValueError as exc:
            raise UsageError(str(exc))
        code = run_job(
            paths=list(paths) if paths else [bundled_data_dir()],
            out=out, backend_name=backend, config=config, decode_options=decode_options, glob=glob,
            workers=workers or os.cpu_count() or 2, threads=threads, batch_size=batch_size,
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
