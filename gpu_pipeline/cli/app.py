"""The ``gpu-pipeline`` command line: thin, it parses, checks and delegates to the engine."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class Interrupted(BaseException):
    """A stop signal outside the run's own handling (its number is ``args[0]``). Not a
    KeyboardInterrupt, which click turns into exit 1. Raised, so that ``with`` blocks clean up: a
    SIGTERM to ``bench`` left its generated corpus in the temporary folder."""


def _quiet_on_interrupt(previous_hook):
    """Ctrl-C while the program is still importing ends it with status 130, without a traceback."""

    def hook(kind, value, traceback) -> None:
        if isinstance(_interrupt_behind(value), KeyboardInterrupt):
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(130)
        previous_hook(kind, value, traceback)

    return hook


def _interrupt_behind(error: BaseException | None) -> BaseException | None:
    """The KeyboardInterrupt or :class:`Interrupted` that ``error`` is, or was raised because of:
    Python 3.11 wraps one that lands in a class's ``__set_name__`` (a dataclass's field, as a module
    is imported) in a RuntimeError. None for any other error."""
    seen = set()
    while error is not None and id(error) not in seen:  # (a chain may loop back)
        if isinstance(error, (KeyboardInterrupt, Interrupted)):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


# First, before the heavy imports below (typer, numpy, numba), which take most of the start-up.
if sys.excepthook is sys.__excepthook__:
    sys.excepthook = _quiet_on_interrupt(sys.excepthook)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a script's background job (errors.ignored_on_purpose):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python left it ignored, and it was lost until main()
from pathlib import Path
from typing import Optional

import typer

from gpu_pipeline import __version__
from gpu_pipeline.cli import streams
from gpu_pipeline.cli.options import (L2, Backend, Bands, BatchSize, Blur, Command, Commands, Decode, DecodeTimeout,
                                      Device, FilesFrom, Glob, High, Low, MaxPixels, Paths, Stretch, Threads,
                                      Workers, check_counts, decode_options, fail_usage, given_file_name,
                                      given_path, given_paths, pipeline_config, refuse_closed_stdout)
from gpu_pipeline.config import DecodeOptions, PipelineConfig
from gpu_pipeline.engine.decoding import processes_for_time_limit
from gpu_pipeline.engine.stream import Engine
from gpu_pipeline.errors import STOP_SIGNALS, UsageError, ignored_on_purpose
from gpu_pipeline.inputs.decode import codecs_quieted
from gpu_pipeline.inputs.processes import processes_wanted

#: The longest ``--dask-timeout``: a day (Dask cannot parse ``inf``, and 1e308 s overflowed as the run closed).
MOST_DASK_TIMEOUT_S = 86400

app = typer.Typer(
    cls=Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Batch image analysis: histogram, equalization, Canny edges, edge count and a label per image, "
    "byte-identical on every CPU and GPU backend.",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gpu-pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    context: typer.Context,
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """Batch image analysis on every CPU core and on CUDA GPUs, identical bytes on every path."""
    # every command's: a damaged file's codec messages (tifffile's "invalid offset to first page") are
    # its error record or verify's skip, not lines on stderr; as they were once the command is done
    context.with_resource(codecs_quieted())


@app.command(cls=Command)
def run(
    paths: Paths = None,
    files_from: FilesFrom = None,
    out: str = typer.Option("results.jsonl", "--out", "-o", parser=given_file_name,
                            help="Output file (.jsonl, .csv or .parquet), or - for stdout. An existing output is "
                            "resumed: images already recorded are skipped."),
    output_format: Optional[str] = typer.Option(None, "--format",
                                                help="jsonl, csv or parquet. Default: from --out's extension."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the output afresh instead of resuming."),
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="When resuming, redo the images whose record is an error."),
    backend: Backend = "auto",
    low: Low = PipelineConfig.low_threshold,
    high: High = PipelineConfig.high_threshold,
    l2: L2 = False,
    blur: Blur = PipelineConfig.blur_ksize,
    bands: Bands = None,
    stretch: Stretch = DecodeOptions.stretch,
    max_pixels: MaxPixels = DecodeOptions.max_pixels,
    glob: Glob = None,
    workers: Workers = None,
    decode: Decode = "auto",
    decode_timeout: DecodeTimeout = None,
    threads: Threads = None,
    batch_size: BatchSize = Engine.batch_size,
    device: Device = None,
    save_edges: Optional[Path] = typer.Option(None, "--save-edges", parser=given_path,
                                              help="Also write each edge map as a PNG under this folder, as "
                                                   "DIR/sub/NAME.edges.png for ROOT/sub/NAME, ROOT being the "
                                                   "common folder of the PATHS (/ with --files-from)."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", parser=given_file_name,
        help="Label with a model from `gpu-pipeline fit`, or a shipped one (eurosat, eurosat-cnn), instead of the default rule."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Check everything the run would check (inputs, output, resume, settings, "
                                 "backend) and print what it would do: the images to process, those already "
                                 "recorded. Writes nothing; exit 0, or 2 where the run would be refused."),
    dask: Optional[str] = typer.Option(None, "--dask", metavar="ADDRESS",  # "\\[": the help is rich markup
                                       help="Run on a Dask cluster: a scheduler address (tcp://host:8786) or "
                                       "local:N (N worker processes here), or local-cuda (one worker per GPU here; "
                                       "needs gpu-pipeline\\[dask-cuda]). Needs gpu-pipeline\\[dask]."),
    dask_timeout: float = typer.Option(10.0, "--dask-timeout", metavar="SECONDS",
                                       help="How long to wait for the Dask scheduler to answer and for a first "
                                       "worker to join."),
) -> None:
    """Process images: one JSON record per image (a result or an error).

    Exit status: 0 when every image succeeded, 1 when some failed, 2 on bad usage (nothing written),
    3 when writing the output failed (disk full), 4 when the GPU failed for good (resumable), 130 / 143 /
    129 when stopped by SIGINT (Ctrl-C) / SIGTERM / SIGHUP (the terminal closed; not under nohup) after
    flushing what was done.
    """
    from gpu_pipeline.engine.job import run_job

    if dry_run and out != "-":  # (its plan is its result; a run's results go to --out, its messages to
        refuse_closed_stdout()    # stderr; with --out - it meets the run's own refusal, exit 2, below)
    try:
        check_counts(workers=workers, threads=threads, batch_size=batch_size)
        if not 0 < dask_timeout <= MOST_DASK_TIMEOUT_S:
            raise UsageError(f"--dask-timeout must be > 0 and at most {MOST_DASK_TIMEOUT_S} seconds, got {dask_timeout}")
        if device is not None and device < 0:
            raise UsageError(f"--device must be >= 0, got {device}")
        if device is not None and dask is not None:
            raise UsageError("--device picks a GPU of this machine; with --dask each worker binds its own")
        if decode == "processes" and dask is not None:
            raise UsageError("--decode processes is for a run on this machine; "
                             "with --dask each worker decodes in threads")
        if decode_timeout is not None and dask is not None:
            raise UsageError("--decode-timeout is for a run on this machine; "
                             "with --dask each worker decodes in threads, which cannot be stopped")
        processes = processes_for_time_limit(processes_wanted(decode), decode_timeout)
        if out == "-" and "stdout" in streams.closed:
            raise UsageError("--out -: standard output is closed")
        if out == "-" and retry_failed:  # (it did nothing, without a word)
            raise UsageError("--retry-failed redoes the failed images of an --out file; standard output holds none")
        code = run_job(
            paths=given_paths(paths, files_from),
            out=out, backend_name=backend, config=pipeline_config(low, high, l2, blur),
            decode_options=decode_options(bands, stretch, max_pixels), glob=glob,
            workers=workers, processes=processes, decode_timeout=decode_timeout, threads=threads,
            batch_size=batch_size,
            save_edges=save_edges, quiet=quiet, output_format=output_format, overwrite=overwrite,
            retry_failed=retry_failed, model=model, dask=dask, dask_timeout=dask_timeout, device=device,
            dry_run=dry_run,
        )
    except UsageError as exc:
        fail_usage(str(exc))
    raise typer.Exit(code)


from gpu_pipeline.cli.diagnostics import register as register_diagnostics  # noqa: E402
from gpu_pipeline.cli.labels import register as register_label_commands  # noqa: E402

register_diagnostics(app)
register_label_commands(app)


def _interrupt(signum, frame) -> None:
    if _in_llvm_lock(frame):
        _send_again(signum)
        return
    raise Interrupted(signum)


#: The folder of llvmlite's modules, as frames name their files.
_LLVMLITE = f"{os.sep}llvmlite{os.sep}"


def _in_llvm_lock(frame) -> bool:
    """Whether ``frame`` runs inside llvmlite's lock's ``__enter__`` or ``__exit__``, which call the
    callbacks numba registers with the lock taken: an exception raised there left it taken, numba's
    helper threads waited for it, and the run for them, for ever (a SIGTERM as the kernels loaded).
    (Only there: a Ctrl-C that a context manager of the run's own unblocks in its ``__exit__``, as the
    local Dask cluster starts, must act at once.)"""
    while frame is not None:
        if frame.f_code.co_name in ("__enter__", "__exit__") and _LLVMLITE in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _send_again(signum: int) -> None:
    """The signal again a moment later, from another thread, to act where it is safe to."""
    again = threading.Timer(0.02, os.kill, (os.getpid(), signum))
    again.daemon = True
    again.start()


def _unraisable(hook_args, previous=sys.unraisablehook) -> None:
    """An Interrupted raised while Python ran inside a C callback (llvmlite's, as numba loads or
    compiles kernels) is dropped there, with a traceback, and the run went on to exit 1: the
    signal is sent again a moment later, from another thread, to act after the callback (raised in
    the hook, it would be dropped too; again inside a callback, it comes back here), and nothing is
    printed."""
    if isinstance(hook_args.exc_value, Interrupted):
        _send_again(hook_args.exc_value.args[0])
        return
    previous(hook_args)


def catch_interrupts() -> None:
    """The stop signals raise :class:`Interrupted` (start-up and shutdown; a run has its own)."""
    for signum in STOP_SIGNALS:
        if not ignored_on_purpose(signum):
            signal.signal(signum, _interrupt)
    sys.unraisablehook = _unraisable


def _in_utf8_mode() -> None:
    """Start again in Python's UTF-8 mode where the locale's encoding is another (a Latin-1 locale):
    file names are read, recorded and matched on resume as UTF-8, whatever the locale, as they are in
    the C or a UTF-8 locale; decode processes and Dask's local workers inherit it. Only once: a user's
    ``-X utf8=0`` or ``PYTHONUTF8=0`` stays."""
    if (sys.getfilesystemencoding() == "utf-8" or os.environ.get("PYTHONUTF8") or not sys.executable
            or not _started_as_this_command()):
        return
    os.environ["PYTHONUTF8"] = "1"
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:  # (it cannot be started again: names as the locale reads them, in workers too)
        del os.environ["PYTHONUTF8"]


def _started_as_this_command() -> bool:
    """Whether the interpreter, started again as it was, runs this command again: its program is not
    one read from standard input (``python - <<EOF``: started again, it found nothing left to read and
    did nothing, exit 0), and ``main``'s arguments are the interpreter's, not a program's own (read
    from standard input, they were gone)."""
    arguments = sys.argv[1:]
    return sys.argv[0] not in ("", "-") and sys.orig_argv[len(sys.orig_argv) - len(arguments):] == arguments


def main() -> None:
    _in_utf8_mode()
    streams.prepare()
    # numba reads it at its import, deep in a command, and raises (0, -3) or warns ("abc") there
    threads = os.environ.get("NUMBA_NUM_THREADS")
    # isdecimal, not isdigit: int() refuses digits such as "²", which isdigit takes
    if threads is not None and not (threads.strip().isdecimal() and int(threads) > 0):
        print(f"gpu-pipeline: error: NUMBA_NUM_THREADS must be a whole number >= 1, got {threads!r}", file=sys.stderr)
        sys.exit(2)
    # The run installs its own handler while images are processed (flush, then 130); this one covers
    # start-up and shutdown, where nothing needs flushing.
    catch_interrupts()
    try:
        app()
    except (Interrupted, RuntimeError) as exc:
        interrupt = _interrupt_behind(exc)
        if not isinstance(interrupt, Interrupted):
            raise
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        sys.exit(128 + (interrupt.args[0] if interrupt.args else signal.SIGINT))
    except SystemExit as exc:
        if streams.reader_went_away():
            if (ours := streams.pipe_of_ours(exc)) is not None:
                raise ours from None
            sys.exit(streams.write_failed("the reader closed the pipe"))
        raise
    except OSError as exc:
        if exc.errno not in streams.WRITE_ERRORS and not isinstance(exc, streams.StdoutClosed):
            raise
        if not streams.stdout_failed:  # a full disk under another file (numba's cache, a temporary)
            named = f": {os.fsdecode(exc.filename)}" if exc.filename is not None else ""
            print(f"gpu-pipeline: error: {exc.strerror or exc}{named}", file=sys.stderr)
            sys.exit(1)
        sys.exit(streams.write_failed(exc.strerror or str(exc)))
    finally:
        # The exit status is decided; a Ctrl-C while the interpreter shuts down must not replace it
        # with a death by SIGINT.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
