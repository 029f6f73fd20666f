"""One `gpu-pipeline run`, in two visible steps: :func:`check_job`, then :func:`execute`.

:func:`check_job` does everything that can refuse the run (``UsageError``, exit 2) and writes
nothing: the inputs, the edge folder, the output (ours? the same format and settings? resumable?)
and the backend. Only then does :func:`execute` write: the settings record, the output's repairs,
the records. The output is locked (``OUT.lock``) around both, so two runs never write one output.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from gpu_pipeline.backends import BackendUnavailable, create
from gpu_pipeline.backends.base import DeviceFailed
from gpu_pipeline.labels.labeller import (attach_label_model_or_close, label_function, labeller_compiles,
                                           warm_up_labeller)
from gpu_pipeline.config import SETTING_OPTIONS, DecodeOptions, PipelineConfig, canny_order
from gpu_pipeline.engine.decoding import early_fork_server, processes_option
from gpu_pipeline.engine.stream import Engine, RunSummary
from gpu_pipeline.inputs.processes import DecodeProcessesFailed, ForkServer
from gpu_pipeline.errors import (EXIT_DEVICE_FAILED, EXIT_WRITE_ERROR, STOP_SIGNALS, UsageError, cannot_write,
                                 ignored_on_purpose, one_line, shown)
from gpu_pipeline.inputs.discover import ListedPath, find_files, folders_under, no_files_found, unlisted_warning
from gpu_pipeline.outputs.edges import edge_root, edge_saver
from gpu_pipeline.outputs.files import (NAME_MAX, remove_stale_temporaries, same_file_as, temporaries_of,
                                         write_replacing)
from gpu_pipeline.outputs.plan import (LockedSink, OutputLock, OutputPlan, check_dataset_folder, check_writable,
                                       format_for, inspect_output, lock_path, misspelt_extension, written_format)
from gpu_pipeline.outputs.sink import SinkError, SinkWriteError

#: A second stop signal sooner than this after the first is the first one delivered again.
SAME_SIGNAL_S = 1.0


def open_backend(name: str, threads: int | None, device: int | None = None):
    try:
        return create(name, threads=threads, device=device)
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None
    except BackendUnavailable as exc:
        raise UsageError(str(exc)) from None


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console,
    )


def print_summary(console: Console, summary: RunSummary, backend: str, out: str) -> None:
    console.print(
        f"[bold]{summary.total:,}[/] image{'' if summary.total == 1 else 's'} with backend [bold]{backend}[/] "
        f"in {summary.seconds:.2f} s: "
        f"[green]{summary.ok:,} ok[/], " + (f"[red]{summary.failed:,} failed[/]" if summary.failed else "0 failed")
        + f" ({summary.images_per_second:,.0f} images/s, {summary.megapixels_per_second:,.1f} MP/s)"
    )
    if summary.failures_by_stage:
        stages = ", ".join(f"{stage}: {n:,}" for stage, n in summary.failures_by_stage.most_common())
        console.print(f"failures by stage: {stages}")
    if summary.labels:
        console.print("labels: " + ", ".join(f"{shown(label)} {n:,}" for label, n in summary.labels.most_common()))
    console.print(f"results: {out if out == '-' else shown(os.path.abspath(out))}")


def model_identity(model: str | None) -> str | None:
    """The label model as settings see it: the SHA-256 of its file (labels depend on its content)."""
    if model is None:
        return None
    from gpu_pipeline.labels.model import resolve_model_path

    return "sha256:" + hashlib.sha256(resolve_model_path(model).read_bytes()).hexdigest()


def settings_path(out: str) -> Path:
    """``OUT.settings.json``, beside the output file: where ``out`` is a symbolic link, beside the file
    it leads to, as the lock, so that every spelling of one output finds the same record."""
    name = out.rstrip("/")
    if out != "-" and os.path.islink(name):
        name = os.path.realpath(name)
    return Path(name + ".settings.json")


def check_settings(out: str, settings: dict, output: OutputPlan, earlier: dict | None) -> None:
    """Refuse an output this run must not add to: not ours, or made in another format or with other settings.

    Results do not depend on the backend (they are the same bytes), so switching backends between
    runs is fine; thresholds, blur, bands, stretch, the label model or the format are not.
    """
    if out == "-" or not output.exists or output.start_afresh:
        return
    path = settings_path(out)
    if earlier is None:  # (one there that is not ours was refused by checked_settings_record)
        replace = ("--overwrite replaces such a folder only when it holds nothing but gpu-pipeline's Parquet parts"
                   if os.path.isdir(out) else "use --overwrite to replace it")
        beside_link = Path(out.rstrip("/") + ".settings.json")
        moved = (f" (runs before 2026-12-06 kept it beside the link, as {beside_link}: if it is this output's, "
                 f"move it to {path})" if beside_link != path and os.path.lexists(beside_link) else "")
        raise UsageError(f"{out} exists but has no settings record {path.name}{moved}: it is not a gpu-pipeline "
                         f"output, or its settings were removed, and resuming could mix settings; {replace}, "
                         "or another --out")
    settings = json.loads(json.dumps(settings))  # compare as stored: tuples become lists
    used_before, used_now = _as_canny_uses(earlier), _as_canny_uses(settings)  # (shown as given, below)
    if _same_json(used_before, used_now):
        return
    # in this format: inspect checked that before the output was read back
    changed = [_changed_section(key, earlier.get(key), settings.get(key)) for key in _differing(used_before, used_now)]
    raise UsageError(f"{out} holds results computed with other settings (changed: {'; '.join(changed)}; "
                     f"see {path}); use --overwrite or another --out")


def _changed_section(key: str, earlier, now) -> str:
    """``pipeline: --low 100 -> 50``: the options that changed, with the output's value and this run's
    as given ("changed: pipeline" alone left the user to compare the settings record by hand).
    Thresholds given the other way round are no change (:func:`_as_canny_uses`)."""
    if not (isinstance(earlier, dict) and isinstance(now, dict)):
        return key  # (the model: its SHA-256 would tell the user nothing)
    same_thresholds = _same_json(list(_canny_thresholds(earlier)), list(_canny_thresholds(now)))
    options = [_change_shown(name, earlier, now) for name in _differing(earlier, now)
               if not (same_thresholds and name in _THRESHOLDS)]
    return f"{key}: {', '.join(options)}"


def _change_shown(name: str, earlier: dict, now: dict) -> str:
    """``--low 100 -> 50``; a recorded value that reads as this run's (a record edited by hand to hold
    "100" or [100]) as the record has it, ``--low "100" -> 100``, where "100 -> 100" named no change."""
    was = _setting_shown(earlier[name]) if name in earlier else "not recorded"
    is_now = _setting_shown(now[name]) if name in now else "not a setting of this version"
    if name in earlier and name in now and (was == is_now or not _same_kind(earlier[name], now[name])):
        was = json.dumps(earlier[name])
    return f"{SETTING_OPTIONS.get(name, name)} {was} -> {is_now}"


def _differing(earlier: dict, now: dict) -> list[str]:
    """The keys whose values differ, this run's order first, a key on one side only among them (a newer
    version's setting, one the record lacks): left out, they gave "changed: pipeline: " and nothing to
    act on (None is no value to compare a missing key by)."""
    return [name for name in {**now, **earlier}
            if name not in now or name not in earlier or not _same_json(earlier[name], now[name])]


def _same_json(earlier, now) -> bool:
    """Whether two settings are the same JSON values: a record edited by hand to hold true for a
    threshold resumed a run with --low 1, Python's True being 1."""
    if isinstance(earlier, dict) and isinstance(now, dict):
        return earlier.keys() == now.keys() and all(_same_json(earlier[key], now[key]) for key in earlier)
    if isinstance(earlier, list) and isinstance(now, list):
        return len(earlier) == len(now) and all(map(_same_json, earlier, now))
    return _same_kind(earlier, now) and earlier == now


def _same_kind(earlier, now) -> bool:
    """Whether neither or both are JSON's true or false (Python's bool is a number)."""
    return isinstance(earlier, bool) == isinstance(now, bool)


def _setting_shown(value) -> str:
    """A setting as the command line spells it: 100.0 as 100, [3, 2, 1] as 3,2,1."""
    if value is None:
        return "not given"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):  # (six digits at most: 100.00001 would read as 100)
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    if isinstance(value, list) and all(type(item) is int for item in value):
        return ",".join(map(str, value))
    if isinstance(value, list):  # (edited by hand: [true, 2, 3] read "True,2,3")
        return json.dumps(value)
    return str(value)


def _as_canny_uses(settings: dict) -> dict:
    """``settings`` with the thresholds in the order cv2.Canny uses them (swapped when low > high):
    ``--low 200 --high 100`` gives the same records as ``--low 100 --high 200``, and a resume with the
    other spelling was refused as other settings."""
    pipeline = settings.get("pipeline")
    if not (isinstance(pipeline, dict) and all(name in pipeline for name in _THRESHOLDS)):
        return settings
    return {**settings, "pipeline": {**pipeline, **dict(zip(_THRESHOLDS, _canny_thresholds(pipeline)))}}


#: The settings :func:`_as_canny_uses` orders.
_THRESHOLDS = ("low_threshold", "high_threshold")


def _canny_thresholds(pipeline: dict) -> tuple:
    """The pipeline's thresholds in cv2.Canny's order; as they are where one is not a number."""
    low, high = (pipeline.get(name) for name in _THRESHOLDS)
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (low, high)):
        return low, high
    return canny_order(low, high)


#: The keys of a settings record ("format" is missing from those of early versions).
SETTINGS_KEYS = ("pipeline", "decode", "model", "format")


def checked_settings_record(out: str, overwrite: bool) -> dict | None:
    """``OUT.settings.json``, read once for every check of the run; None when there is none to
    check (absent, or ``--overwrite`` starts afresh). It is replaced at the start of a run: refuse
    unless it is a settings record of ours (of any version with ``--overwrite``, which replaces
    the output and its record, never a file of someone else's)."""
    if out == "-":
        return None
    path = settings_path(out)
    if not os.path.lexists(path):  # (False, not an error, for a name too long: refused when written)
        return None
    earlier = recorded_settings(out)
    if earlier is None or not {"pipeline", "decode"} <= set(earlier):  # (every version's record has both)
        raise UsageError(f"{path} exists and is not a gpu-pipeline settings record that can be read; it is "
                         "left alone: remove it or choose another --out")
    if overwrite:
        return None
    if not {"pipeline", "decode", "model"} <= set(earlier) <= set(SETTINGS_KEYS):
        raise UsageError(f"{path} is a settings record of another gpu-pipeline version, which this run cannot "
                         "compare with its own: use --overwrite to start afresh, or choose another --out")
    return earlier


def recorded_settings(out: str) -> dict | None:
    """The settings record beside ``out``, or None when it is missing or cannot be read."""
    if not settings_path(out).is_file():  # (a FIFO there would block the read)
        return None
    try:
        earlier = json.loads(settings_path(out).read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) else None


def check_recorded_format(out: str, earlier: dict, output_format: str) -> None:
    if earlier["format"] != output_format:
        raise UsageError(f"{out} was written as {earlier['format']}, not {output_format}; "
                         "use the same --format, --overwrite, or another --out")


def remove_killed_runs_temporaries(out: str, edge_folder: Path | None) -> None:
    """The temporaries a SIGKILL left beside the output (a ``--retry-failed`` rewrite) and its settings
    record, and in the edge folder's tree (maps being written): all of them now, for a run that
    has nothing left to save in a folder would never come back to it."""
    if out != "-":
        for path in (os.path.realpath(out), str(settings_path(out))):
            remove_stale_temporaries(os.path.dirname(path) or ".", temporaries_of(os.path.basename(path)))
    if edge_folder is not None:
        for folder, names in folders_under(edge_folder):
            remove_stale_temporaries(folder, lambda target, pid: target.endswith(".edges.png"), names)


#: What :func:`_settings_bytes` gives for a settings record it could not read: left as it is.
_UNREAD = b"(unread)"


def _settings_bytes(out: str) -> bytes | None:
    """The settings record a run is about to replace, as it is (None: none, or ``--out -``)."""
    if out == "-":
        return None
    try:
        return settings_path(out).read_bytes()
    except FileNotFoundError:
        return None
    except OSError:  # (a name too long: a refusal to come; or unreadable: not to be removed)
        return _UNREAD


def _put_back_settings(out: str, earlier: bytes | None) -> None:
    """The settings record as it was before this run, whose start was refused or interrupted before
    the output was reset: an ``--overwrite`` with other settings left its new record beside the old
    results, and the next resume with the new settings added to them."""
    if out == "-" or earlier is _UNREAD:
        return
    path = settings_path(out)
    with contextlib.suppress(OSError):  # (a name too long: there is none)
        if earlier is None:
            path.unlink(missing_ok=True)
        elif path.read_bytes() != earlier:
            write_replacing(path, earlier, durable=True)


def write_settings(out: str, settings: dict) -> None:
    """Record the settings beside the output, atomically (a torn settings file would refuse every rerun)."""
    if out == "-":
        return
    path = settings_path(out)
    text = json.dumps(settings, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(path, text.encode(), durable=True)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise _settings_name_too_long(out) from None
        raise UsageError(cannot_write(path, exc)) from None


def _settings_name_too_long(out: str) -> UsageError:
    return UsageError(f"--out {out}: the name is too long for the settings record beside it "
                      f"({settings_path(out).name}); choose a shorter one")


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT / SIGTERM / SIGHUP end the run after the batches in flight; a second signal acts at once.

    A repeat within :data:`SAME_SIGNAL_S` of the first is the same signal delivered twice: coreutils
    ``timeout`` sends SIGTERM to the run and then to its process group, which killed the run at once
    in 2 of 7 tries, without its summary and with the last batches unwritten."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    first_at: list[float] = []

    def handle(signum: int, frame) -> None:
        now = time.monotonic()
        if first_at and now - first_at[0] >= SAME_SIGNAL_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # the system's default action, now
            return
        if not first_at:
            first_at.append(now)
            received.append(signum)
            stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS if not ignored_on_purpose(sig)}
    try:
        yield received
    finally:  # (None: a handler set outside Python, which Python cannot put back)
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@dataclass
class Job:
    """The arguments of one ``gpu-pipeline run``."""

    paths: list[Path]
    out: str
    backend_name: str
    config: PipelineConfig
    decode_options: DecodeOptions
    glob: str | None
    workers: int | None
    threads: int | None
    batch_size: int
    save_edges: Path | None
    quiet: bool
    output_format: str | None = None
    overwrite: bool = False
    retry_failed: bool = False
    model: str | None = None
    dask: str | None = None
    dask_timeout: float | None = None
    device: int | None = None
    processes: bool | None = None  # decode in processes: None lets the engine choose
    decode_timeout: float | None = None  # seconds a decode process may spend on one file (needs processes)
    dry_run: bool = False  # check everything, say what the run would do, write nothing


@dataclass
class CheckedJob:
    """Everything :func:`check_job` found acceptable; nothing has been written yet."""

    files: list[str]
    todo: list[str]
    earlier_failures: int
    settings: dict
    output: OutputPlan
    engine: Engine
    #: Folders under the inputs that could not be listed, and why: their images are not processed.
    unlisted: list[tuple[str, str]] = field(default_factory=list)


def run_job(**arguments) -> int:
    """Run the whole job; returns the exit status (0 all ok, 1 some failed, 3 write error, 4 the GPU failed,
    128 + the number of a stop signal: 130, 143, 129).

    Raises UsageError (exit 2), having written nothing, when the job is refused.
    """
    job = Job(**arguments)
    check_out_place(job.out)
    # the lock beside the real file: two spellings of one output (a symbolic link) take one lock
    lock = OutputLock(os.path.realpath(job.out)) if job.out != "-" else None
    created: list[Path] = []
    if lock is not None:
        # for the lock, where it goes (beside the file a link leads to); undone if refused
        created = make_folders(lock.path.parent, f"--out {job.out}")
        try:
            lock.acquire()
        except OSError as exc:
            remove_folders(created)
            raise UsageError(str(exc) if isinstance(exc, SinkError) else cannot_write(job.out, exc)) from None
    ran = False
    try:
        checked = check_job(job)
        try:
            if job.dry_run:
                with checked.engine.backend:  # (started, so that one that cannot start refuses: closed unused)
                    warn_unlisted(Console(stderr=True, soft_wrap=True), checked.unlisted)
                    print(plan_line(job, checked), flush=True)
                return 0
            code = execute(job, checked, lock)
        finally:  # a fork server no run took over (refused, the GPU failed at the warm-up, a stop signal
            checked.engine.close()  # before the run began): not left to the exit, which warned of it
        ran = True
        return code
    finally:
        if lock is not None:
            lock.release()
        if not ran:  # refused, or a dry run: the folders made for the lock go too
            remove_folders(created)


def plan_line(job: Job, checked: CheckedJob) -> str:
    """What ``run --dry-run`` prints: the images the run would process out of those found, where to,
    and what the output already holds of them."""
    found, todo = len(checked.files), len(checked.todo)
    where = "standard output" if job.out == "-" else shown(os.path.abspath(job.out))
    line = f"dry run: {todo:,} of {found:,} images to process with backend {checked.engine.backend.name} into {where}"
    redone = len(checked.output.retried or ())
    if redone:
        line += f", {redone:,} of them recorded as errors before (--retry-failed)"
    if found > todo:
        line += f"; {found - todo:,} already recorded there"
        if checked.earlier_failures:
            line += f" ({checked.earlier_failures:,} as errors: --retry-failed redoes them)"
    elif checked.output.start_afresh and checked.output.exists:
        line += " (--overwrite: its records replaced)"
    elif not checked.output.exists and job.out != "-":
        line += " (a new output)"
    return line + "; nothing written"


def input_files(job: Job, unlisted: list[tuple[str, str]]) -> list[str]:
    """The inputs, absolute; never the output itself, nor the edge maps a run saved. Folders that
    could not be listed go to ``unlisted`` (see :func:`find_files`).

    An ``--out`` that names one of the inputs and is not our output is refused. Names are strings
    (:func:`find_files`): a run of many files spends no GIL on a ``Path`` per file.
    """
    found = find_files(job.paths, glob=job.glob, unlisted=unlisted)
    out = os.path.normpath(Path(job.out).absolute()) if job.out != "-" else None
    out_name = os.path.basename(out) if out is not None else None
    # by device and inode as well as by name: a link would let --overwrite replace an input (a resume
    # stats every input once: 2.5 us a file here; a first run, none)
    is_out = same_file_as(job.out) if out is not None else None
    if out is not None:  # the records kept beside the output are never inputs either
        sidecars = {os.path.abspath(settings_path(job.out)), os.path.abspath(lock_path(job.out))}
        named = [path for path in found if path in sidecars]
        if named:
            raise UsageError(f"--out {job.out} keeps its settings and lock beside it, as {named[0]}, "
                             "one of the inputs; choose another --out")
    files = []
    for path in found:
        if out is not None and (path.endswith(out_name) and os.path.normpath(path) == out
                                or is_out is not None and is_out(path)):
            if not settings_path(job.out).is_file():
                raise UsageError(f"--out {job.out} is one of the input images; choose another --out")
            continue  # our own output, with an image-like name
        if job.save_edges is not None and path.endswith(".edges.png") and _is_under(path, job.save_edges):
            continue
        files.append(path)
    if not files:
        raise no_files_found(job.paths, job.glob, unlisted)
    return files


def _is_under(path: str, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
    except ValueError:
        return False
    return True


def check_edge_folder(folder: Path | None) -> None:
    """``--save-edges`` must be a folder, or creatable: refused now rather than one error per image later."""
    if folder is None:
        return
    refuse_under_dev_or_proc("--save-edges", folder, "edge maps", "choose a folder in /dev/shm/ or elsewhere")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--save-edges {folder} exists and is not a folder")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--save-edges {folder}: cannot write in {existing}")


def make_edge_folder(folder: Path | None) -> list[Path]:
    """Create ``--save-edges`` (and its missing parents) before anything else is written: the test
    that decides, where :func:`check_edge_folder`'s permission check cannot see a refusal (root in
    ``/proc``, a read-only mount below a writable one). The folders created, parents first."""
    if folder is None:
        return []
    return make_folders(folder, f"--save-edges {folder}")


def make_folders(folder: Path, what: str) -> list[Path]:
    """``folder`` and its missing parents, made; the ones made, parents first (see :func:`remove_folders`).
    UsageError, naming ``what`` asked for it, when one cannot be made or a file stands in the way."""
    missing = []
    above = folder.absolute()
    while not above.exists():
        missing.append(above)
        above = above.parent
    if not above.is_dir():
        raise UsageError(f"{what}: {above} is not a folder")
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except OSError as exc:
            remove_folders(created)
            raise UsageError(f"{what}: cannot create {path}: {exc.strerror or exc}") from None
        created.append(path)
    return created


def remove_folders(created: list[Path]) -> None:
    """Undo :func:`make_folders` for a run refused later: a refusal leaves nothing behind (a folder
    that holds something, records of a run stopped midway, stays)."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


def inspect(job: Job, settings: dict, earlier: dict | None) -> OutputPlan:
    if earlier is not None and "format" not in earlier:
        # versions before 2026-12-01 (no Parquet folders yet) did not record it: it is what the
        # output holds (a CSV resumed as JSON lines was rewritten from its first byte)
        earlier = {**earlier, "format": written_format(job.out) or settings["format"]}
    if earlier is not None and os.path.exists(job.out):
        # before the output is read back in the requested format: a JSONL output named .csv would
        # otherwise be "not a gpu-pipeline CSV output", with --overwrite as the way out
        check_recorded_format(job.out, earlier, settings["format"])
    try:
        output = inspect_output(job.out, job.output_format, overwrite=job.overwrite, retry_failed=job.retry_failed)
    except SinkError as exc:
        raise UsageError(str(exc)) from None
    check_settings(job.out, settings, output, earlier)
    try:
        check_dataset_folder(output)  # (after the settings: a folder without them is not ours at all)
        check_writable(output)
    except SinkError as exc:
        raise UsageError(str(exc)) from None
    return output


def check_out_place(out: str) -> None:
    """``--out`` may not be a device or a descriptor (``/dev/stdout`` is whatever file stdout is now:
    the settings would go into /dev, and a later run, its stdout elsewhere, would take that file for
    its output and cut it). Checked before the lock, which would go into /dev too: a user, who may not
    write there, was told "cannot write in /dev" instead, and root's run made its lock there."""
    if out != "-":
        refuse_under_dev_or_proc("--out", out, "records", "use --out - for standard output, or a name in /dev/shm/")


def refuse_under_dev_or_proc(option: str, name: str | Path, what: str, instead: str) -> None:
    """``--out`` and ``--save-edges`` alike: nothing in /dev or /proc but a name in /dev/shm/ (/dev/shm
    itself neither: an output's settings record would go into /dev). Refused by name among the checks:
    root, whom no permission check refuses, learnt of an edge folder in /proc only as the run made it,
    and its dry run said the run would go on."""
    absolute = os.path.abspath(name)
    if (absolute + "/").startswith(("/dev/", "/proc/")) and not absolute.startswith("/dev/shm/"):
        raise UsageError(f"{option} {name}: under /dev or /proc, not a place for {what} (a device, a process's "
                         f"descriptor, /dev/shm itself); {instead}")


def check_out_name(out: str, output_format: str, model: str | None, save_edges: Path | None) -> None:
    """Names ``--out`` may not have (besides :func:`check_out_place`'s): a file output spelled as a
    folder (``r.jsonl/``: a refused run had already emptied ``r.jsonl``); the model file the run
    reads; the edge folder."""
    if out == "-":
        return
    absolute = os.path.abspath(out)
    if output_format != "parquet" and out.endswith(("/", os.sep)):
        raise UsageError(f"--out {out}: a {output_format.upper()} output is a file; drop the trailing /")
    if len(os.fsencode(settings_path(out).name)) > NAME_MAX:  # (the run's first write: a dry run refuses it too)
        raise _settings_name_too_long(out)
    if model is not None and (is_out := same_file_as(out)) is not None:
        from gpu_pipeline.labels.model import resolve_model_path  # imports numba: only with a model

        if is_out(resolve_model_path(model)):
            raise UsageError(f"--out {out} is the model file this run reads; choose another --out")
    if save_edges is not None and os.path.abspath(save_edges) == absolute:
        raise UsageError(f"--save-edges and --out both name {out}; give each its own")


def check_job(job: Job) -> CheckedJob:
    """Every check that can refuse the run, in one place, before anything is written."""
    unlisted: list[tuple[str, str]] = []
    files = input_files(job, unlisted)
    check_edge_folder(job.save_edges)
    labels_of = label_function(job.model, job.config)
    try:
        output_format = format_for(job.out, job.output_format)
    except SinkError as exc:
        raise UsageError(str(exc)) from None
    if job.output_format is None and not os.path.lexists(job.out) and (meant := misspelt_extension(job.out)):
        # (a new output: one written so by an earlier version resumes as it is)
        raise UsageError(f"--out {shown(job.out)}: its extension is no output format's; did you mean {meant}? "
                         "Name it so, or give --format jsonl, csv or parquet")
    check_out_name(job.out, output_format, job.model, job.save_edges)
    if output_format == "parquet" and job.save_edges is not None and _is_under(str(job.save_edges), Path(job.out)):
        # the dataset folder holds our parts only: its next run would refuse the edge maps
        raise UsageError(f"--save-edges {job.save_edges} is inside the Parquet dataset folder {job.out}; "
                         "choose another folder")
    settings = {"pipeline": asdict(job.config), "decode": asdict(job.decode_options),
                "model": model_identity(job.model), "format": output_format}
    earlier = checked_settings_record(job.out, job.overwrite)
    output = inspect(job, settings, earlier)
    existing = output.existing
    done = existing.succeeded | existing.failed
    if job.retry_failed:
        done = existing.succeeded
        output.retried = existing.failed.intersection(files)  # (other files' error records stay)
    todo = [path for path in files if path not in done]
    earlier_failures = 0 if job.retry_failed else sum(path in existing.failed for path in files)
    fork_server = (early_fork_server(job.processes, len(todo), job.workers, processes_option(job.decode_timeout))
                   if job.dask is None and not job.dry_run else None)
    try:
        checked = _with_backend(job, files, todo, earlier_failures, settings, output, labels_of, fork_server)
    except BaseException:
        if fork_server is not None:
            fork_server.close()
        raise
    checked.unlisted = unlisted
    return checked


def _with_backend(job: Job, files: list[str], todo: list[str], earlier_failures: int, settings: dict,
                  output: OutputPlan, labels_of, fork_server: ForkServer | None) -> CheckedJob:
    """:func:`check_job`'s last step: the backend (or Dask cluster) and the engine."""
    # Last, because it can take a while (a Dask cluster) and must be closed if refused later.
    if job.dask is None:
        backend, engine_class, workers = open_backend(job.backend_name, job.threads, job.device), Engine, job.workers
        failed = attach_label_model_or_close(backend, labels_of)
        if failed is not None:
            raise UsageError(f"backend {backend.name!r} could not start: {one_line(failed)}")
    else:
        from gpu_pipeline.engine.distributed import DaskCluster, DaskEngine

        backend, engine_class, workers = DaskCluster(job.dask, job.backend_name, job.threads,
                                                     timeout=job.dask_timeout), DaskEngine, job.workers
    engine = engine_class(backend=backend, config=job.config, decode_options=job.decode_options,
                          batch_size=job.batch_size, workers=workers, labels_of=labels_of,
                          on_edges=edge_saver(job.save_edges, _edge_root(job.paths))
                          if job.save_edges else None,
                          **({"processes": job.processes, "fork_server": fork_server,
                              "decode_timeout": job.decode_timeout} if job.dask is None else {}))
    return CheckedJob(files, todo, earlier_failures, settings, output, engine)


def _edge_root(paths: list) -> str:
    """The folder ``--save-edges`` mirrors: ``/`` for a ``--files-from`` list's paths, whose common folder
    changes from night to night with the list, else :func:`edge_root`'s."""
    return "/" if any(isinstance(path, ListedPath) for path in paths) else edge_root(paths)


def execute(job: Job, checked: CheckedJob, lock: OutputLock | None = None) -> int:
    """Write the settings, prepare the output, stream the images into it (checking that ``lock``, the
    output's, is still held after each batch), report."""
    backend, files, todo, output = checked.engine.backend, checked.files, checked.todo, checked.output
    console = Console(stderr=True, soft_wrap=True)
    created: list[Path] = []
    earlier_settings = _settings_bytes(job.out)
    try:
        created = make_edge_folder(job.save_edges)
        write_settings(job.out, checked.settings)
        remove_killed_runs_temporaries(job.out, job.save_edges)
        sink = output.open()
        if lock is not None:
            sink = LockedSink(sink, lock, job.out)
    except BaseException as exc:  # (a Ctrl-C too, before the output is reset: it must still match)
        _put_back_settings(job.out, earlier_settings)
        if not isinstance(exc, (SinkError, UsageError)):
            raise
        remove_folders(created)
        backend.close()
        if isinstance(exc, SinkWriteError) and job.out == "-":  # the CSV header, to a full disk or a closed pipe
            console.print(f"gpu-pipeline: error: {exc.strerror}", highlight=False, markup=False)
            return EXIT_WRITE_ERROR
        raise UsageError(str(exc)) from None
    if output.existing.damaged:
        console.print(f"warning: {shown(job.out)}: skipped {output.existing.damaged:,} damaged line(s) between intact "
                      "records; their images are processed again")
    if job.dask is None and todo:
        labels_of = checked.engine.labels_of
        try:
            warm_up_backend(backend, job.config, console, job.quiet)
        except DeviceFailed as exc:
            with backend, sink:  # (closed as after a run; run_job closes the fork server)
                pass
            return device_failed(console, exc, job.out)
        announced_warm_up("labels", "label model's kernels", 10, console, job.quiet,
                          lambda: labeller_compiles(labels_of), lambda: warm_up_labeller(labels_of))
    recorded = len(files) - len(todo)
    warn_unlisted(console, checked.unlisted)
    if not job.quiet and recorded:
        console.print(f"resuming {shown(job.out)}: {recorded:,} of {len(files):,} images already recorded"
                      + (f" ({checked.earlier_failures:,} failed; --retry-failed redoes them)"
                         if checked.earlier_failures else ""))
    stop = threading.Event()
    try:
        with stop_on_signals(stop) as signals, backend, sink:  # (a signal while the cluster closes: still ours)
            summary = stream(checked.engine, todo, sink, stop, console, job.quiet)
    except DecodeProcessesFailed as exc:  # (a fork server that died is restarted: this one kept dying)
        message = f"gpu-pipeline: error: {exc}"
        if job.out != "-":  # (to stdout, the records went to whoever read them: nothing to resume)
            message += "; the records written before are kept: run the same command again to resume"
        if job.decode_timeout is None:  # (a time limit needs decode processes)
            message += ", or use --decode threads" if job.out != "-" else "; use --decode threads"
        console.print(message, highlight=False, markup=False)
        return 1
    except DeviceFailed as exc:
        return device_failed(console, exc, job.out)
    except SinkWriteError as exc:
        if job.out == "-":  # nothing to resume: the records went to whoever read them
            console.print(f"gpu-pipeline: error: {exc.strerror}", highlight=False, markup=False)
        else:
            console.print(f"gpu-pipeline: error: {exc.strerror}; the records written before are kept: "
                          "fix the cause and run the same command again to resume", highlight=False, markup=False)
        return EXIT_WRITE_ERROR
    if not job.quiet:
        print_summary(console, summary, backend.name, job.out)
        if summary.interrupted:
            console.print(f"interrupted: {len(todo) - summary.total:,} images not processed; "
                          "run the same command again to resume")
    if signals:
        return 128 + signals[0]  # as a shell reports a death by that signal
    if checked.unlisted:
        console.print(f"warning: {len(checked.unlisted)} folder(s) could not be listed; their images have no records",
                      highlight=False, markup=False)
    return 0 if summary.failed + checked.earlier_failures == 0 and not checked.unlisted else 1


def device_failed(console: Console, exc: DeviceFailed, out: str) -> int:
    """Say that the GPU failed (one line) and that the run resumes; :data:`EXIT_DEVICE_FAILED`."""
    message = f"gpu-pipeline: error: {exc}"
    if out != "-":  # (to stdout, the records went to whoever read them: nothing to resume)
        message += "; the records written before are kept: run the same command again to resume once the GPU works"
    console.print(message, highlight=False, markup=False)
    return EXIT_DEVICE_FAILED


def warn_unlisted(console: Console, unlisted: list[tuple[str, str]], most: int = 10) -> None:
    """One line for each folder that could not be listed (a run once skipped them without a word,
    exit 0), the first ``most`` of them: ``run``, ``verify`` and ``bench`` say it alike."""
    for folder, reason in unlisted[:most]:
        console.print(f"warning: {unlisted_warning(folder, reason)}", highlight=False, markup=False)
    if len(unlisted) > most:
        console.print(f"warning: and {len(unlisted) - most} more folders that cannot be listed",
                      highlight=False, markup=False)


def kernels_cached() -> bool:
    """Whether compiled kernels are kept for later runs: numba's cache found a writable folder that
    outlives this run (not a fresh private one, made because no other would do)."""
    from gpu_pipeline.backends import _numba_setup

    return _numba_setup.CACHE_DIR is not None and not _numba_setup.CACHE_IS_FRESH


def warm_up_backend(backend, config: PipelineConfig, console: Console, quiet: bool = False) -> None:
    """Load ``backend``'s kernels before the first image, a compile (about 15 s) announced first:
    ``run``, ``verify``, ``fit`` and ``evaluate`` alike."""
    numba_math_without_blas_probe()
    announced_warm_up(f"backend {backend.name}", f"{backend.name} kernels", 15, console, quiet,
                      backend.compiles_on_warm_up, lambda: backend.warm_up(config))


#: What numba's math module imports to learn whether BLAS backs np.dot (numba.np.linalg.ensure_blas).
_BLAS = "scipy.linalg.cython_blas"


def numba_math_without_blas_probe() -> None:
    """Import numba's math module with scipy's BLAS hidden from it: as it is first imported it asks
    whether BLAS is there for np.dot, and importing scipy.linalg to answer was 0.09 s of a 0.75 s
    one-image run (2 cores), for kernels that call no BLAS (it then uses its own loop). For the
    command line's process only: the API leaves a program's numba as the program has it. Hidden no
    longer after; a numba that cannot take it is imported again as it is."""
    if "numba.np.arraymath" in sys.modules or _BLAS in sys.modules:
        return
    sys.modules[_BLAS] = None  # (an import of it raises ImportError, as where scipy is missing)
    try:
        import numba.np.arraymath  # noqa: F401
    except ImportError:
        pass
    finally:
        if sys.modules.get(_BLAS, False) is None:
            del sys.modules[_BLAS]


def announced_warm_up(what: str, kernels: str, seconds: int, console: Console, quiet: bool,
                      compiles: Callable[[], bool], warm_up: Callable[[], None]) -> None:
    """Compile or load kernels before the run: a compile (seconds) is announced before it starts,
    and said so when timed after."""
    compiling = not quiet and compiles()
    cached = not compiling or kernels_cached()  # (only then: it imports numba)
    if compiling:
        console.print(f"compiling the {kernels} (" + (
            f"first run after install, about {seconds} s; later runs load them from the cache)" if cached else
            f"about {seconds} s, at every run: no writable cache folder; see gpu-pipeline info, set NUMBA_CACHE_DIR)"))

    def note() -> str:  # (after the warm-up: only then is a cache that could not keep the kernels known)
        if kernels_unsaved():
            return "(kernels compiled; the cache could not keep them)"
        if not compiling:
            return "(kernels loaded)"  # (a slow load said "compiled once, then cached")
        return "(kernels compiled once, then cached)" if cached else "(kernels compiled; no cache to keep them)"

    timed_warm_up(what, warm_up, console, quiet, note)


def kernels_unsaved() -> bool:
    """Whether numba's cache failed to keep a compiled kernel (its disk full): the run went on."""
    setup = sys.modules.get("gpu_pipeline.backends._numba_setup")  # (not imported for it: no numba there)
    return bool(setup is not None and setup.unsaved)


def timed_warm_up(what: str, warm_up: Callable[[], None], console: Console, quiet: bool,
                  note: Callable[[], str]) -> None:
    """Compile or load kernels before the run; say how long it took when it was slow (a compile),
    with ``note()`` on how."""
    started = time.perf_counter()
    warm_up()
    if not quiet and (seconds := time.perf_counter() - started) > 1:
        console.print(f"{what} ready in {seconds:.1f} s {note()}")


#: How often a run whose stderr is no terminal (a cron job's log) says how far it is, in seconds.
PROGRESS_EVERY_S = 60
_clock = time.monotonic


def stream(engine: Engine, todo: list[str], sink, stop: threading.Event, console: Console,
           quiet: bool) -> RunSummary:
    """``engine.run`` of ``todo`` into ``sink``, with a progress bar on a terminal, else a line every
    :data:`PROGRESS_EVERY_S` seconds (none with ``quiet``)."""
    if quiet or not sys.stderr.isatty():
        return engine.run(todo, sink, stop=stop, progress=None if quiet else progress_lines(console, len(todo)))
    with progress_bar(console) as bar:
        task = bar.add_task("processing", total=len(todo), rate="-")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[task].speed
            bar.update(task, rate=f"{speed:.0f}" if speed else "-")

        return engine.run(todo, sink, progress=advance, stop=stop)


def progress_lines(console: Console, total: int = 0) -> Callable[..., None]:
    """A progress callback that prints where the run is, at most every :data:`PROGRESS_EVERY_S`
    seconds and not once it is done: ``progress: 4,096 of 50,000 images (8%) in 0:01:00, 68.27
    images/s, about 0:11:12 left``. It takes the images done since its last call, and the total
    where it was not known when it was made (``verify`` learns it as it goes). The rate counts from
    the first call, a minute before the first line: the first batch's time holds the start (``verify``
    loads its kernels in it, minutes for a GPU's compile, and its first lines said a fraction of the
    rate)."""
    started = said = _clock()
    done = 0
    steady: tuple[float, int] | None = None  # (when the first batch was done, and its images)

    def advance(count: int, of: int | None = None) -> None:
        nonlocal done, said, steady, total
        done += count
        total = of if of is not None else total
        now = _clock()
        if steady is None:
            steady, said = (now, done), now
            return
        if now - said < PROGRESS_EVERY_S or done >= total:
            return
        said = now
        rate = (done - steady[1]) / (now - steady[0])
        console.print(f"progress: {done:,} of {total:,} images ({done * 100 // total}%) in {_duration(now - started)}, "
                      f"{f'{rate:,.0f}' if rate >= 100 else f'{rate:.2f}'} images/s, "
                      f"about {_duration((total - done) / rate)} left", highlight=False, markup=False)

    return advance


def _duration(seconds: float) -> str:
    """``0:02:05``: hours, minutes and seconds."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
