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

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path

from gpu_pipeline.errors import UsageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def discover(paths: Iterable[str | os.PathLike[str]], glob: str | None = None) -> list[Path]:
    """Image files under ``paths``, de-duplicated and sorted (see the module docstring).

    Raises
    ------
    UsageError
        A path does not exist (or is a broken symbolic link).
    """
    found: dict[str, Path] = {}
    for given in map(Path, paths):
        if given.is_dir():
            candidates = _files_in_folder(given, glob)
        elif given.exists():  # a file, or a FIFO, socket or device: that one gets an error record
            candidates = [given]
        elif given.is_symlink():
            raise UsageError(f"a broken symbolic link: {given}")
        else:
            raise UsageError(f"no such file or folder: {given}")
        for path in candidates:
            found.setdefault(os.path.normpath(os.path.abspath(path)), path)
    return sorted(found.values(), key=lambda path: path.parts)


def _files_in_folder(folder: Path, glob: str | None) -> list[Path]:
    pattern = glob.lower() if glob else None
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(root, name)
            if pattern is not None:
                subject = path.relative_to(folder).as_posix() if "/" in pattern else name
                if not fnmatch.fnmatchcase(subject.lower(), pattern):
                    continue
            files.append(path)
    return files
