"""``gpu-pipeline fit`` and ``gpu-pipeline evaluate``: land-cover models from folder-per-class trees.

A labelled tree is the EuroSAT layout: one sub-folder per class, named after it, with that class's
images anywhere below it. Images go through the same engine and backends as ``run``, so the
features a model is fitted on are the ones ``run --model`` computes.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from gpu_pipeline import __version__
from gpu_pipeline.classify import FEATURE_NAMES, Features, PerImage, feature_vector
from gpu_pipeline.cli_options import (L2, Backend, Bands, Blur, High, Low, Stretch, decode_options, fail_usage,
                                      pipeline_config)
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.io import UsageError, discover
from gpu_pipeline.model import LabelModel, fit_model, load_model, settings_text

#: How many failed images are listed by name before the rest are only counted.
SHOWN_FAILURES = 5


@dataclass(frozen=True)
class LabeledImages:
    """The images of a labelled tree: ``paths[i]`` belongs to class ``classes[targets[i]]``."""

    classes: tuple[str, ...]
    paths: list[Path]
    targets: np.ndarray  # int64, one class index per path


def read_labeled_tree(root: Path, min_classes: int = 2) -> LabeledImages:
    """Classes (sub-folders, sorted, hidden ones skipped) and their images; UsageError when unusable."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder (expected one sub-folder of images per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < min_classes:
        raise UsageError(f"{root} has {len(folders)} class folder{'' if len(folders) == 1 else 's'}, "
                         f"needs at least {min_classes} (one sub-folder of images per class)")
    paths: list[Path] = []
    targets: list[int] = []
    for index, folder in enumerate(folders):
        files = discover([folder])
        if not files:
            raise UsageError(f"class folder {folder} has no images")
        paths += files
        targets += [index] * len(files)
    return LabeledImages(tuple(p.name for p in folders), paths, np.array(targets, dtype=np.int64))


@dataclass(frozen=True)
class FeatureTable:
    """Feature vectors of the images that went through (``ok``) and the failures, one line each."""

    vectors: np.ndarray  # float64[images, features]; rows of failed images are NaN
    ok: np.ndarray  # bool[images]
    failures: list[str]


class _FeatureCollector:
    """Engine hooks that keep each image's feature vector.

    The engine calls ``labels_of`` once per batch and writes what it returns into the records'
    ``label``; returning a fresh ticket per image lets ``write`` pair each vector with its record's
    path, whatever order the engine works in. Only the vector is kept, never the image.
    """

    def __init__(self) -> None:
        self._tickets = itertools.count()
        self._pending: dict[str, np.ndarray] = {}
        self.vectors: dict[str, np.ndarray] = {}
        self.failures: dict[str, str] = {}

    def labels_of(self, images, histograms: np.ndarray, edge_counts: np.ndarray) -> list[str]:
        return PerImage(self._ticket)(images, histograms, edge_counts)

    def _ticket(self, features: Features) -> str:
        ticket = str(next(self._tickets))
        self._pending[ticket] = feature_vector(features)
        return ticket

    def write(self, records: list[dict]) -> None:
        for record in records:
            if "error" in record:
                self.failures[record["path"]] = f"{record['path']}: {record['stage']}: {record['error']}"
            else:
                self.vectors[record["path"]] = self._pending.pop(record["label"])


def compute_features(paths: list[Path], backend_name: str, config: PipelineConfig, console: Console,
                     decode: DecodeOptions | None = None) -> tuple[FeatureTable, str]:
    """Run ``paths`` through the engine; returns the features and the concrete backend's name."""
    from gpu_pipeline.engine import Engine
    from gpu_pipeline.runner import open_backend, progress_bar

    collector = _FeatureCollector()
    backend = open_backend(backend_name, None)
    with backend:
        engine = Engine(backend=backend, config=config, decode_options=decode or DecodeOptions(),
                        workers=os.cpu_count() or 2, labels_of=collector.labels_of)
        if sys.stderr.isatty():
            with progress_bar(console) as bar:
                task = bar.add_task("features", total=len(paths), rate="-")
                engine.run(paths, collector, progress=lambda n: bar.advance(task, n))
        else:
            engine.run(paths, collector)
    missing = np.full(len(FEATURE_NAMES), np.nan)
    vectors = np.stack([collector.vectors.get(str(p), missing) for p in paths])
    ok = np.array([str(p) in collector.vectors for p in paths], dtype=bool)
    return FeatureTable(vectors, ok, list(collector.failures.values())), backend.name


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: ``round(fraction * n)`` images of each class (never all of them), by ``seed``."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(targets), dtype=bool)
    for target in np.unique(targets):
        members = np.flatnonzero(targets == target)
        count = min(len(members) - 1, int(fraction * len(members) + 0.5))
        test[rng.permutation(members)[:count]] = True
    return test


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """``matrix[true, predicted]`` counts."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (targets, predicted), 1)
    return matrix


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def accuracy_text(matrix: np.ndarray) -> str:
    correct, total = int(np.trace(matrix)), int(matrix.sum())
    return f"accuracy {_percent(correct, total)} ({correct}/{total} images)"


def accuracy_line(matrix: np.ndarray) -> str:
    """Accuracy, and what always answering the most common class would score."""
    return (f"{accuracy_text(matrix)}; always answering the most common class: "
            f"{_percent(int(matrix.sum(axis=1).max()), int(matrix.sum()))}")


def scores_table(classes: tuple[str, ...], matrix: np.ndarray) -> Table:
    """Per-class images, precision and recall, for the classes that have images."""
    table = Table(title="per class")
    for name in ("class", "images", "precision", "recall"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for k, name in enumerate(classes):
        images = int(matrix[k].sum())
        if images:
            table.add_row(name, str(images), _percent(int(matrix[k, k]), int(matrix[:, k].sum())),
                          _percent(int(matrix[k, k]), images))
    return table


def confusion_table(classes: tuple[str, ...], matrix: np.ndarray) -> Table:
    """Rows: true class (those with images); columns: predicted class, by number."""
    table = Table(title="confusion matrix (rows: true class, columns: predicted class)")
    table.add_column("true class")
    for k in range(len(classes)):
        table.add_column(str(k + 1), justify="right")
    for k, name in enumerate(classes):
        if matrix[k].sum():
            cells = [f"[bold green]{v}[/]" if j == k else (str(v) if v else "[dim]0[/]")
                     for j, v in enumerate(matrix[k])]
            table.add_row(f"{k + 1} {name}", *cells)
    return table


def save_confusion_plot(path: Path, classes: tuple[str, ...], matrix: np.ndarray, title: str) -> None:
    """A PNG of the row-normalised confusion matrix, with counts in the cells (needs matplotlib)."""
    from matplotlib.figure import Figure

    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.5 * len(classes)), layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            axes.text(column, row, str(count), ha="center", va="center",
                      color="white" if shares[row, column] > 0.5 else "black", fontsize=8)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    figure.savefig(path, dpi=120)


def _report_failures(failures: list[str]) -> None:
    if not failures:
        return
    typer.echo(f"gpu-pipeline: {len(failures)} image(s) could not be processed and were left out:", err=True)
    for line in failures[:SHOWN_FAILURES]:
        typer.echo(f"  {line}", err=True)
    if len(failures) > SHOWN_FAILURES:
        typer.echo(f"  ... and {len(failures) - SHOWN_FAILURES} more", err=True)


def _usable(labeled: LabeledImages, table: FeatureTable) -> None:
    """UsageError when a class lost all its images to failures."""
    for k, name in enumerate(labeled.classes):
        if not np.any(table.ok[labeled.targets == k]):
            raise UsageError(f"no image of class {name} could be processed")


def fit(
    labeled_dir: Path = typer.Argument(..., help="Folder with one sub-folder of images per class (EuroSAT layout).",
                                       show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the model (JSON).", show_default=False),
    backend: Backend = "auto",
    low: Low = PipelineConfig.low_threshold,
    high: High = PipelineConfig.high_threshold,
    l2: L2 = False,
    blur: Blur = PipelineConfig.blur_ksize,
    bands: Bands = None,
    stretch: Stretch = "percentile",
    test_fraction: float = typer.Option(0.2, "--test-fraction",
                                        help="Share of each class held out to measure accuracy (0: fit on all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out draw."),
) -> None:
    """Fit a land-cover model on a folder-per-class tree and write it as JSON.

    The model is fitted on the images not held out; the held-out ones measure its accuracy.
    Runs using it need the same --low, --high, --l2 and --blur (they are stored in the model), and
    should use the same --bands and --stretch (recorded in its training summary).
    Exit status: 0, 1 when some images failed (they are left out), 2 on bad usage.
    """
    try:
        if not 0 <= test_fraction < 1:
            raise UsageError(f"--test-fraction must be in [0, 1), got {test_fraction}")
        config = pipeline_config(low, high, l2, blur)
        decode = decode_options(bands, stretch)
        if not out.parent.is_dir():
            raise UsageError(f"cannot write the model: folder {out.parent} does not exist")
        labeled = read_labeled_tree(labeled_dir, min_classes=2)
        table, backend_name = compute_features(labeled.paths, backend, config, Console(stderr=True), decode)
        _usable(labeled, table)
    except UsageError as exc:
        fail_usage(str(exc))
    _report_failures(table.failures)

    test = np.zeros_like(table.ok)  # drawn among the processed images, so every class keeps one to train on
    test[table.ok] = stratified_split(labeled.targets[table.ok], test_fraction, seed)
    train = table.ok & ~test
    model = fit_model(table.vectors[train], labeled.targets[train], labeled.classes, config, {
        "data": str(labeled_dir),
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
    model.training["test_accuracy"] = _accuracy(test_matrix) if test_matrix is not None else None
    try:
        model.save(out)
    except OSError as exc:
        fail_usage(f"cannot write the model {out}: {exc.strerror or exc}")

    console = Console(soft_wrap=True)
    console.print(f"fitted on [bold]{int(train.sum())}[/] images of {len(labeled.classes)} classes with backend "
                  f"[bold]{backend_name}[/] and {settings_text(config)}")
    console.print(f"training {accuracy_text(train_matrix)}")
    if test_matrix is not None:
        console.print(f"held-out {accuracy_line(test_matrix)}")
        console.print(scores_table(labeled.classes, test_matrix))
        console.print(confusion_table(labeled.classes, test_matrix))
    console.print(f"model: {os.path.abspath(out)}")
    raise typer.Exit(1 if table.failures else 0)


def _per_class(labeled: LabeledImages, mask: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labeled.targets[mask], minlength=len(labeled.classes))
    return {name: int(n) for name, n in zip(labeled.classes, counts)}


def _confusion_of(model: LabelModel, labeled: LabeledImages, table: FeatureTable, mask: np.ndarray) -> np.ndarray:
    return confusion_matrix(labeled.targets[mask], model.predict(table.vectors[mask]), len(labeled.classes))


def _accuracy(matrix: np.ndarray) -> float:
    return round(float(np.trace(matrix) / matrix.sum()), 4)


def evaluate(
    labeled_dir: Path = typer.Argument(..., help="Folder with one sub-folder of images per class (EuroSAT layout).",
                                       show_default=False),
    model_path: str = typer.Option(..., "--model", "-m", show_default=False,
                                   help="Model file from `gpu-pipeline fit`, or a shipped model: eurosat."),
    backend: Backend = "auto",
    bands: Bands = None,
    stretch: Stretch = "percentile",
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also save the confusion matrix as a PNG "
                                        "(needs matplotlib).", show_default=False),
) -> None:
    """Measure a model on a folder-per-class tree: accuracy, per-class precision and recall, confusion matrix.

    Images are processed with the pipeline settings stored in the model. Every class folder must be
    a class of the model. Exit status: 0, 1 when some images failed (left out), 2 on bad usage.
    """
    console = Console(soft_wrap=True)
    try:
        if plot is not None and not _has_matplotlib():
            raise UsageError("--plot needs matplotlib: pip install matplotlib")
        decode = decode_options(bands, stretch)
        model = load_model(model_path)
        labeled = read_labeled_tree(labeled_dir, min_classes=1)
        unknown = [name for name in labeled.classes if name not in model.classes]
        if unknown:
            raise UsageError(f"class folder(s) {', '.join(unknown)} are not classes of the model "
                             f"({', '.join(model.classes)})")
        table, backend_name = compute_features(labeled.paths, backend, model.config, Console(stderr=True), decode)
        if not table.ok.any():
            raise UsageError("no image could be processed")
    except UsageError as exc:
        fail_usage(str(exc))
    _report_failures(table.failures)

    targets = np.array([model.classes.index(labeled.classes[t]) for t in labeled.targets[table.ok]])
    matrix = confusion_matrix(targets, model.predict(table.vectors[table.ok]), len(model.classes))
    console.print(f"model {model_path}: {model.describe()}")
    console.print(f"backend [bold]{backend_name}[/], {accuracy_line(matrix)}")
    console.print(scores_table(model.classes, matrix))
    console.print(confusion_table(model.classes, matrix))
    if plot is not None:
        save_confusion_plot(plot, model.classes, matrix, f"{labeled_dir.name}: {accuracy_text(matrix)}")
        console.print(f"plot: {os.path.abspath(plot)}")
    raise typer.Exit(1 if table.failures else 0)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def register(app: typer.Typer) -> None:
    """Add ``fit`` and ``evaluate`` to the command line."""
    app.command("fit")(fit)
    app.command("evaluate")(evaluate)
