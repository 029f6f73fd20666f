"""Trainable land-cover labels: a nearest-centroid model, fitted on labelled folders, saved as JSON.

The model is small enough to read. Each image becomes the float vector of
:func:`gpu_pipeline.classify.feature_vector`; every feature is standardized with the training mean
and standard deviation; the label is the class whose centroid (mean training vector) is nearest in
the Mahalanobis distance of the pooled within-class covariance, shrunk toward a multiple of the
identity by :data:`SHRINKAGE`. That is linear discriminant analysis with equal priors; with
shrinkage 1 it would be plain nearest centroid on standardized features. The JSON file holds the
feature names, the standardization, the whitening matrix (an upper-triangular ``W`` with
``W.T @ W`` the inverse of the shrunk covariance), the centroids in feature units, the pipeline
settings the features were computed with (edge density depends on them) and a training summary.

Labels are computed one vector at a time by the same code in every caller, so a label never
depends on the batch it was computed in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gpu_pipeline.classify import FEATURE_NAMES, Features, PerImage, feature_vector
from gpu_pipeline.config import PipelineConfig
from gpu_pipeline.io import UsageError

FORMAT = "gpu-pipeline label model"
FORMAT_VERSION = 1
#: Weight of the identity in the shrunk covariance: 0.1 was best among 0, 0.05, 0.1, 0.2, 0.5 and 1
#: on held-out EuroSAT tiles (within noise of 0.05), and keeps the matrix invertible on tiny sets.
SHRINKAGE = 0.1
METHOD = "nearest centroid, Mahalanobis distance of the pooled within-class covariance (shrunk)"

#: Models shipped with the package, by the name ``--model`` accepts instead of a path.
SHIPPED_MODELS = {"eurosat": Path(__file__).resolve().parent / "models" / "eurosat_default.json"}


class ModelError(UsageError):
    """A model file is missing, malformed, or does not fit this run (the CLI exits with status 2)."""


@dataclass(frozen=True, eq=False)
class LabelModel:
    """A fitted model; see the module docstring for what each part means."""

    classes: tuple[str, ...]
    mean: np.ndarray  # float64[d]
    scale: np.ndarray  # float64[d], > 0
    whitening: np.ndarray  # float64[d, d]
    centroids: np.ndarray  # float64[classes, d], in feature units
    config: PipelineConfig
    training: dict[str, Any] = field(default_factory=dict)
    feature_names: tuple[str, ...] = FEATURE_NAMES

    @cached_property
    def _whitened_centroids(self) -> np.ndarray:
        return np.stack([self._whiten(c) for c in self.centroids])

    def _whiten(self, vector: np.ndarray) -> np.ndarray:
        return self.whitening @ ((vector - self.mean) / self.scale)

    def nearest(self, vector: np.ndarray) -> int:
        """Index of the class nearest to one feature vector (the first one on a tie)."""
        distances = np.sum((self._whitened_centroids - self._whiten(vector)) ** 2, axis=1)
        return int(np.argmin(distances))

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        """Class indices of feature vectors (rows), one at a time as :meth:`label` does."""
        return np.array([self.nearest(v) for v in vectors], dtype=np.int64)

    def label(self, features: Features) -> str:
        return self.classes[self.nearest(feature_vector(features))]

    def labels(self, images: Sequence[np.ndarray], histograms: np.ndarray, edge_counts: np.ndarray) -> list[str]:
        """A :data:`gpu_pipeline.classify.Labeller`: the label of each image of a batch."""
        return PerImage(self.label)(images, histograms, edge_counts)

    def describe(self) -> str:
        """One line for humans: classes and the pipeline settings the model needs."""
        return f"{len(self.classes)} classes ({', '.join(self.classes)}), fitted with {settings_text(self.config)}"

    def check_config(self, config: PipelineConfig) -> None:
        """Raise ModelError unless ``config`` is the pipeline the model was fitted with."""
        if config != self.config:
            raise ModelError(
                f"the model was fitted with {settings_text(self.config)} but this run uses {settings_text(config)}; "
                "edge features depend on them: use the model's settings or fit a model with yours")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": METHOD,
            "features": list(self.feature_names),
            "classes": list(self.classes),
            "standardize": {"mean": self.mean.tolist(), "scale": self.scale.tolist()},
            "whitening": self.whitening.tolist(),
            "centroids": {name: row.tolist() for name, row in zip(self.classes, self.centroids)},
            "pipeline": asdict(self.config),
            "training": self.training,
        }

    def save(self, path: Path | str) -> None:
        Path(path).write_text(_json_text(self.to_dict()) + "\n")


def _json_text(value: Any, indent: int = 0) -> str:
    """Indented JSON with each list of numbers or names on one line, so matrices read as matrices."""
    inner = " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(key)}: {_json_text(item, indent + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
        return "[\n" + ",\n".join(inner + json.dumps(item) for item in value) + "\n" + " " * indent + "]"
    return json.dumps(value)


def settings_text(config: PipelineConfig) -> str:
    """The pipeline settings as command-line options, e.g. ``--low 100 --high 200 --no-l2 --blur 5``."""
    return (f"--low {config.low_threshold:g} --high {config.high_threshold:g} "
            f"{'--l2' if config.l2_gradient else '--no-l2'} --blur {config.blur_ksize}")


def fit_model(vectors: np.ndarray, targets: np.ndarray, classes: tuple[str, ...], config: PipelineConfig,
              training: dict[str, Any] | None = None, shrinkage: float = SHRINKAGE) -> LabelModel:
    """Fit on feature vectors (rows) with class indices ``targets``; every class needs one vector.

    The training accuracy and the shrinkage are added to ``training``.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    targets = np.asarray(targets)
    counts = np.bincount(targets, minlength=len(classes))
    if len(classes) < 2 or np.any(counts == 0):
        raise ValueError("every class needs at least one training vector, and there must be two classes")
    mean = vectors.mean(axis=0)
    scale = vectors.std(axis=0)
    scale[np.ptp(vectors, axis=0) == 0] = 1.0  # a constant feature tells nothing; avoid 0 / 0
    standardized = (vectors - mean) / scale
    class_means = np.stack([standardized[targets == k].mean(axis=0) for k in range(len(classes))])
    residuals = standardized - class_means[targets]
    covariance = residuals.T @ residuals / len(vectors)
    dims = covariance.shape[0]
    level = np.trace(covariance) / dims
    if level == 0:  # every vector sits on its centroid: only the identity is left to use
        level = 1.0
    shrunk = (1 - shrinkage) * covariance + shrinkage * level * np.eye(dims)
    whitening = np.linalg.cholesky(np.linalg.inv(shrunk)).T
    centroids = class_means * scale + mean
    model = LabelModel(tuple(classes), mean, scale, whitening, centroids, config, dict(training or {}))
    train_accuracy = float(np.mean(model.predict(vectors) == targets))
    model.training.update({"shrinkage": shrinkage, "train_accuracy": round(train_accuracy, 4)})
    return model


def resolve_model_path(model: str | Path) -> Path:
    """A model file, or the file of a shipped model named ``model``; ModelError when neither exists."""
    path = Path(model)
    if path.is_file():
        return path
    if str(model) in SHIPPED_MODELS:
        return SHIPPED_MODELS[str(model)]
    shipped = ", ".join(SHIPPED_MODELS)
    if path.exists():
        raise ModelError(f"model {model} is not a file")
    raise ModelError(f"model file {model} does not exist (shipped models: {shipped})")


def load_model(model: str | Path) -> LabelModel:
    """Read a model file (or a shipped model by name), checking everything; ModelError says what is wrong."""
    path = resolve_model_path(model)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read model {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"model {path} is not valid JSON: {exc}") from None
    try:
        return _model_from_dict(data)
    except ModelError as exc:
        raise ModelError(f"model {path}: {exc}") from None


def _model_from_dict(data: Any) -> LabelModel:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"not a gpu-pipeline label model (no \"format\": \"{FORMAT}\")")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(f"format version {version!r} is not supported (this gpu-pipeline reads {FORMAT_VERSION})")
    features = _require(data, "features", list)
    if features != list(FEATURE_NAMES):
        raise ModelError(f"it uses features {features} but this gpu-pipeline computes {list(FEATURE_NAMES)}")
    dims = len(FEATURE_NAMES)
    classes = _require(data, "classes", list)
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise ModelError("\"classes\" must be two or more distinct, non-empty names")
    standardize = _require(data, "standardize", dict)
    mean = _numbers(standardize.get("mean"), (dims,), "standardize.mean")
    scale = _numbers(standardize.get("scale"), (dims,), "standardize.scale")
    if np.any(scale <= 0):
        raise ModelError("standardize.scale must be > 0")
    whitening = _numbers(data.get("whitening"), (dims, dims), "whitening")
    centroid_map = _require(data, "centroids", dict)
    if sorted(centroid_map) != sorted(classes):
        raise ModelError("\"centroids\" must have one entry per class")
    centroids = _numbers([centroid_map[c] for c in classes], (len(classes), dims), "centroids")
    config = _pipeline_config(_require(data, "pipeline", dict))
    training = data.get("training", {})
    if not isinstance(training, dict):
        raise ModelError("\"training\" must be an object")
    return LabelModel(tuple(classes), mean, scale, whitening, centroids, config, training)


def _pipeline_config(settings: dict) -> PipelineConfig:
    """PipelineConfig from the model's "pipeline" object: exactly its fields, with JSON types that fit."""
    names = [f.name for f in fields(PipelineConfig)]
    for name in names:
        value, default = settings.get(name), getattr(PipelineConfig, name)
        is_bool = isinstance(default, bool)
        if isinstance(value, bool) != is_bool or not (is_bool or isinstance(value, type(default))
                                                       or isinstance(default, float) and isinstance(value, int)):
            raise ModelError(f"\"pipeline\" needs {name} as {type(default).__name__}, got {value!r}")
    if set(settings) != set(names):
        raise ModelError(f"\"pipeline\" must hold exactly {', '.join(names)}")
    try:
        return PipelineConfig(**settings)
    except ValueError as exc:
        raise ModelError(f"bad \"pipeline\" settings: {exc}") from None


def _require(data: dict, key: str, kind: type) -> Any:
    value = data.get(key)
    if not isinstance(value, kind):
        raise ModelError(f"\"{key}\" is missing or not {'an object' if kind is dict else 'a list'}")
    return value


def _numbers(value: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A float64 array of exactly ``shape`` from JSON lists of finite numbers, else ModelError."""
    try:
        array = np.array(value, dtype=np.float64) if _is_number_tree(value) else None
    except ValueError:  # ragged lists
        array = None
    if array is None or array.shape != shape or not np.all(np.isfinite(array)):
        raise ModelError(f"\"{name}\" must be finite numbers of shape {shape}")
    return array


def _is_number_tree(value: Any) -> bool:
    """True for a number or (nested) lists of numbers; JSON true/false are not numbers."""
    if isinstance(value, list):
        return all(_is_number_tree(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)
