"""Which output a run writes, what an earlier run left there, and one writer at a time.

Opening an output for a run has two steps, so that a run that is refused writes nothing:
:func:`inspect_output` reads what an earlier run left (read-only, it raises :class:`SinkError` for
anything it cannot resume), and :meth:`OutputPlan.open` then makes the changes (cut a torn tail,
drop error records for ``--retry-failed``, start afresh for ``--overwrite``) and returns the
format's :class:`Sink`. :class:`OutputLock` keeps a second run off the same output.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from gpu_pipeline.errors import cannot_write
from gpu_pipeline.outputs import parquet
from gpu_pipeline.outputs.files import still_names
from gpu_pipeline.outputs.lines import LineSink, keep_results, scan
from gpu_pipeline.outputs.sink import Existing, Sink, SinkError, SinkWriteError

FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet"}


def format_for(out: str, explicit: str | None = None) -> str:
    """The output format: ``explicit`` if given, else the one whose extension the name ends with (a
    name that is only an extension, ``.csv``, too: ``Path`` takes it for a suffixless hidden file),
    else JSON Lines."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise SinkError(f"unknown output format {explicit!r}; choose from {', '.join(FORMATS)}")
        return explicit
    name = os.path.basename(out.rstrip("/")).lower()
    return next((kind for extension, kind in _EXTENSIONS.items() if name.endswith(extension)), "jsonl")


def misspelt_extension(out: str) -> str | None:
    """The extension of an output format that ``out``'s own looks like a slip of (``.parquett``,
    ``.cvs``, ``.tsv``), or None: such a name was written as JSON Lines, which the reader it was
    named for (pandas.read_parquet, a spreadsheet) then refused."""
    name = os.path.basename(out.rstrip("/")).lower()
    suffix = os.path.splitext(name)[1] or (name if name.startswith(".") else "")
    if not suffix or suffix in _EXTENSIONS:
        return None
    close = difflib.get_close_matches(suffix, list(_EXTENSIONS), n=1, cutoff=0.75)
    return close[0] if close else None


def written_format(out: str | os.PathLike[str]) -> str | None:
    """The format of an output by what it holds: a folder is Parquet, a file starting with ``{`` JSON
    lines, one starting with its header's first column (``path,``, in every version) CSV; None when
    it cannot tell (empty, or neither)."""
    if os.path.isdir(out):
        return "parquet"
    try:
        with open(out, "rb") as stream:
            head = stream.read(5)
    except OSError:
        return None
    return "jsonl" if head.startswith(b"{") else "csv" if head == b"path," else None


def read_records(path: str | os.PathLike[str]) -> list[dict]:
    """All intact records of a JSONL, CSV or Parquet output (for tests, verify and users' scripts), in
    the format it holds: ``--format`` may have written one whatever the name (the CSV of ``r.txt``,
    read as JSON lines by its name, gave no record); by the name when the content cannot tell."""
    fmt = written_format(path) or format_for(str(path))
    if fmt == "parquet":
        return [parquet.from_table_row(row) for row in parquet.read_dataset(Path(path)).to_pylist()]
    records: list[dict] = []
    scan(Path(path), fmt, lambda record, raw: records.append(record), whole=True)
    return records


# ---------------------------------------------------------------- inspecting, then opening


@dataclass
class OutputPlan:
    """What :func:`inspect_output` found, and what :meth:`open` will change."""

    out: str
    fmt: str
    exists: bool  # the output holds something an earlier run wrote (or something else)
    existing: Existing
    #: A CSV output whose header a crash left torn or zero-filled, and nothing else: written again.
    #: It still ``exists``: only beside its settings record is it ours (a file of zeros is not).
    torn_header: bool = False
    start_afresh: bool = False
    retry_failed: bool = False
    #: With ``retry_failed``: the failed paths this run redoes, its inputs' (None: every one). The
    #: error records of other files stay: a retry of one folder removed those of every other.
    retried: set[str] | None = None
    good_end: int = 0
    next_part: int = 0

    def open(self) -> Sink:
        """Make the output ready and return its sink; the first step that writes."""
        try:
            if self.fmt == "parquet":
                return self._open_dataset()
            return self._open_lines()
        except SinkError:  # (says what and which file already: the sink's "cannot write OUT: ...")
            raise
        except OSError as exc:
            raise SinkError(exc.errno, cannot_write(self.out, exc)) from None

    def _open_lines(self) -> Sink:
        if self.out == "-":
            sink = LineSink(self.out, self.fmt)
            sink.write_header()
            return sink
        path = Path(self.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.start_afresh or not self.exists or self.torn_header:
            _emptied(path)
            sink = LineSink(self.out, self.fmt)
            sink.write_header()
            return sink
        if self.retry_failed and (dropped := self._dropped()):
            keep_results(path, self.fmt, dropped)
            self.existing.failed -= dropped
            self.existing.damaged = self.existing.dropped_bytes = 0
        elif self.existing.dropped_bytes:
            os.truncate(path, self.good_end)
        return LineSink(self.out, self.fmt, self.existing)

    def _dropped(self) -> set[str]:
        """The error records ``--retry-failed`` removes: those of the paths it redoes."""
        return self.existing.failed if self.retried is None else self.existing.failed & self.retried

    def _open_dataset(self) -> Sink:
        folder = Path(self.out)
        like = parquet.last_part_status(folder)  # (before --overwrite removes it)
        if self.start_afresh:
            if folder.is_dir():
                for entry in parquet.parts(folder) + parquet.temporaries(folder):
                    entry.unlink()
            elif folder.exists():
                folder.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        for temporary in parquet.temporaries(folder):  # a part a killed run did not finish
            temporary.unlink()
        if self.retry_failed and not self.start_afresh and (dropped := self._dropped()):
            parquet.drop_error_rows(folder, self.out, dropped)
            self.existing.failed -= dropped
        return parquet.ParquetSink(self.out, 0 if self.start_afresh else self.next_part, self.existing, like)


def _emptied(path: Path) -> None:
    """Make the output file at ``path`` empty: truncated, or, where another name shares the file (a
    hard link: a backup made with ``cp -l`` or rsnapshot), replaced by a new one, so that the other
    name keeps the records it holds. A symbolic link stays one: its file is the one emptied."""
    real = Path(os.path.realpath(path))
    with contextlib.suppress(FileNotFoundError):
        if real.stat().st_nlink > 1:
            real.unlink()
    with open(real, "wb"):
        pass


def check_dataset_folder(plan: OutputPlan) -> None:
    """Refuse to resume a Parquet output whose folder holds files we did not write (once its settings
    record says it is ours): a folder replaced by someone else's dataset got our parts among theirs,
    which pyarrow then read as one table of their schema. A hidden file is no part of the dataset
    for pyarrow, pandas or DuckDB, and may stay."""
    path = Path(plan.out)
    if plan.fmt == "parquet" and plan.exists and not plan.start_afresh and path.is_dir():
        if foreign := _not_ours(path, hidden=False):
            raise SinkError(f"{plan.out} holds files gpu-pipeline did not write ({', '.join(foreign)}); resuming "
                            "would mix them into the dataset: move them out of the folder, or use another --out")


def check_writable(plan: OutputPlan) -> None:
    """Refuse an existing output this process may not write (made read-only, another user's), with the
    other checks: a resume onto a read-only Parquet folder processed a batch and then exited 3, and
    ``--dry-run`` said a run onto a read-only file would go on. (Root passes this check.)"""
    real = os.path.realpath(plan.out)
    if plan.out == "-" or not os.path.exists(real):
        return
    if plan.fmt == "parquet":
        writable = not os.path.isdir(real) or os.access(real, os.W_OK | os.X_OK)  # (a file there is replaced)
    else:  # (a file another name shares is replaced, not written, when started afresh: see _emptied)
        writable = os.access(real, os.W_OK) or (plan.start_afresh and os.stat(real).st_nlink > 1)
    if not writable:
        raise SinkError(errno.EACCES, f"cannot write {plan.out}: {os.strerror(errno.EACCES)}")


def _not_ours(folder: Path, hidden: bool = True) -> list[str]:
    """The first few names in a dataset folder that are not our parts or their temporaries (with
    ``hidden`` False, not hidden ones either), sorted."""
    ours = {entry.name for entry in parquet.parts(folder) + parquet.temporaries(folder)}
    return sorted(entry.name for entry in folder.iterdir()
                  if entry.name not in ours and (hidden or not entry.name.startswith(".")))[:3]


def _is_empty(path: Path) -> bool:
    return path.stat().st_size == 0 if path.is_file() else not any(path.iterdir())


def inspect_output(out: str, fmt: str | None = None, overwrite: bool = False,
                   retry_failed: bool = False) -> OutputPlan:
    """Read what an earlier run left in ``out``; writes nothing. SinkError if it cannot be resumed."""
    chosen = format_for(out, fmt)
    if chosen == "parquet":
        parquet.import_parquet()
        if out == "-":
            raise SinkError("Parquet output needs a folder, not stdout")
    plan = OutputPlan(out, chosen, exists=False, existing=Existing(), retry_failed=retry_failed)
    if out == "-":
        return plan
    path = Path(out)
    if not (path.exists() or path.is_symlink()):
        return plan
    if chosen == "parquet":
        if path.is_file():
            if not overwrite:
                what = "a single Parquet file" if path.stat().st_size > 0 else "an empty file"
                raise SinkError(f"{out} is {what}, not a gpu-pipeline Parquet dataset folder; "
                                "use --overwrite or another --out")
        elif not path.is_dir() and not path.is_file():
            raise SinkError(f"{out} is not a folder; use another --out")
    elif path.is_symlink() and not path.exists():
        raise SinkError(f"{out} is a symbolic link to {os.readlink(path)}, which does not exist; "
                        "use the name it leads to, or another --out")
    elif path.is_dir():  # (a folder for the results: the user meant a file in it)
        kind = "CSV" if chosen == "csv" else "JSON Lines"  # (a Parquet output, a folder, is taken above)
        raise SinkError(f"{out} is a folder; a {kind} output is a file: "
                        f"name one in it (such as {os.path.join(out, 'results.' + chosen)}), or give another --out")
    elif not path.is_file():
        raise SinkError(f"{out} is not a regular file; use another --out")
    plan.exists = not _is_empty(path)
    if overwrite:
        plan.start_afresh = True
        if chosen == "parquet" and path.is_dir() and (foreign := _not_ours(path)):
            raise SinkError(f"{out} holds files gpu-pipeline did not write ({', '.join(foreign)}); use another --out")
        return plan
    try:
        if chosen == "parquet":
            if path.is_dir():
                plan.existing, plan.next_part = parquet.read_existing(path)
        elif plan.exists:
            found = scan(path, chosen)
            plan.existing, plan.good_end = found.existing, found.good_end
            plan.torn_header = chosen == "csv" and found.good_end == 0
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

    def _foreign(self) -> SinkError:
        return SinkError(errno.EEXIST, f"{self.path} exists and is not a gpu-pipeline lock; it is left alone: "
                         "remove it or use another --out")

    def _open(self) -> int:
        """The lock file, opened (created if absent); SinkError naming it when it cannot be, or is not
        a regular file (a folder, a FIFO, a link to nowhere: the refusal named the output instead)."""
        # (not through a link: O_CREAT would make its target, wherever it points; 0666 less the umask,
        # so that in a folder a group shares, another member's run can lock a stale one again)
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW, 0o666)
        except OSError as exc:
            if not os.path.lexists(self.path):  # (nothing to remove: the folder cannot be written)
                raise SinkError(exc.errno, f"cannot write in {self.path.parent or '.'}, where the output and its "
                                f"lock go: {exc.strerror or exc}; use another --out") from None
            reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or exc
            raise SinkError(exc.errno, f"cannot use {self.path}, the lock of the output: {reason}; "
                            "remove it or use another --out") from None
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise self._foreign()
        return descriptor

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = self._open()
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(descriptor)
                raise SinkError(errno.EBUSY, f"another gpu-pipeline run (process {holder}) is writing "
                                f"{self.path.name[:-len('.lock')]} (it holds {self.path}); "
                                "wait for it to finish or use another --out") from None
            # The holder before us may have removed the file after we opened it: lock the one on disk.
            if still_names(self.path, descriptor):
                break
            os.close(descriptor)
        held = os.pread(descriptor, 64, 0)
        if held.strip() and not held.strip().isdigit():  # a lock of ours holds a process id, or nothing yet
            os.close(descriptor)
            raise self._foreign()
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # a full disk: the refusal leaves no lock file behind (it is ours: we hold it)
            self.path.unlink(missing_ok=True)
            os.close(descriptor)
            raise
        self._descriptor = descriptor

    def _still_held(self) -> bool:
        """Whether ``OUT.lock`` is still the file locked (a wrapper's ``rm -f *.lock`` removes it
        during the run, and the next run locks a new one)."""
        return still_names(self.path, self._descriptor)

    def check_held(self, out: str) -> None:
        """SinkWriteError when the lock file was removed during the run: another run could then
        lock a new one and write ``out`` too (both wrote every image left to do)."""
        try:
            held = self._still_held()
        except OSError:  # (its folder made unsearchable: no other run can take it either)
            return
        if not held:
            raise SinkWriteError(errno.ENOENT, f"the lock {self.path} was removed during the run, and another run "
                                 f"could write {out} too: stopped")

    def release(self) -> None:
        if self._descriptor is not None:
            # (its folder made read-only during the run: the file stays, and is simply locked again;
            # the run had done its work, and ended in a traceback)
            with contextlib.suppress(OSError):
                if self._still_held():  # (not another run's, made after ours was removed)
                    self.path.unlink(missing_ok=True)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockedSink(Sink):
    """``sink``, checking after each write that the run still holds the output's ``lock``."""

    def __init__(self, sink: Sink, lock: OutputLock, out: str) -> None:
        self.sink, self.lock, self.out = sink, lock, out

    def write(self, records: list[dict]) -> None:
        self.sink.write(records)
        self.lock.check_held(self.out)

    def close(self) -> None:
        self.sink.close()
