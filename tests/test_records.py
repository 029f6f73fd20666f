"""Batch record encoding gives exactly the bytes of encoding each record dict on its own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline.outputs.records import CSV_COLUMNS, RecordBatch, csv_text, histogram_texts, jsonl_text
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
    assert [row[CSV_COLUMNS.index("label")] for row in rows[:2]] == ["busy", "a\rlabel"] and len({len(row) for row in rows}) == 1


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


# ---------------------------------------------------------------- what a resume reads of a line

def _records_of(text: str, fmt: str, whole: bool) -> list:
    from gpu_pipeline.outputs.lines import _entries, _lines

    import io

    stream = io.BytesIO(text.encode("utf-8", "surrogateescape"))  # lines as a file gives them (at \n only)
    return list(_entries(_lines(stream, 0), fmt, whole))


def _as_resume_sees(record: dict | None):
    from gpu_pipeline.outputs.sink import record_key

    return None if record is None else (record_key(record), "error" in record)


@pytest.mark.parametrize("fmt, line, damage", [
    ("jsonl", 0, lambda text: text.replace('"histogram":[0,', '"histogram":[00,', 1)),  # leading zeros: no JSON
    ("jsonl", 0, lambda text: text.replace(",0,0,", ",0,00,", 1)),
    ("jsonl", 0, lambda text: text.replace(",0,0,", ",0,0,0,", 1)),  # 257 counts: still JSON
    ("jsonl", 0, lambda text: text.replace(",0,0,", ",0,", 1)),  # 255
    ("csv", 0, lambda text: text.replace(",0 0 0 ", ",0 0 0 0 ", 1)),  # 257 counts
    ("csv", 0, lambda text: text.replace(",0 0 0 ", ",0 0 ", 1)),  # 255
    ("csv", 1, lambda text: text[text.index(","):]),  # an error without its path
    ("csv", 0, lambda text: text.replace("/data/plain.jpg", '/data/pl"ain.jpg', 1)),  # a quote in a bare field
    ("csv", 1, lambda text: text.replace("/data/failed.jpg", '/data/failed.jpg"', 1)),
])
def test_a_line_the_whole_decode_refuses_is_unreadable_to_a_resume_too(fmt, line, damage):
    """A resume checks the counts of a line its pattern matched itself (:func:`_counts`); one that a
    full decode refuses must be unreadable to both, else its image was taken as done, never redone.
    (Random damage rarely makes these: a separator or a zero in the right place.)"""
    batch = batch_of(["/data/plain.jpg", "/data/failed.jpg"], ["busy", "smooth"], errors_at={1})
    text = (jsonl_text if fmt == "jsonl" else csv_text)(batch).splitlines(keepends=True)[line]
    damaged = damage(text)
    assert damaged != text
    keys, whole = _records_of(damaged, fmt, whole=False), _records_of(damaged, fmt, whole=True)
    assert [record for _, _, record in keys] == [record for _, _, record in whole] == [None]


@settings(max_examples=examples(80), deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8), st.data())
def test_a_resume_reads_each_line_as_the_whole_record_says(paths, data):
    """A line laid out as written is matched by a pattern and only its path decoded (a million-record
    output was 23 s to read back); the key and the error flag must be those of the whole record, and
    the pattern must take every line the tool writes (else this test proves nothing)."""
    from gpu_pipeline.outputs.lines import _CSV_ERROR, _CSV_RESULT, _JSONL_ERROR, _JSONL_RESULT
    from gpu_pipeline.outputs.sink import as_written

    paths += data.draw(st.lists(st.sampled_from(TRICKY_PATHS + ["/x/\udcff\udc80.png", "\udce9t\u00e9.jpg"]),
                                max_size=4))
    errors_at = set(data.draw(st.lists(st.integers(0, len(paths) - 1), max_size=3)))
    labels = data.draw(st.lists(st.text(min_size=1, max_size=6), min_size=len(paths), max_size=len(paths)))
    records = list(as_written(batch_of(paths, labels, errors_at, seed=len(paths))))  # (path_bytes where not UTF-8)
    for fmt, encode, patterns in (("jsonl", jsonl_text, (_JSONL_RESULT, _JSONL_ERROR)),
                                  ("csv", csv_text, (_CSV_RESULT, _CSV_ERROR))):
        text = encode(records)
        keys, whole = _records_of(text, fmt, whole=False), _records_of(text, fmt, whole=True)
        assert [raw for _, raw, _ in keys] == [raw for _, raw, _ in whole]
        assert [_as_resume_sees(r) for _, _, r in keys] == [_as_resume_sees(r) for _, _, r in whole]
        assert [_as_resume_sees(r) for _, _, r in whole] == [_as_resume_sees(r) for r in records]
        for _, raw, _ in keys:
            assert any(p.fullmatch(raw.decode("utf-8")) for p in patterns), raw


@settings(max_examples=examples(150), deadline=None)
@given(st.sampled_from(["jsonl", "csv"]), st.integers(0, 10**6), st.binary(min_size=1, max_size=2))
def test_a_damaged_line_reads_as_a_full_decode_reads_it(fmt, where, junk):
    """A byte changed anywhere (a torn or bit-rotted line) is as intact, or not, as the whole record."""
    batch = batch_of(['/data/with, comma "q".jpg', "/data/plain.jpg"], ["busy", "smooth"], errors_at={1})
    text = (jsonl_text if fmt == "jsonl" else csv_text)(batch).encode()
    at = where % len(text)
    damaged = (text[:at] + junk + text[at + 1:]).decode("utf-8", "surrogateescape")
    keys, whole = _records_of(damaged, fmt, whole=False), _records_of(damaged, fmt, whole=True)
    assert [(raw, _as_resume_sees(r)) for _, raw, r in keys] == [(raw, _as_resume_sees(r)) for _, raw, r in whole]


def test_the_remembered_edge_densities_stay_few(monkeypatch):
    """The densities' texts and floats are remembered by (edge count, pixels), and forgotten past a
    bound: a run over images of many sizes kept every value it met, for the whole run."""
    from gpu_pipeline.outputs import records

    monkeypatch.setattr(records, "_MOST_DENSITY_TEXTS", 4)
    monkeypatch.setattr(records, "_DENSITY_TEXTS", {})
    monkeypatch.setattr(records, "_DENSITIES", {})
    for seed in range(4):
        batch = batch_of([f"/{seed}/{i}.png" for i in range(4)], ["busy"] * 4, errors_at=set(), seed=seed)
        jsonl_text(batch)
        list(batch)
        assert len(records._DENSITY_TEXTS) <= 4 + 4 and len(records._DENSITIES) <= 4 + 4
