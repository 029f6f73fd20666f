"""Batch record encoding gives exactly the bytes of encoding each record dict on its own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline.outputs.records import RecordBatch, csv_text, histogram_texts, jsonl_text
from tests.strategies import examples

TRICKY_PATHS = ["/data/plain.jpg", "/data/with, comma.jpg", '/data/with "quotes".png', "/data/new\nline.png",
                "/data/carriage\rreturn.png", "/données/été/ünïcode.tif", "/data/emoji 🛰.jpg", "C:\\windows\\x.jpg"]


def batch_of(paths: list[str], labels: list[str], errors_at: set[int], seed: int = 0) -> RecordBatch:
    rng = np.random.default_rng(seed)
    results = len(paths) - len(errors_at)
    widths = rng.integers(1, 5000, results).tolist()
    heights = rng.integers(1, 5000, results).tolist()
    histograms = rng.integers(0, 10**12, (results, 256)).astype(np.int64)
    histograms[:, :3] = 0
    edge_counts = [int(rng.integers(0, w * h + 1)) for w, h in zip(widths, heights)]
    errors = {i: {"path": paths[i], "stage": "decode", "error": f"broken, \"really\" {i}"} for i in errors_at}
    return RecordBatch(paths=paths, errors=errors, backend="numba", widths=widths, heights=heights,
                       bands=rng.choice([1, 3], results).tolist(), histograms=histograms,
                       edge_counts=edge_counts, labels=labels[:results])


@pytest.mark.parametrize("encode", [jsonl_text, csv_text])
def test_batch_encoding_equals_encoding_each_dict(encode):
    labels = ["busy", "textured", "a, label", 'quoted "label"', "Forêt"] * 2
    batch = batch_of(TRICKY_PATHS, labels, errors_at={1, 5})
    assert encode(batch) == encode(list(batch))


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8), st.data())
def test_any_paths_and_labels_encode_like_the_dicts(paths, data):
    errors_at = set(data.draw(st.lists(st.integers(0, len(paths) - 1), max_size=3)))
    labels = data.draw(st.lists(st.text(min_size=1, max_size=6), min_size=len(paths), max_size=len(paths)))
    batch = batch_of(paths, labels, errors_at, seed=len(paths))
    assert jsonl_text(batch) == jsonl_text(list(batch))
    assert csv_text(batch) == csv_text(list(batch))
    assert list(batch) == [batch[i] for i in range(len(batch))]  # one pass (the API's) = record by record


@pytest.mark.parametrize("path", TRICKY_PATHS + ["", " lead", "trail ", "a\rb\r", "\r", '"', "a\u2028b"])
def test_csv_rows_read_back_whole_with_the_csv_module(path):
    """Each row is one record to csv.reader (Python's, whatever its version): a bare carriage return
    in a name is quoted too (csv.writer before 3.13 left it bare, and the row split in two)."""
    import csv
    import io

    batch = batch_of([path, "/next.png", path], ["busy", "a\rlabel"], errors_at={2})
    rows = list(csv.reader(io.StringIO(csv_text(batch), newline="")))
    assert [row[0] for row in rows] == [path, "/next.png", path]
    assert [row[7] for row in rows[:2]] == ["busy", "a\rlabel"] and len({len(row) for row in rows}) == 1


def test_dict_view_has_the_fields_in_order():
    batch = batch_of(["/a.png", "/b.png"], ["busy", "smooth"], errors_at={0})
    error, result = list(batch)
    assert error == {"path": "/a.png", "stage": "decode", "error": 'broken, "really" 0'}
    assert list(result) == ["path", "width", "height", "bands", "backend", "histogram", "edge_count", "edge_density",
                            "label"]
    assert result["edge_density"] == round(result["edge_count"] / (result["width"] * result["height"]), 6)
    assert batch[-1] == result and batch[0:1] == [error] and len(batch) == 2


def test_histogram_texts_are_the_decimal_counts():
    rows = np.array([[0, 1, 9, 10, 99, 100, 2**62], [123456789, 0, 0, 0, 0, 0, 7]], np.int64)
    assert histogram_texts(rows) == [",".join(map(str, row)) for row in rows.tolist()]
    assert histogram_texts(rows, " ")[1] == " ".join(map(str, rows[1].tolist()))
    assert histogram_texts(np.zeros((0, 256), np.int64)) == []


def test_parquet_columns_of_a_batch_equal_those_of_its_dicts():
    import pyarrow as pa

    from gpu_pipeline.outputs.lines import COLUMNS
    from gpu_pipeline.outputs.parquet import parquet_schema
    from gpu_pipeline.outputs.records import table_columns

    for errors_at in (set(), {0, 3}, set(range(len(TRICKY_PATHS)))):
        batch = batch_of(TRICKY_PATHS, ["busy", "a, label"] * 4, errors_at)
        fast = pa.table(table_columns(batch, COLUMNS), schema=parquet_schema())
        slow = pa.table(table_columns(list(batch), COLUMNS), schema=parquet_schema())
        assert fast.equals(slow)
