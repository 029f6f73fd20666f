"""From a backend's outputs to a label, on the host, so labels are identical on every backend.

A labeller sees what every backend produces byte-identically (the gray histogram and the edge
count) and the decoded image (the same bytes for every backend), so the same function gives the
same labels on every path. Land-cover models compute their features from these in
:mod:`gpu_pipeline.labels.features`.

The default rule is honest about what it measures: how much edge structure a tile has (edge density,
the fraction of edge pixels) and, for smooth tiles, whether they are dark or bright
(mean gray level of the histogram, before equalization). It is not land cover; trainable land-cover labels come from
``gpu-pipeline fit`` (:mod:`gpu_pipeline.labels.model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gpu_pipeline.config import PipelineConfig
from gpu_pipeline.errors import UsageError, one_line
from gpu_pipeline.images import pixel_counts

#: Edge-density bands of the default rule (fraction of pixels that are edges). Equalization
#: stretches every tile to full contrast, so even calm water shows some edges: on the EuroSAT tiles
#: with the default thresholds (100, 200) the median density runs from 0.12 (AnnualCrop) to 0.30
#: (Residential).
SMOOTH_BELOW = 0.10
BUSY_FROM = 0.22
#: Mean gray levels (0-255) under / over which a flat tile is called dark / bright.
DARK_BELOW = 48
BRIGHT_FROM = 208

DEFAULT_LABELS = ("dark-smooth", "bright-smooth", "smooth", "textured", "busy")

#: The 256 gray levels, for means over a histogram.
GRAY_LEVELS = np.arange(256, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Features:
    """Integer outputs of the pipeline for one image, the same bytes on every backend."""

    histogram: np.ndarray  # int64[256] of the gray image
    edge_count: int
    pixels: int
    image: np.ndarray | None = field(default=None, repr=False)  # the decoded uint8 image

    @property
    def edge_density(self) -> float:
        return self.edge_count / self.pixels

    @property
    def mean_gray(self) -> float:
        return float(np.dot(self.histogram, GRAY_LEVELS)) / self.pixels


def _rule(density: np.ndarray, mean: np.ndarray) -> list[str]:
    """The documented rule (README, "Labels") for edge densities and mean gray levels."""
    # np.select takes the first true condition, in the order of the rule.
    chosen = np.select([density >= BUSY_FROM, density >= SMOOTH_BELOW, mean < DARK_BELOW, mean >= BRIGHT_FROM],
                       [4, 3, 0, 1], default=2)
    return [DEFAULT_LABELS[i] for i in chosen]


def default_label(features: Features) -> str:
    """The documented rule (README, "Labels") for one image."""
    return _rule(np.array([features.edge_density]), np.array([features.mean_gray]))[0]


#: What labels a batch of images: ``labeller(images, histograms, edge_counts)`` returns one label
#: per image. ``images`` are the decoded uint8 images (the same bytes on every backend),
#: ``histograms`` int64 (N, 256) their gray histograms and ``edge_counts`` int64 (N,) their edge
#: counts, as the backend computed them (byte-identical on every backend, so labels are too).
#: A model's labeller also takes a fourth argument, ``label_features``: the model's features as a
#: backend computed them on its device (:meth:`gpu_pipeline.backends.base.Backend.attach_label_model`),
#: passed only when the backend computed them.
Labeller = Callable[..., list[str]]


def default_labels(images: Sequence[np.ndarray], histograms: np.ndarray, edge_counts: np.ndarray) -> list[str]:
    """The documented rule (README, "Labels") for a batch: :func:`default_label` of every image."""
    if len(images) == 0:
        return []
    pixels = pixel_counts(images)
    return _rule(np.asarray(edge_counts, dtype=np.int64) / pixels,
                 (np.asarray(histograms, dtype=np.int64) @ GRAY_LEVELS) / pixels)


def warm_up_labeller(labeller: Labeller) -> None:
    """Label a tiny gray and a tiny RGB image, so that a labeller's kernels (a model's features) are
    compiled or loaded from numba's cache now, not in the middle of the first batch."""
    images = [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.uint8)]
    histograms = np.zeros((2, 256), np.int64)
    histograms[:, 0] = 64
    labeller(images, histograms, np.zeros(2, np.int64))


def labeller_compiles(labeller: Labeller) -> bool:
    """Whether warming ``labeller`` up compiles kernels (a model's, missing from numba's cache)."""
    check = getattr(getattr(labeller, "__self__", None), "compiles_on_warm_up", None)
    return bool(check is not None and check())


def attach_label_model(backend, labels_of: Labeller) -> bool:
    """Offer the model behind ``labels_of`` (a model's ``labels`` method) to ``backend``, which may
    then compute the model's features on its device; True when it took it."""
    model = getattr(labels_of, "__self__", None)
    offer = getattr(backend, "attach_label_model", None)  # verify's OpenCV oracle is no backend
    return model is not None and offer is not None and bool(offer(model))


def attach_label_model_or_close(backend, labels_of: Labeller) -> BaseException | None:
    """:func:`attach_label_model`; where ``backend``'s GPU fails as it takes the model (copying a
    CNN's weights), the backend is closed and that error returned: the caller reports a backend
    that could not start (``run``: exit 2; ``verify``: that backend failed), not a traceback.
    Any other error closes the backend too, and is raised."""
    try:
        attach_label_model(backend, labels_of)
    except Exception as exc:
        with backend:  # (closed; a failed GPU's close raises nothing more)
            if not backend.is_device_failure(exc):
                raise
        return exc
    return None


def model_module(who: str):
    """``gpu_pipeline.labels.model`` (it imports this module: imported here when needed), whose
    feature kernels are numba's; UsageError saying that ``who`` needs numba when numba cannot be
    imported (missing, or a broken llvmlite)."""
    try:
        from gpu_pipeline.labels import model
    except (ImportError, OSError) as exc:
        raise UsageError(f"{who} needs numba, which cannot be imported ({one_line(exc)})") from None
    return model


def label_function(model: str | Path | None, config: PipelineConfig | None = None) -> Labeller:
    """The labeller of a run: the default rule without a model, else the model's ``labels``.

    ``model`` is a model file or the name of a shipped model (``eurosat``). With ``config``, the
    run's pipeline settings are checked against those the model was fitted with (its edge features
    depend on them). Raises :class:`gpu_pipeline.labels.model.ModelError` (a ``UsageError``) when the model
    cannot be used.
    """
    if model is None:
        return default_labels
    load_model = model_module(f"--model {model}").load_model

    label_model = load_model(model)
    if config is not None:
        label_model.check_config(config)
    return label_model.labels
