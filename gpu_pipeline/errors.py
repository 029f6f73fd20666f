"""Errors every layer shares: the refusal of a bad argument, the signals that stop a command, and how an
exception or a name reads on one line."""

import signal


#: The exit status of a command whose output could not be written (a full disk, a closed pipe).
EXIT_WRITE_ERROR = 3
#: The exit status of a run stopped because its GPU failed for good (a sticky CUDA error); resumable.
EXIT_DEVICE_FAILED = 4

#: The signals that stop a command after what it finished is written: Ctrl-C, ``kill`` or ``timeout``,
#: and the terminal going away (an ssh session dropped). The exit status is then the shell's, 128 + its number.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def ignored_on_purpose(signum: int) -> bool:
    """A hangup that this process ignores: ``nohup``'s, for a run that outlives its terminal, which
    stays ignored. (An ignored SIGINT is not on purpose: a shell ignores it in a script's background
    jobs, and ``kill -INT`` still stops those.)"""
    return signum == getattr(signal, "SIGHUP", None) and signal.getsignal(signum) is signal.SIG_IGN


class UsageError(ValueError):
    """A path, option or model given by the user is missing or unusable (the CLI exits with status 2)."""


class PipelineWarning(RuntimeWarning):
    """A warning of gpu-pipeline's own, for the user: the command line prints it as its other
    messages, ``warning: ...`` on one line."""


def counted(n: int, word: str) -> str:
    """``n`` and ``word``, plural unless ``n`` is 1: "1 thread", "2 threads", "50,000 images"."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for error records and one-line refusals."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def cannot_write(what: object, exc: OSError) -> str:
    """``cannot write WHAT: reason``, every command's words for a file it could not write: the
    system's reason, or the error itself where it gave none."""
    return f"cannot write {what}: {exc.strerror or exc}"


def first_line(exc: BaseException) -> str:
    """The first line of the message (the type's name if it has none), to put inside a sentence:
    cutting the whole sentence at the message's first newline lost what followed, a closing bracket."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


#: Escapes for the C0 controls and DEL (a file name may hold any of them but NUL), and for the C1
#: controls (U+009B is the terminal's CSI, as ESC [ is) and the line and paragraph separators, as
#: ``\\u009b``: ``\\x9b`` is how a byte of a name that is not UTF-8 is shown.
_CONTROLS = ({code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F]} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}
             | {code: f"\\u{code:04x}" for code in [*range(0x80, 0xA0), 0x2028, 0x2029]})


def is_utf8(text: str) -> bool:
    """False for a name with a byte that is not UTF-8 (a surrogate escape): no CSV, Parquet or JSON text holds it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``a\\nb`` for a newline), so that a message
    naming a file (a name may hold a newline) stays one line, and the bytes of a name that is not
    UTF-8 shown as ``\\xff`` (:func:`bytes_shown`). Records escape such names already."""
    return bytes_shown(text).translate(_CONTROLS)


def bytes_shown(text: str) -> str:
    """``text`` with each byte a file name held that is not UTF-8 (a surrogate escape, as
    ``os.fsdecode`` gives it) shown as ``\\xNN``; other text unchanged."""
    if is_utf8(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name makes: shown as \\udNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def single_root(name: str) -> str:
    """``name`` with a leading ``//`` (``"$ROOT/$DIR"`` with ``ROOT=/``) as ``/``: POSIX leaves two
    leading slashes to the system, and Linux reads them as one. Discovery names files so, and a
    resume reads the names of earlier records so (they kept the ``//`` before 2026-12-06)."""
    return name[1:] if name.startswith("//") and not name.startswith("///") else name


def shown(name: str) -> str:
    """A name as a rich console prints it: on one line (:func:`printable`), never read as markup
    (an ``--out`` named ``[b]r.jsonl`` was printed ``r.jsonl``)."""
    from rich.markup import escape  # (imported where a console prints, not by every import of this)

    return escape(printable(name))
