"""Where records go, and how a rerun resumes: JSON Lines (default), CSV, a Parquet dataset.

Every image gets exactly one record: a result or an error. Opening an output for a run has two
steps, so that a run that is refused writes nothing: :func:`inspect_output` reads what an earlier
run left (read-only, it raises :class:`SinkError` for anything it cannot resume), and
:meth:`OutputPlan.open` then makes the changes (cut a torn tail, drop error records for
``--retry-failed``, start afresh for ``--overwrite``) and returns the :class:`Sink`.

* JSON Lines and CSV are appended whole records at a time, one ``write`` per batch, so a kill
  leaves complete batches plus at most one torn last record. On resume a record that does not end
  in a newline, and unreadable lines after the last intact record, are cut off and redone; an
  unreadable line *between* intact records is skipped and counted (a warning says how many), so
  intact records are never dropped.
* Parquet output is a dataset folder of part files, one per batch, each written under a hidden
  temporary name and renamed into place when complete; pyarrow, pandas and DuckDB read the folder
  as one table, and a killed run leaves only whole parts (the hidden temporary is removed on
  resume).

File names are recorded exactly (:func:`portable`): ``path`` is the name as text; when it is not
valid UTF-8, ``path`` shows it with ``\\xNN`` escapes and ``path_bytes`` holds its exact bytes in
base64. Resume matches on the exact bytes.
"""

from __future__ import annotations

import base64
import csv
import errno
import io
import json
import os
import re
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from gpu_pipeline.outputs import records as record_text
from gpu_pipeline.outputs.records import RecordBatch, table_columns

FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet"}

#: Columns of the CSV and Parquet outputs; the histogram is one column of 256 space-separated ints.
COLUMNS = record_text.CSV_COLUMNS
_RESULT_FIELDS = COLUMNS[:9]
_INT_COLUMNS = ("width", "height", "bands", "edge_count")
#: A CSV record spans several lines only when a field holds newlines (a file name can); beyond
#: this many lines an unbalanced quote is damage, not a record.
_MAX_LINES_PER_RECORD = 1000


class SinkError(OSError):
    """The output cannot be opened or read back: the run is refused (exit 2) before any work."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class SinkWriteError(SinkError):
    """Writing records failed during the run (disk full, I/O error); what was written is kept."""


def format_for(out: str, explicit: str | None = None) -> str:
    """The output format: ``explicit`` if given, else from the file extension, else JSON Lines."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise SinkError(f"unknown output format {explicit!r}; choose from {', '.join(FORMATS)}")
        return explicit
    return _EXTENSIONS.get(Path(out.rstrip("/")).suffix.lower(), "jsonl")


# ---------------------------------------------------------------- file names


def portable(record: dict) -> dict:
    """``record`` as written: a name that is not valid UTF-8 gets its exact bytes in ``path_bytes``.

    Paths arrive as Python strings, where undecodable bytes are surrogate escapes (``os.fsdecode``).
    Those cannot be written as UTF-8, and ``\\udcff`` in JSON names no file; ``path`` shows them as
    ``\\xff`` and ``path_bytes`` names the file exactly. Ordinary records are returned unchanged.
    """
    path = record["path"]
    try:
        path.encode("utf-8")
        return record
    except UnicodeEncodeError:
        raw = os.fsencode(path)
    return {**record, "path": raw.decode("utf-8", "backslashreplace"),
            "path_bytes": base64.b64encode(raw).decode("ascii")}


def as_written(records: Iterable[dict]) -> Iterable[dict]:
    """``records`` with :func:`portable` names. A :class:`RecordBatch` whose names are all UTF-8 (the
    usual case) is returned as it is, so the sinks can encode it in one go."""
    if isinstance(records, RecordBatch):
        try:
            "".join(records.paths).encode("utf-8")
            return records
        except UnicodeEncodeError:
            pass
    return [portable(record) for record in records]


def record_key(record: dict) -> str:
    """The input path a stored record is for, as discovery names it (``str`` of the ``Path``)."""
    encoded = record.get("path_bytes")
    return os.fsdecode(base64.b64decode(encoded)) if encoded else record["path"]


@dataclass
class Existing:
    """What an earlier run left in the output: the paths that succeeded and those that failed."""

    succeeded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    dropped_bytes: int = 0  # a torn or unreadable tail that is cut off and redone
    damaged: int = 0  # unreadable lines between intact records: skipped, their images redone

    def add(self, record: dict) -> None:
        (self.failed if "error" in record else self.succeeded).add(record_key(record))


# ---------------------------------------------------------------- JSON Lines


def _jsonl_parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("path"), str) else None


# ---------------------------------------------------------------- CSV

_CSV_HEADER = ",".join(COLUMNS)


def _csv_parse(line: bytes) -> dict | None:
    try:
        rows = list(csv.reader(io.StringIO(line.decode("utf-8"), newline=""), strict=True))
    except (ValueError, UnicodeDecodeError, csv.Error):
        return None
    if len(rows) != 1 or len(rows[0]) != len(COLUMNS) or not rows[0][0]:
        return None
    values = dict(zip(COLUMNS, rows[0]))
    if values["error"]:
        record = {"path": values["path"], "stage": values["stage"], "error": values["error"]}
    else:
        try:
            record = {key: values[key] for key in ("path", "width", "height", "bands", "backend")}
            record.update({key: int(values[key]) for key in _INT_COLUMNS})
            record["histogram"] = [int(v) for v in values["histogram"].split()]
            record["edge_count"] = int(values["edge_count"])
            record["edge_density"] = float(values["edge_density"])
            record["label"] = values["label"]
        except ValueError:
            return None
        if len(record["histogram"]) != 256:
            return None
    if values["path_bytes"]:
        record["path_bytes"] = values["path_bytes"]
    return record


_PARSERS = {"jsonl": _jsonl_parse, "csv": _csv_parse}


# ---------------------------------------------------------------- reading line outputs back


def _entries(lines: Iterator[bytes], offset: int, fmt: str) -> Iterator[tuple[int, bytes, dict | None]]:
    """(offset, bytes, record or None when unreadable) for each record of a JSONL or CSV file.

    A CSV record continues on the next line while its quotes are unbalanced (a quoted newline). If
    the joined lines do not parse, only the first is unreadable and the others are read again.
    """
    parse = _PARSERS[fmt]
    queue: deque[bytes] = deque()
    while True:
        if not queue:
            line = next(lines, None)
            if line is None:
                return
            queue.append(line)
        raw, taken = queue[0], 1
        quotes = raw.count(b'"')
        while fmt == "csv" and quotes % 2 and raw.endswith(b"\n") and taken < _MAX_LINES_PER_RECORD:
            if taken == len(queue):
                more = next(lines, None)
                if more is None:
                    break
                queue.append(more)
            quotes += queue[taken].count(b'"')
            raw += queue[taken]
            taken += 1
        # A record is whole only with its newline: a torn last line may still parse.
        record = parse(raw) if raw.endswith(b"\n") else None
        if record is None:
            raw, taken = queue[0], 1
        for _ in range(taken):
            queue.popleft()
        yield offset, raw, record
        offset += len(raw)


@dataclass
class _Scan:
    """A JSONL or CSV output read back."""

    existing: Existing
    good_end: int  # end of the last intact record (or of the header): what follows is cut
    size: int


def _check_header(stream: IO[bytes], fmt: str, path) -> int:
    """Check and skip the CSV header; returns where the records start."""
    if fmt != "csv":
        return 0
    header = stream.readline()
    if header and header.rstrip(b"\r\n") != _CSV_HEADER.encode():
        raise SinkError(f"{path} is not a gpu-pipeline CSV output of this version (unexpected header); "
                        "use --overwrite or another --out")
    return len(header)


def _scan(path: Path, fmt: str, keep: Callable[[dict, bytes], None] | None = None) -> _Scan:
    """Read a JSONL or CSV output; ``keep(record, raw)`` sees each intact record."""
    existing = Existing()
    with open(path, "rb") as stream:
        good_end = _check_header(stream, fmt, path)
        unreadable_since_good = 0
        for offset, raw, record in _entries(iter(stream), good_end, fmt):
            if record is None:
                unreadable_since_good += 1
                continue
            existing.damaged += unreadable_since_good
            unreadable_since_good = 0
            good_end = offset + len(raw)
            existing.add(record)
            if keep is not None:
                keep(record, raw)
        size = os.fstat(stream.fileno()).st_size
    existing.dropped_bytes = size - good_end
    return _Scan(existing, good_end, size)


def read_records(path: str | os.PathLike[str]) -> list[dict]:
    """All intact records of a JSONL, CSV or Parquet output (for tests, verify and users' scripts)."""
    fmt = format_for(str(path))
    if fmt == "parquet":
        return [_from_table_row(row) for row in _read_dataset(Path(path)).to_pylist()]
    records: list[dict] = []
    _scan(Path(path), fmt, lambda record, raw: records.append(record))
    return records


# ---------------------------------------------------------------- the Sink interface


class Sink:
    """What an engine writes to: ``write(records)`` once per batch, ``close()`` at the end.

    Every sink implements it: the line and Parquet outputs here, the in-memory list a Dask worker
    returns, and the benchmark's sink that drops records.
    """

    def write(self, records: list[dict]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordList(Sink, list):
    """An in-memory sink: the records stay in the list."""

    def write(self, records: list[dict]) -> None:
        self.extend(records)


class NullSink(Sink):
    """Drops the records (benchmarks measure the engine, not the disk)."""

    def write(self, records: list[dict]) -> None:
        pass


def _write_all(descriptor: int, data: bytes, out: str) -> None:
    """``data`` to ``descriptor`` whole; a short write is continued, an error raised as SinkWriteError."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(descriptor, view):]
    except OSError as exc:
        raise SinkWriteError(exc.errno, f"cannot write {out}: {exc.strerror or exc}") from exc


class LineSink(Sink):
    """JSON Lines or CSV, appended one batch at a time by one ``os.write`` (no buffer to lose)."""

    def __init__(self, out: str, fmt: str, existing: Existing | None = None) -> None:
        self.out = out
        self.fmt = fmt
        self.existing = existing or Existing()
        self._text = record_text.jsonl_text if fmt == "jsonl" else record_text.csv_text
        self._descriptor: int | None = None
        if out != "-":
            try:
                self._descriptor = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            except OSError as exc:
                raise SinkError(exc.errno, f"cannot write {out}: {exc.strerror or exc}") from None

    def write_header(self) -> None:
        if self.fmt == "csv":
            self._write_text(_CSV_HEADER + "\n")

    def write(self, records: list[dict]) -> None:
        text = self._text(as_written(records))
        if text:
            self._write_text(text)

    def _write_text(self, text: str) -> None:
        if self._descriptor is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            _write_all(self._descriptor, text.encode("utf-8"), self.out)

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


# ---------------------------------------------------------------- Parquet dataset

_PART = re.compile(r"part-(\d{6,})\.parquet")


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("bands", pa.int8()),
        ("backend", pa.string()), ("edge_count", pa.int64()), ("edge_density", pa.float64()),
        ("label", pa.string()), ("histogram", pa.list_(pa.int64(), 256)), ("stage", pa.string()),
        ("error", pa.string()), ("path_bytes", pa.string()),
    ])


def _import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SinkError("Parquet output needs pyarrow: pip install 'gpu-pipeline[parquet]'") from None
    return pq


def _parts(folder: Path) -> list[Path]:
    """The complete part files of a dataset folder, in order."""
    return sorted((entry for entry in folder.iterdir() if _PART.fullmatch(entry.name)),
                  key=lambda entry: int(_PART.fullmatch(entry.name).group(1)))


def _temporaries(folder: Path) -> list[Path]:
    return [entry for entry in folder.iterdir() if entry.name.startswith(".part-") and entry.name.endswith(".tmp")]


def _read_dataset(folder: Path):
    pq = _import_parquet()
    import pyarrow as pa

    parts = _parts(folder)
    if not parts:
        return _parquet_schema().empty_table()
    return pa.concat_tables(pq.read_table(part, schema=_parquet_schema()) for part in parts)


def _from_table_row(row: dict) -> dict:
    if row["error"] is not None:
        record = {"path": row["path"], "stage": row["stage"], "error": row["error"]}
    else:
        record = {key: row[key] for key in _RESULT_FIELDS}
    if row.get("path_bytes"):
        record["path_bytes"] = row["path_bytes"]
    return record


class ParquetSink(Sink):
    """A dataset folder: one part file per batch, written hidden and renamed into place when whole."""

    def __init__(self, out: str, first_part: int, existing: Existing | None = None) -> None:
        _import_parquet()
        self.out = out
        self.folder = Path(out)
        self.existing = existing or Existing()
        self._next = first_part
        self._schema = _parquet_schema()

    def write(self, records: list[dict]) -> None:
        if records:
            name = f"part-{self._next:06d}.parquet"
            _write_part(self.folder, name, as_written(records), self._schema, self.out)
            self._next += 1


def _write_part(folder: Path, name: str, records: Iterable[dict], schema, out: str) -> None:
    """One part file, complete or absent: written to a hidden name, synced, renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = table_columns(records, COLUMNS)
    temporary = folder / f".{name}.tmp"
    try:
        pq.write_table(pa.table(columns, schema=schema), temporary)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, folder / name)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise SinkWriteError(exc.errno, f"cannot write {out}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------- inspecting, then opening


@dataclass
class OutputPlan:
    """What :func:`inspect_output` found, and what :meth:`open` will change."""

    out: str
    fmt: str
    exists: bool  # the output holds something an earlier run wrote (or something else)
    existing: Existing
    start_afresh: bool = False
    retry_failed: bool = False
    good_end: int = 0
    next_part: int = 0

    @property
    def has_records(self) -> bool:
        return bool(self.existing.succeeded or self.existing.failed)

    def open(self) -> Sink:
        """Make the output ready and return its sink; the first step that writes."""
        try:
            if self.fmt == "parquet":
                return self._open_dataset()
            return self._open_lines()
        except SinkWriteError:
            raise
        except OSError as exc:
            raise SinkError(exc.errno, f"cannot write {self.out}: {exc.strerror or exc}") from None

    def _open_lines(self) -> Sink:
        if self.out == "-":
            sink = LineSink(self.out, self.fmt)
            sink.write_header()
            return sink
        path = Path(self.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.start_afresh or not self.exists:
            with open(path, "wb"):
                pass
            sink = LineSink(self.out, self.fmt)
            sink.write_header()
            return sink
        if self.retry_failed and self.existing.failed:
            self._rewrite_without_errors(path)
        elif self.existing.dropped_bytes:
            os.truncate(path, self.good_end)
        return LineSink(self.out, self.fmt, self.existing)

    def _rewrite_without_errors(self, path: Path) -> None:
        """Replace the file atomically by its intact result records (a crash leaves the old or the new)."""
        temporary = path.with_name(path.name + ".rewrite")
        with open(temporary, "wb") as stream:
            if self.fmt == "csv":
                stream.write((_CSV_HEADER + "\n").encode())
            _scan(path, self.fmt, lambda record, raw: None if "error" in record else stream.write(raw))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        self.existing.failed = set()
        self.existing.damaged = self.existing.dropped_bytes = 0

    def _open_dataset(self) -> Sink:
        folder = Path(self.out)
        if self.start_afresh:
            if folder.is_dir():
                for entry in _parts(folder) + _temporaries(folder):
                    entry.unlink()
            elif folder.exists():
                folder.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        for temporary in _temporaries(folder):  # a part a killed run did not finish
            temporary.unlink()
        if self.retry_failed and self.existing.failed and not self.start_afresh:
            self._drop_error_rows(folder)
        return ParquetSink(self.out, 0 if self.start_afresh else self.next_part, self.existing)

    def _drop_error_rows(self, folder: Path) -> None:
        """Rewrite each part that holds error rows without them, one atomic rename per part."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for part in _parts(folder):
            table = pq.read_table(part, schema=_parquet_schema())
            kept = table.filter(pc.is_null(table["error"]))
            if kept.num_rows == table.num_rows:
                continue
            if kept.num_rows == 0:
                part.unlink()
            else:
                _write_part(folder, part.name, kept.to_pylist(), _parquet_schema(), self.out)
        self.existing.failed = set()


def _is_empty(path: Path) -> bool:
    return path.stat().st_size == 0 if path.is_file() else not any(path.iterdir())


def inspect_output(out: str, fmt: str | None = None, overwrite: bool = False,
                   retry_failed: bool = False) -> OutputPlan:
    """Read what an earlier run left in ``out``; writes nothing. SinkError if it cannot be resumed."""
    chosen = format_for(out, fmt)
    if chosen == "parquet":
        _import_parquet()
        if out == "-":
            raise SinkError("Parquet output needs a folder, not stdout")
    plan = OutputPlan(out, chosen, exists=False, existing=Existing(), retry_failed=retry_failed)
    if out == "-":
        return plan
    path = Path(out)
    if not (path.exists() or path.is_symlink()):
        return plan
    if chosen == "parquet":
        if path.is_file() and path.stat().st_size > 0:
            if not overwrite:
                raise SinkError(f"{out} is a single Parquet file, not a gpu-pipeline Parquet dataset folder; "
                                "use --overwrite or another --out")
        elif not path.is_dir() and not path.is_file():
            raise SinkError(f"{out} is not a folder; use another --out")
    elif not path.is_file():
        raise SinkError(f"{out} is not a regular file; use another --out")
    plan.exists = not _is_empty(path)
    if overwrite:
        plan.start_afresh = True
        if chosen == "parquet" and path.is_dir():
            ours = {entry.name for entry in _parts(path) + _temporaries(path)}
            foreign = [entry.name for entry in path.iterdir() if entry.name not in ours]
            if foreign:
                raise SinkError(f"{out} holds files gpu-pipeline did not write ({', '.join(sorted(foreign)[:3])}); "
                                "use another --out")
        return plan
    try:
        if chosen == "parquet":
            if path.is_dir():
                parts = _parts(path)
                for part in parts:
                    table = _import_parquet().read_table(part, columns=["path", "error", "path_bytes"])
                    for row in table.to_pylist():
                        if row["error"] is None:
                            del row["error"]
                        plan.existing.add(row)
                plan.next_part = int(_PART.fullmatch(parts[-1].name).group(1)) + 1 if parts else 0
        elif plan.exists:
            scan = _scan(path, chosen)
            plan.existing, plan.good_end = scan.existing, scan.good_end
    except SinkError:
        raise
    except OSError as exc:
        raise SinkError(exc.errno or errno.EIO, f"cannot read {out}: {exc.strerror or exc}") from None
    except Exception as exc:  # a Parquet part that is not Parquet
        raise SinkError(errno.EINVAL, f"cannot read {out} back: {exc}") from None
    return plan


def open_sink(out: str, fmt: str | None = None, resume: bool = True, retry_failed: bool = False) -> Sink:
    """Inspect and open ``out`` in one step (scripts and tests; ``run`` does the two apart)."""
    return inspect_output(out, fmt, overwrite=not resume, retry_failed=retry_failed).open()


# ---------------------------------------------------------------- one writer at a time


def lock_path(out: str) -> Path:
    return Path(out.rstrip("/") + ".lock")


class OutputLock:
    """An exclusive ``fcntl.flock`` on ``OUT.lock`` for the whole run; it holds the owner's process id.

    The lock is the kernel's, so it ends with the process, even after SIGKILL; a stale lock file
    left by a killed run is simply locked again. The file is removed when the lock is released.
    """

    def __init__(self, out: str) -> None:
        self.path = lock_path(out)
        self._descriptor: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(descriptor)
                raise SinkError(errno.EBUSY, f"another gpu-pipeline run (process {holder}) is writing "
                                f"{self.path.name[:-len('.lock')]} (it holds {self.path}); "
                                "wait for it to finish or use another --out") from None
            # The holder before us may have removed the file after we opened it: lock the one on disk.
            try:
                same = os.path.samestat(os.fstat(descriptor), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
