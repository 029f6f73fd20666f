"""Confusion matrices and the scores read from them: accuracy, per-class precision and recall."""

from __future__ import annotations

import numpy as np
from rich.table import Table

from gpu_pipeline.errors import shown


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """``matrix[true, predicted]`` counts."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(targets, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def accuracy(matrix: np.ndarray) -> float:
    """Share of the diagonal, rounded to 4 digits (as stored in a model's training summary)."""
    return round(float(np.trace(matrix) / matrix.sum()), 4)


def accuracy_text(matrix: np.ndarray) -> str:
    correct, total = int(np.trace(matrix)), int(matrix.sum())
    return f"accuracy {percent(correct, total)} ({correct}/{total} images)"


def accuracy_line(matrix: np.ndarray) -> str:
    """Accuracy, and what always answering the most common class would score."""
    return (f"{accuracy_text(matrix)}; always answering the most common class: "
            f"{percent(int(matrix.sum(axis=1).max()), int(matrix.sum()))}")


def scores_table(classes: tuple[str, ...], matrix: np.ndarray) -> Table:
    """Per-class images, precision and recall, for the classes that have images (names :func:`shown`:
    a class folder ``[red]x[`` is text, not markup, and a newline stays in its row)."""
    table = Table(title="per class")
    for name in ("class", "images", "precision", "recall"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for k, name in enumerate(classes):
        images = int(matrix[k].sum())
        if images:
            table.add_row(shown(name), str(images), percent(int(matrix[k, k]), int(matrix[:, k].sum())),
                          percent(int(matrix[k, k]), images))
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
            table.add_row(f"{k + 1} {shown(name)}", *cells)
    unnamed = [f"{k + 1} {shown(name)}" for k, name in enumerate(classes) if not matrix[k].sum()]
    if unnamed:  # (their columns were numbers named nowhere: a tree of some of the model's classes)
        table.caption = "classes without images here (columns only): " + ", ".join(unnamed)
    return table


def markdown_table(classes: tuple[str, ...], matrix: np.ndarray) -> str:
    """The confusion matrix with recall per row and precision per column, as a Markdown table."""
    short = [name[:4] for name in classes]
    lines = ["| true \\ predicted | " + " | ".join(short) + " | recall |",
             "|---" * (len(classes) + 2) + "|"]
    for k, name in enumerate(classes):
        cells = [f"**{v}**" if j == k else str(v) for j, v in enumerate(matrix[k])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {percent(int(matrix[k, k]), int(matrix[k].sum()))} |")
    lines.append("| precision | " + " | ".join(percent(int(matrix[k, k]), int(matrix[:, k].sum()))
                                            for k in range(len(classes))) + " | |")
    return "\n".join(lines)
