"""Find image files: the paths of a run, in the order their records are written.

:func:`discover` takes files and folders. A path named explicitly is taken whatever its name (and
whatever its type: a FIFO, socket or device gets an error record, see :func:`decode_image`).
Folders are walked recursively; inside them only files with a known image extension
(:data:`IMAGE_EXTENSIONS`, any case) are taken, names starting with a dot (files and folders)
are skipped, and symbolic links to folders are not followed. ``glob`` filters the files found
inside folders, case-insensitively: a pattern without ``/`` matches the file name (``*.tif``,
``Forest_*``), a pattern with ``/`` matches the path relative to the folder given
(``Forest/*.jpg``). Explicitly named files are never filtered out. The result is de-duplicated
and sorted by path components.
"""

from __future__ import annotations

import bisect
import errno
import fnmatch
import operator
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from gpu_pipeline.errors import UsageError, printable, single_root

_BY_NAME = operator.attrgetter("name")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".jp2", ".j2k", ".j2c"})
# For str.endswith: "x.PNG".lower() ends in ".png" where the extension after its last dot lowers to
# "png", as no character lowers to a dot and the extensions are ASCII.
_EXTENSIONS = tuple(sorted(IMAGE_EXTENSIONS))


def _prefix(folder: str) -> str:
    """What ``str(Path(folder, relative))`` puts before ``relative``, for a Path-normalised ``folder``."""
    if folder == ".":
        return ""
    return folder if folder.endswith("/") else folder + "/"


def absolute_name(given: Path) -> str:
    """``given`` as an absolute name without ``.`` or ``..`` parts: the name a record keeps, the same
    whichever folder the run starts from, so that a rerun from elsewhere resumes instead of writing a
    second record. Lexical (``os.path.abspath``), except where a ``..`` follows a symbolic link: there
    the lexical name is another file, and its folder is resolved (``os.path.realpath``), its own name
    kept (a symbolic link is named, not its target, as everywhere else). A name that ends in a ``..``
    and leads nowhere (``a/..``, no ``a``) keeps what leads nowhere as spelt: its lexical name is a
    folder that is there, which it does not name. A leading
    ``//`` is ``/`` (:func:`single_root`): kept, it gave a second record of each file on resume."""
    absolute = single_root(os.path.abspath(given))
    if ".." in given.parts and not _lexically_right(absolute, given):
        if given.name == "..":
            return _resolved_as_far_as_there(given)
        # its folder resolved, its own name kept: a broken link was named as its target, a file never listed
        return os.path.join(os.path.realpath(given.parent), given.name)
    return absolute


def _resolved_as_far_as_there(given: Path) -> str:
    """``given`` resolved (``os.path.realpath``) as far as it leads somewhere, the rest as spelt:
    realpath takes a ``gone/..`` that leads nowhere for the folder it sits in."""
    there = len(given.parts)
    while there and not os.path.exists(Path(*given.parts[:there])):
        there -= 1
    return os.path.join(os.path.realpath(Path(*given.parts[:there])), *given.parts[there:])


def _lexically_right(absolute: str, given: Path) -> bool:
    """Whether ``absolute``, ``given``'s lexical name, is the file it names: the same file, or for a name
    that leads nowhere (a broken link, a file gone) the same folder; False where that cannot be told."""
    try:
        return os.path.samefile(absolute, given)
    except OSError:
        pass
    try:
        return given.name != ".." and os.path.samefile(os.path.dirname(absolute), given.parent)
    except OSError:
        return False


def _is_folder(given: str | Path) -> bool:
    """Whether ``given`` is a folder (else something a record can be written for); UsageError, saying
    why, where it cannot be reached. ``Path.is_dir`` raises on a name too long or a folder that
    cannot be searched, and calls a symbolic link loop missing."""
    try:
        return stat.S_ISDIR(os.stat(given).st_mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"a symbolic link loop: {given}") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            what = "a broken symbolic link" if os.path.islink(given) else "no such file or folder"
            raise UsageError(f"{what}: {_visibly(os.fspath(given))}") from None
        raise UsageError(f"cannot read {given}: {exc.strerror}") from None


def _visibly(name: str) -> str:
    """``name`` in a refusal, what a terminal shows as nothing made visible: quoted where it starts
    or ends in a space (a list's line ends are not stripped); its byte-order mark, as a list saved
    "UTF-8 with BOM" starts, as ``\\ufeff`` (:func:`printable` escapes its control characters)."""
    name = name.replace("\ufeff", "\\ufeff")
    return f"'{name}'" if name != name.strip(" ") else name


def _find(paths: Iterable[str | os.PathLike[str]], glob: str | None, absolute: bool,
          unlisted: list[tuple[str, str]] | None = None) -> list[str]:
    """Every file, de-duplicated and sorted: its absolute name (:func:`absolute_name`), or its name as given.

    Names are the strings :class:`pathlib.Path` makes (``Path(folder, name)``), without a ``Path``
    object per file: one costs about 10 us of the GIL, a quarter of a second for 26,500 tiles. The
    sort key joins the path's components with NUL, which no name holds and which sorts before every
    other character: strings then sort as the components would.
    """
    paths = [os.fspath(path) for path in paths]  # (a ListedPath stays one)
    if len(paths) == 1 and not isinstance(paths[0], ListedPath) and _is_folder(_as_read(paths[0])):
        # the usual run: a folder's files come sorted, no key needed
        given = Path(paths[0])
        at = _prefix(absolute_name(given) if absolute else str(given))
        return _files_in_folder(str(given), glob, unlisted, prefix=at)
    found: dict[str, tuple[str, str]] = {}  # by the file's absolute name: first one wins
    here = None  # the current folder as a prefix, found at the first relative plain file name
    listed, unreached = 0, []  # listed paths, and why those that cannot be reached cannot
    for name in paths:
        plain = plain_name(name)
        read = name if plain else _as_read(name)  # the file or folder it names, as Path reads it
        if isinstance(name, ListedPath):
            listed += 1
            try:
                folder = _is_folder(read)
            except UsageError as exc:  # a file, for the decoder's error record to say why
                unreached.append((name, str(exc)))
                folder = False
        else:
            folder = _is_folder(read)
        if not folder and plain:  # a file named as Path would name it: a glob's or a listing's names
            if name.startswith("/"):
                found.setdefault(name, ("/" + name.replace("/", "\0"), name))
                continue
            here = here if here is not None else _prefix(absolute_name(Path(".")))
            found.setdefault(here + name, (name.replace("/", "\0"), name))
            continue
        given = Path(name) if plain else read  # (a name that is not plain was read as a Path)
        if folder:
            at_given, at_absolute = _prefix(str(given)), _prefix(absolute_name(given))
            at_key = "\0".join(given.parts) + "\0" if given.parts else ""
            for relative in _files_in_folder(str(given), glob, unlisted):
                found.setdefault(at_absolute + relative, (at_key + relative.replace("/", "\0"), at_given + relative))
        else:  # a file, or a FIFO, socket or device: that one gets an error record
            found.setdefault(absolute_name(given), ("\0".join(given.parts), str(given)))
    if listed and len(unreached) == listed:  # (relative names from another folder, say: error records only)
        raise _none_reached(unreached)
    ordered = sorted(found.items(), key=lambda item: item[1][0])
    return [name if absolute else names[1] for name, names in ordered]


class ListedPath(str):
    """A path read from a list (``--files-from``): one that cannot be reached gets an error record,
    as a file that cannot be read does, where a path given as an argument refuses the run (a file
    gone between the night's ``find`` and its run stopped all of it). A list none of whose paths can
    be reached is refused."""


def _none_reached(unreached: list[tuple[str, str]]) -> UsageError:
    """The refusal of a list none of whose paths can be reached (``unreached``: each and why)."""
    name, why = unreached[0]
    hint = "" if name.lstrip("\ufeff").startswith("/") else "; relative names are taken from the current folder"
    if len(unreached) == 1:
        return UsageError(f"the one path listed cannot be reached ({why}){hint}")
    return UsageError(f"none of the {len(unreached)} paths listed can be reached (the first: {why}){hint}")


def _as_read(name: str) -> str | Path:
    """``name`` as discovery reads it: as ``Path`` does (``e.png/`` and ``e.png/.`` are the file
    ``e.png``, which the system refuses as spelt: ENOTDIR), except an empty name, which is refused
    (``Path("")`` is the current folder, which it walked)."""
    return Path(name) if name else name


def plain_name(name: str) -> bool:
    """Whether ``name`` is spelt as ``str(Path(name))`` spells it, with no ``..`` part: no empty part,
    no ``.`` part, no ``/`` at the end. Its parts are then its pieces between ``/`` (after a root
    ``/``), its absolute name the current folder and it (for a relative name), and it needs no
    ``Path``, which costs about 8 us of the GIL a file where 26,500 files are named one by one."""
    return (name != "" and name != "." and not name.endswith(("/", "/.")) and not name.startswith("./")
            and "//" not in name and "/./" not in name and name != ".." and not name.startswith("../")
            and not name.endswith("/..") and "/../" not in name)


def discover(paths: Iterable[str | os.PathLike[str]], glob: str | None = None,
             unlisted: list[tuple[str, str]] | None = None) -> list[Path]:
    """Image files under ``paths``, de-duplicated and sorted, named as given (see the module docstring).
    ``unlisted`` (when given) receives the folders that could not be listed, as :func:`find_files`'s.

    Raises
    ------
    UsageError
        A path cannot be reached: it does not exist, or is a broken symbolic link or a loop, or its
        name is too long.
    """
    return [Path(given) for given in _find(paths, glob, absolute=False, unlisted=unlisted)]


def find_files(paths: Iterable[str | os.PathLike[str]], glob: str | None = None,
               unlisted: list[tuple[str, str]] | None = None) -> list[str]:
    """The files of :func:`discover`, in its order, as absolute names without ``.`` or ``..`` parts:
    what a run processes and writes in its records. Raises :class:`UsageError` as it does.
    ``unlisted`` (when given) receives ``(folder, reason)`` for each folder that could not be listed
    (no permission, a name past the system's path limit): its files are missing from the list."""
    return _find(paths, glob, absolute=True, unlisted=unlisted)


def listed_paths(listing: bytes) -> list[ListedPath]:
    """The paths of a list (``--files-from``): NUL-separated where it holds a NUL (``find -print0``:
    any name, newlines included), else one a line; empty entries skipped. Each keeps its bytes as a
    command-line argument does (``os.fsdecode``). Nothing is stripped: a name may end in a space."""
    separator = b"\0" if b"\0" in listing else b"\n"
    return [ListedPath(os.fsdecode(name)) for name in listing.split(separator) if name]


def unlisted_warning(folder: str, reason: str) -> str:
    """What every command says (after ``warning: ``) of a folder under its inputs that could not be
    listed: ``run``, ``verify``, ``bench`` and the Python API go on without its images."""
    return f"cannot list {printable(folder)} ({reason}); its images are not processed"


def no_files_found(paths: Iterable[str | os.PathLike[str]], glob: str | None,
                   unlisted: list[tuple[str, str]]) -> UsageError:
    """The refusal of a command that found no image under ``paths``, naming the first folders
    that could not be listed (the likely cause)."""
    paths = list(paths)
    named = ", ".join(str(path) for path in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return UsageError("no image files found in " + named  # (a --files-from list may hold 100,000)
                      + (f" matching {glob!r}" if glob else "")
                      + "".join(f"; cannot list {printable(folder)}: {reason}" for folder, reason in unlisted[:3]))


def _files_in_folder(folder: str, glob: str | None, unlisted: list[tuple[str, str]] | None = None,
                     prefix: str = "") -> list[str]:
    """Image files under ``folder``, relative to it with ``/`` between parts (``prefix`` before each),
    sorted by their path components: a subfolder's files go where its name sorts among the folder's
    entries. As ``os.walk``: symbolic links to folders are not followed, and folders that cannot be
    listed are skipped, each told to ``unlisted`` (when given) with the reason. No recursion: a tree
    of any depth (Python stops a recursion about 1,000 folders deep). A folder's files are taken in
    bulk (:func:`_listing`): 0.8 us of the GIL a EuroSAT tile, where a loop over its entries took 1.1."""
    matches = re.compile(fnmatch.translate(glob.lower())).match if glob else None  # (fnmatchcase's test)
    whole_path = matches is not None and "/" in glob
    files: list[str] = []
    walking: list[tuple[str, str] | list[str]] = [(folder, "")]  # folders to walk and files found, the next last
    while walking:
        item = walking.pop()
        if isinstance(item, list):
            files += item
            continue
        path, below = item
        images, subfolders = _listing(path, unlisted)
        if matches is not None:
            images = [name for name in images if matches((below + name if whole_path else name).lower())]
        at = prefix + below
        if not subfolders:  # (most folders)
            files += [at + name for name in images]
            continue
        later: list[tuple[str, str] | list[str]] = []
        start = 0
        for subfolder in subfolders:
            end = bisect.bisect_left(images, subfolder.name, start)
            if end > start:
                later.append([at + name for name in images[start:end]])
            later.append((subfolder.path, f"{below}{subfolder.name}/"))
            start = end
        later.append([at + name for name in images[start:]])
        walking += reversed(later)
    return files


def folders_under(top: str | os.PathLike[str]) -> Iterator[tuple[str, list[str]]]:
    """``(folder, names of its entries)`` for ``top`` and each folder under it, in no set order, as
    ``os.walk`` without following links and with no recursion (Python 3.11's ``os.walk`` recurses);
    folders that cannot be listed are skipped."""
    pending = [os.fspath(top)]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            continue
        yield folder, [entry.name for entry in entries]
        pending += [entry.path for entry in entries if _is_subfolder(entry)]


def _listing(directory: str, unlisted: list[tuple[str, str]] | None) -> tuple[list[str], list[os.DirEntry]]:
    """The names of the image files in ``directory`` and its subfolders (not links to folders), each
    in name order, hidden ones left out; none when it cannot be listed (told to ``unlisted``)."""
    try:
        with os.scandir(directory) as listing:
            entries = list(listing)
    except OSError as exc:
        if unlisted is not None:
            unlisted.append((directory, exc.strerror or str(exc)))
        return [], []
    try:
        folders = list(filter(os.DirEntry.is_dir, entries))  # (a system call for a link alone)
    except OSError:  # a link that cannot be followed (a loop): a file, as os.walk has it
        folders = [entry for entry in entries if _is_dir(entry)]
    images = sorted([name for entry in entries  # (lower() alone where the extension's case is not)
                     if (name := entry.name).endswith(_EXTENSIONS) or name.lower().endswith(_EXTENSIONS)])
    del images[bisect.bisect_left(images, "."):bisect.bisect_left(images, "/")]  # hidden: "/" is the next character
    if not folders:
        return images, []
    skipped = {entry.name for entry in folders}  # a folder named x.png is no image, nor a link to one
    images = [name for name in images if name not in skipped]
    subfolders = sorted((entry for entry in folders if not entry.name.startswith(".") and not entry.is_symlink()),
                        key=_BY_NAME)
    return images, subfolders


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder or a link to one; not where the link cannot be followed."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_subfolder(entry: os.DirEntry) -> bool:
    """A folder that is not a symbolic link to one (those are not followed)."""
    try:
        return entry.is_dir() and not entry.is_symlink()
    except OSError:
        return False
