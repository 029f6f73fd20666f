"""Records a batch at a time: one :class:`RecordBatch` per engine batch, encoded in one go.

The engine used to build a dict per image and the sink a ``json.dumps`` per dict; on 64x64 tiles
that Python work cost more than the pixels (docs/benchmarks.md, "Where the time goes"). A
:class:`RecordBatch` keeps the batch's arrays and is still a sequence of the same dicts for any
code that reads records one by one; :func:`jsonl_text` and :func:`csv_text` write its lines
without making those dicts.

The 256 histogram counts per record are the bulk of the text. They are formatted by a numba
kernel that runs without the GIL (:func:`_histogram_lines`); the other fields are formatted by
the Python function ``json.dumps`` uses, and quoted as ``csv.writer`` of Python 3.13 quotes, so the
bytes are those of the dicts written one by one. Measured per histogram row (256 rows, 2 shared cores): ``",".join(map(str, row))``
42-47 us, ``json.dumps`` 35-38 us, msgspec on ``tolist()`` 4.9-5.1 us, this kernel 3.3-3.6 us
(GIL released), orjson with numpy support 2.1-2.2 us (GIL held, and one more dependency).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string  # what json.dumps uses for str

import numpy as np

#: Columns of the CSV and Parquet outputs (``outputs/lines.py``, ``outputs/parquet.py``); the histogram is one
#: column of 256 space-separated ints; ``path_bytes`` is filled only for names that are not UTF-8.
CSV_COLUMNS = ("path", "width", "height", "bands", "backend", "edge_count", "edge_density", "label",
               "histogram", "stage", "error", "path_bytes")

_NEWLINE = 10
#: Edge densities as text, by (edge count, pixels); emptied when it grows past the bound.
_DENSITY_TEXTS: dict[tuple[int, int], str] = {}
_MOST_DENSITY_TEXTS = 1 << 18
#: ... and as floats, for the dict records: ``round`` is a third of the time a dict takes.
_DENSITIES: dict[tuple[int, int], float] = {}


def _densities(keys: Iterable[tuple[int, int]]) -> list[float]:
    """``round(edge_count / pixels, 6)`` of each (edge count, pixels): a dict record's value, remembered."""
    if len(_DENSITIES) > _MOST_DENSITY_TEXTS:
        _DENSITIES.clear()
    values = []
    for key in keys:
        value = _DENSITIES.get(key)  # (not ``or``: 0.0, no edges, is a common value)
        if value is None:
            value = _DENSITIES[key] = round(key[0] / key[1], 6)
        values.append(value)
    return values


def _density_text(key: tuple[int, int]) -> str:
    count, pixels = key
    text = _DENSITY_TEXTS[key] = repr(round(count / pixels, 6))
    return text


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


@functools.cache
def _compiled_histogram_lines():
    """The numba kernel, made on first use: importing the engine (``gpu-pipeline --help``) does not
    import numba; None where numba cannot be imported (the reference backend's runs write records all the same)."""
    try:
        from gpu_pipeline.backends._numba_setup import helper
    except (ImportError, OSError):  # numba missing, or a broken llvmlite (as the numba backend says)
        return None
    return helper(_histogram_lines)


def histogram_texts(histograms: np.ndarray, separator: str = ",") -> list[str]:
    """Each row of an int64 (N, 256) array as ``"c0,c1,...,c255"`` (one numba call per batch)."""
    if len(histograms) == 0:
        return []
    formatter = _compiled_histogram_lines()
    if formatter is None:  # the same text, about 10x slower
        return [separator.join(map(str, row)) for row in histograms.tolist()]
    text = formatter(np.ascontiguousarray(histograms, dtype=np.int64), ord(separator))
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

    def result_paths(self) -> list[str]:
        return [path for position, path in enumerate(self.paths) if position not in self.errors] \
            if self.errors else self.paths

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
        """The records in order, as ``self[i]`` gives them, built in one pass over the batch."""
        results = zip(self.widths, self.heights, self.bands, self.histograms.tolist(), self.edge_counts,
                      self._densities(), self.labels)
        backend, errors = self.backend, self.errors
        for position, path in enumerate(self.paths):
            if errors and position in errors:
                yield errors[position]
                continue
            width, height, bands, histogram, edge_count, density, label = next(results)
            yield {"path": path, "width": width, "height": height, "bands": bands, "backend": backend,
                   "histogram": histogram, "edge_count": edge_count, "edge_density": density, "label": label}

    def _result_index(self, position: int) -> int:
        return position - sum(1 for p in self.errors if p < position)

    def _density_keys(self) -> Iterable[tuple[int, int]]:
        """(edge count, pixels) of each result: what its density is remembered by."""
        pixels = (np.asarray(self.widths, np.int64) * np.asarray(self.heights, np.int64)).tolist()
        return zip(self.edge_counts, pixels)

    def _densities(self) -> list[float]:
        """Each result's ``edge_density`` (see :func:`_densities`)."""
        return _densities(self._density_keys())

    def edge_densities(self) -> list[str]:
        """``repr(round(edge_count / pixels, 6))`` of each result: the text both formats write for
        the float the dict records hold. Remembered per (edge count, pixels): tiles of one size
        repeat the same few thousand values."""
        if len(_DENSITY_TEXTS) > _MOST_DENSITY_TEXTS:
            _DENSITY_TEXTS.clear()
        return [_DENSITY_TEXTS.get(key) or _density_text(key) for key in self._density_keys()]

    def with_errors(self, result_lines: list[str], error_line) -> list[str]:
        """``result_lines`` (one per result, in order) with each error's line at its place."""
        if not self.errors:
            return result_lines
        lines, results = [], iter(result_lines)
        for position in range(len(self.paths)):
            lines.append(error_line(self.errors[position]) if position in self.errors else next(results))
        return lines


def jsonl_text(records: Iterable[dict]) -> str:
    """JSON Lines of ``records``: exactly ``json.dumps(record, separators=(",", ":"))`` per line."""
    if not isinstance(records, RecordBatch):
        return "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
    batch = records
    backend = _json_string(batch.backend)
    sizes = {key: f',"width":{key[0]},"height":{key[1]},"bands":{key[2]},"backend":{backend},"histogram":['
             for key in set(zip(batch.widths, batch.heights, batch.bands))}
    labels = {label: _json_string(label) for label in set(batch.labels)}
    lines = [f'{{"path":{_json_string(path)}{sizes[size]}{histogram}],"edge_count":{count},'
             f'"edge_density":{density},"label":{labels[label]}}}\n'
             for path, size, histogram, count, density, label in zip(
                 batch.result_paths(), zip(batch.widths, batch.heights, batch.bands),
                 histogram_texts(batch.histograms, ","), batch.edge_counts, batch.edge_densities(), batch.labels)]
    return "".join(batch.with_errors(lines, lambda record: json.dumps(record, separators=(",", ":")) + "\n"))


def csv_text(records: Iterable[dict]) -> str:
    """CSV rows of ``records`` (:data:`CSV_COLUMNS`, no header), as ``csv.writer`` writes them."""
    if not isinstance(records, RecordBatch):
        return _csv_writer_text(_csv_row(record) for record in records)
    batch = records
    lines = [_csv_line(path, width, height, bands, batch.backend, count, density, label, histogram)
             for path, width, height, bands, count, density, label, histogram in zip(
                 batch.result_paths(), batch.widths, batch.heights, batch.bands, batch.edge_counts,
                 batch.edge_densities(), batch.labels, histogram_texts(batch.histograms, " "))]
    return "".join(batch.with_errors(lines, lambda record: _csv_writer_text([_csv_row(record)])))


def _csv_line(path: str, width: int, height: int, bands: int, backend: str, count: int, density: str,
              label: str, histogram: str) -> str:
    if _needs_quotes(path) or _needs_quotes(label) or _needs_quotes(backend):
        return _csv_writer_text([[path, width, height, bands, backend, count, float(density), label, histogram,
                                  "", "", ""]])
    # csv.writer quotes a field only when it holds a comma, a quote or a line break; numbers and
    # the space-separated histogram never do, so the line is the fields joined by commas
    return f"{path},{width},{height},{bands},{backend},{count},{density},{label},{histogram},,,\n"


def table_columns(records: Iterable[dict], columns: Sequence[str]) -> dict[str, list]:
    """The values of each of ``columns`` over ``records`` (None where a record has no such field),
    for a column store (Parquet). A RecordBatch's histograms become one pyarrow fixed-size list
    array, built from the (N, 256) array without a Python int per count."""
    if not isinstance(records, RecordBatch):
        found: dict[str, list] = {column: [] for column in columns}
        for record in records:
            for column in columns:
                found[column].append(record.get(column))
        return found
    import pyarrow as pa

    batch = records
    results = iter(range(len(batch.labels)))
    rows = [None if position in batch.errors else next(results) for position in range(len(batch))]
    densities = batch._densities()
    fields = {"width": batch.widths, "height": batch.heights, "bands": batch.bands, "edge_count": batch.edge_counts,
              "edge_density": densities, "label": batch.labels}
    found = {"path": batch.paths, "backend": [None if k is None else batch.backend for k in rows]}
    for name, values in fields.items():
        found[name] = [None if k is None else values[k] for k in rows]
    errors = [batch.errors.get(position, {}) for position in range(len(batch))]
    found["stage"] = [error.get("stage") for error in errors]
    found["error"] = [error.get("error") for error in errors]
    found["path_bytes"] = [None] * len(batch)  # callers pass a RecordBatch only when every name is UTF-8
    counts = np.zeros((len(batch), 256), np.int64)
    is_result = np.array([k is not None for k in rows], bool)
    counts[is_result] = batch.histograms
    found["histogram"] = pa.FixedSizeListArray.from_arrays(pa.array(counts.reshape(-1)), 256,
                                                           mask=pa.array(~is_result))
    return {column: found[column] for column in columns}


def _needs_quotes(text: str) -> bool:
    return not text or "," in text or '"' in text or "\n" in text or "\r" in text


def _csv_field(value) -> str:
    text = "" if value is None else str(value)
    return '"' + text.replace('"', '""') + '"' if text and _needs_quotes(text) else text


def _csv_writer_text(rows) -> str:
    """Rows as ``csv.writer(lineterminator="\\n")`` of Python 3.13 writes them: a field quoted when it
    holds a comma, a quote or a line break. (Before 3.13 it left a bare carriage return unquoted,
    and a reader split the row there: a name with one came back as two rows.)"""
    return "".join(",".join(map(_csv_field, row)) + "\n" for row in rows)


def _csv_row(record: dict) -> list:
    row = dict(record)
    if "histogram" in row:
        row["histogram"] = " ".join(str(v) for v in row["histogram"])
    return [row.get(column, "") for column in CSV_COLUMNS]
