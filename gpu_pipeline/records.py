"""Records a batch at a time: one :class:`RecordBatch` per engine batch, encoded in one go.

The engine used to build a dict per image and the sink a ``json.dumps`` per dict; on 64x64 tiles
that Python work cost more than the pixels (docs/benchmarks.md, "Where the time goes"). A
:class:`RecordBatch` keeps the batch's arrays and is still a sequence of the same dicts for any
code that reads records one by one; :func:`jsonl_text` and :func:`csv_text` write its lines
without making those dicts.

The 256 histogram counts per record are the bulk of the text. They are formatted by a numba
kernel that runs without the GIL (:func:`_histogram_lines`); the other fields are formatted by
the same Python functions ``json.dumps`` and ``csv.writer`` use, so the bytes are the same as
before. Measured per histogram row (256 rows, 2 shared cores): ``",".join(map(str, row))``
42-47 us, ``json.dumps`` 35-38 us, msgspec on ``tolist()`` 4.9-5.1 us, this kernel 3.3-3.6 us
(GIL released), orjson with numpy support 2.1-2.2 us (GIL held, and one more dependency).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string  # what json.dumps uses for str

import numpy as np

from gpu_pipeline.backends._numba_setup import helper

#: Columns of the CSV rows (the same as :data:`gpu_pipeline.sinks.COLUMNS`).
CSV_COLUMNS = ("path", "width", "height", "bands", "backend", "edge_count", "edge_density", "label",
               "histogram", "stage", "error")

_COMMA, _SPACE, _NEWLINE = 44, 32, 10


@helper
def _histogram_lines(histograms, separator):
    """The rows of ``histograms`` (int64, non-negative) as decimal text, one line per row."""
    rows, bins = histograms.shape
    out = np.empty(rows * bins * 20 + rows, np.uint8)
    digits = np.empty(20, np.uint8)
    end = 0
    for i in range(rows):
        for j in range(bins):
            if j:
                out[end] = separator
                end += 1
            value = histograms[i, j]
            count = 0
            while True:
                digits[count] = 48 + value % 10
                value //= 10
                count += 1
                if value == 0:
                    break
            while count:
                count -= 1
                out[end] = digits[count]
                end += 1
        out[end] = _NEWLINE
        end += 1
    return out[:end]


def histogram_texts(histograms: np.ndarray, separator: str = ",") -> list[str]:
    """Each row of an int64 (N, 256) array as ``"c0,c1,...,c255"`` (one numba call per batch)."""
    if len(histograms) == 0:
        return []
    text = _histogram_lines(np.ascontiguousarray(histograms, dtype=np.int64), ord(separator))
    return text.tobytes().decode("ascii").split("\n")[:-1]


@dataclass
class RecordBatch(Sequence[dict]):
    """The records of one batch, in input order: results and errors.

    ``errors`` maps a position to its error record; the other positions are results, in order,
    with their fields in the arrays (one entry per result).
    """

    paths: list[str]
    errors: dict[int, dict]
    backend: str
    widths: list[int]
    heights: list[int]
    bands: list[int]
    histograms: np.ndarray  # int64 (results, 256)
    edge_counts: list[int]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        if position in self.errors:
            return self.errors[position]
        k = self._result_index(position)
        width, height, edge_count = self.widths[k], self.heights[k], self.edge_counts[k]
        return {
            "path": self.paths[position],
            "width": width,
            "height": height,
            "bands": self.bands[k],
            "backend": self.backend,
            "histogram": self.histograms[k].tolist(),
            "edge_count": edge_count,
            "edge_density": round(edge_count / (width * height), 6),
            "label": self.labels[k],
        }

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def _result_index(self, position: int) -> int:
        return position - sum(1 for p in self.errors if p < position)

    def edge_densities(self) -> list[float]:
        """``round(edge_count / pixels, 6)`` of each result, as the dict records hold it."""
        pixels = np.asarray(self.widths, np.int64) * np.asarray(self.heights, np.int64)
        return [round(d, 6) for d in (np.asarray(self.edge_counts, np.int64) / pixels).tolist()]

    def _lines(self, result_line, error_line) -> list[str]:
        """One line per record, in order; ``result_line(k)`` for the k-th result."""
        lines = []
        k = 0
        for position in range(len(self.paths)):
            if position in self.errors:
                lines.append(error_line(self.errors[position]))
            else:
                lines.append(result_line(k))
                k += 1
        return lines


def jsonl_text(records: Iterable[dict]) -> str:
    """JSON Lines of ``records``: exactly ``json.dumps(record, separators=(",", ":"))`` per line."""
    if not isinstance(records, RecordBatch):
        return "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
    batch = records
    histograms = histogram_texts(batch.histograms, ",")
    densities = batch.edge_densities()
    backend = _json_string(batch.backend)
    label_json = {label: _json_string(label) for label in set(batch.labels)}
    result_paths = [p for i, p in enumerate(batch.paths) if i not in batch.errors]

    def result_line(k: int) -> str:
        return (f'{{"path":{_json_string(result_paths[k])},"width":{batch.widths[k]},'
                f'"height":{batch.heights[k]},"bands":{batch.bands[k]},"backend":{backend},'
                f'"histogram":[{histograms[k]}],"edge_count":{batch.edge_counts[k]},'
                f'"edge_density":{densities[k]!r},"label":{label_json[batch.labels[k]]}}}\n')

    def error_line(record: dict) -> str:
        return json.dumps(record, separators=(",", ":")) + "\n"

    return "".join(batch._lines(result_line, error_line))


def csv_text(records: Iterable[dict]) -> str:
    """CSV rows of ``records`` (:data:`CSV_COLUMNS`, no header), as ``csv.writer`` writes them."""
    if not isinstance(records, RecordBatch):
        return _csv_writer_text(_csv_row(record) for record in records)
    batch = records
    histograms = histogram_texts(batch.histograms, " ")
    densities = batch.edge_densities()
    result_paths = [p for i, p in enumerate(batch.paths) if i not in batch.errors]

    def result_line(k: int) -> str:
        path, label = result_paths[k], batch.labels[k]
        if _needs_quotes(path) or _needs_quotes(label) or _needs_quotes(batch.backend):
            return _csv_writer_text([[path, batch.widths[k], batch.heights[k], batch.bands[k], batch.backend,
                                      batch.edge_counts[k], densities[k], label, histograms[k], "", ""]])
        # csv.writer quotes a field only when it holds a comma, a quote or a line break; numbers
        # and the space-separated histogram never do, so the line is the fields joined by commas
        return (f"{path},{batch.widths[k]},{batch.heights[k]},{batch.bands[k]},{batch.backend},"
                f"{batch.edge_counts[k]},{densities[k]!r},{label},{histograms[k]},,\n")

    return "".join(batch._lines(result_line, lambda record: _csv_writer_text([_csv_row(record)])))


def _needs_quotes(text: str) -> bool:
    return not text or "," in text or '"' in text or "\n" in text or "\r" in text


def _csv_writer_text(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _csv_row(record: dict) -> list:
    row = dict(record)
    if "histogram" in row:
        row["histogram"] = " ".join(str(v) for v in row["histogram"])
    return [row.get(column, "") for column in CSV_COLUMNS]
