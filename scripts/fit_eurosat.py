"""Fit the shipped ``eurosat`` label model and measure it by 5-fold cross-validation.

Usage (the 26,500 EuroSAT RGB tiles of ../shared/data/eurosat_rgb_26500.tar, extracted elsewhere;
never commit them, see ../shared/data/SOURCES.md for their attribution)::

    mkdir -p /tmp/eurosat26500 && tar xf ../shared/data/eurosat_rgb_26500.tar -C /tmp/eurosat26500
    python scripts/fit_eurosat.py /tmp/eurosat26500/eurosat_rgb_26500 --out gpu_pipeline/labels/models/eurosat.json

Features come from the engine with the numba backend and the default pipeline settings, exactly
as ``run --model`` computes them. The script prints the accuracy of each fold, then the pooled
out-of-fold accuracy, per-class precision and recall and the confusion matrix (Markdown, for
docs/labels.md), then fits on all tiles and writes the model, with the cross-validated numbers
in its training summary. Folds are stratified and drawn by ``--seed``; the fit is deterministic,
so the same tiles give the same file byte for byte on one machine (docs/labels.md: the shipped
file came from an earlier version of the fit and is not reproduced byte for byte).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from gpu_pipeline import __version__
from gpu_pipeline.config import PipelineConfig
from gpu_pipeline.errors import bytes_shown
from gpu_pipeline.labels.confusion import accuracy, confusion_matrix, markdown_table
from gpu_pipeline.labels.labelled import compute_features, read_labeled_tree
from gpu_pipeline.labels.model import PENALTY, fit_model
from gpu_pipeline.labels.splits import stratified_folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", type=Path, help="folder with one sub-folder of tiles per class")
    parser.add_argument("--out", type=Path, required=True, help="where to write the model")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--penalty", type=float, default=PENALTY)
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--features", type=Path, help="cache the feature table here (.npz) and reuse it")
    args = parser.parse_args()

    config = PipelineConfig()
    labeled = read_labeled_tree(args.tree)
    if args.features is not None and args.features.exists():
        vectors = np.load(args.features)["vectors"]
        backend = str(np.load(args.features)["backend"])
    else:
        started = time.perf_counter()
        table, backend = compute_features(labeled.paths, args.backend, config, Console(stderr=True))
        if table.failures:
            raise SystemExit(f"{len(table.failures)} tiles failed, e.g. {table.failures[0]}")
        vectors = table.vectors
        print(f"features of {len(vectors)} tiles with backend {backend}: {time.perf_counter() - started:.0f} s")
        if args.features is not None:
            np.savez(args.features, vectors=vectors, backend=backend)
    targets = labeled.targets
    classes = labeled.classes

    fold = stratified_folds(targets, args.folds, args.seed)
    predicted = np.empty_like(targets)
    for k in range(args.folds):
        started = time.perf_counter()
        train, test = fold != k, fold == k
        model = fit_model(vectors[train], targets[train], classes, config, penalty=args.penalty)
        predicted[test] = model.predict(vectors[test])
        print(f"fold {k + 1}/{args.folds}: {accuracy(confusion_matrix(targets[test], predicted[test], len(classes))):.4f}"
              f" on {int(test.sum())} held-out tiles (training {model.training['train_accuracy']:.4f}, "
              f"{time.perf_counter() - started:.0f} s)", flush=True)
    matrix = confusion_matrix(targets, predicted, len(classes))
    recall = np.diag(matrix) / matrix.sum(axis=1)
    print(f"\n{args.folds}-fold cross-validated accuracy: {accuracy(matrix):.4f} "
          f"({int(np.trace(matrix))}/{int(matrix.sum())}); lowest recall {recall.min():.3f} ({classes[recall.argmin()]})")
    print(markdown_table(classes, matrix))

    model = fit_model(vectors, targets, classes, config, {
        "data": f"EuroSAT RGB, {len(targets)} tiles ({bytes_shown(args.tree.name)})",  # (no lone surrogate)
        "backend": backend,
        "images_per_class": {name: int(n) for name, n in zip(classes, np.bincount(targets))},
        "cross_validation": {"folds": args.folds, "seed": args.seed, "accuracy": accuracy(matrix),
                             "recall": {name: round(float(r), 4) for name, r in zip(classes, recall)}},
        "gpu_pipeline_version": __version__,
    }, penalty=args.penalty)
    model.save(args.out)
    print(f"\nfitted on all {len(targets)} tiles (training accuracy {model.training['train_accuracy']:.4f}): {args.out}")


if __name__ == "__main__":
    main()
