"""The Python API: the same data plane as ``gpu-pipeline run``, for notebooks and other programs.

* :func:`process` runs the pipeline on images already in memory and returns the batch arrays;
* :func:`run` streams files through the engine (decode pool, batches, labels) and yields one
  record per file, the same dicts ``gpu-pipeline run`` writes as JSON lines;
* :func:`run_batches` streams them the same way and yields each batch as arrays (:class:`Batch`):
  no Python object per file but its name and label, where a record is 256 Python ints and a dict.

Backends are created once per backend name and thread count and kept for the life of the process,
so kernels are loaded (or compiled) once, whatever calls them.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (before the fork hook below: see _finish_loading_before_fork)
import contextlib
import logging  # noqa: F401  (the same)
import numbers
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from gpu_pipeline.backends import Backend, registry
from gpu_pipeline.backends.base import check_image, raise_if_device_failed
from gpu_pipeline.backends.base import DeviceFailed as DeviceFailed  # (gpu_pipeline.DeviceFailed, exported)
from gpu_pipeline.config import MOST_THREADS, DecodeOptions, PipelineConfig, threshold_text, whole_number
from gpu_pipeline.errors import PipelineWarning
from gpu_pipeline.images import ImageBatch, pixel_counts
from gpu_pipeline.inputs.limits import DecodeError as DecodeError  # (gpu_pipeline.DecodeError, exported)
from gpu_pipeline.outputs.records import RecordBatch


@dataclass(eq=False)  # (compared by identity: field by field, its arrays have no one truth value)
class Results:
    """What :func:`process` returns for N images, in order.

    ``histograms`` int64 (N, 256), ``edge_counts`` int64 (N,), ``labels`` one string per image;
    ``equalized`` and ``edges`` lists of uint8 images when asked for (``keep_images=True``).
    """

    histograms: np.ndarray
    edge_counts: np.ndarray
    labels: list[str]
    equalized: list[np.ndarray] | None = None
    edges: list[np.ndarray] | None = None


@dataclass(frozen=True, eq=False)  # (compared and hashed by identity, as Results)
class Batch:
    """What :func:`run_batches` yields: the files of one backend call, in input order, as arrays.

    For the N files of the batch: ``paths`` their names (as :func:`run`'s records name them, but a name
    that is not UTF-8 keeps its bytes as ``os.fsdecode`` does: ``os.fsencode`` gives them back);
    ``ok`` bool (N), False for a file that failed, whose error record (``path``, ``stage``,
    ``error``) is ``errors[position]``; ``histograms`` int64 (N, 256), ``edge_counts``, ``widths``,
    ``heights`` and ``bands`` int64 (N), zero where a file failed; ``labels`` one per file, None
    where it failed; ``backend`` the backend's name. ``records()`` gives :func:`run`'s dicts.
    """

    paths: list[str]
    ok: np.ndarray
    histograms: np.ndarray
    edge_counts: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    bands: np.ndarray
    labels: list[str | None]
    errors: dict[int, dict]
    backend: str
    _written: RecordBatch = field(repr=False, compare=False)

    @classmethod
    def of(cls, records: RecordBatch) -> Batch:
        """The arrays of the engine's ``records``: one vector operation a field, none a file."""
        count = len(records.paths)
        ok = np.ones(count, bool)
        ok[list(records.errors)] = False

        def spread(values, columns: tuple[int, ...] = ()) -> np.ndarray:
            """``values`` (one per result) at the positions of the results, zeros at the errors'."""
            if not records.errors:
                return np.asarray(values, np.int64).reshape(count, *columns)
            every = np.zeros((count, *columns), np.int64)
            every[ok] = np.asarray(values, np.int64).reshape(-1, *columns)
            return every

        labels = records.labels
        if records.errors:
            given = iter(records.labels)
            labels = [next(given) if good else None for good in ok.tolist()]
        return cls(records.paths, ok, spread(records.histograms, (256,)), spread(records.edge_counts),
                   spread(records.widths), spread(records.heights), spread(records.bands), labels,
                   records.errors, records.backend, records)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:  # (not thousands of names and a histogram each)
        return f"Batch({len(self)} files, {len(self.errors)} failed, backend={self.backend!r})"

    def records(self) -> list[dict]:
        """The batch's records, as :func:`run` yields them (and ``gpu-pipeline run`` writes them)."""
        from gpu_pipeline.outputs.sink import as_written

        return list(as_written(self._written))


def shared_backend(name: str = "auto", threads: int | None = None) -> Backend:
    """The backend ``name`` (or the best available for ``auto``), created once per process, its
    kernels loaded (or compiled).

    That is done in a thread of its own while the caller waits: a Ctrl-C (KeyboardInterrupt) in a
    notebook stops the wait, never numba's import or a kernel's compile half-way, which left them
    broken for the rest of the session ("module 'numba' has no attribute 'core'", "no compiled object
    yet"); the next call finds the backend ready, or waits for it again.

    ValueError for an unknown name or a thread count below 1 (as the command line's exit 2)."""
    name = _backend_name(name)
    if threads is not None:
        threads = whole_number("threads", threads, least=1, most=MOST_THREADS)
    return _loaded(_backends, (name, threads), lambda: _warmed_backend(name, threads)).result()


def _warmed_backend(name: str, threads: int | None) -> Backend:
    try:
        backend = registry.create(name, threads=threads)
    except KeyError as exc:  # (the registry's unknown name alone: a backend's own KeyError stays one)
        raise ValueError(exc.args[0]) from None
    try:
        backend.warm_up()
    except BaseException:
        with contextlib.suppress(Exception):
            backend.close()
        raise
    return backend


#: The backends made (or being made), by name and threads: each a Future of it (:func:`shared_backend`).
_backends: dict[tuple[str, int | None], Future] = {}
#: The label models whose kernels are loaded (or being loaded), by name: a Future each (:func:`_labeller`).
_models: dict[str, Future] = {}
_creating = threading.Lock()


def _loaded(made: dict, key, work) -> Future:
    """``made[key]``: the Future of ``work()``, started in a thread of its own (:func:`_in_own_thread`)
    once however many threads ask at once, and again after a failure."""
    with _creating:
        future = made.get(key)
        if future is None or future.done() and future.exception() is not None:
            future = made[key] = _in_own_thread(work)
        return future


def _finish_loading_before_fork() -> None:
    """A fork waits for the backends and models being loaded: a child forked half-way got their locks
    (numba's compiler lock, an import's) held by a thread it does not have, and its first call hung
    for ever (a multiprocessing 'fork' pool started while a Ctrl-C'd first call still loads)."""
    if threading.current_thread().name == _LOADING:  # (the loading itself forks: nothing to wait for)
        return
    with _creating:
        loading = [future for future in (*_backends.values(), *_models.values()) if not future.done()]
    for future in loading:
        future.exception()  # (waits; what it raised is its callers' to see)


def _unlock_after_fork() -> None:
    global _creating, _backends, _models
    _creating = threading.Lock()  # a fork while another thread held it would leave it held for ever
    # (and what a thread the child does not have was loading would be waited for, for ever)
    _backends = {key: made for key, made in _backends.items() if made.done()}
    _models = {key: made for key, made in _models.items() if made.done()}


def _forget_backends() -> None:
    """Close and forget the backends made (tests)."""
    with _creating:
        made = list(_backends.values())
        _backends.clear()
    for backend in made:
        if backend.done() and backend.exception() is None:
            backend.result().close()


# Fork hooks run newest first: this one waits before the thread pools' and logging's take the locks the
# loading uses (their modules are imported above, so registered earlier), else the fork waited for ever.
os.register_at_fork(before=_finish_loading_before_fork, after_in_child=_unlock_after_fork)


def _backend_name(name) -> str:
    """``name`` when it names a backend (or ``auto``), without loading one; ValueError otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"backend must be a backend's name (auto, {', '.join(registry.backend_names())}), got {name!r}")
    if name != "auto":  # (auto is resolved where the backend is made: that loads the candidates)
        try:
            registry.resolve(name)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
    return name


def _checked_images(images) -> Sequence[np.ndarray]:
    """``images`` as the backends take them: one ImageBatch over a stack, or a list of checked images.

    ValueError, saying what to pass, for anything else: a single image is not a stack (an (H, W, 3)
    RGB image would read as H gray images 3 pixels wide), nor is a list of lists.
    """
    if isinstance(images, np.ndarray) and not (images.dtype == object and images.ndim == 1):
        # (an array of objects, a DataFrame column's to_numpy(), is a list of images: below)
        if images.ndim == 2:
            raise ValueError(f"an array of shape {images.shape} is one image: pass [image], a stack "
                             "(N, H, W) or (N, H, W, 3), or a list of images")
        if images.ndim == 3 and images.shape[-1] == 3:
            raise ValueError(f"an array of shape {images.shape} is one RGB image, or a stack of gray images 3 "
                             "pixels wide: pass [image] for one image, a stack (N, H, W, 3), or a list of images")
        if images.ndim not in (3, 4):
            raise ValueError(f"expected a stack (N, H, W) or (N, H, W, 3) or a list of images, got shape {images.shape}")
        check_image(np.empty(images.shape[1:], images.dtype) if images.shape[0] == 0 else images[0])  # all share it
        return ImageBatch.stacked(images)
    if isinstance(images, (str, bytes, os.PathLike)) or not (hasattr(images, "__iter__")
                                                             or hasattr(images, "__getitem__")):
        # (None gave Python's own TypeError, and a path was taken for images, a character each)
        raise ValueError(f"expected a stack (N, H, W) or (N, H, W, 3) or a list of images, got {type(images).__name__}"
                         + (": gpu_pipeline.run reads files" if isinstance(images, (str, os.PathLike)) else ""))
    images = list(images)
    for index, image in enumerate(images):
        try:
            check_image(image)
        except ValueError as exc:
            raise ValueError(f"image {index}: {exc}") from None
        if type(image) is not np.ndarray:  # a subclass's own arithmetic (a masked array's mask) changed
            images[index] = np.asarray(image)  # the reference backend's results; a stack is a plain copy too
    return images


def process(images: Sequence[np.ndarray], *, backend: str = "auto", threads: int | None = None,
            low: float = PipelineConfig.low_threshold, high: float = PipelineConfig.high_threshold,
            l2: bool = False, blur: int = PipelineConfig.blur_ksize, keep_images: bool = False,
            model: str | None = None) -> Results:
    """Run the pipeline on uint8 gray (H, W) or RGB (H, W, 3) images in memory.

    Images of any mix of shapes go to the backend in its own batch sizes; the results are the
    same bytes as ``gpu-pipeline run`` on the same pixels. ``model`` labels with a model file or
    a shipped model (``eurosat``, ``eurosat-cnn``) instead of the default rule.

    A stack of same-shape images as one array, ``(N, H, W)`` gray or ``(N, H, W, 3)`` RGB, goes to
    the backend as it lies in memory, with no Python object per image (a list of the same tiles
    costs about 2 us an image more on the numba backend, on one thread or two).
    """
    config = _pipeline_config(low, high, l2, blur)
    keep_images = _flag("keep_images", keep_images)
    labels_of = _labeller(model, config)
    images = _checked_images(images)
    chosen = shared_backend(backend, threads)
    parts = [_processed(chosen, images[start:end], config, keep_images)
             for start, end in _slices(pixel_counts(images), chosen.batch_pixels())]
    histograms = np.concatenate([p.histograms for p in parts]) if parts else np.zeros((0, 256), np.int64)
    edge_counts = np.concatenate([p.edge_counts for p in parts]) if parts else np.zeros(0, np.int64)
    labels = list(labels_of(images, histograms, edge_counts)) if images else []
    kept = (lambda name: [im for p in parts for im in getattr(p, name)]) if keep_images else (lambda name: None)
    return Results(histograms, edge_counts, labels, kept("equalized"), kept("edges"))


def read_image(path: str | os.PathLike | bytes, *, bands: Sequence[int] | int | str | None = None,
               stretch: str = DecodeOptions.stretch) -> np.ndarray:
    """The image ``run`` computes on for the file ``path`` with these ``bands`` and ``stretch``: uint8
    gray (H, W) or RGB (H, W, 3), C-contiguous. ``process([read_image(path)], keep_images=True)`` then
    gives ``run``'s record for it, and its equalized image and edge map, whatever the file holds
    (16-bit samples, a palette, many bands), where Pillow or tifffile would give other pixels.

    Raises :class:`DecodeError` (``stage``, and a message without the path) where the file cannot
    become an image: where ``run`` writes an error record for it, with its stage and message, and
    for a file that does not exist (which ``run`` refuses); ValueError for bad arguments, as ``run``.
    """
    from gpu_pipeline.inputs.decode import decode_image

    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ValueError(f"path must be a file name (str, bytes or os.PathLike), got {path!r}")
    (name,) = _given_paths(path)
    return decode_image(name, DecodeOptions(bands=_bands(bands), stretch=stretch))


def _processed(backend: Backend, images: Sequence[np.ndarray], config: PipelineConfig,
               keep_images: bool):
    """``backend.process``; :class:`DeviceFailed` when the GPU failed for good (as :func:`run` raises)."""
    try:
        return backend.process(images, config, keep_images)
    except Exception as error:
        raise_if_device_failed(backend, error)
        raise


def _slices(pixels: np.ndarray, batch_pixels: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, end) runs of images of ``pixels`` pixels each, at most ``batch_pixels``
    pixels a run (or one image): one search a run, none an image."""
    ends = np.cumsum(pixels)
    start = before = 0
    while start < len(pixels):
        end = max(start + 1, int(np.searchsorted(ends, before + batch_pixels, side="right")))
        yield start, end
        start, before = end, int(ends[end - 1])


def run(paths: str | os.PathLike | bytes | Iterable[str | os.PathLike | bytes], *, backend: str = "auto",
        threads: int | None = None, workers: int | None = None, low: float = PipelineConfig.low_threshold,
        high: float = PipelineConfig.high_threshold, l2: bool = False, blur: int = PipelineConfig.blur_ksize,
        bands: Sequence[int] | int | str | None = None, stretch: str = DecodeOptions.stretch,
        model: str | os.PathLike | None = None, glob: str | None = None, decode: str = "auto",
        decode_timeout: float | None = None) -> Iterator[dict]:
    """Yield one record per image file under ``paths`` (files and folders, searched recursively):
    the dicts ``gpu-pipeline run`` writes, results and errors, in input order. A file name that is
    not valid UTF-8 is as the command line writes it: ``path`` shows its bytes as ``\\xNN`` and
    ``path_bytes`` holds them exactly, in base64.

    ``paths``: one path (str, bytes or os.PathLike) or a list of them. ``bands``: 1-based band numbers,
    three (RGB) or one (gray): ``(4, 3, 2)``, ``"4,3,2"`` as the command line spells them, or ``1``.
    ``decode_timeout``: seconds (1 to 86,400) an image may take to read and decode; one that takes
    longer gets an error record instead (its decode process is killed; every image is then decoded
    in a decode process, Linux only), as ``--decode-timeout``; None, no limit.

    The arguments are checked when ``run`` is called (ValueError naming the bad one); the files are
    found at the first record. The records are made in the caller's thread, a batch at a time, while
    the engine's own threads compute the next batch and decode ahead; closing the generator early
    stops them after the batches in flight.
    """
    batches = _record_batches(paths, backend, threads, workers, low, high, l2, blur, bands, stretch, model, glob,
                              decode, decode_timeout)
    return _records(batches)


def run_batches(paths: str | os.PathLike | bytes | Iterable[str | os.PathLike | bytes], *, backend: str = "auto",
                threads: int | None = None, workers: int | None = None,
                low: float = PipelineConfig.low_threshold, high: float = PipelineConfig.high_threshold,
                l2: bool = False, blur: int = PipelineConfig.blur_ksize, bands: Sequence[int] | int | str | None = None,
                stretch: str = DecodeOptions.stretch, model: str | os.PathLike | None = None, glob: str | None = None,
                decode: str = "auto", decode_timeout: float | None = None) -> Iterator[Batch]:
    """:func:`run`, a :class:`Batch` of arrays at a time instead of a record a file: the same files,
    results and errors, in input order, a batch for each call of the backend (about 1 MP of pixels a
    call on the CPU backends, 32 MP on the GPU ones). Takes :func:`run`'s arguments, checked when it
    is called. Where a program wants the numbers rather than the dicts (a DataFrame, a model), this
    spends no Python per file on them: a tile's 256 histogram counts as Python ints cost more of the
    GIL than the engine's own work on it (docs/benchmarks.md, "Fifteenth round").
    """
    batches = _record_batches(paths, backend, threads, workers, low, high, l2, blur, bands, stretch, model, glob,
                              decode, decode_timeout)
    return _batches(batches)


def _records(batches: Iterator[RecordBatch]) -> Iterator[dict]:
    from gpu_pipeline.outputs.sink import as_written

    with contextlib.closing(batches):  # closed with this generator: the engine stops
        for batch in batches:
            yield from as_written(batch)  # a name that is not UTF-8 as the command line writes it


def _batches(batches: Iterator[RecordBatch]) -> Iterator[Batch]:
    with contextlib.closing(batches):  # closed with this generator: the engine stops
        for batch in batches:
            yield Batch.of(batch)


def _record_batches(paths, backend, threads, workers, low, high, l2, blur, bands, stretch, model, glob, decode,
                    decode_timeout) -> Iterator[RecordBatch]:
    """The engine's record batches for :func:`run`'s arguments, checked now (ValueError naming the
    bad one); the files are found, and the engine started, at the first batch."""
    config = _pipeline_config(low, high, l2, blur)
    backend = _backend_name(backend)
    if threads is not None:
        threads = whole_number("threads", threads, least=1, most=MOST_THREADS)
    if workers is not None:
        workers = whole_number("workers", workers, least=1, most=MOST_THREADS)
    given = _given_paths(paths)
    if glob is not None and not (isinstance(glob, str) and glob):
        raise ValueError(f"glob must be a file name pattern such as '*.tif', got {glob!r}")
    decode_options = DecodeOptions(bands=_bands(bands), stretch=stretch)
    processes = _decode_processes(decode)
    processes = _processes_for_time_limit(processes, decode_timeout, workers)
    labels_of = _labeller(model, config)
    return _engine_batches(given, glob, backend, threads, workers, config, decode_options, processes, labels_of,
                           decode_timeout)


def _engine_batches(paths: list[str], glob: str | None, backend: str, threads: int | None, workers: int | None,
                    config: PipelineConfig, decode_options: DecodeOptions, processes: bool | None,
                    labels_of, decode_timeout: float | None) -> Iterator[RecordBatch]:
    """:func:`_record_batches`, its arguments checked."""
    from gpu_pipeline.engine.decoding import early_fork_server
    from gpu_pipeline.engine.stream import Engine
    from gpu_pipeline.inputs.discover import find_files, unlisted_warning

    unlisted: list[tuple[str, str]] = []
    files = find_files(paths, glob=glob, unlisted=unlisted)
    for folder, reason in unlisted:  # (its images get no record: say so, as the command line does)
        warnings.warn(unlisted_warning(folder, reason), PipelineWarning, stacklevel=3)  # (the caller's loop)
    fork_server = early_fork_server(processes, len(files), workers)  # imports while the backend loads
    try:
        engine = Engine(backend=shared_backend(backend, threads), config=config, decode_options=decode_options,
                        workers=workers, processes=processes, labels_of=labels_of, fork_server=fork_server,
                        decode_timeout=decode_timeout)
    except BaseException:
        if fork_server is not None:
            fork_server.close()
        raise
    started_in = os.getpid()
    with contextlib.closing(engine.record_batches(files)) as batches:  # closed with this generator
        for batch in batches:
            yield batch
            _in_process(started_in)


def _in_process(started_in: int) -> None:
    """RuntimeError in a process forked from the one that started the run: its next batch would be
    waited for for ever (the engine's threads are the parent's)."""
    if os.getpid() != started_in:
        raise RuntimeError(f"this run was started in process {started_in}: a forked child cannot go on with it "
                           "(its engine stayed in that process); start a run of the child's own")


# ---------------------------------------------------------------- the arguments, checked as the API names them


def _pipeline_config(low, high, l2, blur) -> PipelineConfig:
    return PipelineConfig(low_threshold=low, high_threshold=high, l2_gradient=_flag("l2", l2), blur_ksize=blur)


def _flag(name: str, value) -> bool:
    """``value`` as a bool: True or False (NumPy's too), not any value that is true or false
    (``l2="false"`` switched L2 on)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _given_paths(paths) -> list[str]:
    """``paths`` (one path or several) as names: bytes decoded as ``os.fsdecode`` does; ValueError
    for anything else, or an empty name (``Path("")`` is the current folder, which it walked)."""
    if isinstance(paths, (str, bytes, os.PathLike)):  # one path, not its characters
        paths = [paths]
    try:
        given = list(paths)
    except TypeError:
        raise ValueError(f"paths must be a file or folder name or a list of them, got {paths!r}") from None
    names = []
    for path in given:
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise ValueError(f"paths: {path!r} is not a file or folder name (str, bytes or os.PathLike)")
        name = os.fsdecode(path)
        if not name:
            raise ValueError("paths: an empty path (a shell variable left unset?); name '.' for the current folder")
        names.append(name)
    return names


def _bands(bands) -> tuple[int, ...] | None:
    """``bands`` as 1-based band numbers: a sequence, one int, or the command line's ``"4,3,2"``."""
    if bands is None:
        return None
    if isinstance(bands, str):
        try:
            bands = tuple(int(part) for part in bands.split(","))
        except ValueError:
            raise ValueError(f"bands takes 1-based band numbers such as (4, 3, 2), \"4,3,2\" or 1, got {bands!r}") from None
    elif isinstance(bands, numbers.Integral) and not isinstance(bands, bool):
        bands = (bands,)
    else:
        try:
            bands = tuple(bands)
        except TypeError:
            raise ValueError(f"bands takes 1-based band numbers such as (4, 3, 2), \"4,3,2\" or 1, got {bands!r}") from None
    if len(bands) not in (1, 3):
        raise ValueError(f"bands takes 1 or 3 band numbers, got {len(bands)}: {bands!r}")
    bands = tuple(whole_number("each of bands", band) for band in bands)
    if any(band < 1 for band in bands):
        raise ValueError(f"band numbers are 1-based and must be >= 1, got {bands!r}")
    return bands


def _decode_processes(decode) -> bool | None:
    """``decode`` as the engine's ``processes``: None (auto), False (threads), True (processes)."""
    from gpu_pipeline.inputs.processes import DECODE_MODES, available

    if not isinstance(decode, str) or decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "processes" and not available():
        raise ValueError("decode='processes' needs Linux (memfd_create and descriptor passing); use decode='threads'")
    return None if decode == "auto" else decode == "processes"


def _processes_for_time_limit(processes: bool | None, decode_timeout, workers: int | None) -> bool | None:
    """``processes`` as a decode time limit leaves it; with a limit, checked now that this process
    may open the files its decode processes need (a run would refuse at its first record)."""
    from gpu_pipeline.engine.decoding import decoder_count, decodes_in_processes, processes_for_time_limit

    processes = processes_for_time_limit(processes, decode_timeout, "decode_timeout")
    if decode_timeout is not None:
        decodes_in_processes(processes, 0, decoder_count(workers), "decode_timeout")
    return processes


def _labeller(model, config: PipelineConfig):
    """The labeller of ``model`` (None: the default rule); ValueError (a ModelError, saying why) when
    it is not a model that can label with these settings."""
    from gpu_pipeline.labels.labeller import label_function

    if model is None:
        return label_function(None)
    if not isinstance(model, (str, bytes, os.PathLike)) or not os.fsdecode(model):
        raise ValueError(f"model must be a model file or a shipped model's name (eurosat, eurosat-cnn), got {model!r}")
    name = os.fsdecode(model)
    # numba imported, the model's kernels compiled, once, beyond a Ctrl-C's reach
    _loaded(_models, name, lambda: _warm_model(name, f"model={model!r}")).result()
    labels_of = label_function(name)
    labels_of.__self__.check_config(config, named=_keywords, used="these settings are")
    return labels_of


def _warm_model(name: str, keyword: str) -> None:
    from gpu_pipeline.labels.labeller import label_function, model_module, warm_up_labeller

    model_module(keyword)  # (said in the keyword's words where numba cannot be imported)
    warm_up_labeller(label_function(name))


def _in_own_thread(work) -> Future:
    """``work()``, started in a thread of its own: what it returns or raises, when done. The caller's
    wait for it stops at a Ctrl-C; the work goes on (see :func:`shared_backend`)."""
    done = Future()
    threading.Thread(target=_into, args=(done, work), name=_LOADING, daemon=True).start()
    return done


_LOADING = "gpu-pipeline loading"


def _into(done: Future, work) -> None:
    try:
        done.set_result(work())
    except BaseException as exc:
        done.set_exception(exc)


def _keywords(config: PipelineConfig) -> str:
    return (f"low={threshold_text(config.low_threshold)}, high={threshold_text(config.high_threshold)}, "
            f"l2={config.l2_gradient}, blur={config.blur_ksize}")
