"""5-fold cross-validated accuracy of the label models we considered, on the same features and folds.

Reads the feature table that ``scripts/fit_eurosat.py --features FILE.npz`` saves (26,500 EuroSAT
tiles), so every method sees the same numbers and the same stratified folds (seed 0):

* ``centroid``   nearest centroid on standardized features;
* ``lda``        the previous model: Mahalanobis distance of the pooled within-class covariance,
                 shrunk 10 % toward the identity (linear discriminant analysis, equal priors);
* ``lda-8``      the same on the previous model's 8 features only (edge density, gray entropy,
                 band means and standard deviations);
* ``knn``        10 nearest neighbours (Euclidean, standardized features, majority vote, ties to
                 the nearest);
* ``softmax-linear``, ``softmax-squares``: softmax regression on the standardized features
                 (plus their squares), fitted like the shipped model;
* ``softmax-quadratic``: the shipped model (features and all pairwise products).

    python scripts/label_alternatives.py /tmp/features26500.npz /tmp/eurosat26500/eurosat_rgb_26500 [--only knn,lda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gpu_pipeline.config import PipelineConfig
from gpu_pipeline.labels.features import FEATURE_NAMES
from gpu_pipeline.labels.labelled import read_labeled_tree
from gpu_pipeline.labels.model import PENALTY, _cross_entropy, fit_model, minimise_lbfgs
from gpu_pipeline.labels.splits import stratified_folds

OLD_FEATURES = ["edge_density", "gray_entropy", "red_mean", "green_mean", "blue_mean", "red_std", "green_std",
                "blue_std"]


def standardizer(train: np.ndarray):
    mean, scale = train.mean(axis=0), train.std(axis=0)
    scale[scale == 0] = 1.0
    return lambda x: (x - mean) / scale


def centroid(train, targets, test, classes):
    z = standardizer(train)
    centres = np.stack([z(train)[targets == k].mean(axis=0) for k in range(classes)])
    return np.argmin(((z(test)[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)


def lda(train, targets, test, classes, shrinkage=0.1):
    z = standardizer(train)
    zt = z(train)
    centres = np.stack([zt[targets == k].mean(axis=0) for k in range(classes)])
    residuals = zt - centres[targets]
    covariance = residuals.T @ residuals / len(zt)
    shrunk = (1 - shrinkage) * covariance + shrinkage * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    whitening = np.linalg.cholesky(np.linalg.inv(shrunk)).T
    a, c = z(test) @ whitening.T, centres @ whitening.T
    return np.argmin(((a[:, None, :] - c[None]) ** 2).sum(axis=2), axis=1)


def lda8(train, targets, test, classes):
    columns = [FEATURE_NAMES.index(name) for name in OLD_FEATURES]
    return lda(train[:, columns], targets, test[:, columns], classes)


def knn(train, targets, test, classes, k=10):
    z = standardizer(train)
    a, b = z(train), z(test)
    predicted = np.empty(len(b), np.int64)
    for start in range(0, len(b), 500):
        block = b[start:start + 500]
        distances = (block ** 2).sum(1)[:, None] - 2 * block @ a.T + (a ** 2).sum(1)[None]
        nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
        for row, neighbours in enumerate(nearest):
            votes = np.bincount(targets[neighbours], minlength=classes)
            winners = np.flatnonzero(votes == votes.max())
            predicted[start + row] = next(targets[n] for n in neighbours if targets[n] in winners)
    return predicted


def softmax(expansion):
    def method(train, targets, test, classes):
        z = standardizer(train)
        a, b = expansion(z(train)), expansion(z(test))
        zz = standardizer(a)
        design = np.hstack([zz(a), np.ones((len(a), 1))])
        parameters = minimise_lbfgs(lambda p: _cross_entropy(p, design, np.eye(classes)[targets], PENALTY),
                                    np.zeros((classes, design.shape[1])))
        return np.argmax(np.hstack([zz(b), np.ones((len(b), 1))]) @ parameters.T, axis=1)
    return method


def quadratic(train, targets, test, classes):
    return fit_model(train, targets, tuple(map(str, range(classes))), PipelineConfig()).predict(test)


METHODS = {"centroid": centroid, "lda": lda, "lda-8": lda8, "knn": knn,
           "softmax-linear": softmax(lambda z: z), "softmax-squares": softmax(lambda z: np.hstack([z, z * z])),
           "softmax-quadratic": quadratic}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("features", type=Path)
    parser.add_argument("tree", type=Path)
    parser.add_argument("--only", help="comma-separated methods (default: all)")
    args = parser.parse_args()
    vectors = np.load(args.features)["vectors"]
    labeled = read_labeled_tree(args.tree)
    targets, classes = labeled.targets, len(labeled.classes)
    fold = stratified_folds(targets, 5, 0)
    for name in (args.only.split(",") if args.only else METHODS):
        started = time.perf_counter()
        predicted = np.empty_like(targets)
        for k in range(5):
            train, test = fold != k, fold == k
            predicted[test] = METHODS[name](vectors[train], targets[train], vectors[test], classes)
        recall = [np.mean(predicted[targets == k] == k) for k in range(classes)]
        print(f"{name:18s} accuracy {np.mean(predicted == targets):.4f}  lowest recall {min(recall):.3f} "
              f"({labeled.classes[int(np.argmin(recall))]})  recalls {' '.join(f'{r:.2f}' for r in recall)}  "
              f"{time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
