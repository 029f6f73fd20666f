"""Trainable land-cover labels: softmax regression over label features, fitted deterministically, saved as JSON.

The model is multinomial logistic regression (softmax regression; Hastie, Tibshirani & Friedman,
*The Elements of Statistical Learning*, 2nd ed., section 4.4) on a fixed quadratic expansion of
the standardized features: each feature ``x`` of :data:`gpu_pipeline.labels.features.FEATURE_NAMES`
becomes ``z = (x - mean) / scale`` (training mean and standard deviation), the terms are the
``z`` and every product ``z_i * z_j`` with ``i <= j`` (:func:`term_names`), and the label is the
class with the largest score ``bias[k] + weights[k] . terms`` (the first listed on a tie). So the
model file is readable as it is: one named weight per class and term.

Fitting minimises the mean cross-entropy plus an L2 penalty on the weights (not the biases) by
L-BFGS (Nocedal & Wright, *Numerical Optimization*, 2nd ed., algorithm 7.4) with a backtracking
Armijo line search, from zero weights, for a fixed number of iterations, in float64. The terms are
standardized once more while fitting (so one penalty suits all of them) and the result is folded
back into per-term weights. Stored numbers are rounded to :data:`DIGITS` significant digits. Every
product of the fit sums in one fixed order (:func:`matmul_rows`, :func:`matmul_columns`), never in
a BLAS, whose sums depend on its thread count (the iterations grow that last bit into the stored
digits), so fitting the same data twice on one machine writes the same file byte for byte.

Scores are computed by one numba function, each image's sums in one fixed order (eight images side
by side, never mixed), so a label never depends on the batch it was computed in, nor on the backend.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gpu_pipeline.backends import _numba_setup
from gpu_pipeline.config import PipelineConfig, threshold_text
from gpu_pipeline.labels import cnn
from gpu_pipeline.labels.features import FEATURE_BOUND, FEATURE_NAMES, batch_features, feature_kernel
from gpu_pipeline.errors import UsageError

FORMAT = "gpu-pipeline label model"
FORMAT_VERSION = 2
METHOD = "softmax regression on standardized features and their pairwise products"
#: L2 penalty on the standardized-term weights; chosen by 5-fold cross-validation on EuroSAT (docs/labels.md).
PENALTY = 1e-4
#: L-BFGS iterations (fixed, so that the fit does not depend on a tolerance) and remembered pairs.
ITERATIONS = 300
MEMORY = 10
#: Significant digits of the stored numbers.
DIGITS = 10
#: Largest bound on a score (and on a term) that a loaded model may have: far below float64's largest
#: number (1.8e308), so that no partial sum, in any order, overflows.
SCORE_BOUND = 1e300

#: Models shipped with the package, by the name ``--model`` accepts instead of a path.
SHIPPED_MODELS = {name: Path(__file__).resolve().parent / "models" / f"{name}.json"
                  for name in ("eurosat", "eurosat-cnn")}


class ModelError(UsageError):
    """A model file is missing, malformed, or does not fit this run (the CLI exits with status 2)."""


def _pairs(features: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j), i <= j, of the product terms, row by row of the upper triangle."""
    first, second = np.triu_indices(features)
    return first.astype(np.int64), second.astype(np.int64)


def term_names(features: Sequence[str] = FEATURE_NAMES) -> list[str]:
    """The model's terms: every feature, then ``a*b`` for every pair (``a*a`` the squares)."""
    first, second = _pairs(len(features))
    return list(features) + [f"{features[i]}*{features[j]}" for i, j in zip(first, second)]


def expand(standardized: np.ndarray) -> np.ndarray:
    """The terms (rows) of standardized feature vectors: ``z`` then ``z_i * z_j`` for ``i <= j``."""
    first, second = _pairs(standardized.shape[1])
    return np.hstack([standardized, standardized[:, first] * standardized[:, second]])


@_numba_setup.helper
def _block_terms(vectors, start, mean, scale, first, second, terms):
    """``terms[t, b]``: term t of vector ``start + b``, for the 8 columns of ``terms`` (0 past the last vector)."""
    features = vectors.shape[1]
    count = min(8, vectors.shape[0] - start)
    for f in range(features):
        for b in range(count):
            terms[f, b] = (vectors[start + b, f] - mean[f]) / scale[f]
        for b in range(count, 8):
            terms[f, b] = 0.0
    for p in range(first.shape[0]):
        for b in range(8):
            terms[features + p, b] = terms[first[p], b] * terms[second[p], b]


@_numba_setup.helper
def _scores(vectors, mean, scale, first, second, weights, bias, out):
    """``out[n, k]``: the score of class k for vector n, summed in term order (one fixed order).

    Each score is ``bias[k]`` plus ``weights[k, t] * term t`` for every term in order, as written;
    eight vectors are scored side by side, in eight independent sums that the compiler keeps in
    one SIMD register, instead of one long chain of dependent additions. No sum is reordered.
    """
    terms = np.empty((vectors.shape[1] + first.shape[0], 8))
    for start in range(0, vectors.shape[0], 8):
        _block_terms(vectors, start, mean, scale, first, second, terms)
        count = min(8, vectors.shape[0] - start)
        for k in range(bias.shape[0]):
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = bias[k]
            for t in range(terms.shape[0]):
                weight = weights[k, t]
                row = terms[t]
                s0 += weight * row[0]
                s1 += weight * row[1]
                s2 += weight * row[2]
                s3 += weight * row[3]
                s4 += weight * row[4]
                s5 += weight * row[5]
                s6 += weight * row[6]
                s7 += weight * row[7]
            sums = (s0, s1, s2, s3, s4, s5, s6, s7)
            for b in range(count):
                out[start + b, k] = sums[b]


@dataclass(frozen=True, eq=False)
class LabelModel:
    """A fitted model; see the module docstring for what each part means."""

    classes: tuple[str, ...]
    mean: np.ndarray  # float64[features]
    scale: np.ndarray  # float64[features], > 0
    weights: np.ndarray  # float64[classes, terms]
    bias: np.ndarray  # float64[classes]
    config: PipelineConfig
    training: dict[str, Any] = field(default_factory=dict)
    feature_names: tuple[str, ...] = FEATURE_NAMES

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """float64 (N, classes): the class scores of feature vectors (rows)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float64).reshape(-1, len(self.feature_names))
        out = np.empty((len(vectors), len(self.classes)))
        first, second = self._pairs
        _scores(vectors, self.mean, self.scale, first, second, self.weights, self.bias, out)
        return out

    @cached_property
    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The product terms' feature indices, made once per model."""
        return _pairs(len(self.feature_names))

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        """Class indices of feature vectors (rows): the largest score, the first class on a tie."""
        return np.argmax(self.scores(vectors), axis=1).astype(np.int64)

    @property
    def feature_count(self) -> int:
        return len(self.feature_names)

    def compiles_on_warm_up(self) -> bool:
        """Whether its feature and score kernels are missing from numba's cache (a compile of seconds)."""
        return _numba_setup.compiles_on_first_call((feature_kernel(), _scores))

    def features(self, images: Sequence[np.ndarray], histograms: np.ndarray, edge_counts: np.ndarray) -> np.ndarray:
        """float64 (N, features): what :meth:`predict` needs of each image of a batch."""
        return batch_features(images, histograms, edge_counts)

    def labels(self, images: Sequence[np.ndarray], histograms: np.ndarray, edge_counts: np.ndarray) -> list[str]:
        """A :data:`gpu_pipeline.labels.labeller.Labeller`: the label of each image of a batch."""
        if len(images) == 0:
            return []
        return [self.classes[k] for k in self.predict(self.features(images, histograms, edge_counts))]

    def describe(self) -> str:
        """One line for humans: classes and the pipeline settings the model needs."""
        return f"{len(self.classes)} classes ({', '.join(self.classes)}), fitted with {settings_text(self.config)}"

    def check_config(self, config: PipelineConfig, named=None, used: str = "this run uses") -> None:
        """Raise ModelError unless ``config`` is the pipeline the model was fitted with; ``named`` says
        settings as the caller spells them (default :func:`settings_text`, the command line's options)."""
        named = named or settings_text
        if not config.computes_as(self.config):
            raise ModelError(
                f"the model was fitted with {named(self.config)} but {used} {named(config)}; "
                "edge features depend on them: use the model's settings or fit a model with yours")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": METHOD,
            "features": list(self.feature_names),
            "classes": list(self.classes),
            "standardize": {"mean": self.mean.tolist(), "scale": self.scale.tolist()},
            "terms": term_names(self.feature_names),
            "bias": {name: float(b) for name, b in zip(self.classes, self.bias)},
            "weights": {name: row.tolist() for name, row in zip(self.classes, self.weights)},
            "pipeline": asdict(self.config),
            "training": self.training,
        }

    def save(self, path: Path | str) -> None:
        Path(path).write_text(_json_text(self.to_dict()) + "\n", encoding="utf-8")


def _json_text(value: Any, indent: int = 0) -> str:
    """Indented JSON with each list of numbers or names on one line, so it reads as a table."""
    inner = " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(key)}: {_json_text(item, indent + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return json.dumps(value)


def settings_text(config: PipelineConfig) -> str:
    """The pipeline settings as command-line options, e.g. ``--low 100 --high 200 --no-l2 --blur 5``."""
    return (f"--low {threshold_text(config.low_threshold)} --high {threshold_text(config.high_threshold)} "
            f"{'--l2' if config.l2_gradient else '--no-l2'} --blur {config.blur_ksize}")


def _rounded(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to :data:`DIGITS` significant digits (exactly what JSON will hold)."""
    return np.array([float(f"{v:.{DIGITS - 1}e}") for v in np.ravel(values)]).reshape(np.shape(values))


@_numba_setup.helper
def _column_products(a, b, out):
    """``out = a.T @ b``, each sum in the order of ``k``, reading ``a`` and ``b`` once, row by row."""
    out[:] = 0.0
    for k in range(a.shape[0]):
        for i in range(a.shape[1]):
            x = a[k, i]
            for j in range(b.shape[1]):
                out[i, j] += x * b[k, j]


@_numba_setup.helper
def _row_products(a, rows, out):
    """``out = a @ rows.T``, each sum in the order of ``k``: eight rows of ``a`` side by side, in eight
    independent sums that overlap (each the same sum as alone), then the rest one by one."""
    whole = a.shape[0] - a.shape[0] % 8
    for start in range(0, whole, 8):
        for j in range(rows.shape[0]):
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
            for k in range(a.shape[1]):
                weight = rows[j, k]
                s0 += a[start, k] * weight
                s1 += a[start + 1, k] * weight
                s2 += a[start + 2, k] * weight
                s3 += a[start + 3, k] * weight
                s4 += a[start + 4, k] * weight
                s5 += a[start + 5, k] * weight
                s6 += a[start + 6, k] * weight
                s7 += a[start + 7, k] * weight
            sums = (s0, s1, s2, s3, s4, s5, s6, s7)
            for b in range(8):
                out[start + b, j] = sums[b]
    for i in range(whole, a.shape[0]):
        for j in range(rows.shape[0]):
            s = 0.0
            for k in range(a.shape[1]):
                s += a[i, k] * rows[j, k]
            out[i, j] = s


# The fit's products, each sum in one fixed order whatever the BLAS: a multi-threaded BLAS splits its
# sums by thread count, and 300 iterations grow that last bit into the stored digits.
def matmul_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a.T @ b`` of 2-D arrays, each sum in one fixed order."""
    out = np.empty((a.shape[1], b.shape[1]))
    _column_products(np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(b, dtype=np.float64), out)
    return out


def matmul_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``a @ rows.T`` of 2-D arrays, each sum in one fixed order."""
    out = np.empty((a.shape[0], rows.shape[0]))
    _row_products(np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(rows, dtype=np.float64), out)
    return out


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a . b`` of two vectors, summed in order."""
    return float(matmul_rows(a.reshape(1, -1), b.reshape(1, -1))[0, 0])


def _cross_entropy(parameters: np.ndarray, terms: np.ndarray, onehot: np.ndarray, penalty: float
                   ) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of the softmax plus ``penalty / 2 * |weights|^2``, and its gradient.

    ``parameters`` is (classes, terms + 1), the last column the biases; ``terms`` ends with a column of ones.
    """
    logits = matmul_rows(terms, parameters)
    logits -= logits.max(axis=1, keepdims=True)
    exps = np.exp(logits)
    totals = exps.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(totals[:, 0]) - np.sum(logits * onehot, axis=1)))
    gradient = matmul_columns(exps / totals - onehot, terms) / len(terms)
    weights = parameters[:, :-1]
    loss += 0.5 * penalty * float(np.sum(weights * weights))
    gradient[:, :-1] += penalty * weights
    return loss, gradient


def minimise_lbfgs(objective, start: np.ndarray, iterations: int = ITERATIONS, memory: int = MEMORY) -> np.ndarray:
    """L-BFGS (Nocedal & Wright, algorithm 7.4 and 7.5) with a backtracking Armijo line search.

    Runs ``iterations`` steps (fewer only when the gradient vanishes or no step decreases the
    objective), so the result depends on nothing but the objective and the start.
    """
    x = start.copy()
    value, gradient = objective(x)
    steps: list[np.ndarray] = []
    changes: list[np.ndarray] = []
    for _ in range(iterations):
        g = gradient.ravel()
        if not np.any(g):
            break
        # two-loop recursion: direction = -H g
        q = g.copy()
        alphas = []
        for s, y in zip(reversed(steps), reversed(changes)):
            alpha = dot(s, q) / dot(y, s)
            alphas.append(alpha)
            q -= alpha * y
        if steps:
            q *= dot(steps[-1], changes[-1]) / dot(changes[-1], changes[-1])
        else:
            q /= float(np.sqrt(dot(g, g)))  # first step: unit length along the gradient
        for (s, y), alpha in zip(zip(steps, changes), reversed(alphas)):
            beta = dot(y, q) / dot(y, s)
            q += (alpha - beta) * s
        direction = -q
        slope = dot(g, direction)
        if slope >= 0:  # not a descent direction (numerical trouble): restart from the gradient
            steps.clear()
            changes.clear()
            direction = -g / float(np.sqrt(dot(g, g)))
            slope = dot(g, direction)
        length = 1.0
        for _ in range(40):
            candidate = x + length * direction.reshape(x.shape)
            new_value, new_gradient = objective(candidate)
            if new_value <= value + 1e-4 * length * slope:
                break
            length /= 2
        else:
            break
        s = (candidate - x).ravel()
        y = (new_gradient - gradient).ravel()
        if dot(y, s) > 1e-12:
            steps.append(s)
            changes.append(y)
            if len(steps) > memory:
                steps.pop(0)
                changes.pop(0)
        x, value, gradient = candidate, new_value, new_gradient
    return x


def _constant_terms(standardized: np.ndarray) -> np.ndarray:
    """Which terms of exactly standardized vectors are constant up to rounding (spread under 1e-9 of size).

    With one vector per class every square and product is 1 but for rounding, and with the stored
    mean and scale (10 digits) that rounding, over a small spread, reached 1e-6: fitted to that noise,
    weights of 1e14. So constancy is judged on the exact mean and scale, where rounding stays ~1e-16.
    """
    terms = expand(standardized)
    return np.ptp(terms, axis=0) <= 1e-9 * np.max(np.abs(terms), axis=0)


def fit_model(vectors: np.ndarray, targets: np.ndarray, classes: tuple[str, ...], config: PipelineConfig,
              training: dict[str, Any] | None = None, penalty: float = PENALTY,
              iterations: int = ITERATIONS) -> LabelModel:
    """Fit on feature vectors (rows) with class indices ``targets``; every class needs one vector.

    Deterministic: the same inputs give the same model, number for number. The training accuracy
    and the fitting settings are added to ``training``.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(targets, minlength=len(classes))
    if len(classes) < 2 or np.any(counts == 0) or len(counts) != len(classes):
        raise ValueError("every class needs at least one training vector, and there must be two classes")
    exact_mean = vectors.mean(axis=0)
    exact_scale = vectors.std(axis=0)
    exact_scale[np.ptp(vectors, axis=0) == 0] = 1.0  # a constant feature tells nothing; avoid 0 / 0
    mean, scale = _rounded(exact_mean), _rounded(exact_scale)
    terms = expand((vectors - mean) / scale)
    # Standardize the terms too, so that one penalty fits them all; folded back into the weights below.
    term_mean = terms.mean(axis=0)
    term_scale = terms.std(axis=0)
    term_scale[_constant_terms((vectors - exact_mean) / exact_scale)] = np.inf  # a constant term gets weight 0
    design = np.hstack([(terms - term_mean) / term_scale, np.ones((len(terms), 1))])
    onehot = np.eye(len(classes))[targets]
    parameters = minimise_lbfgs(lambda p: _cross_entropy(p, design, onehot, penalty),
                                np.zeros((len(classes), design.shape[1])), iterations)
    weights = parameters[:, :-1] / term_scale
    bias = parameters[:, -1] - matmul_rows(weights, term_mean.reshape(1, -1))[:, 0]
    model = LabelModel(tuple(classes), mean, scale, _rounded(weights), _rounded(bias), config,
                       dict(training or {}))
    train_accuracy = float(np.mean(model.predict(vectors) == targets))
    model.training.update({"penalty": penalty, "iterations": iterations, "train_accuracy": round(train_accuracy, 4)})
    return model


def resolve_model_path(model: str | Path) -> Path:
    """A model file, or the file of a shipped model named ``model``; ModelError when neither exists."""
    path = Path(model)
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return path
        problem = f"model {model} is not a file"
    except OSError as exc:  # (Path.is_file raises on a name too long)
        problem = (f"model file {model} does not exist (shipped models: {', '.join(SHIPPED_MODELS)})"
                   if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
                   else f"cannot read model {model}: {exc.strerror}")
    if str(model) in SHIPPED_MODELS:
        return SHIPPED_MODELS[str(model)]
    raise ModelError(problem)


def load_model(model: str | Path) -> LabelModel | cnn.CnnModel:
    """Read a model file (or a shipped model by name), checking everything; ModelError says what is wrong.

    The file's ``format`` says which kind of model it is: softmax regression on features (this
    module) or an integer CNN (:mod:`gpu_pipeline.labels.cnn`)."""
    path = resolve_model_path(model)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8 (RFC 8259), whatever the locale
    except OSError as exc:
        raise ModelError(f"cannot read model {path}: {exc}") from None
    except UnicodeDecodeError as exc:  # (an image, an npz, a pickle: said as such, not as a read error)
        problem = f"not UTF-8 JSON text: {exc.reason} at byte {exc.start}"
        raise ModelError(f"model {path} is not a model file ({problem})") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"model {path} is not valid JSON: {exc}") from None
    except RecursionError:  # lists in lists, thousands deep: no model is
        raise ModelError(f"model {path} is nested too deeply to be a model") from None
    except MemoryError:  # a file of gigabytes (--model given a disk image, say): read whole, it does not fit
        raise ModelError(f"model {path} is too large to be read into memory") from None
    try:
        return cnn.model_from_dict(data) if cnn.is_cnn_model(data) else _model_from_dict(data)
    except (ModelError, cnn.CnnModelError) as exc:
        raise ModelError(f"model {path}: {exc}") from None
    except RecursionError:  # nested deep enough for the checks' recursion, not the parser's
        raise ModelError(f"model {path} is nested too deeply to be a model") from None


def _model_from_dict(data: Any) -> LabelModel:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"not a gpu-pipeline label model (no \"format\": \"{FORMAT}\" or \"{cnn.FORMAT}\")")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(f"format version {version!r} is not supported (this gpu-pipeline reads {FORMAT_VERSION}; "
                         "fit the model again)")
    features = _require(data, "features", list)
    if features != list(FEATURE_NAMES):
        raise ModelError(f"it uses features {features} but this gpu-pipeline computes {list(FEATURE_NAMES)}")
    dims = len(FEATURE_NAMES)
    names = term_names()
    if _require(data, "terms", list) != names:
        raise ModelError(f"\"terms\" must be the features and their pairwise products ({len(names)} names)")
    classes = _require(data, "classes", list)
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise ModelError("\"classes\" must be two or more distinct, non-empty names")
    cnn.check_utf8(classes, ModelError)
    standardize = _require(data, "standardize", dict)
    mean = _numbers(standardize.get("mean"), (dims,), "standardize.mean")
    scale = _numbers(standardize.get("scale"), (dims,), "standardize.scale")
    if np.any(scale <= 0):
        raise ModelError("standardize.scale must be > 0")
    bias_map = _require(data, "bias", dict)
    weight_map = _require(data, "weights", dict)
    for key, mapping in (("bias", bias_map), ("weights", weight_map)):
        if sorted(mapping) != sorted(classes):
            raise ModelError(f"\"{key}\" must have one entry per class")
    bias = _numbers([bias_map[c] for c in classes], (len(classes),), "bias")
    weights = _numbers([weight_map[c] for c in classes], (len(classes), len(names)), "weights")
    if not _scores_stay_finite(mean, scale, weights, bias):
        raise ModelError("\"weights\", \"bias\" and \"standardize\" are so extreme that scores could overflow "
                         "float64 (to inf and NaN, which label nothing)")
    config = _pipeline_config(_require(data, "pipeline", dict))
    training = data.get("training", {})
    if not isinstance(training, dict):
        raise ModelError("\"training\" must be an object")
    return LabelModel(tuple(classes), mean, scale, weights, bias, config, training)


def _scores_stay_finite(mean: np.ndarray, scale: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> bool:
    """Whether every score of every image stays below :data:`SCORE_BOUND`: finite numbers can still
    overflow (weights of 1e308, a scale of 1e-308), and a NaN score made the label the first class.
    Bounded with every feature in 0..FEATURE_BOUND, so a model ``fit`` wrote passes by far."""
    first, second = _pairs(len(mean))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is the answer, not a warning
        z = (FEATURE_BOUND + np.abs(mean)) / scale
        terms = np.concatenate([z, z[first] * z[second]])
        scores = np.abs(bias) + np.abs(weights) @ terms
    return bool(np.all(terms < SCORE_BOUND) and np.all(scores < SCORE_BOUND))


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
    except (ValueError, OverflowError):  # ragged lists, an integer beyond float64 (10**400)
        array = None
    if array is None or array.shape != shape or not np.all(np.isfinite(array)):
        raise ModelError(f"\"{name}\" must be finite numbers of shape {shape}")
    return array


def _is_number_tree(value: Any) -> bool:
    """True for a number or (nested) lists of numbers; JSON true/false are not numbers."""
    if isinstance(value, list):
        return all(_is_number_tree(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)
