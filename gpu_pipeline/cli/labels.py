"""``gpu-pipeline fit`` and ``gpu-pipeline evaluate``: land-cover models from folder-per-class trees.

The commands only parse, delegate and print: trees and features are in :mod:`gpu_pipeline.labels.labelled`,
held-out draws in :mod:`gpu_pipeline.labels.splits`, the model in :mod:`gpu_pipeline.labels.model`, scores in
:mod:`gpu_pipeline.labels.confusion` and the picture in :mod:`gpu_pipeline.labels.plots`. The first two are
imported when a command runs: they import numba, which every other command (``--help`` too) would pay
about 0.16 s for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import typer
from rich.console import Console

from gpu_pipeline import __version__
from gpu_pipeline.cli.options import (L2, Backend, Bands, Blur, Command, High, Low, Stretch, decode_options,
                                      fail_unwritten, fail_usage, given_file_name, given_path, pipeline_config,
                                      refuse_closed_stdout, written_path, written_png)
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.outputs.files import check_target, is_our_json, is_our_png, replace_with
from gpu_pipeline.labels.confusion import (accuracy, accuracy_line, accuracy_text, confusion_matrix, confusion_table,
                                    scores_table)
from gpu_pipeline.errors import UsageError, bytes_shown, printable, shown
from gpu_pipeline.labels.plots import MAX_CLASSES, has_matplotlib, save_confusion_plot
from gpu_pipeline.labels.splits import stratified_split

if TYPE_CHECKING:
    from gpu_pipeline.labels.labelled import FeatureTable, LabeledImages
    from gpu_pipeline.labels.model import LabelModel

#: How many failed images are listed by name before the rest are only counted.
SHOWN_FAILURES = 5


def _need_numba(command: str) -> None:
    """fit and evaluate compute features with numba kernels: without numba, one line and exit 2."""
    from gpu_pipeline.labels.labeller import model_module

    try:
        model_module(command)
    except UsageError as exc:
        fail_usage(str(exc))


def _report_failures(failures: list[str]) -> None:
    if not failures:
        return
    typer.echo(f"gpu-pipeline: {len(failures)} image(s) could not be processed and were left out:", err=True)
    for line in failures[:SHOWN_FAILURES]:
        typer.echo(f"  {printable(line)}", err=True)
    if len(failures) > SHOWN_FAILURES:
        typer.echo(f"  ... and {len(failures) - SHOWN_FAILURES} more", err=True)


def _usable(labeled: LabeledImages, table: FeatureTable) -> None:
    """UsageError when a class lost all its images to failures, listed first: they say why (--bands 5 of RGB)."""
    for k, name in enumerate(labeled.classes):
        if not np.any(table.ok[labeled.targets == k]):
            _report_failures(table.failures)
            raise UsageError(f"no image of class {name} could be processed")


def fit(
    labeled_dir: Path = typer.Argument(..., help="Folder with one sub-folder of images per class (EuroSAT layout).",
                                       show_default=False, parser=given_path),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the model (JSON).", show_default=False,
                             parser=written_path),
    backend: Backend = "auto",
    low: Low = PipelineConfig.low_threshold,
    high: High = PipelineConfig.high_threshold,
    l2: L2 = False,
    blur: Blur = PipelineConfig.blur_ksize,
    bands: Bands = None,
    stretch: Stretch = DecodeOptions.stretch,
    test_fraction: float = typer.Option(0.2, "--test-fraction",
                                        help="Share of each class held out to measure accuracy (0: fit on all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out draw (0 or more)."),
) -> None:
    """Fit a land-cover model on a folder-per-class tree and write it as JSON.

    The model is fitted on the images not held out; the held-out ones measure its accuracy.
    Runs using it need the same --low, --high, --l2 and --blur (they are stored in the model), and
    should use the same --bands and --stretch (recorded in its training summary).

    Exit status: 0, 1 when some images failed (they are left out), 2 on bad usage, 3 when standard
    output or the model cannot be written (a full disk, a closed pipe).
    """
    refuse_closed_stdout()
    _need_numba("fit")
    from gpu_pipeline.labels.labelled import compute_features, read_labeled_tree
    from gpu_pipeline.labels.model import fit_model, settings_text

    try:
        if not 0 <= test_fraction < 1:
            raise UsageError(f"--test-fraction must be in [0, 1), got {test_fraction}")
        if seed < 0:  # NumPy's generators take none (a traceback after all the work)
            raise UsageError(f"--seed must be 0 or more, got {seed}")
        config = pipeline_config(low, high, l2, blur)
        decode = decode_options(bands, stretch)
        if not out.parent.is_dir():
            raise UsageError(f"cannot write the model: {out.parent} is not a folder" if out.parent.exists()
                             else f"cannot write the model: folder {out.parent} does not exist")
        labeled = read_labeled_tree(labeled_dir, min_classes=2)
        check_target(out, "--out", is_our_json, labeled.paths)  # a model of ours is replaced, nothing else
        table, backend_name = compute_features(labeled.paths, backend, config, Console(stderr=True), decode)
        _usable(labeled, table)
    except UsageError as exc:
        fail_usage(str(exc))
    _report_failures(table.failures)

    test = np.zeros_like(table.ok)  # drawn among the processed images, so every class keeps one to train on
    test[table.ok] = stratified_split(labeled.targets[table.ok], test_fraction, seed)
    train = table.ok & ~test
    model = fit_model(table.vectors[train], labeled.targets[train], labeled.classes, config, {
        "data": bytes_shown(str(labeled_dir)),  # as the records show it: a lone surrogate is no JSON text
        "backend": backend_name,
        "bands": list(decode.bands) if decode.bands else None,
        "stretch": decode.stretch,
        "images_per_class": _per_class(labeled, train),
        "held_out_per_class": _per_class(labeled, test),
        "test_fraction": test_fraction,
        "seed": seed,
        "failed_images": len(table.failures),
        "gpu_pipeline_version": __version__,
    })
    train_matrix = _confusion_of(model, labeled, table, train)
    test_matrix = _confusion_of(model, labeled, table, test) if test.any() else None
    model.training["test_accuracy"] = accuracy(test_matrix) if test_matrix is not None else None
    unwritten = None
    try:
        replace_with(out, "--out", model.save, is_our_json)
    except UsageError as exc:  # (a full disk) said after the accuracy, which must not be lost too
        unwritten = exc

    console = Console(soft_wrap=True)
    console.print(f"fitted on [bold]{int(train.sum())}[/] images of {len(labeled.classes)} classes with backend "
                  f"[bold]{backend_name}[/] and {settings_text(config)}")
    console.print(f"training {accuracy_text(train_matrix)}")
    if test_matrix is not None:
        console.print(f"held-out {accuracy_line(test_matrix)}")
        console.print(scores_table(labeled.classes, test_matrix))
        console.print(confusion_table(labeled.classes, test_matrix))
    if unwritten is not None:
        fail_unwritten(unwritten)
    console.print(f"model: {shown(os.path.abspath(out))}")
    raise typer.Exit(1 if table.failures else 0)


def _per_class(labeled: LabeledImages, mask: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labeled.targets[mask], minlength=len(labeled.classes))
    return {name: int(n) for name, n in zip(labeled.classes, counts)}


def _confusion_of(model: LabelModel, labeled: LabeledImages, table: FeatureTable, mask: np.ndarray) -> np.ndarray:
    return confusion_matrix(labeled.targets[mask], model.predict(table.vectors[mask]), len(labeled.classes))


def evaluate(
    labeled_dir: Path = typer.Argument(..., help="Folder with one sub-folder of images per class (EuroSAT layout).",
                                       show_default=False, parser=given_path),
    model_path: str = typer.Option(..., "--model", "-m", show_default=False, parser=given_file_name,
                                   help="Model file, or a shipped model: eurosat, eurosat-cnn."),
    backend: Backend = "auto",
    bands: Bands = None,
    stretch: Stretch = DecodeOptions.stretch,
    plot: Optional[Path] = typer.Option(None, "--plot", parser=written_png, help="Also save the confusion matrix as a PNG "
                                        "(needs matplotlib).", show_default=False),
) -> None:
    """Measure a model on a folder-per-class tree: accuracy, per-class precision and recall, confusion matrix.

    Images are processed with the pipeline settings stored in the model. Every class folder must be
    a class of the model.

    Exit status: 0, 1 when some images failed (left out), 2 on bad usage, 3 when standard output or
    the --plot cannot be written (a full disk, a closed pipe).
    """
    refuse_closed_stdout()
    _need_numba("evaluate")
    from gpu_pipeline.labels.labelled import compute_features, read_labeled_tree
    from gpu_pipeline.labels.model import load_model, resolve_model_path

    console = Console(soft_wrap=True)
    try:
        if plot is not None and not has_matplotlib():
            raise UsageError("--plot needs matplotlib; install it with: pip install 'gpu-pipeline[plot]'")
        decode = decode_options(bands, stretch)
        model = load_model(model_path)
        if plot is not None and len(model.classes) > MAX_CLASSES:
            raise UsageError(f"--plot draws at most {MAX_CLASSES} classes, the model has {len(model.classes)}; "
                             "leave --plot out")
        labeled = read_labeled_tree(labeled_dir, min_classes=1)
        if plot is not None:
            check_target(plot, "--plot", is_our_png, [*labeled.paths, resolve_model_path(model_path)])
        unknown = [name for name in labeled.classes if name not in model.classes]
        if unknown:
            raise UsageError(f"class folder(s) {', '.join(unknown)} are not classes of the model "
                             f"({', '.join(model.classes)})")
        table, backend_name = compute_features(labeled.paths, backend, model.config, Console(stderr=True), decode,
                                               model.features, model.feature_count)
        if not table.ok.any():
            _report_failures(table.failures)  # they say why
            raise UsageError("no image could be processed")
    except UsageError as exc:
        fail_usage(str(exc))
    _report_failures(table.failures)

    targets = np.array([model.classes.index(labeled.classes[t]) for t in labeled.targets[table.ok]])
    matrix = confusion_matrix(targets, model.predict(table.vectors[table.ok]), len(model.classes))
    unwritten = None
    if plot is not None:  # first: a table that cannot be printed (| head, a full disk) must not lose it
        title = f"{labeled_dir.name}: {accuracy_text(matrix)}"
        try:
            replace_with(plot, "--plot", lambda temporary: save_confusion_plot(temporary, model.classes, matrix, title),
                         is_our_png)
        except UsageError as exc:  # said after the tables, which must not be lost either
            unwritten = exc
    console.print(f"model {shown(model_path)}: {shown(model.describe())}")
    console.print(f"backend [bold]{backend_name}[/], {accuracy_line(matrix)}")
    console.print(scores_table(model.classes, matrix))
    console.print(confusion_table(model.classes, matrix))
    if unwritten is not None:
        fail_unwritten(unwritten)
    if plot is not None:
        console.print(f"plot: {shown(os.path.abspath(plot))}")
    raise typer.Exit(1 if table.failures else 0)


def register(app: typer.Typer) -> None:
    """Add ``fit`` and ``evaluate`` to the command line."""
    app.command("fit", cls=Command)(fit)
    app.command("evaluate", cls=Command)(evaluate)
