"""``gpu-pipeline verify``: run backends side by side and prove they give the reference's bytes.

Every image is decoded once; each chunk of images goes to the reference (the ground truth) and
then, in one call per chunk, to each backend under test. Per image and backend, five stages are
compared exactly: histogram, equalized, edges, edge_count and label. A difference is reported
with its first differing pixel (or histogram bin) and both values; a backend that raises on an
image is an error for that image, and the run goes on. ``--against-opencv`` adds OpenCV, the
contract's definition, as one more row compared with the reference.

Exit status: 0 when every compared stage is identical, 1 on any difference, error or backend
that failed to start, 2 on usage errors (raised as :class:`~gpu_pipeline.errors.UsageError`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpu_pipeline import __version__
from gpu_pipeline.backends import registry
from gpu_pipeline.backends.base import Backend, DeviceFailed, StageResult, check_image, raise_if_device_failed
from gpu_pipeline.labels.labeller import Labeller, attach_label_model_or_close, default_labels, label_function
from gpu_pipeline.config import DecodeOptions, PipelineConfig, threshold_text
from gpu_pipeline.engine.decoding import Decoded, decode_parts, decodes_in_processes, processes_for_time_limit
from gpu_pipeline.engine.stream import part_batches
from gpu_pipeline.errors import UsageError, counted, one_line, shown
from gpu_pipeline.outputs.files import check_target, is_our_json, replace_with_report
from gpu_pipeline.inputs.discover import discover, no_files_found

GROUND_TRUTH = "reference"
OPENCV = "opencv"
STAGES = ("histogram", "equalized", "edges", "edge_count", "label")
#: How a backend that could not be created is reported (its status is "failed", as a GPU that failed during the run).
COULD_NOT_START = "could not start"
REPORT_SCHEMA = "gpu-pipeline-verify/1"
#: Differences and errors printed on the console; the JSON report has all of them.
MAX_PRINTED = 20
#: Pixels per chunk. A chunk holds the images, the reference's outputs and one backend's outputs.
CHUNK_PIXELS = 16 * 1024 * 1024
#: cv2.calcHist counts in float32, exact only below 2**24.
_FLOAT32_EXACT = 1 << 24


class OpenCvOracle(Backend):
    """The contract's OpenCV calls (docs/contract.md), image by image: the independent oracle."""

    name = OPENCV

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import cv2  # noqa: F401
        except Exception as exc:
            return (f"OpenCV (cv2) cannot be imported ({one_line(exc)}); "
                    "install it with: pip install opencv-python-headless")
        return None

    def process(self, images: Sequence[np.ndarray], config: PipelineConfig,
                keep_images: bool = False) -> list[StageResult]:
        import cv2

        k = config.blur_ksize
        cv2.ipp.setUseIPP(False)  # for this thread: see docs/contract.md, "What OpenCV does internally"
        results = []
        for image in images:
            check_image(image)
            gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            equalized = cv2.equalizeHist(gray)
            blurred = cv2.GaussianBlur(equalized, (k, k), 0)
            edges = cv2.Canny(blurred, config.low_threshold, config.high_threshold, apertureSize=3,
                              L2gradient=config.l2_gradient)
            results.append(StageResult(
                histogram=_cv_histogram(gray), edge_count=int(cv2.countNonZero(edges)),
                equalized=equalized if keep_images else None, edges=edges if keep_images else None,
            ))
        return results


def _cv_histogram(gray: np.ndarray) -> np.ndarray:
    """``cv2.calcHist`` as int64, summed over row slices small enough for its float32 counts."""
    import cv2

    rows = max(1, _FLOAT32_EXACT // gray.shape[1])
    histogram = np.zeros(256, np.int64)
    for top in range(0, gray.shape[0], rows):
        piece = np.ascontiguousarray(gray[top:top + rows])
        histogram += cv2.calcHist([piece], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return histogram


# --- comparing one stage ------------------------------------------------------------------------


@dataclass
class Difference:
    """One stage of one image where a backend's output is not the reference's.

    ``kind`` says what differs: ``pixels`` (``first`` is ``{"row", "col"}``), ``bins`` (``first``
    is ``{"bin"}``), ``value`` (edge_count, label), ``shape``, ``dtype``, ``missing`` (not
    returned) or ``invalid`` (cannot be compared; ``actual`` holds the error). ``expected`` is the
    reference's value, ``actual`` the backend's; ``count`` how many pixels or bins differ.
    """

    image: str
    backend: str
    stage: str
    kind: str
    expected: Any = None
    actual: Any = None
    first: dict | None = None
    count: int | None = None

    def describe(self) -> str:
        """One line naming the stage, where it differs and both values."""
        truth, other = f"{GROUND_TRUTH} {self.expected}", f"{self.backend} {self.actual}"
        if self.kind == "pixels":
            where = f"(row {self.first['row']}, col {self.first['col']})"
            return f"{self.stage}: {_differ(self.count, 'pixel')}, first at {where}: {truth}, {other}"
        if self.kind == "bins":
            return f"{self.stage}: {_differ(self.count, 'bin')}, first bin {self.first['bin']}: {truth}, {other}"
        if self.kind == "missing":
            return f"{self.stage}: not returned by {self.backend} (asked for with keep_images=True)"
        if self.kind == "invalid":
            return f"{self.stage}: cannot be compared: {self.actual}"
        if self.kind == "value":
            return f"{self.stage}: {truth}, {other}"
        return f"{self.stage}: {self.kind} {truth}, {other}"  # shape or dtype


def _differ(n: int, what: str) -> str:
    return f"1 {what} differs" if n == 1 else f"{n} {what}s differ"


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _compare_arrays(expected: np.ndarray, actual: Any, kind: str) -> dict | None:
    """None when identical, else the fields of a Difference (first differing element, C order)."""
    if actual is None:
        return {"kind": "missing"}
    if not isinstance(actual, np.ndarray):
        return {"kind": "invalid", "actual": f"a {type(actual).__name__}, not a NumPy array"}
    if actual.shape != expected.shape:
        return {"kind": "shape", "expected": list(expected.shape), "actual": list(actual.shape)}
    if actual.dtype != expected.dtype:
        return {"kind": "dtype", "expected": str(expected.dtype), "actual": str(actual.dtype)}
    mismatch = expected != actual
    if not mismatch.any():
        return None
    index = np.unravel_index(int(np.argmax(mismatch)), mismatch.shape)
    first = {"row": int(index[0]), "col": int(index[1])} if kind == "pixels" else {"bin": int(index[0])}
    return {"kind": kind, "first": first, "count": int(np.count_nonzero(mismatch)),
            "expected": expected[index].item(), "actual": actual[index].item()}


def _compare_values(expected: Any, actual: Any) -> dict | None:
    """None when equal and of the same type (a NumPy integer counts as an int), else a Difference's fields."""
    expected, actual = (int(v) if isinstance(v, np.integer) else v for v in (expected, actual))
    if type(actual) is type(expected) and actual == expected:
        return None
    return {"kind": "value", "expected": expected,
            "actual": actual if isinstance(actual, (int, str)) else repr(actual)}


@dataclass
class _Truth:
    """The reference's outputs for one image, with the label they give."""

    result: StageResult
    label: str


def compare_result(truth: _Truth, result: StageResult, label: Callable[[], str]) -> dict[str, dict | None]:
    """Per stage: None when the backend's output is identical, else the fields of a Difference."""
    comparisons: dict[str, Callable[[], dict | None]] = {
        "histogram": lambda: _compare_arrays(truth.result.histogram, result.histogram, "bins"),
        "equalized": lambda: _compare_arrays(truth.result.equalized, result.equalized, "pixels"),
        "edges": lambda: _compare_arrays(truth.result.edges, result.edges, "pixels"),
        "edge_count": lambda: _compare_values(truth.result.edge_count, result.edge_count),
        "label": lambda: _compare_values(truth.label, label()),
    }
    outcome = {}
    for stage, compare in comparisons.items():
        try:
            outcome[stage] = compare()
        except Exception as exc:  # a malformed result must not stop the comparison of the others
            outcome[stage] = {"kind": "invalid", "actual": one_line(exc)}
    return outcome


# --- the report ---------------------------------------------------------------------------------


@dataclass
class BackendTally:
    """What happened to one backend (or the OpenCV oracle) during the run."""

    name: str
    role: str  # "backend" or "oracle"
    status: str  # "compared", "unavailable" or "failed" (available but could not start, or its GPU failed)
    reason: str | None = None
    images: int = 0  # images compared, all stages
    errors: int = 0  # images on which it raised
    stages: dict[str, dict[str, int]] = field(
        default_factory=lambda: {stage: {"identical": 0, "differs": 0} for stage in STAGES})

    @property
    def differs(self) -> int:
        return sum(counts["differs"] for counts in self.stages.values())


@dataclass
class VerifyReport:
    """Everything ``verify`` found; ``to_json`` is the ``--report`` file (schema in docs/verify.md)."""

    config: PipelineConfig
    decode_options: DecodeOptions
    backends: list[BackendTally]
    found: int = 0
    decoded: int = 0
    compared: int = 0
    differences: list[Difference] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    decode_errors: list[dict] = field(default_factory=list)
    #: ``(folder, reason)`` for each folder under the inputs that could not be listed: its images
    #: were not compared (a warning, as for ``run``; the verdict is on the images compared).
    unlisted: list[tuple[str, str]] = field(default_factory=list)
    #: The label model as given (a file or a shipped model's name) and the SHA-256 of its file; None: the default rule.
    model: dict | None = None
    #: The other arguments, so that the report says how to run it again: paths and glob, threads and chunking.
    inputs: dict = field(default_factory=dict)
    execution: dict = field(default_factory=dict)

    @property
    def failed_backends(self) -> list[BackendTally]:
        return [tally for tally in self.backends if tally.status == "failed"]

    @property
    def exit_status(self) -> int:
        """1 on any difference, error or failed start; else 2 when nothing was compared; else 0."""
        if self.differences or self.errors or self.failed_backends:
            return 1
        return 2 if self.compared == 0 else 0

    def to_json(self) -> dict:
        return {
            "schema": REPORT_SCHEMA,
            "gpu_pipeline_version": __version__,
            "identical": self.exit_status == 0,
            "exit_status": self.exit_status,
            "ground_truth": GROUND_TRUTH,
            "stages": list(STAGES),
            "config": asdict(self.config),
            "decode": {"bands": list(self.decode_options.bands) if self.decode_options.bands else None,
                       "stretch": self.decode_options.stretch, "max_pixels": self.decode_options.max_pixels},
            "model": self.model,
            "inputs": self.inputs,
            "execution": self.execution,
            "images": {"found": self.found, "decoded": self.decoded, "compared": self.compared},
            "backends": [asdict(tally) for tally in self.backends],
            "differences": [asdict(difference) for difference in self.differences],
            "errors": self.errors,
            "decode_errors": self.decode_errors,
            "unlisted": [{"folder": folder, "reason": reason} for folder, reason in self.unlisted],
        }


# --- choosing what to compare -------------------------------------------------------------------


def parse_backend_list(text: str | None) -> list[str] | None:
    """``"numba, cuda"`` -> ``["numba", "cuda"]``; None means every registered backend."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise UsageError(f"--backends takes comma-separated backend names such as numba,cuda, got {text!r}")
    known = registry.backend_names()
    unknown = [name for name in names if name not in known]
    if unknown:
        hint = ("; OpenCV is no backend: add --against-opencv to compare with it"
                if any(name.lower() in ("opencv", "cv2") for name in unknown) else "")
        raise UsageError(f"unknown backend {', '.join(map(repr, unknown))}; known: {', '.join(known)}{hint}")
    return list(dict.fromkeys(names))


def plan_backends(requested: list[str] | None, against_opencv: bool) -> list[BackendTally]:
    """The rows of the comparison: available backends to run, unavailable ones with their reason.

    A backend named explicitly in ``requested`` must be able to run (else UsageError, exit 2);
    from the default set (every registered backend) unavailable ones are listed, not run.
    """
    reason = registry.unavailable_reason(GROUND_TRUTH)
    if reason is not None:
        raise UsageError(f"the {GROUND_TRUTH} backend, the ground truth, cannot run: {reason}")
    tallies = []
    for name in requested if requested is not None else registry.backend_names():
        if name == GROUND_TRUTH:
            continue
        reason = registry.unavailable_reason(name)
        if reason is not None and requested is not None:
            raise UsageError(f"backend {name!r} is unavailable here: {reason}")
        tallies.append(BackendTally(name, "backend", "unavailable" if reason else "compared", reason))
    if against_opencv:
        reason = OpenCvOracle.unavailable_reason()
        if reason is not None:
            raise UsageError(f"--against-opencv: {reason}")
        tallies.append(BackendTally(OPENCV, "oracle", "compared"))
    if not any(tally.status == "compared" for tally in tallies):
        unavailable = "; ".join(f"{t.name}: {t.reason}" for t in tallies)
        raise UsageError("no available backend to compare with the reference"
                         + (f" ({unavailable})" if unavailable else "")
                         + "; name one with --backends or add --against-opencv")
    return tallies


def _start(tallies: list[BackendTally], threads: int | None) -> dict[str, Backend]:
    """Instances of the backends to compare; one that fails to start is marked ``failed``."""
    started = {}
    for tally in tallies:
        if tally.status != "compared":
            continue
        try:
            started[tally.name] = OpenCvOracle() if tally.role == "oracle" else registry.create(
                tally.name, threads=threads)
        except Exception as exc:
            tally.status, tally.reason = "failed", f"{COULD_NOT_START}: {one_line(exc)}"
    return started


# --- running ------------------------------------------------------------------------------------


@dataclass
class Verifier:
    """Compares each chunk of decoded images, backend by backend, with the reference."""

    reference: Backend
    backends: dict[str, Backend]
    config: PipelineConfig
    report: VerifyReport
    labels_of: Labeller = default_labels

    def run_chunk(self, chunk: list[Decoded]) -> None:
        for item in chunk:
            if item.error is not None:
                self.report.decode_errors.append(
                    {"image": item.error["path"], "stage": item.error["stage"], "error": item.error["error"]})
        decoded = [item for item in chunk if item.image is not None]
        self.report.decoded += len(decoded)
        truths = self._truths(decoded)
        compared = [(item, truth) for item, truth in zip(decoded, truths) if truth is not None]
        self.report.compared += len(compared)
        if not compared:
            return
        images = [item.image for item, _ in compared]
        tallies = {tally.name: tally for tally in self.report.backends}
        for name, backend in self.backends.items():
            if tallies[name].status == "failed":
                continue  # its GPU failed: every later call would fail alike
            try:
                outcomes = _outputs(backend, images, self.config)
            except DeviceFailed as exc:  # (the images compared before keep their verdict)
                tallies[name].status, tallies[name].reason = "failed", str(exc)
                continue
            # Each backend's labels come from its own outputs, in one call of the labeller.
            labels = _batch_labels(self.labels_of, images, outcomes)
            for (item, truth), outcome, label in zip(compared, outcomes, labels):
                self._record(tallies[name], str(item.path), truth, outcome, label)

    def _truths(self, decoded: list[Decoded]) -> list[_Truth | None]:
        truths: list[_Truth | None] = []
        images = [item.image for item in decoded]
        outcomes = _outputs(self.reference, images, self.config)
        for item, outcome, label in zip(decoded, outcomes, _batch_labels(self.labels_of, images, outcomes)):
            if isinstance(outcome, BaseException):
                self.report.errors.append(
                    {"image": str(item.path), "backend": GROUND_TRUTH, "error": one_line(outcome)})
                truths.append(None)
                continue
            truths.append(_Truth(outcome, label()))
        return truths

    def _record(self, tally: BackendTally, image_name: str, truth: _Truth,
                outcome: StageResult | BaseException, label: Callable[[], str]) -> None:
        if isinstance(outcome, BaseException):
            tally.errors += 1
            self.report.errors.append({"image": image_name, "backend": tally.name, "error": one_line(outcome)})
            return
        tally.images += 1
        for stage, difference in compare_result(truth, outcome, label).items():
            tally.stages[stage]["differs" if difference else "identical"] += 1
            if difference:
                self.report.differences.append(Difference(image_name, tally.name, stage, **difference))


def _batch_labels(labels_of: Labeller, images: list[np.ndarray], outcomes: list[StageResult | BaseException]
                  ) -> list[Callable[[], str]]:
    """For each outcome, a function that gives its label (or raises what labelling it raised).

    The labeller runs once over the results that look well-formed; when that call fails (a
    malformed result, say), each image is labelled alone, so only the culprits show the error.
    """
    def features(chosen: list[int]) -> tuple:
        """The label features the backend computed on its device, as the labeller's fourth argument."""
        if chosen and all(outcomes[i].label_features is not None for i in chosen):
            return (np.stack([outcomes[i].label_features for i in chosen]),)
        return ()

    def alone(i: int) -> Callable[[], str]:
        def label() -> str:
            result = outcomes[i]
            return labels_of([images[i]], np.asarray(result.histogram, dtype=np.int64).reshape(1, 256),
                             np.array([result.edge_count], dtype=np.int64), *features([i]))[0]
        return label

    done = [i for i, outcome in enumerate(outcomes) if not isinstance(outcome, BaseException)]
    labelled: list[Callable[[], str]] = [alone(i) for i in range(len(outcomes))]
    try:
        found = labels_of([images[i] for i in done],
                          np.array([outcomes[i].histogram for i in done], dtype=np.int64).reshape(len(done), 256),
                          np.array([outcomes[i].edge_count for i in done], dtype=np.int64), *features(done))
    except Exception:
        return labelled
    for i, label in zip(done, found):
        labelled[i] = lambda label=label: label
    return labelled


def _outputs(backend: Backend, images: list[np.ndarray], config: PipelineConfig
             ) -> list[StageResult | BaseException]:
    """One call for the whole chunk; if it raises, image by image, so only the culprits get the error.
    :class:`DeviceFailed` when the backend's GPU failed for good."""
    try:
        outcomes = list(backend.process(images, config, keep_images=True))
    except Exception as exc:
        raise_if_device_failed(backend, exc)  # no image's fault
        if len(images) == 1:
            return [exc]
        return [outcome for image in images for outcome in _outputs(backend, [image], config)]
    if len(outcomes) != len(images):
        return [RuntimeError(f"returned {len(outcomes)} results for {len(images)} images")] * len(images)
    return outcomes


def run_verify(*, paths: list[Path], requested: list[str] | None, against_opencv: bool,
               config: PipelineConfig, decode_options: DecodeOptions, glob: str | None, threads: int | None,
               batch_size: int, workers: int, report_path: Path | None,
               progress: Callable[[int, int], None] | None = None, model: str | None = None,
               decode_timeout: float | None = None, console: Console | None = None) -> VerifyReport:
    """Plan and run a verification (``report_path`` is checked before the first image); the caller
    writes the JSON report (:func:`write_report`), prints it and exits.

    ``progress(n, total)`` is called after each chunk of ``n`` files. Labels come from the default
    rule, or from ``model`` (a model file or a shipped model's name, checked against ``config``);
    either way each backend's labels are computed from that backend's own outputs. With
    ``decode_timeout`` (seconds, ``--decode-timeout``) files are decoded in ``workers`` decode
    processes, and one that takes longer than that is skipped as a decode error, as ``run`` does.
    With ``console``, the backends' kernels are loaded first, a compile announced there as ``run``
    does (a first verify after install sat at 0 images for 15-20 s without a word).
    """
    processes = processes_for_time_limit(None, decode_timeout) is True  # (a bad limit: UsageError)
    labels_of = label_function(model, config)
    tallies = plan_backends(requested, against_opencv)
    unlisted: list[tuple[str, str]] = []
    files = discover(paths, glob=glob, unlisted=unlisted)
    if not files:
        raise no_files_found(paths, glob, unlisted)
    if processes:  # (where this process may not open the files they need: UsageError)
        decodes_in_processes(True, len(files), workers, "--decode-timeout")
    model_file = None
    if model is not None:  # (the model module imports numba: not without a model)
        from gpu_pipeline.labels.model import resolve_model_path

        model_file = resolve_model_path(model)
    if report_path is not None:  # now rather than after a long run; only a report of ours is replaced
        check_target(report_path, "--report", is_our_json, [*files, *([model_file] if model_file else [])])
    report = VerifyReport(
        config, decode_options, tallies, found=len(files), unlisted=unlisted,
        model=None if model_file is None else {
            "given": str(model), "sha256": hashlib.sha256(model_file.read_bytes()).hexdigest()},
        inputs={"paths": [str(path) for path in paths], "glob": glob},
        execution={"threads": threads, "workers": workers, "batch_size": batch_size, "decode_timeout": decode_timeout})
    reference = registry.create(GROUND_TRUTH, threads=threads)
    started = _start(tallies, threads)
    for name, backend in list(started.items()):  # a GPU backend may run the label model on its device
        failed = attach_label_model_or_close(backend, labels_of)
        if failed is not None:  # its GPU failed as it took the model: as one that could not start
            _could_not_start(name, failed, started, tallies)
    try:
        if console is not None:
            _warm_up(started, tallies, config, console)
        verifier = Verifier(reference, started, config, report, labels_of)
        parts = decode_parts(files, decode_options, workers, prefetch=batch_size + 2 * workers, processes=processes,
                             consumer_pixels=CHUNK_PIXELS, time_limit=decode_timeout)
        with contextlib.closing(parts):  # (the decoders stop, and their processes end, whatever happens)
            for batch in part_batches(parts, batch_size, CHUNK_PIXELS):
                chunk = list(batch.one_by_one())
                verifier.run_chunk(chunk)
                if progress is not None:
                    progress(len(chunk), len(files))
    finally:
        for backend in [reference, *started.values()]:
            with backend:  # (closed; a failed GPU's close raises nothing more)
                pass
    return report


def _could_not_start(name: str, failure: BaseException, started: dict[str, Backend],
                     tallies: list[BackendTally]) -> None:
    """Backend ``name`` is left out (closed already), marked ``failed`` for ``failure``."""
    del started[name]
    tally = next(tally for tally in tallies if tally.name == name)
    tally.status, tally.reason = "failed", f"{COULD_NOT_START}: {one_line(failure)}"


def _warm_up(started: dict[str, Backend], tallies: list[BackendTally], config: PipelineConfig,
             console: Console) -> None:
    """Load (or compile, saying so first) each backend's kernels, as ``run`` does before its images;
    one whose warm-up fails (its GPU) is as one that could not start."""
    from gpu_pipeline.engine.job import warm_up_backend

    for name, backend in list(started.items()):
        try:
            warm_up_backend(backend, config, console)
        except Exception as exc:
            with backend:  # (closed; a failed GPU's close raises nothing more)
                pass
            _could_not_start(name, exc, started, tallies)


def write_report(report: VerifyReport, report_path: Path) -> None:
    """The JSON report into ``report_path`` (checked by :func:`run_verify` before the first image);
    UsageError when it cannot be written (a full disk), for the caller to say after the table."""
    replace_with_report(report_path, "--report", report.to_json())


# --- printing -----------------------------------------------------------------------------------


def _cell(counts: dict[str, int]) -> str:
    if counts["differs"]:
        return f"[red]{counts['differs']:,} differ"
    return "[green]identical" if counts["identical"] else "[dim]-"


def comparison_table(report: VerifyReport) -> Table:
    """Backend x stage: identical, or on how many images a stage differs."""
    config = report.config
    table = Table(
        title=f"{counted(report.compared, 'image')} compared with the {GROUND_TRUTH} backend (ground truth)",
        caption=f"Canny {threshold_text(config.low_threshold)}/{threshold_text(config.high_threshold)} "
                f"{'L2' if config.l2_gradient else 'L1'}, blur {config.blur_ksize}"
                + (f"; {OPENCV}: the contract's cv2 calls, an independent oracle"
                   if any(t.role == "oracle" for t in report.backends) else ""),
        box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False,
    )
    table.add_column("backend", overflow="fold")  # a long name wraps, the verdicts never do
    for stage in STAGES:
        table.add_column(stage, no_wrap=True, min_width=max(len(stage), len("identical")))
    table.add_column("errors", justify="right", no_wrap=True, min_width=len("errors"))
    for tally in report.backends:
        if tally.status == "compared":
            errors = f"[red]{tally.errors:,}" if tally.errors else "0"
            table.add_row(tally.name, *(_cell(tally.stages[stage]) for stage in STAGES), errors)
        else:
            status = "[yellow]n/a" if tally.status == "unavailable" else "[red]failed"
            table.add_row(f"[dim]{tally.name}", *[status] * len(STAGES), "")
    return table


def _problem_lines(report: VerifyReport) -> list[str]:
    lines = [f"[red]error[/] {shown(e['image'])}  {e['backend']} raised {escape(e['error'])}"
             for e in report.errors]
    lines += [f"[red]differs[/] {shown(d.image)}  {d.backend}  {escape(d.describe())}"
              for d in report.differences]
    return lines


def _printed_capped(console: Console, lines: list[str], what: str, report_path: Path | None) -> None:
    for line in lines[:MAX_PRINTED]:
        console.print(line)
    if len(lines) > MAX_PRINTED:
        where = f"all in {shown(str(report_path))}" if report_path else "--report FILE.json lists them all"
        console.print(f"... and {len(lines) - MAX_PRINTED:,} more {what} ({where})")


def _summary(report: VerifyReport) -> str:
    compared = [t.name for t in report.backends if t.status == "compared"]
    if report.exit_status == 2:
        return f"[red bold]NOTHING COMPARED[/]: none of the {report.found:,} files could be decoded"
    if report.exit_status == 0:
        return (f"[green bold]IDENTICAL[/]: every stage ({', '.join(STAGES)}) of {_and(compared)} is identical "
                f"to the {GROUND_TRUTH} on " + ("its one image" if report.compared == 1 else f"all {report.compared:,} images"))
    images = {d.image for d in report.differences} | {e["image"] for e in report.errors}
    reference_errors = sum(e["backend"] == GROUND_TRUTH for e in report.errors)
    per_backend = [f"{GROUND_TRUTH} ({counted(reference_errors, 'error')})"] if reference_errors else []
    for tally in report.backends:
        parts = [counted(tally.differs, "difference")] if tally.differs else []
        parts += [counted(tally.errors, "error")] if tally.errors else []
        if tally.status == "failed":
            parts.append("failed to start" if (tally.reason or "").startswith(COULD_NOT_START) else "its GPU failed")
        if parts:
            per_backend.append(f"{tally.name} ({', '.join(parts)})")
    return (f"[red bold]DIFFERENT[/]: {counted(len(report.differences), 'difference')} and "
            f"{counted(len(report.errors), 'error')} on {len(images):,} of {report.decoded:,} images: "
            + "; ".join(per_backend))


def print_report(console: Console, report: VerifyReport, report_path: Path | None) -> None:
    """The table, the backends not verified and why, the first problems, decode errors, a summary."""
    console.print(comparison_table(report))
    for tally in report.backends:
        if tally.status != "compared":
            console.print(f"[yellow]not verified[/]: {tally.name}: {tally.status}: {escape(tally.reason or '')}")
    _printed_capped(console, _problem_lines(report), "differences and errors", report_path)
    decode_lines = [f"[yellow]skipped[/] {shown(e['image'])}: {e['stage']} error: {escape(e['error'])}"
                    for e in report.decode_errors]
    _printed_capped(console, decode_lines, "decode errors", report_path)
    console.print(_summary(report))
    if report_path is not None:
        console.print(f"report: {shown(str(report_path))}")
