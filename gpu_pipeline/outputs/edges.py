"""Edge maps saved as PNG (``--save-edges``): where each map goes, and whose file may be replaced.

A map mirrors its input's place below the common folder of the paths given (:func:`edge_root`),
as ``FOLDER/sub/NAME.edges.png`` (:func:`edge_map_name`); :func:`edge_saver` writes them, each
marked as ours, and leaves alone a file that is someone else's or the map of another image.
"""

from __future__ import annotations

import base64
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from gpu_pipeline.errors import bytes_shown, cannot_write, is_utf8, printable
from gpu_pipeline.inputs.discover import absolute_name, plain_name
from gpu_pipeline.outputs.files import SOFTWARE, ensure_folder, is_ours, png_texts, write_replacing
from gpu_pipeline.outputs.png import gray_png
from gpu_pipeline.outputs.sink import DISK_ERRORS, SinkWriteError, name_bytes


def edge_root(paths: Sequence[str | os.PathLike[str]]) -> str:
    """The folder ``--save-edges`` mirrors: the common folder of the paths given (a folder itself, a
    file's parent), absolute as discovery names them. It depends on the command line only, not on the
    files found: a resume whose new files sat higher in the tree once moved every name (a.png of the
    first run and sub/a.png of the second were both mapped to a.png.edges.png)."""
    folders = []
    for given in paths:
        name = absolute_name(Path(given))
        folders.append(name if os.path.isdir(name) else os.path.dirname(name))
    return os.path.commonpath(folders)


#: Folders an edge saver remembers having made (see :func:`edge_saver`).
MADE_FOLDERS_KEPT = 1024


def edge_saver(folder: Path, root: str) -> Callable[[str, np.ndarray], None]:
    """Write edge maps as PNG under ``folder``, mirroring the inputs' layout below ``root``
    (:func:`edge_root`): ``ROOT/sub/a.jpg`` gives ``FOLDER/sub/a.jpg.edges.png``.

    The names are the inputs' as discovery wrote them (lexical: a file or folder swapped for a link
    during the run cannot send a map elsewhere). Each PNG names gpu-pipeline as its ``Software`` and
    its image as its ``Source``. A file of that name that is not ours (someone else's), or a map of
    ours made from another image (an earlier run into the same folder from another root), is left
    alone, and that image gets a ``save-edges`` error record. A full or read-only disk
    (:data:`DISK_ERRORS`) raises :class:`SinkWriteError` naming the map instead: every later map
    would fail alike, so the run stops as for its records (exit 3, resumable). A map is encoded by
    :func:`gray_png` (Pillow's writer held the GIL about 100 us a map), and each folder is made once."""
    prefix = root if root.endswith("/") else root + "/"
    folder = os.path.abspath(folder)  # (--dask: a relative one went to each worker's own folder)
    # folders made (or found) lately: a mkdir per map cost a system call. Bounded: a folder per image
    # (a product per folder, a tile pyramid) kept ~0.5 KB a folder for the whole run
    made: set[str] = set()

    def save(path: str | os.PathLike[str], edges: np.ndarray) -> None:  # (a Path from --dask)
        name = os.fspath(path)
        if not name.startswith(prefix):
            raise ValueError(f"{printable(name)} is not below {printable(root)}")
        target = edge_map_name(folder, name[len(prefix):])
        with _disk_errors_stop_the_run(target):
            parent = os.path.dirname(target)
            if parent not in made:
                ensure_folder(Path(parent))
                if len(made) >= MADE_FOLDERS_KEPT:  # inputs come folder by folder: the old ones are done
                    made.clear()
                made.add(parent)
            try:
                found = os.lstat(target)
            except FileNotFoundError:
                found = None
            if found is not None:
                # lstat: a FIFO there would block the open for ever, a link would lead elsewhere
                texts = png_texts(target) if stat.S_ISREG(found.st_mode) else None
                if not (is_ours(texts) or _earlier_versions_map(target, texts, edges)):
                    raise FileExistsError(f"{target} exists and was not written by gpu-pipeline; it is left alone")
                if not _same_image(texts, name):
                    raise FileExistsError(f"{target} is the edge map of {texts.get('Source', 'another image')}; "
                                          "it is left alone (save the edge maps of these inputs into another folder)")
            png = gray_png(edges, text=_marks(name), international={"Source": bytes_shown(name)})
            # a kill leaves no half map, and a hard link to the old map (an input, perhaps) keeps its bytes
            try:
                write_replacing(target, png)
            except FileNotFoundError:  # its folder was removed during the run: made again, as before
                ensure_folder(Path(parent))
                write_replacing(target, png)

    return save


def edge_map_name(folder: str, relative: str) -> str:
    """``str(Path(folder) / (relative + ".edges.png"))``, the map of the input ``ROOT/relative``,
    without a ``Path`` a map (with its parent's and its temporary's, 10 us of GIL of the 40 a saved
    tile map took): the names joined when ``relative`` is relative and spelt as ``Path`` spells it
    (:func:`plain_name`: discovery's names are), else the ``Path``'s."""
    if relative.startswith("/") or not plain_name(relative):
        return str(Path(folder) / (relative + ".edges.png"))
    return folder + relative + ".edges.png" if folder.endswith("/") else f"{folder}/{relative}.edges.png"


@contextmanager
def _disk_errors_stop_the_run(target: str) -> Iterator[None]:
    """A full or read-only disk while writing ``target`` raised as :class:`SinkWriteError` naming it;
    the system's other errors (a folder made unwritable) raised naming it too, not the hidden
    temporary the map was written to (``.a.png.edges.png.655.tmp``)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_ERRORS:
            raise SinkWriteError(exc.errno, cannot_write(f"the edge map {printable(target)}", exc)) from exc
        if exc.strerror is None:  # ours, which names the map already (a file left alone)
            raise
        raise type(exc)(cannot_write(f"the edge map {printable(target)}", exc)) from exc


def _earlier_versions_map(target: str, texts: dict[str, str] | None, edges: np.ndarray) -> bool:
    """A map of ours from before maps named their ``Software`` (versions before 2026-12-05 wrote no
    text chunk), of this image with these settings: a PNG with no text at all whose pixels are
    the very map this run made (maps are the same bytes on every version). Taken for someone else's
    file, every image whose map such a version had saved got an error record instead of its result,
    at every run. Any other file, a user's own Canny map of the image included, is left alone."""
    from PIL import Image

    if texts != {}:
        return False
    try:
        with Image.open(target) as image:
            return image.mode == "L" and np.array_equal(np.asarray(image), edges)
    except Exception:  # (png_texts read it: a file that changed since)
        return False


#: The exact bytes of a ``Source`` that is not UTF-8, in base64 (``Source`` shows them as ``\xNN``).
SOURCE_BYTES = "Source bytes"


def _marks(name: str) -> dict[str, str]:
    """The ``tEXt`` chunks of the map of ``name``: ours, and its exact bytes where it is not UTF-8."""
    return {"Software": SOFTWARE} if is_utf8(name) else {"Software": SOFTWARE, SOURCE_BYTES: name_bytes(name)}


def _same_image(texts: dict[str, str], name: str) -> bool:
    """Whether an edge map of ours with text chunks ``texts`` may be replaced by the map of ``name``:
    it records this name, or none (an earlier version's map), or a name of this very file (a link,
    another mount), or a file that is gone (a folder renamed since). Only a map of another image
    that still exists is left alone. A name that is not UTF-8 is compared by its exact bytes: as
    shown, it named no file, and the map of another image that exists was taken for one gone."""
    recorded = texts.get("Source")
    if SOURCE_BYTES in texts:
        try:
            recorded = os.fsdecode(base64.b64decode(texts[SOURCE_BYTES], validate=True))
        except ValueError:  # (damaged by hand: whose map it is cannot be told, so it is left alone)
            return False
    elif recorded is not None and recorded == bytes_shown(name):  # (maps made before kept the shown name only)
        return True
    if recorded is None or recorded == name:
        return True
    try:
        return os.path.samefile(recorded, name)
    except OSError:  # the recorded image is gone (or the name was not a name: shown bytes)
        return not os.path.lexists(recorded)
