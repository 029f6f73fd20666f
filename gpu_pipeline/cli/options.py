"""What the commands share: their common options (defined once), and turning them into settings.

Every command reports bad usage the same way: one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from gpu_pipeline.backends import registry
from gpu_pipeline.cli import streams
from gpu_pipeline.config import (BLUR_SIZES, MOST_THREADS, SETTING_OPTIONS, STRETCHES, DecodeOptions,
                                 PipelineConfig, setting_name)
from gpu_pipeline.errors import EXIT_WRITE_ERROR, UsageError, printable


def given_path(text: str) -> Path:
    """A path argument or option: an empty one (a shell variable left unset) is refused, where
    ``Path("")`` would quietly be the current folder (``--save-edges ""`` wrote edge maps there)."""
    return Path(given_file_name(text))


def written_path(text: str) -> Path:
    """A file a command writes (``--report``, ``--json``, ``fit --out``): :func:`given_path`, and not
    ``-`` (only ``run --out -`` means standard output: here it made a file named "-") nor a name
    ending in ``/`` (a folder's spelling: ``Path`` dropped the slash and wrote the file)."""
    if text == "-":
        raise typer.BadParameter("standard output is for run --out - only; name a file")
    if text.endswith(("/", os.sep)):
        raise typer.BadParameter("ends with /; name a file")
    return given_path(text)


def written_png(text: str) -> Path:
    """A PNG a command draws (``--plot``): :func:`written_path`, named ``.png`` (a ``.pdf`` got PNG bytes)."""
    path = written_path(text)
    if path.suffix.lower() != ".png":
        raise typer.BadParameter("the plot is a PNG: name it .png")
    return path


def given_file_name(text: str) -> str:
    """A file name option (``--out``, ``--model``): never empty, and short enough for the file system,
    where ``Path.exists`` and ``is_file`` raise deep in a command (a traceback) on a name too long."""
    try:
        os.lstat(given_text(text))
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise typer.BadParameter("name too long for the file system") from None
    return text


def given_text(text: str) -> str:
    """A name or pattern option (``--out``, ``--glob``, ``--model``): never empty."""
    if not text:
        raise typer.BadParameter("empty (a shell variable left unset?)")
    return text


Paths = Annotated[Optional[List[Path]], typer.Argument(
    help="Image files or folders (searched recursively). Default: the bundled sample set (none with --files-from).",
    show_default=False,
    parser=given_path)]
FilesFrom = Annotated[Optional[str], typer.Option(
    "--files-from", metavar="LIST", parser=given_file_name, show_default=False,
    help="Also take the paths listed in LIST, a file or - for standard input: one a line, or separated by NUL "
         "as find -print0 writes them. For more paths than a command line holds.")]
Backend = Annotated[str, typer.Option("--backend", "-b",  # (the registry's names: a new backend is listed)
                                      help=f"{', '.join(registry.backend_names())}, or auto (the fastest available).")]
Low = Annotated[float, typer.Option("--low", help="Canny low threshold (as cv2.Canny; swapped if above --high).")]
High = Annotated[float, typer.Option("--high", help="Canny high threshold.")]
L2 = Annotated[bool, typer.Option("--l2/--no-l2", help="Canny L2 gradient magnitude instead of L1.")]
Blur = Annotated[int, typer.Option("--blur", help=f"Gaussian blur kernel size before Canny: one of {BLUR_SIZES}.")]
Bands = Annotated[Optional[str], typer.Option(
    "--bands", help="1-based bands to use, e.g. 4,3,2 (RGB) or 1 (gray). Default: 1 or 2 bands (gray, alpha) give gray, "
                    "3 or 4 (RGB, alpha or a 4th band) the first three as RGB; more need --bands.")]
Stretch = Annotated[str, typer.Option(
    "--stretch", help=f"How data wider than 8 bits becomes 8-bit: {', '.join(STRETCHES)}.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels",
                                         help="Refuse images larger than this (decompression-bomb guard).")]
Glob = Annotated[Optional[str], typer.Option("--glob", help="Only files whose name matches, e.g. '*.tif'.",
                                             parser=given_text)]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Decoders: threads, or decode processes (with --decode processes, or --decode-timeout). Default: one per usable core (see `info`).")]
#: ``verify``'s: it has no --decode (its help named it, and following it failed with "No such option").
VerifyWorkers = Annotated[Optional[int], typer.Option("--workers", help="Decoders: threads, or decode processes (with --decode-timeout). Default: one per usable core (see `info`).")]
Decode = Annotated[str, typer.Option(
    "--decode", help="Where files are decoded: threads (of this process), processes (worker processes that hand "
                     "the pixels over in shared memory; Linux), or auto (processes for runs of 2,000 files or more on 8 cores or "
                     "more, of 10,000 or more on 2 to 7 cores).")]
DecodeTimeout = Annotated[Optional[float], typer.Option(
    "--decode-timeout", metavar="SECONDS",
    help="Give up on an image that takes longer than this to read and decode (a codec caught in a loop, a read "
         "from a hung mount): its decode process is killed, the image gets a decode error (its record in `run`, "
         "skipped in `verify`) and the command goes on. From 1 s to a day; decodes every image in a decode process. "
         "Default: no limit.")]
Threads = Annotated[Optional[int], typer.Option("--threads",
                                                help="Compute threads of CPU backends. Default: one per usable core (see `info`).")]
Device = Annotated[Optional[int], typer.Option(
    "--device", metavar="N", help="GPU number for the cuda and cupy backends. Default: 0.")]
#: ``run``'s: by default the backend chooses.
BatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", help="Most images per backend call (default: as many as the backend's pixel budget holds: "
                         "1 MP for CPU backends, 256 K pixels a thread where that is more; 32 MP for GPU backends).")]
#: ``verify``'s: a chunk also holds at most 16 MP (``CHUNK_PIXELS``; not imported: it is a heavy module).
ImagesPerCall = Annotated[int, typer.Option("--batch-size",
                                            help="Most images per backend call (and at most 16 MP a call).")]


def fail_usage(message: str) -> None:
    typer.echo(f"gpu-pipeline: error: {printable(message)}", err=True)
    raise typer.Exit(2)


def refuse_closed_stdout() -> None:
    """A command whose results go to standard output, started with it closed (``>&-``): exit 3 and
    one line now, before any other check, any work or any file (``fit`` wrote its model, ``bench``
    its JSON, then failed at the first line of results)."""
    if "stdout" in streams.closed:
        raise typer.Exit(streams.write_failed("standard output is closed"))


class _FlagsTakeNoValue:
    """A flag's help row shows no value: typer 0.29 shows its type (``--overwrite <bool>``, even
    ``--help <bool>``), as if it took one (``--overwrite true`` then took "true" for an input path).
    An empty metavar shows nothing on every typer; flags are parsed as before."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):  # (arguments have no is_flag)
                param.metavar = ""
        return params


class _HelpWrapsToTheTerminal:
    """A command's description is wrapped at the terminal's width: typer (0.29, in its rich markup)
    keeps a docstring's line breaks after the first paragraph, so at 80 columns every other line was
    a stub (" (nothing written),"). The paragraphs stay; no help here uses click's ``\\b`` blocks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.help is None and self.callback is not None:  # (python -OO strips docstrings)
            self.help = _docstring_in_source(self.callback)
        if self.help:
            self.help = "\n\n".join(" ".join(paragraph.split())
                                    for paragraph in inspect.cleandoc(self.help).split("\n\n"))


def _docstring_in_source(function) -> str | None:
    """``function``'s docstring, read from its source file: under ``python -OO`` (PYTHONOPTIMIZE=2)
    ``__doc__`` is None, and each command lost its description (run's exit statuses among it). None
    where there is no source, or where the lines at the function's line number are not that function
    (a source edited since its unchecked-hash .pyc was made): no description, as before, never a crash."""
    import ast
    import textwrap

    try:
        found = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    except Exception:  # (no source: OSError, TypeError; half a statement: SyntaxError; none: IndexError)
        return None
    if not isinstance(found, (ast.FunctionDef, ast.AsyncFunctionDef)) or found.name != function.__name__:
        return None  # (an assignment, or another function, whose docstring would mislead)
    return ast.get_docstring(found)


class Command(_HelpWrapsToTheTerminal, _FlagsTakeNoValue, TyperCommand):
    """Each command (``app.command(cls=Command)``)."""


class Commands(_HelpWrapsToTheTerminal, _FlagsTakeNoValue, TyperGroup):
    """The command group. A usage error that click finds as it parses (an unknown option or command,
    a value of the wrong type, a missing one) is said as every refusal of ours is: one line on
    stderr, exit status 2, not click's usage lines and framed box (six lines in a nightly log)."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):  # (where each command's own arguments are parsed)
        with _one_line_usage_errors():
            return super().invoke(ctx)


#: click's UsageError, of whichever click typer runs on (typer 0.2x has its own copy): BadParameter's base.
_USAGE_ERROR = next(kind for kind in typer.BadParameter.__mro__ if kind.__name__ == "UsageError")
_NO_ARGS_IS_HELP = getattr(sys.modules[_USAGE_ERROR.__module__], "NoArgsIsHelpError", ())


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except _NO_ARGS_IS_HELP:  # (no command given: the help, as it is)
        raise
    except _USAGE_ERROR as exc:
        command = ["gpu-pipeline", *_subcommands(exc.ctx)]
        fail_usage(f"{' '.join(exc.format_message().split())} (see {' '.join(command)} --help)")


def _subcommands(ctx) -> list[str]:
    """The command names below the program's, for ``ctx``: the program's own may be several words
    (``python -m gpu_pipeline.cli``), so they are not taken from ``command_path``."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return names[::-1]


def fail_unwritten(refusal: UsageError) -> None:
    """A file that was to be written at the end, said after the results: exit 3 when it could not
    be (:class:`~gpu_pipeline.outputs.files.CannotWrite`, a full disk), as for standard output;
    2 for a refusal (a file another program made there meanwhile)."""
    from gpu_pipeline.outputs.files import CannotWrite

    typer.echo(f"gpu-pipeline: error: {printable(str(refusal))}", err=True)
    raise typer.Exit(EXIT_WRITE_ERROR if isinstance(refusal, CannotWrite) else 2)


def given_paths(paths: list[Path] | None, files_from: str | None) -> list[str | Path]:
    """The paths a command processes: those given, then those ``--files-from`` lists (names, as
    strings: a ``Path`` each costs the GIL about 10 us, a second for 100,000); the bundled sample set
    when there are none of either and no list. UsageError when the list cannot be read or is empty."""
    if files_from is None:
        return list(paths) if paths else [bundled_data_dir()]
    from gpu_pipeline.inputs.discover import listed_paths

    listed = listed_paths(_listing(files_from))
    if not listed:  # (not the sample set: the night's list came out empty)
        raise UsageError(f"--files-from {printable(files_from)} lists no paths")
    return [*(paths or []), *listed]


def _listing(files_from: str) -> bytes:
    """The bytes of ``--files-from``'s list: its file, or standard input for ``-``."""
    if files_from != "-":
        try:
            with open(files_from, "rb") as stream:
                return stream.read()
        except OSError as exc:
            raise UsageError(f"cannot read --files-from {printable(files_from)}: {exc.strerror or exc}") from None
    from gpu_pipeline.cli import streams

    if "stdin" in streams.closed or sys.stdin is None:
        raise UsageError("--files-from -: standard input is closed")
    if sys.stdin.isatty():  # (the run would wait for a list typed by hand)
        raise UsageError("--files-from -: standard input is a terminal; pipe the list in "
                         "(find DIR -name '*.tif' -print0 | gpu-pipeline run --files-from - ...)")
    try:
        return sys.stdin.buffer.read()
    except OSError as exc:
        raise UsageError(f"cannot read --files-from -: {exc.strerror or exc}") from None


def bundled_data_dir() -> Path:
    """The sample set shipped with the package (data/ in a checkout, gpu_pipeline/sample_data when installed)."""
    package = Path(__file__).resolve().parent.parent
    checkout = package.parent / "data"
    if (checkout / "SOURCES.md").is_file():
        return checkout
    if (package / "sample_data").is_dir():
        return package / "sample_data"
    raise UsageError("no bundled sample data found: pass image files or folders")


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--bands takes comma-separated 1-based band numbers such as 4,3,2, got {text!r}") from None


def check_counts(**counts: int | None) -> None:
    """Each given count (``--workers``, ``--batch-size``, ...) must be at least 1; ``--workers`` and
    ``--threads`` at most :data:`MOST_THREADS`."""
    for name, value in counts.items():
        option = f"--{name.replace('_', '-')}"
        if value is not None and value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
        if value is not None and name in ("workers", "threads") and value > MOST_THREADS:
            raise UsageError(f"{option} must be at most {MOST_THREADS}, got {value}")


def _as_option(refusal: ValueError) -> UsageError:
    """The API's refusal, naming the option the user typed ("blur size must be ..." -> "--blur must be ...")."""
    message = str(refusal)
    for field, option in SETTING_OPTIONS.items():
        setting = setting_name(field)
        if message.startswith(f"{setting} must "):
            return UsageError(option + message.removeprefix(setting))
    return UsageError(message)


def pipeline_config(low: float, high: float, l2: bool, blur: int) -> PipelineConfig:
    try:
        return PipelineConfig(low_threshold=low, high_threshold=high, l2_gradient=l2, blur_ksize=blur)
    except ValueError as exc:
        raise _as_option(exc) from None


def decode_options(bands: str | None, stretch: str, max_pixels: int = DecodeOptions.max_pixels) -> DecodeOptions:
    try:
        return DecodeOptions(bands=parse_bands(bands), stretch=stretch, max_pixels=max_pixels)
    except ValueError as exc:
        raise _as_option(exc) from None
