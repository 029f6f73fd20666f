"""The format-neutral side of the outputs: the ``Sink`` interface, its errors, exact file names.

Every image gets exactly one record: a result or an error. A sink takes them a batch at a time
(``write(records)``) and is closed at the end; each format (``lines.py``: JSON Lines and CSV,
``parquet.py``: a Parquet dataset) implements it, and ``plan.py`` decides which one a run opens and
what an earlier run left there.

File names are recorded exactly (:func:`portable`): ``path`` is the name as text; when it is not
valid UTF-8, ``path`` shows it with ``\\xNN`` escapes and ``path_bytes`` holds its exact bytes in
base64. Resume matches on the exact bytes.
"""

from __future__ import annotations

import base64
import errno
import os
from dataclasses import dataclass, field
from typing import Iterable

from gpu_pipeline.errors import bytes_shown, is_utf8, single_root
from gpu_pipeline.outputs.records import RecordBatch


class SinkError(OSError):
    """The output cannot be opened or read back: the run is refused (exit 2) before any work."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class SinkWriteError(SinkError):
    """Writing records failed during the run (disk full, I/O error); what was written is kept."""


#: Errors of a disk, not of one file: every later write there would fail alike (a full disk, a
#: quota reached, a file system remounted read-only after an I/O error).
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


# ---------------------------------------------------------------- file names


def portable(record: dict) -> dict:
    """``record`` as written: a name that is not valid UTF-8 gets its exact bytes in ``path_bytes``.

    Paths arrive as Python strings, where undecodable bytes are surrogate escapes (``os.fsdecode``).
    Those cannot be written as UTF-8, and ``\\udcff`` in JSON names no file; ``path`` shows them as
    ``\\xff`` and ``path_bytes`` names the file exactly. An error message that names such a file shows
    it the same way. Ordinary records are returned unchanged.
    """
    path, error = record["path"], record.get("error")
    if is_utf8(path) and (error is None or is_utf8(error)):
        return record
    record = dict(record)
    if error is not None:
        record["error"] = bytes_shown(error)
    if not is_utf8(path):
        record.update(path=bytes_shown(path), path_bytes=name_bytes(path))
    return record


def as_written(records: Iterable[dict]) -> Iterable[dict]:
    """``records`` with :func:`portable` names. A :class:`RecordBatch` whose names are all UTF-8 (the
    usual case) is returned as it is, so the sinks can encode it in one go."""
    if isinstance(records, RecordBatch) and is_utf8("".join(records.paths)) and \
            is_utf8("".join(error["error"] for error in records.errors.values())):
        return records
    return [portable(record) for record in records]


def portable_names(value):
    """A JSON value (a report) with every name that is not UTF-8 shown as ``\\xNN``
    (:func:`bytes_shown`), as in the records, and an ``image``, ``folder`` or ``path`` that is not
    given its exact bytes in base64 beside it (``image_bytes``, ``folder_bytes``, ``path_bytes``;
    for a list of names, ``KEY_bytes``: the bytes of each such name, ``null`` for the others).
    Written as they were, such names were lone surrogate escapes (``"\\udcff"``), which strict JSON
    readers (Rust's serde_json) refuse."""
    if isinstance(value, str):
        return value if is_utf8(value) else bytes_shown(value)
    if isinstance(value, (list, tuple)):
        return [portable_names(item) for item in value]
    if not isinstance(value, dict):
        return value
    portable = {key: portable_names(item) for key, item in value.items()}
    for key in ("image", "folder", "path"):
        name = value.get(key)
        if isinstance(name, str) and not is_utf8(name):
            portable[f"{key}_bytes"] = name_bytes(name)
    for key, names in value.items():  # a list of names (a report's inputs): the bytes beside it too
        if isinstance(names, list) and any(isinstance(name, str) and not is_utf8(name) for name in names):
            portable[f"{key}_bytes"] = [name_bytes(name) if isinstance(name, str) and not is_utf8(name) else None
                                        for name in names]
    return portable


def name_bytes(name: str) -> str:
    """A file name's exact bytes in base64 (``path_bytes`` and the reports' ``*_bytes``)."""
    return base64.b64encode(os.fsencode(name)).decode("ascii")


def record_key(record: dict) -> str:
    """The input path a stored record is for, as discovery names it (``str`` of the ``Path``): a
    leading ``//``, which discovery kept before 2026-12-06, read as ``/`` (:func:`single_root`), so
    that such an output resumes instead of getting a second record of every file."""
    encoded = record.get("path_bytes")
    return single_root(os.fsdecode(base64.b64decode(encoded)) if encoded else record["path"])


@dataclass
class Existing:
    """What an earlier run left in the output: the paths that succeeded and those that failed."""

    succeeded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    dropped_bytes: int = 0  # a torn or unreadable tail that is cut off and redone
    damaged: int = 0  # unreadable lines between intact records: skipped, their images redone

    def add(self, record: dict) -> None:
        (self.failed if "error" in record else self.succeeded).add(record_key(record))


# ---------------------------------------------------------------- the Sink interface


class Sink:
    """What an engine writes to: ``write(records)`` once per batch, ``close()`` at the end.

    Every sink implements it: the line and Parquet outputs, the in-memory list a Dask worker
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
