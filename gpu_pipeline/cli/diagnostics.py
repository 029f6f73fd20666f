"""The diagnostic commands, ``verify``, ``bench`` and ``info``: thin, they parse and delegate.

``register(app)`` adds them to the main typer app (gpu_pipeline/cli/app.py calls it).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from gpu_pipeline.cli.options import (L2, Bands, Command, DecodeTimeout, FilesFrom, ImagesPerCall, Blur, Glob,
                                      High, Low, MaxPixels, Paths, Stretch, Threads, VerifyWorkers,
                                      bundled_data_dir, check_counts, decode_options, fail_unwritten, fail_usage,
                                      given_file_name, given_path, given_paths, pipeline_config,
                                      refuse_closed_stdout, written_path, written_png)
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine.cores import usable_cores
from gpu_pipeline.errors import UsageError
from gpu_pipeline.outputs.files import check_target, is_our_json, is_our_png, replace_with, replace_with_report

#: The most timed runs ``bench --repeat`` takes.
MOST_REPEATS = 1000


def verify(
    paths: Paths = None,
    files_from: FilesFrom = None,
    backends: Optional[str] = typer.Option(
        None, "--backends", "-b",
        help="Comma-separated backends to compare with the reference, e.g. numba,cuda. Default: every "
             "registered backend (those that cannot run here are listed with the reason).", show_default=False),
    against_opencv: bool = typer.Option(False, "--against-opencv",
                                        help="Also compare OpenCV, the contract's definition, with the reference."),
    report: Optional[Path] = typer.Option(None, "--report", parser=written_path,
                                          help="Write every difference and error to this JSON file."),
    low: Low = PipelineConfig.low_threshold,
    high: High = PipelineConfig.high_threshold,
    l2: L2 = False,
    blur: Blur = PipelineConfig.blur_ksize,
    bands: Bands = None,
    stretch: Stretch = DecodeOptions.stretch,
    max_pixels: MaxPixels = DecodeOptions.max_pixels,
    glob: Glob = None,
    workers: VerifyWorkers = None,
    decode_timeout: DecodeTimeout = None,
    threads: Threads = None,
    batch_size: ImagesPerCall = 64,
    model: Optional[str] = typer.Option(
        None, "--model", "-m", show_default=False, parser=given_file_name,
        help="Compare the labels of this model (a model file, or eurosat, eurosat-cnn) instead of the default rule."),
) -> None:
    """Check that every backend gives the reference's bytes: histogram, equalized, edges, edge count, label.

    Exit status: 0 when all identical, 1 on any difference or backend error, 2 on bad usage, 3 when
    standard output or the --report cannot be written (a full disk, a closed pipe).
    """
    refuse_closed_stdout()
    from gpu_pipeline.engine.job import progress_bar, progress_lines, warn_unlisted
    from gpu_pipeline.diagnostics.verify import parse_backend_list, print_report, run_verify, write_report
    from gpu_pipeline.inputs.processes import DecodeProcessesFailed

    try:
        check_counts(workers=workers, threads=threads, batch_size=batch_size)
        arguments = {
            "paths": given_paths(paths, files_from), "requested": parse_backend_list(backends),
            "against_opencv": against_opencv, "config": pipeline_config(low, high, l2, blur),
            "decode_options": decode_options(bands, stretch, max_pixels), "glob": glob,
            "threads": threads, "batch_size": batch_size, "workers": workers or usable_cores(),
            "decode_timeout": decode_timeout, "report_path": report, "model": model,
        }
        if sys.stderr.isatty():
            with progress_bar(Console(stderr=True)) as bar:
                task = bar.add_task("verifying", total=None, rate="-")

                def advance(n: int, total: int) -> None:
                    bar.update(task, total=total, advance=n)
                    speed = bar.tasks[task].speed
                    bar.update(task, rate=f"{speed:.0f}" if speed else "-")

                # (the compile announced above the bar: on a terminal it sat at 0 for 15-20 s)
                outcome = run_verify(**arguments, progress=advance, console=bar.console)
        else:  # (a cron job's log: a line a minute)
            outcome = run_verify(**arguments, progress=progress_lines(Console(stderr=True, soft_wrap=True)))
    except UsageError as exc:
        fail_usage(str(exc))
    except DecodeProcessesFailed as exc:  # (a fork server that kept dying, under --decode-timeout)
        Console(stderr=True, soft_wrap=True).print(f"gpu-pipeline: error: {exc}", highlight=False, markup=False)
        raise typer.Exit(1) from None
    unwritten = None
    if report is not None:  # first: a table that cannot be printed (| head) must not lose the report
        try:
            write_report(outcome, report)
        except UsageError as exc:  # (a full disk) said after the table, which must not be lost either
            unwritten, report = exc, None
    warn_unlisted(Console(stderr=True, soft_wrap=True), outcome.unlisted)
    print_report(Console(soft_wrap=True, highlight=False), outcome, report)
    if unwritten is not None:
        fail_unwritten(unwritten)
    if outcome.exit_status == 2:
        fail_usage(f"none of the {outcome.found} files could be decoded; nothing was compared")
    raise typer.Exit(outcome.exit_status)


def bench(
    paths: Optional[List[Path]] = typer.Argument(
        None, help="Image files or folders (searched recursively) to time. Default: a generated corpus "
                   "(--size, --count, --tiles, --format).", show_default=False, parser=given_path),
    backends: Optional[str] = typer.Option(
        None, "--backends", "-b",
        help="Comma-separated contenders: registered backends (e.g. numba,cuda) and the baselines opencv-pool (the "
             "anchor), opencv and skimage-pool. Default: all of them (those that cannot run here are listed with the reason).",
        show_default=False),
    size: Optional[str] = typer.Option(None, "--size", metavar="WxH",
                                       help="Size of the generated scenes. Default: 512x512.", show_default=False),
    count: Optional[int] = typer.Option(None, "--count", help="Number of generated scenes. Default: 16.",
                                        show_default=False),
    tiles: Optional[int] = typer.Option(
        None, "--tiles", help="Also this many 64x64 tiles, cut from the bundled scenes (then from generated "
                              "ones). Default: 48.", show_default=False),
    image_format: Optional[str] = typer.Option(None, "--format", help="jpeg or png: how the generated corpus is "
                                               "written. Default: jpeg.", show_default=False),
    repeat: int = typer.Option(3, "--repeat", "-r",
                               help="Timed runs of each measurement after the warm-up (at most 1000)."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="Threads for every contender: CPU backends, decode pool, OpenCV, pool processes. "
                                "Default: all usable cores.", show_default=False),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Most images per backend call. Default: a quarter of the corpus, so that it "
                                   "makes at least 4 batches (the backend's pixel budget may cut them smaller).",
        show_default=False),
    scaling: bool = typer.Option(True, "--scaling/--no-scaling",
                                 help="Also time each backend with 1, 2, 4, ... --threads threads (a scaling table)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number to this JSON file.",
                                             parser=written_path),
    plot: Optional[Path] = typer.Option(None, "--plot", parser=written_png,
                                        help="Draw a bar chart into this PNG (needs matplotlib: the plot extra)."),
) -> None:
    """Time every backend beside OpenCV (in a process pool: the anchor; and in threads) and the scikit-image
    pool: compute, end to end, decode only; then each backend by thread count.

    Exit status: 0 when every contender that can run here was measured, 1 when one failed, 2 on bad usage,
    3 when standard output, --json or --plot cannot be written (a full disk, a closed pipe).
    """
    refuse_closed_stdout()
    from gpu_pipeline.bench import BenchSettings, default_batch_size, load_corpus, run_benchmark
    from gpu_pipeline.bench.corpus import corpus_folder
    from gpu_pipeline.engine.job import warn_unlisted

    try:
        request = _bench_request(paths, backends, size, count, tiles, image_format, repeat, threads, batch_size,
                                 json_path, plot)
        warn_unlisted(Console(stderr=True, soft_wrap=True), request.get("unlisted", []))
        waiting = Console(stderr=True).status("preparing the corpus") if sys.stderr.isatty() else nullcontext()
        generated = corpus_folder() if "generate" in request else nullcontext(None)  # (PATHS need no folder)
        with waiting as status, generated as folder:
            files, details = _bench_files(request, folder)
            corpus = load_corpus(files, details, DecodeOptions(), request["threads"])
            if not corpus.images:
                raise UsageError(f"none of the {len(files)} files could be decoded; nothing to time")
            settings = BenchSettings(repeats=repeat, threads=request["threads"],
                                     batch_size=batch_size or default_batch_size(len(corpus.images)))
            report = run_benchmark(corpus, request["names"], settings,
                                   progress=(lambda name: status.update(f"measuring {name}")) if status else None,
                                   scaling=scaling)
    except UsageError as exc:
        fail_usage(str(exc))
    from gpu_pipeline.bench import plot_report, print_report
    from gpu_pipeline.diagnostics.info import collect_info

    refused = None
    try:  # the files first: a table that cannot be printed (| head, a full disk) must not lose them
        if json_path is not None:
            replace_with_report(json_path, "--json", report.to_json(machine=collect_info()))
        if plot is not None:
            replace_with(plot, "--plot", lambda temporary: plot_report(report, temporary), is_our_png)
    except UsageError as exc:
        refused = exc
    print_report(Console(soft_wrap=True, highlight=False), report)
    if refused is not None:
        fail_unwritten(refused)
    raise typer.Exit(1 if any(c.status == "failed" for c in report.contenders + report.decoders) else 0)


def _bench_request(paths, backends, size, count, tiles, image_format, repeat, threads, batch_size, json_path,
                   plot) -> dict:
    """Every check of ``bench``'s arguments, before anything is generated or timed (UsageError: exit 2)."""
    from gpu_pipeline.bench import generation_request, parse_contenders, plot_unavailable_reason, usable_cores
    from gpu_pipeline.inputs.discover import discover, no_files_found

    check_counts(repeat=repeat, threads=threads, batch_size=batch_size)
    if repeat > MOST_REPEATS:  # (a slip of the keyboard ran until killed)
        raise UsageError(f"--repeat must be at most {MOST_REPEATS}, got {repeat}")
    request = {"names": parse_contenders(backends), "threads": threads or usable_cores()}
    if plot is not None and (reason := plot_unavailable_reason()) is not None:
        raise UsageError(reason)
    if paths:
        for option, value in (("--size", size), ("--count", count), ("--tiles", tiles), ("--format", image_format)):
            if value is not None:
                raise UsageError(f"{option} describes the generated corpus; it does not apply to given PATHS")
        request["unlisted"] = []  # folders that cannot be listed: a warning, and the corpus says so
        request["files"] = discover(paths, unlisted=request["unlisted"])
        if not request["files"]:
            raise no_files_found(paths, None, request["unlisted"])
    else:
        request["generate"] = generation_request(size, count, tiles, image_format)
    # now rather than after the measurements; only a file of ours is replaced, never an input
    if plot is not None:
        check_target(plot, "--plot", is_our_png, request.get("files", ()))
    if json_path is not None:
        check_target(json_path, "--json", is_our_json, request.get("files", ()))
    if plot is not None and json_path is not None and os.path.abspath(plot) == os.path.abspath(json_path):
        raise UsageError(f"--json and --plot name one file, {json_path}; give each its own")  # (else one replaced the other)
    return request


def _bench_files(request: dict, folder: Path) -> tuple[list[Path], dict]:
    """The given files, or a corpus generated into ``folder`` (tiles from the bundled scenes)."""
    from gpu_pipeline.bench import generate_corpus
    from gpu_pipeline.inputs.discover import discover

    if "files" in request:
        return request["files"], {"source": "paths", "unlisted": [{"folder": folder, "reason": reason}
                                                                for folder, reason in request["unlisted"]]}
    try:
        scenes = bundled_data_dir() / "scenes"
    except UsageError:  # an install without the sample set: tiles from generated scenes
        scenes = None
    sources = discover([scenes]) if scenes is not None and scenes.is_dir() else []
    return generate_corpus(folder, **request["generate"], tile_sources=sources)


def info(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for machines."),
) -> None:
    """Describe this machine: versions, backends (and why one cannot run), GPU, CPU threads, numba setup."""
    refuse_closed_stdout()
    from gpu_pipeline.diagnostics.info import collect_info, print_info

    collected = collect_info()
    if as_json:
        typer.echo(json.dumps(collected, indent=2))
    else:
        print_info(Console(soft_wrap=True, highlight=False), collected)


def register(app: typer.Typer) -> None:
    """Add ``verify``, ``bench`` and ``info`` to ``app``."""
    app.command(cls=Command)(verify)
    app.command(cls=Command)(bench)
    app.command(cls=Command)(info)
