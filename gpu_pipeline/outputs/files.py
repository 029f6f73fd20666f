"""The files the commands other than ``run`` write: ``verify --report``, ``bench --json`` and
``--plot``, ``fit --out``, ``evaluate --plot``.

Each replaces only a file that gpu-pipeline wrote, and that is checked before any work starts
(:func:`check_target`): a path that exists and is anything else (notes, an input image, a device
such as ``/dev/full``, a folder) is refused with exit 2 and left alone. Our files say who wrote them:
the JSON ones start with a ``"schema"`` or ``"format"`` naming gpu-pipeline, the PNG plots carry a
``Software`` text chunk. They are written to a hidden temporary name beside the target, then renamed
into place (:func:`replace_with`), so a full disk never leaves half a report.

:func:`write_replacing` (that rename) and :func:`same_file_as` (one file under two names) also serve
``run``'s settings record, edge maps and the check that its ``--out`` is none of its inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Callable, Iterable

from gpu_pipeline import __version__
from gpu_pipeline.errors import UsageError, cannot_write


class CannotWrite(UsageError):
    """A file the command was to write at the end of its work could not be (a full disk, a folder
    removed meanwhile): the command says it after its results and exits 3, as for standard output.
    Its other refusals there (a file another program made meanwhile) stay exit 2."""

#: The ``Software`` text chunk of the PNG plots gpu-pipeline draws.
SOFTWARE = f"gpu-pipeline {__version__}"
_OUR_JSON = re.compile(rb'\A\s*\{\s*"(?:schema|format)"\s*:\s*"gpu-pipeline[ -]')


def is_our_json(path: Path) -> bool:
    """A verify report, bench JSON or label model: its first key names gpu-pipeline."""
    try:
        with open(path, "rb") as file:
            return bool(_OUR_JSON.match(file.read(4096)))
    except OSError:
        return False


def is_our_png(path: Path) -> bool:
    """A plot gpu-pipeline drew (any version): a PNG whose ``Software`` chunk names it."""
    return is_ours(png_texts(path))


def is_ours(texts: dict[str, str] | None) -> bool:
    """Whether a PNG's text chunks (:func:`png_texts`) name gpu-pipeline as its ``Software``."""
    return texts is not None and texts.get("Software", "").startswith("gpu-pipeline")


def png_texts(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The text chunks of a PNG (those before its pixels), None when it is no PNG or a broken one."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return None
            return {key: str(value) for key, value in image.info.items() if isinstance(value, str)}
    except Exception:  # not an image at all, or a broken one: not ours
        return None


def check_target(path: Path, option: str, ours: Callable[[Path], bool], inputs: Iterable = ()) -> None:
    """UsageError unless ``path`` may be written: absent from a folder that exists, or a regular
    file gpu-pipeline wrote (``ours``) that is none of the command's ``inputs`` (images, a model;
    compared by device and inode: an edge map of ours may be an input too); either way in a folder
    this process may write in (the temporary that replaces the file goes there)."""
    if path.is_symlink() or path.exists():
        if path.is_dir():
            raise UsageError(f"{option} {path} is a folder; name a file")
        if not path.is_file() or not ours(path):
            raise UsageError(f"{option} {path} exists and was not written by gpu-pipeline; it is left alone: "
                             "remove it or choose another name")
        is_target = same_file_as(path)
        for given in inputs:
            if is_target(given):
                raise UsageError(f"{option} {path} is one of the inputs ({given}); choose another name")
        folder = Path(os.path.realpath(path)).parent  # where replace_with makes its temporary
    else:
        folder = path.absolute().parent
        if not folder.is_dir():
            raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):  # a file of ours too: replacing it writes beside it
        raise UsageError(f"{option} {path}: cannot write in {folder}")


def replace_with_report(path: Path, option: str, report: dict) -> None:
    """A JSON report (``verify --report``, ``bench --json``) into ``path`` by :func:`replace_with`,
    its names that are not UTF-8 written as the records write them (:func:`portable_names`)."""
    from gpu_pipeline.outputs.sink import portable_names

    text = json.dumps(portable_names(report), indent=2) + "\n"
    replace_with(path, option, lambda temporary: temporary.write_text(text), is_our_json)


def replace_with(path: Path, option: str, write: Callable[[Path], None], ours: Callable[[Path], bool]) -> None:
    """``write(temporary)``, then the temporary renamed to ``path``; :class:`CannotWrite` (one line)
    when the disk is full or the folder cannot be written, and nothing left behind. A symbolic link
    (checked by :func:`check_target`) keeps pointing where it did, at the new file. The check is
    made again before the rename (``ours``, as :func:`check_target`'s): the command ran for a
    while, and another program (a run writing its output there) may have made the file since."""
    path = Path(os.path.realpath(path))

    def still_ours() -> None:
        if os.path.lexists(path) and not (path.is_file() and not path.is_symlink() and ours(path)):
            raise UsageError(f"{option} {path} was made by another program while this one ran; it is left "
                             "alone: choose another name")

    remove_stale_temporaries(path.parent, temporaries_of(path.name))  # a killed run's (a SIGKILL at the rename)
    try:
        write_replacing(path, write, before_replacing=still_ours, durable=True)
    except OSError as exc:
        raise CannotWrite(f"{option}: {cannot_write(path, exc)}") from None


def write_replacing(path: str | os.PathLike[str], write: Callable[[Path], None] | bytes,
                    before_replacing: Callable[[], None] = lambda: None, durable: bool = False) -> None:
    """``write(temporary)`` (or ``write``'s bytes, written through the descriptor that created the
    temporary), then the temporary renamed to ``path``: a kill or a full disk leaves the
    old file whole, and another name of the old file (a hard link) keeps its bytes. The temporary is
    a hidden name of this process's, created here (``O_EXCL``), so never a file or a link planted
    there; it is removed when anything fails, and the error goes on. One that a SIGKILL left
    behind is removed by :func:`remove_stale_temporaries`, or here when this process has its PID.
    ``path`` may be a string (an edge map's: no ``Path`` a map); ``write`` is given a ``Path``.
    ``durable``: the new bytes are on the disk before the rename, and the rename after it (fsync):
    after a power cut the name holds the old file or the new one, never an empty one (a rename can
    reach the disk before the bytes do). Not for edge maps: a sync each would cost more than the map."""
    folder, slash, name = os.fspath(path).rpartition("/")  # (Path.with_name, without a Path)
    temporary = folder + slash + temporary_name(name, os.getpid())
    replaced = _regular_file_status(path)
    # a new file: 0666 less the umask, as open() gives; a replacement: private until it has the
    # replaced file's permissions, before anything is written into it
    flags, mode = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666 if replaced is None else 0o600
    try:
        created = os.open(temporary, flags, mode)
    except FileExistsError:  # a dead process's, which had this PID (a system call only then)
        os.unlink(temporary)
        created = os.open(temporary, flags, mode)
    try:
        try:
            if replaced is not None:
                keep_mode(replaced, temporary)
            if isinstance(write, bytes):  # os.write: a file object costs 3 more system calls
                write_all(created, write)
        finally:
            os.close(created)
        if not isinstance(write, bytes):
            write(Path(temporary))
        if durable:
            _sync(temporary)
        before_replacing()  # a last check, which may raise
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if durable:
        with contextlib.suppress(OSError):  # (a file system that cannot sync a folder: the bytes are safe)
            _sync(folder + slash or ".", os.O_DIRECTORY)


def _sync(path: str, flags: int = 0) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_all(descriptor: int, data: bytes) -> None:
    """``data`` to ``descriptor`` whole: a short write is continued."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


def ensure_folder(folder: Path) -> None:
    """``folder.mkdir(parents=True, exist_ok=True)`` without its recursion, which ends in a
    RecursionError below about 1,000 missing folders (an edge map mirrors an input that deep)."""
    missing = []
    while True:
        try:
            folder.mkdir(exist_ok=True)
            break
        except FileNotFoundError:
            missing.append(folder)
            folder = folder.parent
    for each in reversed(missing):
        each.mkdir(exist_ok=True)


def _regular_file_status(path: Path) -> os.stat_result | None:
    """The status of the regular file ``path`` (through a link), None when there is none (a new file:
    the umask decides its permissions, as for any file)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info if stat.S_ISREG(info.st_mode) else None


def keep_mode(replaced: os.stat_result, temporary: Path) -> None:
    """The replaced file's permissions (and group, where this user may set it) on its replacement:
    a report its owner made private stayed private, a group-writable one group-writable. Where the
    group cannot be kept, the group gets what others had (as vim does): the bits were given to that
    group, not to this user's. Read, write and execute only: a set-user-ID bit is not copied."""
    mode = stat.S_IMODE(replaced.st_mode) & 0o777
    try:
        os.chown(temporary, -1, replaced.st_gid)
    except OSError:  # (its group may be this user's all the same)
        if os.stat(temporary).st_gid != replaced.st_gid:
            mode = (mode & 0o707) | ((mode & 0o007) << 3)
    os.chmod(temporary, mode)


#: The longest file name in bytes (NAME_MAX of Linux's file systems).
NAME_MAX = 255


def temporary_name(name: str, pid: int) -> str:
    """``.NAME.PID.tmp``, the temporary of ``name`` in process ``pid``; where that would pass
    :data:`NAME_MAX` bytes (``name`` is near the limit but fits), ``NAME`` loses its first bytes to a
    digest of the whole name and keeps its end, which says what it is (``.edges.png``): exactly
    NAME_MAX bytes then. (Without the digest, long names that differ only in their first bytes had
    one temporary, and two of their edge maps saved at once took each other's.)"""
    suffix = f".{pid}.tmp"
    room = NAME_MAX - 1 - len(suffix)
    encoded = os.fsencode(name)
    if len(encoded) > room:
        digest = hashlib.sha256(encoded).hexdigest()[:16] + "~"
        name = digest + os.fsdecode(encoded[len(encoded) - room + len(digest):])
    return f".{name}{suffix}"


_TEMPORARY = re.compile(r"\A\.(?P<target>.+)\.(?P<pid>[0-9]+)\.tmp\Z", re.DOTALL)
#: A temporary touched this recently is left alone, whatever its PID says: it may be a live run's on
#: another machine that shares the folder.
STALE_AFTER_S = 60


def remove_stale_temporaries(folder: str | os.PathLike[str], wanted: Callable[[str, int], bool],
                             names: list[str] | None = None) -> None:
    """Remove the temporaries that :func:`write_replacing` left in ``folder`` when its process was
    killed (a SIGKILL runs no clean-up): hidden ``.NAME.PID.tmp`` files (:func:`temporary_name`)
    whose ``NAME`` and ``PID`` ``wanted`` accepts, whose process is no longer running, untouched for
    :data:`STALE_AFTER_S`. ``names``: the folder's file names when the caller has listed it already."""
    if names is None:
        try:
            with os.scandir(folder) as entries:
                names = [entry.name for entry in entries]
        except OSError:
            return
    found = [(os.path.join(folder, name), int(match["pid"])) for name in names if name.startswith(".")
             and (match := _TEMPORARY.match(name)) and wanted(match["target"], int(match["pid"]))]
    for path, pid in found:
        if is_running(pid):
            continue
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and time.time() - info.st_mtime > STALE_AFTER_S:
                os.unlink(path)


def temporaries_of(name: str) -> Callable[[str, int], bool]:
    """For :func:`remove_stale_temporaries`: the temporaries of the file ``name`` only."""
    return lambda target, pid: temporary_name(name, pid) == f".{target}.{pid}.tmp"


def is_running(pid: int) -> bool:
    """Whether a process ``pid`` runs here (or may: one of another user's, a number that is no PID)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's, or no PID at all: leave it
        return True
    return True


def still_names(path: str | os.PathLike[str], descriptor: int) -> bool:
    """Whether ``path`` still leads to the file open as ``descriptor`` (its device and inode); False
    when nothing is there any more (removed, or a folder on the way replaced by a file). Any other
    error (a folder made unsearchable) is raised: whether it does cannot be told."""
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return False


def same_file_as(path: str | os.PathLike[str]) -> Callable[[str | os.PathLike[str]], bool] | None:
    """A test of whether a name reaches the existing regular file ``path`` (its device and inode:
    through a symbolic link in either, or a hard link); None when ``path`` is no regular file."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    identity = (info.st_dev, info.st_ino)

    def same(other: str | os.PathLike[str]) -> bool:
        try:
            found = os.stat(other)
        except OSError:
            return False
        return (found.st_dev, found.st_ino) == identity

    return same
