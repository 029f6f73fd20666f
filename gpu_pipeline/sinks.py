"""Where records go, and how a rerun resumes: JSON Lines (default), CSV, Parquet.

Every image gets exactly one record: a result or an error. Records are written in whole lines, one
write and one flush per batch, so a run killed at any moment leaves complete batches plus at most
one torn line. Reopening the same output for a resumed run reads the records back, cuts the file
at the first line that is not a complete record (the torn tail, or garbage left by a crash), and
tells the engine which paths are done. Parquet files cannot be appended to once closed, and a
killed writer leaves no footer, so Parquet output is never resumed: such a rerun is refused
unless ``--overwrite`` is given.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from gpu_pipeline import records
from gpu_pipeline.records import table_columns

FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet"}

#: Columns of the CSV and Parquet outputs; the histogram is one column of 256 space-separated ints.
COLUMNS = ("path", "width", "height", "bands", "backend", "edge_count", "edge_density", "label",
           "histogram", "stage", "error")
_INT_COLUMNS = ("width", "height", "bands", "edge_count")


class SinkError(OSError):
    """The output cannot be opened, read back or written; the CLI reports it as a usage error."""


def format_for(out: str, explicit: str | None = None) -> str:
    """The output format: ``explicit`` if given, else from the file extension, else JSON Lines."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise SinkError(f"unknown output format {explicit!r}; choose from {', '.join(FORMATS)}")
        return explicit
    return _EXTENSIONS.get(Path(out).suffix.lower(), "jsonl")


@dataclass
class Existing:
    """What an earlier run left in the output: the paths that succeeded and those that failed."""

    succeeded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    dropped_bytes: int = 0  # a torn or corrupt tail that was cut off


# ---------------------------------------------------------------- JSON Lines


def _jsonl_text(records: Iterable[dict]) -> str:
    return "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)


def _jsonl_parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("path"), str) else None


# ---------------------------------------------------------------- CSV


def _csv_row(record: dict) -> list:
    row = dict(record)
    if "histogram" in row:
        row["histogram"] = " ".join(str(v) for v in row["histogram"])
    return [row.get(column, "") for column in COLUMNS]


def _csv_text(records: Iterable[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(_csv_row(record) for record in records)
    return buffer.getvalue()


def _csv_parse(line: bytes) -> dict | None:
    try:
        (row,) = list(csv.reader([line.decode("utf-8")]))
    except (ValueError, UnicodeDecodeError):
        return None
    if len(row) != len(COLUMNS) or not row[0]:
        return None
    values = dict(zip(COLUMNS, row))
    if values["error"]:
        return {"path": values["path"], "stage": values["stage"], "error": values["error"]}
    try:
        record = {key: values[key] for key in ("path", "backend", "label")}
        record.update({key: int(values[key]) for key in _INT_COLUMNS})
        record["edge_density"] = float(values["edge_density"])
        record["histogram"] = [int(v) for v in values["histogram"].split()]
    except ValueError:
        return None
    return record if len(record["histogram"]) == 256 else None


def read_records(path: str | os.PathLike[str]) -> list[dict]:
    """All records of a JSONL, CSV or Parquet output (for tests, verify and users' scripts)."""
    fmt = format_for(str(path))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return [_from_table_row(row) for row in pq.read_table(path).to_pylist()]
    with open(path, "rb") as stream:
        start = _skip_header(stream, fmt, path)
        return [record for _, _, record in _complete(_text_lines(stream, start), _PARSERS[fmt])]


def _skip_header(stream: IO[bytes], fmt: str, path) -> int:
    """Check and skip the CSV header; returns where the records start."""
    if fmt != "csv":
        return 0
    header = stream.readline()
    if header and header.rstrip(b"\r\n") != ",".join(COLUMNS).encode():
        raise SinkError(f"{path} is not a gpu-pipeline CSV output (unexpected header); "
                        "use --overwrite or another --out")
    return len(header)


def _text_lines(stream: IO[bytes], offset: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) pairs from the stream's current position, which is ``offset``."""
    for line in stream:
        yield offset, line
        offset += len(line)


def _complete(lines: Iterator[tuple[int, bytes]], parse) -> Iterator[tuple[int, bytes, dict]]:
    """Records up to (excluding) the first line that is not whole: (end offset, line, record)."""
    for offset, line in lines:
        record = parse(line) if line.endswith(b"\n") else None
        if record is None:
            return
        yield offset + len(line), line, record


_PARSERS = {"jsonl": _jsonl_parse, "csv": _csv_parse}


class Sink:
    """What the engine writes to: ``write(records)`` per batch, ``close()`` at the end."""

    existing: Existing

    def write(self, records: Iterable[dict]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LineSink(Sink):
    """JSON Lines or CSV, appended whole lines at a time; resumable."""

    def __init__(self, out: str, fmt: str, resume: bool, retry_failed: bool) -> None:
        self.out = out
        self.fmt = fmt
        self._text = records.jsonl_text if fmt == "jsonl" else records.csv_text  # a RecordBatch in one go
        self.existing = Existing()
        if out == "-":
            self._stream: IO[str] = sys.stdout
            self._write_header()
            return
        path = Path(out)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume and path.exists() and path.stat().st_size > 0:
                self.existing = self._recover(path, retry_failed)
                self._stream = open(path, "a", encoding="utf-8", newline="")
            else:
                self._stream = open(path, "w", encoding="utf-8", newline="")
                self._write_header()
        except OSError as exc:
            raise SinkError(f"cannot write {out}: {exc.strerror or exc}") from exc

    def _write_header(self) -> None:
        if self.fmt == "csv":
            self._stream.write(",".join(COLUMNS) + "\n")
            self._stream.flush()

    def _recover(self, path: Path, retry_failed: bool) -> Existing:
        """Read back an earlier run; cut a torn tail; with ``retry_failed`` drop the error records."""
        existing = Existing()
        kept: list[bytes] = []  # raw lines: far smaller than parsed records
        with open(path, "rb") as stream:
            good_end = _skip_header(stream, self.fmt, path)
            for end, line, record in _complete(_text_lines(stream, good_end), _PARSERS[self.fmt]):
                good_end = end
                failed = "error" in record
                (existing.failed if failed else existing.succeeded).add(record["path"])
                if retry_failed and not failed:
                    kept.append(line)
            size = os.fstat(stream.fileno()).st_size
        existing.dropped_bytes = size - good_end
        if retry_failed and existing.failed:
            self._rewrite(path, kept)
            existing.failed = set()
        elif existing.dropped_bytes:
            with open(path, "r+b") as stream:
                stream.truncate(good_end)
        return existing

    def _rewrite(self, path: Path, lines: list[bytes]) -> None:
        """Replace the file atomically by ``lines`` (a crash leaves the old or the new file)."""
        temporary = path.with_name(path.name + ".rewrite")
        with open(temporary, "wb") as stream:
            if self.fmt == "csv":
                stream.write((",".join(COLUMNS) + "\n").encode())
            stream.writelines(lines)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)

    def write(self, records: Iterable[dict]) -> None:
        # One write call per batch, then flush: a kill leaves whole batches and at most one torn line.
        text = self._text(records)
        if text:
            self._stream.write(text)
            self._stream.flush()

    def close(self) -> None:
        if self._stream is sys.stdout:
            self._stream.flush()
        else:
            self._stream.close()


# ---------------------------------------------------------------- Parquet


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("bands", pa.int8()),
        ("backend", pa.string()), ("edge_count", pa.int64()), ("edge_density", pa.float64()),
        ("label", pa.string()), ("histogram", pa.list_(pa.int64(), 256)), ("stage", pa.string()),
        ("error", pa.string()),
    ])


def _from_table_row(row: dict) -> dict:
    if row["error"] is not None:
        return {"path": row["path"], "stage": row["stage"], "error": row["error"]}
    return {key: row[key] for key in COLUMNS[:9]}


class ParquetSink(Sink):
    """Parquet, one row group per batch (pyarrow, the ``parquet`` extra). Not resumable."""

    def __init__(self, out: str, resume: bool) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SinkError("Parquet output needs pyarrow: pip install 'gpu-pipeline[parquet]'") from None
        if out == "-":
            raise SinkError("Parquet output needs a file, not stdout")
        path = Path(out)
        if resume and path.exists():
            raise SinkError(f"{out} exists and Parquet output cannot be resumed safely (a killed writer leaves "
                            "no footer); use --overwrite to start again, or JSONL/CSV for resumable runs")
        self.out = out
        self.existing = Existing()
        self._schema = _parquet_schema()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(out, self._schema)
        except OSError as exc:
            raise SinkError(f"cannot write {out}: {exc.strerror or exc}") from exc

    def write(self, records: Iterable[dict]) -> None:
        import pyarrow as pa

        columns = table_columns(records, COLUMNS)  # a RecordBatch in one go
        if len(columns["path"]):
            self._writer.write_table(pa.table(columns, schema=self._schema))

    def close(self) -> None:
        self._writer.close()


def open_sink(out: str, fmt: str | None = None, resume: bool = True, retry_failed: bool = False):
    """Open the output for a run. ``resume``: keep what an earlier run wrote (``sink.existing``)."""
    chosen = format_for(out, fmt)
    if chosen == "parquet":
        return ParquetSink(out, resume)
    return LineSink(out, chosen, resume, retry_failed)
