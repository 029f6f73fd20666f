"""The confusion matrix as a picture (``evaluate --plot``); matplotlib is optional."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from gpu_pipeline.errors import printable
from gpu_pipeline.outputs.files import SOFTWARE

#: The most classes a plot draws (``evaluate --plot`` refuses more before any work): 100 take 2 s and
#: 300 MB in a figure of the largest size; the size grew with the classes, and 1,100 asked for 32 GiB.
MAX_CLASSES = 100
#: The largest figure, in inches (at 120 dpi: 2880 x 2400 pixels); fits 38 classes at full size.
MAX_SIZE = (24.0, 20.0)


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_confusion_plot(path: Path, classes: tuple[str, ...], matrix: np.ndarray, title: str) -> None:
    """A PNG of :func:`confusion_figure` (needs matplotlib)."""
    figure = confusion_figure(classes, matrix, title)
    with warnings.catch_warnings():  # matplotlib's (a glyph its fonts lack, drawn as a box) are not ours to print
        warnings.simplefilter("ignore")
        # "tight": the picture grows to hold names and a title longer than the class count made room for
        # (the layout gave up, and two EuroSAT names cut it); "Software": the mark of a file ours to replace
        figure.savefig(path, dpi=120, format="png", metadata={"Software": SOFTWARE}, bbox_inches="tight")


def confusion_figure(classes: tuple[str, ...], matrix: np.ndarray, title: str):
    """The row-normalised confusion matrix, with counts in the cells, as a matplotlib Figure.

    Names are drawn as they are: never as mathtext (a ``$`` in a folder name was parsed, and failed),
    on one line, a byte that is not UTF-8 as ``\\xNN``.
    """
    from matplotlib.figure import Figure

    names = [printable(name) for name in classes]
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = (min(1.0 + 0.6 * len(classes), MAX_SIZE[0]), min(0.8 + 0.5 * len(classes), MAX_SIZE[1]))
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            axes.text(column, row, str(count), ha="center", va="center",
                      color="white" if shares[row, column] > 0.5 else "black", fontsize=8)
    axes.set_xticks(range(len(classes)), names, rotation=45, ha="right", parse_math=False)
    axes.set_yticks(range(len(classes)), names, parse_math=False)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(printable(title), parse_math=False)
    return figure
