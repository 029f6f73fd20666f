"""The Parquet output: a dataset folder of part files, one per batch.

Each part is written under a hidden temporary name and renamed into place when complete; pyarrow,
pandas and DuckDB read the folder as one table, and a killed run leaves only whole parts (the
hidden temporary is removed on resume). pyarrow is an optional extra (``gpu-pipeline[parquet]``).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from gpu_pipeline.errors import cannot_write, first_line
from gpu_pipeline.outputs.files import keep_mode
from gpu_pipeline.outputs.records import CSV_COLUMNS as COLUMNS, table_columns
from gpu_pipeline.outputs.sink import Existing, Sink, SinkError, SinkWriteError, as_written, record_key

#: The dataset's columns are the CSV output's; a result record's are all but these (``path_bytes`` is
#: added only when set). By name, not position: a new field is one more column of ``CSV_COLUMNS``.
_RESULT_FIELDS = tuple(column for column in COLUMNS if column not in ("stage", "error", "path_bytes"))
PART = re.compile(r"part-(\d{6,})\.parquet")
_OPENING = re.compile(r"^Could not open Parquet input source '[^']*': ")


def parquet_schema():
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("bands", pa.int8()),
        ("backend", pa.string()), ("edge_count", pa.int64()), ("edge_density", pa.float64()),
        ("label", pa.string()), ("histogram", pa.list_(pa.int64(), 256)), ("stage", pa.string()),
        ("error", pa.string()), ("path_bytes", pa.string()),
    ])


#: pyarrow before 26 writes an error row's histogram (a null fixed-size list) but cannot read it back
#: ("Expected all lists to be of size=256"): resume, --retry-failed and pandas.read_parquet failed.
LEAST_PYARROW = (26,)


def import_parquet():
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise SinkError("Parquet output needs pyarrow: pip install 'gpu-pipeline[parquet]'") from None
    if _release(pyarrow.__version__) < LEAST_PYARROW:
        raise SinkError(f"Parquet output needs pyarrow 26 or later, found {pyarrow.__version__}: earlier versions cannot "
                        "read back the rows of images that failed (pip install 'pyarrow>=26'; it needs Python 3.11)")
    return pq


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def parts(folder: Path) -> list[Path]:
    """The complete part files of a dataset folder, in order."""
    return sorted((entry for entry in folder.iterdir() if PART.fullmatch(entry.name)),
                  key=lambda entry: int(PART.fullmatch(entry.name).group(1)))


def temporaries(folder: Path) -> list[Path]:
    return [entry for entry in folder.iterdir() if entry.name.startswith(".part-") and entry.name.endswith(".tmp")]


def read_dataset(folder: Path):
    pq = import_parquet()
    import pyarrow as pa

    found = parts(folder)
    if not found:
        return parquet_schema().empty_table()
    return pa.concat_tables(_read_part(pq, part, schema=parquet_schema()) for part in found)


def _read_part(pq, part: Path, **options):
    """``pq.read_table`` of one part, from a file opened here: given a name, pyarrow parses it as a
    URI (``run-01:15.parquet`` is an unknown file system "run-01") and needs it to be UTF-8."""
    with open(part, "rb") as stream:
        return pq.read_table(stream, **options)


def read_existing(folder: Path) -> tuple[Existing, int]:
    """What the dataset in ``folder`` holds (its paths, which failed) and the number of its next part."""
    existing = Existing()
    found = parts(folder)
    for part in found:
        table = _read_back(part)
        for row in table.to_pylist():
            if row["error"] is None:
                del row["error"]
            existing.add(row)
    next_part = int(PART.fullmatch(found[-1].name).group(1)) + 1 if found else 0
    return existing, next_part


def _read_back(part: Path):
    """The columns a resume needs of ``part``; ValueError naming the part when it cannot be read as
    one (a torn footer, a file of someone else's): among hundreds, the folder alone did not say which."""
    pq = import_parquet()
    try:
        return _read_part(pq, part, columns=["path", "error", "path_bytes"])
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # (the disk's error, not the part's: refused as any output that cannot be read)
        raise ValueError(_unreadable(part, exc)) from None


def _unreadable(part: Path, exc: Exception) -> str:
    reason = _OPENING.sub("", first_line(exc))  # (the source pyarrow names is our stream: '<Buffer>')
    return (f"{part.name} is not a readable Parquet part ({reason}); move it out of the folder (its "
            "images are then processed again) or use --overwrite")


def from_table_row(row: dict) -> dict:
    if row["error"] is not None:
        record = {"path": row["path"], "stage": row["stage"], "error": row["error"]}
    else:
        record = {key: row[key] for key in _RESULT_FIELDS}
    if row.get("path_bytes"):
        record["path_bytes"] = row["path_bytes"]
    return record


class ParquetSink(Sink):
    """A dataset folder: one part file per batch, written hidden and renamed into place when whole.
    ``like``: the status of a part the dataset held (:func:`last_part_status`), whose permissions and
    group each new part takes, as a file output keeps its own whatever a run adds to it."""

    def __init__(self, out: str, first_part: int, existing: Existing | None = None,
                 like: os.stat_result | None = None) -> None:
        import_parquet()
        self.out = out
        self.folder = Path(out)
        self.existing = existing or Existing()
        self._next = first_part
        self._schema = parquet_schema()
        self._like = like

    def write(self, records: list[dict]) -> None:
        if records:
            name = f"part-{self._next:06d}.parquet"
            write_part(self.folder, name, as_written(records), self._schema, self.out, self._like)
            self._next += 1


def last_part_status(folder: Path) -> os.stat_result | None:
    """The status of the dataset's last part; None where it has none, or where it is gone when read
    (a dangling link, a part removed since the listing), which --overwrite must not refuse."""
    found = parts(folder) if folder.is_dir() else []
    try:
        return os.stat(found[-1]) if found else None
    except OSError:
        return None


def write_part(folder: Path, name: str, records: Iterable[dict], schema, out: str,
               like: os.stat_result | None = None) -> None:
    """One part file, complete or absent: written to a hidden name, synced, renamed into place."""
    _put_in_place(_written_aside(folder, name, records, schema, out, like), folder / name, out)


def _written_aside(folder: Path, name: str, records: Iterable[dict], schema, out: str,
                   like: os.stat_result | None = None) -> Path:
    """Part ``name``, written whole and synced under its hidden temporary name (returned); with the
    permissions and group of the part whose status is ``like``, where one is given (the part it is
    to replace, or one the dataset held). SinkWriteError, and no temporary left, when it cannot be."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = table_columns(records, COLUMNS)
    temporary = folder / f".{name}.tmp"
    with _removed_on_failure(temporary, out):
        with open(temporary, "wb") as stream:  # (a name, pyarrow would parse as a URI: see _read_part)
            pq.write_table(pa.table(columns, schema=schema), stream)
            stream.flush()
            os.fsync(stream.fileno())
        if like is not None:
            keep_mode(like, temporary)
    return temporary


def _put_in_place(temporary: Path, part: Path, out: str) -> None:
    with _removed_on_failure(temporary, out):
        os.replace(temporary, part)


@contextmanager
def _removed_on_failure(temporary: Path, out: str) -> Iterator[None]:
    """Run the block; where it raises OSError, remove the part's ``temporary`` and raise
    SinkWriteError (``cannot write OUT: ...``, the OSError's errno), so that no hidden part is left."""
    try:
        yield
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise SinkWriteError(exc.errno, cannot_write(out, exc)) from exc


def drop_error_rows(folder: Path, out: str, dropped: set[str]) -> None:
    """Rewrite each part that holds error rows of the paths in ``dropped`` without them
    (``--retry-failed`` redoes those images). Every new part is written aside before the first is
    renamed into place: a disk that fills up on the way leaves the dataset as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rewritten: list[tuple[Path | None, Path]] = []  # (its new part, written aside; None: no row left), the part
    try:
        for part in parts(folder):
            table, status = _read_with_status(pq, part)
            rows = table.select(["path", "path_bytes", "error"]).to_pylist()
            kept = table.filter(pa.array([row["error"] is None or record_key(row) not in dropped for row in rows]))
            if kept.num_rows == table.num_rows:
                continue
            # (a part --retry-failed rewrote took the umask's permissions, not the part's own)
            aside = _written_aside(folder, part.name, kept.to_pylist(), parquet_schema(), out,
                                   like=status) if kept.num_rows else None
            rewritten.append((aside, part))
    except BaseException:  # (Ctrl-C too: the temporaries written so far go)
        for aside, _ in rewritten:
            if aside is not None:
                aside.unlink(missing_ok=True)
        raise
    for aside, part in rewritten:
        if aside is None:
            part.unlink(missing_ok=True)  # (removed meanwhile: as good)
        else:
            _put_in_place(aside, part, out)


def _read_with_status(pq, part: Path):
    """A part's table and the status of the file read (one opening: no window for the part to go
    between them). SinkError naming it where it was removed, or another file renamed in its place,
    since the resume read it (a part removed and skipped lost its records with exit 0, the resume
    holding them recorded); the next run reads the dataset afresh and redoes its images."""
    try:
        with open(part, "rb") as stream:
            return pq.read_table(stream, schema=parquet_schema()), os.fstat(stream.fileno())
    except FileNotFoundError:
        raise SinkError(f"{part.name} was removed while this run read the dataset; run the command again "
                        "(its images are then processed anew)") from None
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # (the disk's error, not the part's)
        raise SinkError(_unreadable(part, exc)) from None
