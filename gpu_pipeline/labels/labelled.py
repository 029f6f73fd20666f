"""Labelled image trees (the EuroSAT layout) and their features, computed by the engine.

A labelled tree has one sub-folder per class, named after it, with that class's images anywhere
below it. Images go through the same engine and backends as ``run``, so the features a model is
fitted on are the ones ``run --model`` computes.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.console import Console

from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.labels.features import FEATURE_NAMES, batch_features
from gpu_pipeline.errors import UsageError, is_utf8, printable
from gpu_pipeline.inputs.discover import discover

#: ``features_of(images, histograms, edge_counts)``: float64 (N, width) features of a batch.
FeaturesOf = Callable[[Sequence[np.ndarray], np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LabeledImages:
    """The images of a labelled tree: ``paths[i]`` belongs to class ``classes[targets[i]]``."""

    classes: tuple[str, ...]
    paths: list[Path]
    targets: np.ndarray  # int64, one class index per path


def read_labeled_tree(root: Path, min_classes: int = 2) -> LabeledImages:
    """Classes (sub-folders, sorted, hidden ones skipped) and their images; UsageError when unusable,
    a folder that cannot be listed included: a model fitted or scored without its images is wrong."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder (expected one sub-folder of images per class)")
    try:
        with os.scandir(root) as listing:
            folders = sorted(Path(entry.path) for entry in listing
                             if entry.is_dir() and not entry.name.startswith("."))
    except OSError as exc:
        raise UsageError(f"cannot list {printable(str(root))} ({exc.strerror or exc})") from None
    if len(folders) < min_classes:
        raise UsageError(f"{root} has {len(folders)} class folder{'' if len(folders) == 1 else 's'}, "
                         f"needs at least {min_classes} (one sub-folder of images per class)")
    for folder in folders:
        if not is_utf8(folder.name):  # a class name goes into records, tables and the model's JSON
            raise UsageError(f"class folder {folder} has a name that is not UTF-8; rename it")
    paths: list[Path] = []
    targets: list[int] = []
    for index, folder in enumerate(folders):
        unlisted: list[tuple[str, str]] = []
        files = discover([folder], unlisted=unlisted)
        if unlisted:
            where, reason = unlisted[0]
            raise UsageError(f"cannot list {printable(where)} ({reason}): images of class {folder.name} would be left "
                             "out; make it readable, or move it out of the labelled tree")
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
    """Engine hooks that keep each image's feature vector, as ``features_of`` computes it.

    The engine calls ``labels_of`` once per batch and writes what it returns into the records'
    ``label``; returning a fresh ticket per image lets ``write`` pair each vector with its record's
    path, whatever order the engine works in. Only the vector is kept, never the image.
    """

    def __init__(self, features_of: FeaturesOf = batch_features) -> None:
        self._features_of = features_of
        self._tickets = itertools.count()
        self._pending: dict[str, np.ndarray] = {}
        self.vectors: dict[str, np.ndarray] = {}
        self.failures: dict[str, str] = {}

    def labels_of(self, images, histograms: np.ndarray, edge_counts: np.ndarray) -> list[str]:
        tickets = []
        for vector in self._features_of(images, histograms, edge_counts):
            tickets.append(str(next(self._tickets)))
            self._pending[tickets[-1]] = vector
        return tickets

    def write(self, records: list[dict]) -> None:
        for record in records:
            if "error" in record:
                self.failures[record["path"]] = f"{record['path']}: {record['stage']}: {record['error']}"
            else:
                self.vectors[record["path"]] = self._pending.pop(record["label"])


def compute_features(paths: list[Path], backend_name: str, config: PipelineConfig, console: Console,
                     decode: DecodeOptions | None = None, features_of: FeaturesOf = batch_features,
                     width: int = len(FEATURE_NAMES)) -> tuple[FeatureTable, str]:
    """Run ``paths`` through the engine; returns the features and the concrete backend's name.

    ``features_of(images, histograms, edge_counts)`` gives ``width`` features per image: the
    softmax model's by default, a model's own ``features`` for any other (the CNN's pooled sums).
    """
    from gpu_pipeline.engine.cores import usable_cores
    from gpu_pipeline.engine.stream import Engine
    from gpu_pipeline.engine.job import open_backend, progress_bar, warm_up_backend

    collector = _FeatureCollector(features_of)
    backend = open_backend(backend_name, None)
    with backend:
        engine = Engine(backend=backend, config=config, decode_options=decode or DecodeOptions(),
                        workers=usable_cores(), labels_of=collector.labels_of)
        if sys.stderr.isatty():
            # (a compile announced first, as run does: the bar sat at 0 for 15-20 s without a word)
            warm_up_backend(backend, config, console)
            with progress_bar(console) as bar:
                task = bar.add_task("features", total=len(paths), rate="-")
                engine.run(paths, collector, progress=lambda n: bar.advance(task, n))
        else:
            engine.run(paths, collector)
    missing = np.full(width, np.nan)
    vectors = np.stack([collector.vectors.get(str(p), missing) for p in paths])
    ok = np.array([str(p) in collector.vectors for p in paths], dtype=bool)
    return FeatureTable(vectors, ok, list(collector.failures.values())), backend.name
