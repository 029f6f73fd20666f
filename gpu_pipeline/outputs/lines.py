"""JSON Lines and CSV outputs: appended whole records at a time, and read back for resume.

One ``write`` per batch, so a kill leaves complete batches plus at most one torn last record. On
resume a record that does not end in a newline, and unreadable lines after the last intact
record, are cut off and redone; an unreadable line *between* intact records is skipped and
counted (a warning says how many), so intact records are never dropped.

A resume needs only each record's path and whether it is an error. A line laid out as this version
writes it is matched whole by a pattern (so it is as intact as a full decode would find it) and
only its path is decoded: a nightly output that grows by 50,000 records a night is read back 4x
faster than by decoding every record's 256 counts. Any other line is decoded in full.
"""

from __future__ import annotations

import csv
import errno
import functools
import io
import itertools
import json
import os
import re
import sys
from collections import deque
from dataclasses import dataclass
from json.decoder import scanstring
from pathlib import Path
from typing import IO, Callable, Iterator

from gpu_pipeline.errors import cannot_write
from gpu_pipeline.outputs import records as record_text
from gpu_pipeline.outputs.files import still_names, write_all, write_replacing
from gpu_pipeline.outputs.sink import Existing, Sink, SinkError, SinkWriteError, as_written, record_key

#: Columns of the CSV output; the histogram is one column of 256 space-separated ints.
COLUMNS = record_text.CSV_COLUMNS
_INT_COLUMNS = ("width", "height", "bands", "edge_count")
#: A CSV record spans several lines only when a field holds newlines (a file name can); beyond
#: this many lines an unbalanced quote is damage, not a record. A name has fewer newlines than bytes:
#: under 4,096 for its folder (PATH_MAX) and 256 for itself (it was 1,000: a name with more, which
#: fits, was read back as damage, its image redone and recorded again on every resume).
_MAX_LINES_PER_RECORD = 8192


# ---------------------------------------------------------------- JSON Lines


def _jsonl_parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return None
    if "error" not in record and not (isinstance(record.get("histogram"), list) and len(record["histogram"]) == 256):
        return None  # (damage that is still JSON, a count lost or split in two: as CSV's and the resume's check)
    return record


# ---------------------------------------------------------------- CSV

CSV_HEADER = ",".join(COLUMNS)


def _csv_parse(line: bytes) -> dict | None:
    try:
        text = line.decode("utf-8")
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except (ValueError, UnicodeDecodeError, csv.Error):
        return None
    if len(rows) != 1 or len(rows[0]) != len(COLUMNS) or not rows[0][0]:
        return None
    # csv.reader takes a quote inside a bare field as text; the writer quotes such a field and
    # doubles its quotes, so a bare one is damage (the end of a record cut from its start)
    if any('"' in field and '"' + field.replace('"', '""') + '"' not in text for field in rows[0]):
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


# ---------------------------------------------------------------- keys only, for resume

_NUMBER = r"(?:0|[1-9][0-9]*)"
_FLOAT = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"'
_JSON_TAIL = r'(?:,"path_bytes":(?P<path_bytes>' + _JSON_STRING + r"))?\}\n"
#: A JSONL result and error as written (``json.dumps`` of the record, keys in this order). The
#: histogram's digits and commas are checked by :func:`_counts`: a pattern group repeated 256
#: times cost more than decoding the whole line.
_JSONL_RESULT = re.compile(
    r'\{"path":(?P<path>' + _JSON_STRING + r'),"width":' + _NUMBER + r',"height":' + _NUMBER + r',"bands":' + _NUMBER
    + r',"backend":' + _JSON_STRING + r',"histogram":\[(?P<histogram>[0-9,]+)\],"edge_count":' + _NUMBER
    + r',"edge_density":' + _FLOAT + r',"label":' + _JSON_STRING + _JSON_TAIL)
_JSONL_ERROR = re.compile(r'\{"path":(?P<path>' + _JSON_STRING + r'),"stage":' + _JSON_STRING + r',"error":'
                          + _JSON_STRING + _JSON_TAIL)
#: A CSV field as csv.writer writes it: bare, or quoted with its quotes doubled; then a non-empty one.
_CSV_FIELD = r'(?:"(?:[^"]|"")*"|[^,"\r\n]*)'
_CSV_TEXT = r'(?:"(?:[^"]|"")+"|[^,"\r\n]+)'
_CSV_RESULT = re.compile(
    r"(?P<path>" + _CSV_TEXT + r")," + ",".join([_NUMBER] * 3) + r"," + _CSV_TEXT + r"," + _NUMBER + r","
    + _FLOAT + r"," + _CSV_FIELD + r",(?P<histogram>[0-9 ]+),,,(?P<path_bytes>" + _CSV_FIELD + r")\n")
#: An error row: the path, the result's columns empty (counted from CSV_COLUMNS), stage, error, path_bytes.
_CSV_ERROR = re.compile(r"(?P<path>" + _CSV_TEXT + r")" + "," * COLUMNS.index("stage") + _CSV_FIELD + r","
                        + _CSV_TEXT + r",(?P<path_bytes>" + _CSV_FIELD + r")\n")


_LEADING_ZERO = re.compile(",0[0-9]")


def _counts(text: str, separator: str) -> bool:
    """Whether ``text`` (digits and separators) is 256 counts; in JSON (``,``) without leading zeros."""
    if text.count(separator) != 255 or text[0] == separator or text[-1] == separator or separator * 2 in text:
        return False
    return separator != "," or not ((text[0] == "0" and text[1] != ",") or _LEADING_ZERO.search(text))


@dataclass(frozen=True)
class _Layout:
    """How one format writes its records, for :func:`_key`."""

    result: re.Pattern
    error: re.Pattern
    separator: str  # between the histogram's counts
    value: Callable[[re.Match, str], str]  # a matched field's text as the record holds it
    whole: Callable[[bytes], dict | None]  # the full decode, for any other line


def _json_value(found: re.Match, field: str) -> str:
    return scanstring(found.string, found.start(field) + 1)[0]  # (json.loads of the string, without its wrapper)


def _csv_value(found: re.Match, field: str) -> str:
    text = found[field]
    return text[1:-1].replace('""', '"') if text.startswith('"') else text


def _key(layout: _Layout, line: bytes) -> dict | None:
    """What a resume reads of a record (a CSV record's lines joined): ``{"path"}``, with ``"path_bytes"``
    and ``"error"`` where the record has them (the error's text left out); the full decode for a
    line not laid out as ``layout`` writes it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    found = layout.result.fullmatch(text) or layout.error.fullmatch(text)
    if found is None or (found.re is layout.result and not _counts(found["histogram"], layout.separator)):
        return layout.whole(line)
    record = {"path": layout.value(found, "path")}
    if found["path_bytes"]:  # (a JSON string has its quotes: an empty one is found too)
        record["path_bytes"] = layout.value(found, "path_bytes")
    if found.re is layout.error:
        record["error"] = ""
    return record


_KEY_PARSERS = {"jsonl": functools.partial(_key, _Layout(_JSONL_RESULT, _JSONL_ERROR, ",", _json_value, _jsonl_parse)),
                "csv": functools.partial(_key, _Layout(_CSV_RESULT, _CSV_ERROR, " ", _csv_value, _csv_parse))}


# ---------------------------------------------------------------- reading line outputs back


#: A line longer than this is no record (a record of a name of 4,096 bytes, escaped, is under 40 KB):
#: it is read a piece at a time and never held whole. A crash can leave a tail of zeros without
#: a newline, which was read as one line: 300 MB of it took 704 MB of memory to resume.
LONGEST_LINE = 1 << 20
#: What stands for such a line: no newline, so it is unreadable, and a CSV record never continues into it.
_OVERLONG = b"\0"


def _lines(stream: IO[bytes], offset: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for each line of ``stream`` from ``offset`` on, newline included (not on a
    last line without one); a line longer than :data:`LONGEST_LINE` comes as :data:`_OVERLONG`."""
    for line in iter(functools.partial(stream.readline, LONGEST_LINE + 1), b""):
        if len(line) > LONGEST_LINE:
            length = len(line)
            while not line.endswith(b"\n"):
                line = stream.readline(LONGEST_LINE)
                if not line:
                    break
                length += len(line)
            yield offset, _OVERLONG
            offset += length
            continue
        yield offset, line
        offset += len(line)


def _entries(lines: Iterator[tuple[int, bytes]], fmt: str, whole: bool) -> Iterator[tuple[int, bytes, dict | None]]:
    """(offset, bytes, record or None when unreadable) for each record of a JSONL or CSV file, from
    its ``(offset, line)``: the whole record, or (not ``whole``) only what a resume reads of it (:func:`_key`).

    A CSV record continues on the next line while its quotes are unbalanced (a quoted newline). If
    the joined lines do not parse, only the first is unreadable and the others are read again.
    """
    parse = _PARSERS[fmt] if whole else _KEY_PARSERS[fmt]
    if fmt == "jsonl":  # a line is a record
        for offset, raw in lines:
            # A record is whole only with its newline: a torn last line may still parse.
            yield offset, raw, parse(raw) if raw.endswith(b"\n") else None
        return
    queue: deque[tuple[int, bytes]] = deque()
    while True:
        if not queue:
            line = next(lines, None)
            if line is None:
                return
            queue.append(line)
        offset, raw = queue[0]
        taken, size = 1, len(raw)
        quotes = raw.count(b'"')
        # (no record is longer than a line may be: joined, damage is read no further than that)
        while quotes % 2 and queue[taken - 1][1].endswith(b"\n") and taken < _MAX_LINES_PER_RECORD \
                and size <= LONGEST_LINE:  # (CSV only, from here)
            if taken == len(queue):
                more = next(lines, None)
                if more is None:
                    break
                queue.append(more)
            quotes += queue[taken][1].count(b'"')
            size += len(queue[taken][1])
            taken += 1
        if taken > 1:  # (joined once: adding line by line copied the record so far each time)
            raw = b"".join(line for _, line in itertools.islice(queue, taken))
        # A record is whole only with its newline: a torn last line may still parse.
        record = parse(raw) if raw.endswith(b"\n") else None
        if record is None:
            raw, taken = queue[0][1], 1
        for _ in range(taken):
            queue.popleft()
        yield offset, raw, record


@dataclass
class Scan:
    """A JSONL or CSV output read back."""

    existing: Existing
    good_end: int  # end of the last intact record (or of the header): what follows is cut
    size: int


def _check_header(stream: IO[bytes], fmt: str, path) -> int:
    """Check and skip the CSV header; returns where the records start: 0 for a JSONL output, and for a
    CSV output that a crash left with its header torn or zero-filled and nothing after it."""
    if fmt != "csv":
        return 0
    header = stream.readline(LONGEST_LINE + 1)
    if len(header) > LONGEST_LINE:  # not our header: zeros to the end of the file are a torn one
        while not header.strip(b"\0"):  # (read a piece at a time)
            header = stream.readline(LONGEST_LINE)
            if not header:
                return 0
    elif not header.endswith(b"\n") and ((CSV_HEADER + "\n").encode().startswith(header) or not header.strip(b"\0")):
        return 0
    if header.rstrip(b"\r\n") != CSV_HEADER.encode():
        raise SinkError(f"{path} is not a gpu-pipeline CSV output of this version (unexpected header); "
                        "use --overwrite or another --out")
    return len(header)


def scan(path: Path, fmt: str, keep: Callable[[dict, bytes], None] | None = None, whole: bool = False) -> Scan:
    """Read a JSONL or CSV output; ``keep(record, raw)`` sees each intact record: the whole record, or
    (not ``whole``) its path and whether it is an error (:func:`_key`)."""
    existing = Existing()
    with open(path, "rb") as stream:
        good_end = _check_header(stream, fmt, path)
        unreadable_since_good = 0
        for offset, raw, record in _entries(_lines(stream, good_end), fmt, whole):
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
    return Scan(existing, good_end, size)


def keep_results(path: Path, fmt: str, dropped: set[str]) -> None:
    """Replace the file by its intact records less the errors of the paths in ``dropped``, written
    to a temporary of ours renamed into place (a crash leaves the old or the new): ``--retry-failed``
    redoes those images. The real file is replaced: a symbolic link to it stays one."""
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as stream:
            if fmt == "csv":
                stream.write((CSV_HEADER + "\n").encode())
            scan(path, fmt, lambda record, raw: None if "error" in record and record_key(record) in dropped
                 else stream.write(raw))

    write_replacing(Path(os.path.realpath(path)), write, durable=True)


def stdout_to_devnull() -> None:
    """Point file descriptor 1 at /dev/null after a write to stdout failed: Python's exit would
    flush what is still buffered into the same failure ("Exception ignored", exit 120)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _write_all(descriptor: int, data: bytes, out: str) -> None:
    """``data`` to ``descriptor`` whole; a short write is continued, an error raised as SinkWriteError."""
    try:
        write_all(descriptor, data)
    except OSError as exc:
        raise SinkWriteError(exc.errno, cannot_write(out, exc)) from exc


class LineSink(Sink):
    """JSON Lines or CSV, appended one batch at a time by one ``os.write`` (no buffer to lose)."""

    def __init__(self, out: str, fmt: str, existing: Existing | None = None) -> None:
        self.out = out
        self.fmt = fmt
        self.existing = existing or Existing()
        self._text = record_text.jsonl_text if fmt == "jsonl" else record_text.csv_text
        self._descriptor: int | None = None
        self._named = os.path.abspath(out)  # (the same file after a chdir: see _check_still_named)
        if out != "-":
            try:
                self._descriptor = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            except OSError as exc:
                raise SinkError(exc.errno, cannot_write(out, exc)) from None

    def write_header(self) -> None:
        if self.fmt == "csv":
            self._write_text(CSV_HEADER + "\n")

    def write(self, records: list[dict]) -> None:
        text = self._text(as_written(records))
        if text:
            self._write_text(text)

    def _write_text(self, text: str) -> None:
        if self._descriptor is None:
            try:  # UTF-8, as in a file, whatever stdout's encoding (an ASCII locale raised on "é")
                sys.stdout.flush()
                binary = getattr(sys.stdout, "buffer", None)  # (a notebook's stdout has none)
                if binary is None:
                    sys.stdout.write(text)
                else:
                    binary.write(text.encode("utf-8"))
                    binary.flush()
            except OSError as exc:  # a full disk behind `> file`, or a reader that stopped (`| head`)
                # nothing more goes there: the bytes still buffered would fail again at exit ("Exception
                # ignored", exit 120 instead of 3)
                stdout_to_devnull()
                raise SinkWriteError(exc.errno or errno.EIO, f"cannot write to stdout: {exc.strerror or exc}") from exc
        else:
            _write_all(self._descriptor, text.encode("utf-8"), self.out)
            self._check_still_named()

    def _check_still_named(self) -> None:
        """Raise SinkWriteError when ``out`` no longer names the file written (removed, renamed or
        replaced during the run, by a cleanup job or a hand): each later batch would go to no file,
        and the run once ended with exit 0 and no records. Checked after the write, so that the
        last batch is covered too."""
        try:
            named = still_names(self._named, self._descriptor)
        except OSError:  # (a folder made unsearchable: the records still reach the file)
            return
        if not named:
            raise SinkWriteError(errno.ENOENT, f"cannot write {self.out}: it was removed or replaced during the run")

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
