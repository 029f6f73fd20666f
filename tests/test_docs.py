"""The README and docs/ name files, links and modules that exist: a move or a rename that leaves a doc
behind fails here."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FILE_SUFFIXES = (".py", ".md", ".cu", ".cuh", ".json", ".sh", ".toml")
TOP_FOLDERS = ("gpu_pipeline/", "cpu_reference/", "tests/", "scripts/", "docs/", "data/", ".ci/")
#: Files of other projects that the docs cite by name (read them, they are not ours).
OTHER_PROJECTS = {"_canny.py", "canny.cpp", "histogram.cpp", "smooth.dispatch.cpp"}


def _repo_files() -> set[str]:
    skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}
    return {path.relative_to(REPO).as_posix() for path in REPO.rglob("*")
            if path.is_file() and not skip.intersection(path.relative_to(REPO).parts)}


FILES = _repo_files()
NAMES = {Path(name).name for name in FILES}


def _exists(token: str) -> bool:
    """A path in a doc: from the repository root, or inside the package (``backends/base.py``)."""
    token = token.rstrip("/")
    if token.endswith("/__pycache__"):  # Python makes it on first import: its folder is what must exist
        token = token[: -len("/__pycache__")]
    for candidate in (token, f"gpu_pipeline/{token}"):
        if candidate in FILES or (REPO / candidate).is_dir():
            return True
    return False


def _code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def _path_tokens(span: str) -> list[str]:
    """The file paths in one code span: words with a ``/`` under one of our folders or with a file suffix."""
    tokens = []
    for word in re.split(r"[\s,()|:=]+", span):
        word = word.strip("'\".;")
        if not word or "*" in word or "<" in word or word.startswith(("/", "..", "~", "http")):
            continue
        ours = word.startswith(TOP_FOLDERS) or (word.endswith(FILE_SUFFIXES) and "/" in word)
        if ours:
            tokens.append(word)
    return tokens


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_relative_link_points_to_a_file(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        if not (doc.parent / target).exists():
            missing.append(target)
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_file_path_in_code_spans_exists(doc: Path) -> None:
    missing = []
    for span in _code_spans(doc.read_text(encoding="utf-8")):
        for token in _path_tokens(span):
            if not _exists(token):
                missing.append(token)
        for word in re.findall(r"(?<![\w/.-])([\w.-]+\.(?:py|cu))\b", span):
            if word not in NAMES and word not in OTHER_PROJECTS:
                missing.append(word)
    assert not missing, f"{doc.name} names files that do not exist: {sorted(set(missing))}"


def _resolves(dotted: str) -> bool:
    """``gpu_pipeline.a.b.name``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            continue
        target = importlib.import_module(module_name)
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_module_named_in_a_doc_exists(doc: Path) -> None:
    names = set(re.findall(r"\b(?:gpu_pipeline|cpu_reference)(?:\.\w+)+", doc.read_text(encoding="utf-8")))
    missing = sorted(name for name in names if not _resolves(name))
    assert not missing, f"{doc.name} names modules or attributes that do not exist: {missing}"


def _tests() -> set[str]:
    """The test modules' names and the test functions they define."""
    modules = sorted((REPO / "tests").glob("test_*.py"))
    return {path.stem for path in modules} | {name for path in modules for name in
                                              re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_test_named_in_a_doc_exists(doc: Path) -> None:
    """A doc that cites a test as its evidence (contract.md: ``test_opencv_paths_agree``) names one there is."""
    missing = sorted(set(re.findall(r"\btest_\w+", doc.read_text(encoding="utf-8"))) - _tests())
    assert not missing, f"{doc.name} names tests that do not exist: {missing}"


def test_the_checks_catch_a_moved_file_and_a_moved_module() -> None:
    """The oracles themselves: an old flat path and an old module name are reported missing."""
    assert _path_tokens("gpu_pipeline/engine.py") == ["gpu_pipeline/engine.py"]
    assert not _exists("gpu_pipeline/engine.py") and not _exists("gpu_pipeline/io.py")
    assert _exists("gpu_pipeline/engine/stream.py") and _exists("backends/base.py")
    assert not _resolves("gpu_pipeline.sinks.read_records")
    assert _resolves("gpu_pipeline.outputs.plan.read_records")


def test_architecture_page_names_every_stage_folder() -> None:
    """docs/architecture.md keeps up with the package: each subpackage has its row."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    folders = sorted(path.parent.name for path in (REPO / "gpu_pipeline").glob("*/__init__.py"))
    absent = [folder for folder in folders if f"gpu_pipeline/{folder}/" not in text]
    assert not absent, f"docs/architecture.md does not mention {absent}"


@pytest.mark.parametrize("scale, expected", [(None, 60), ("20", 1200), ("0.001", 1)])
def test_the_examples_scale_multiplies_hypothesis_counts(scale, expected):
    """README: GPU_PIPELINE_EXAMPLES multiplies every hypothesis test's example count."""
    env = {key: value for key, value in os.environ.items() if key != "GPU_PIPELINE_EXAMPLES"}
    if scale is not None:
        env["GPU_PIPELINE_EXAMPLES"] = scale
    code = ("from tests.strategies import examples; from tests import test_numba_cpu as t; "
            "print(examples(60), t.test_random_batches_match_reference._hypothesis_internal_use_settings.max_examples)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.stdout.split() == [str(expected), str(150 if scale is None else max(1, round(150 * float(scale))))], done.stderr


def _drawn(profile: str | None) -> str:
    """What a hypothesis test draws in a fresh process, where ``tests/conftest.py`` loads ``profile``."""
    env = {key: value for key, value in os.environ.items() if key != "GPU_PIPELINE_HYPOTHESIS"}
    if profile is not None:
        env["GPU_PIPELINE_HYPOTHESIS"] = profile
    code = ("import tests.conftest; from hypothesis import given, settings, strategies as st\n"
            "drawn = []\n"
            "@settings(max_examples=20, database=None)\n"
            "@given(st.integers(0, 1 << 64))\n"
            "def draw(value): drawn.append(value)\n"
            "draw(); print(drawn)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_ci_draws_the_same_hypothesis_examples_every_run_and_other_runs_new_ones():
    """README: CI's examples are the same on every run (``GPU_PIPELINE_HYPOTHESIS=ci``, which
    ``.ci/run`` sets for itself and ``.ci/pythons``); any other run draws new ones."""
    import re

    assert re.search(r"^export GPU_PIPELINE_HYPOTHESIS=ci$", (REPO / ".ci" / "run").read_text(), re.MULTILINE)
    assert "the same examples on every run (`GPU_PIPELINE_HYPOTHESIS=ci`" in " ".join(
        (REPO / "README.md").read_text(encoding="utf-8").split())
    assert _drawn("ci") == _drawn("ci")
    assert _drawn(None) != _drawn(None)


#: Figures the docs state that no behaviour test pins (the tests set them to small values to run
#: fast): (page, its words, module, constant, the value those words mean).
FIGURES = [
    ("nightly.md", "no workers for 60 s", "gpu_pipeline.engine.distributed", "NO_WORKERS_TIMEOUT_S", 60),
    ("nightly.md", "a line longer than 1 MiB", "gpu_pipeline.outputs.lines", "LONGEST_LINE", 1 << 20),
    ("nightly.md", "a file of more than 1 MiB, read piece by piece", "gpu_pipeline.inputs.decode", "SMALL_FILE_BYTES",
     1 << 20),
    ("nightly.md", "untouched for a minute", "gpu_pipeline.outputs.files", "STALE_AFTER_S", 60),
    ("nightly.md", "waits for room with: about 0.25 megapixels", "gpu_pipeline.engine.decoding",
     "DECODE_CHUNK_PIXELS", 256 << 10),
    ("nightly.md", "about 0.25 megapixels (1 for a decode process)", "gpu_pipeline.engine.decoding",
     "PROCESS_CHUNK_PIXELS", 1 << 20),
    ("nightly.md", "Images of 256 K pixels or more (on average) are decoded in threads all the same",
     "gpu_pipeline.engine.decoding", "PROCESS_DECODE_BELOW_PIXELS", 256 << 10),
    ("nightly.md", "if its decoding holds 4 MB or more", "gpu_pipeline.inputs.limits", "BUDGETED_FROM_BYTES", 4 << 20),
    ("verify.md", "of at most `--batch-size` images and 16 megapixels", "gpu_pipeline.diagnostics.verify",
     "CHUNK_PIXELS", 16 << 20),
    ("backends.md", "`HYSTERESIS_MAX_LAUNCHES` = 44 launches", "gpu_pipeline.backends._cuda_plan",
     "HYSTERESIS_MAX_LAUNCHES", 44),
    ("backends.md", "`HYSTERESIS_MAX_ROUNDS` = 4 rounds of 8", "gpu_pipeline.backends.cupy_gpu",
     "HYSTERESIS_MAX_ROUNDS", 4),
    ("backends.md", "The host queues a round of 8 launches", "gpu_pipeline.backends.cupy_gpu",
     "HYSTERESIS_LAUNCHES_PER_ROUND", 8),
    ("backends.md", "a grid of 8 blocks per SM", "gpu_pipeline.backends.cupy_gpu", "HYSTERESIS_BLOCKS_PER_SM", 8),
    ("backends.md", "`min(64 MiB, 0.8 * (free + held) / 2)`", "gpu_pipeline.backends.cupy_gpu",
     "SUB_BATCH_TARGET_BYTES", 64 << 20),
    ("backends.md", "`min(64 MiB, 0.8 * (free + held) / 2)`", "gpu_pipeline.backends.cupy_gpu", "MEMORY_FRACTION", 0.8),
    ("backends.md", "Device arenas grow in 2 MiB steps", "gpu_pipeline.backends.cupy_gpu", "ARENA_GRANULE", 2 << 20),
    ("backends.md", "at most 2^30 pixels per image", "gpu_pipeline.backends.cupy_gpu", "MAX_PIXELS", 2**30),
    ("backends.md", "at most 8 Mpixel", "gpu_pipeline.backends._cuda_plan", "TARGET_PIXELS_PER_SUB_BATCH", 8 << 20),
    ("backends.md", "at most `0.7 * (free + held) / 2` device bytes", "gpu_pipeline.backends._cuda_plan",
     "MEMORY_FRACTION", 0.7),
    ("backends.md", "1 / (`ITEMS_PER_THREAD` = 4 x threads)", "gpu_pipeline.backends.numba_cpu", "ITEMS_PER_THREAD", 4),
    ("backends.md", "`MIN_BAND_ROWS` = 64 rows", "gpu_pipeline.backends.numba_cpu", "MIN_BAND_ROWS", 64),
    ("labels.md", "for a fixed 300 iterations", "gpu_pipeline.labels.model", "ITERATIONS", 300),
    ("labels.md", "algorithm 7.4, 10 pairs", "gpu_pipeline.labels.model", "MEMORY", 10),
    ("labels.md", "in strips of whole rows (about 65,000 pixels", "gpu_pipeline.labels.features", "STRIP_PIXELS", 1 << 16),
    ("distributed.md", "The client checks every 5 s", "gpu_pipeline.engine.distributed", "SLOTS_REFRESH_SECONDS", 5),
]


@pytest.mark.parametrize("doc, words, module, name, value", FIGURES, ids=[figure[3] for figure in FIGURES])
def test_a_figure_a_doc_states_is_the_codes(doc, words, module, name, value):
    text = " ".join((REPO / "docs" / doc).read_text(encoding="utf-8").split())
    assert words in text, f"docs/{doc} no longer says {words!r}: update FIGURES"
    assert getattr(importlib.import_module(module), name) == value, f"docs/{doc} says {words!r}"


#: Pages whose command lines are held to the command line's options here (the others name commands
#: of scripts and clusters, held by their own tests).
COMMAND_PAGES = ["README.md", "docs/nightly.md", "docs/verify.md", "docs/contract.md"]


def _shown_commands(text: str) -> list[str]:
    """What follows ``gpu-pipeline`` in a page's commands: ``$ gpu-pipeline ...`` in console blocks, any
    ``gpu-pipeline ...`` in bash and cron blocks, and code spans that start with ``gpu-pipeline ``."""
    found = []
    for language, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        pattern = {"console": r"^\$ gpu-pipeline (.*)", "bash": r"(?:^|[\s/])gpu-pipeline (.*)",
                   "cron": r"(?:^|[\s/])gpu-pipeline (.*)"}.get(language)
        found += [match.group(1) for line in body.splitlines() if pattern and (match := re.search(pattern, line))]
    return found + re.findall(r"`gpu-pipeline ([^`\n]+)`", text)


def _arguments(command: str) -> list[str]:
    """A shown command's arguments: the shell's part (a comment, ``;``, a redirection, a pipe) cut off,
    ``$(date +%F)`` a date, an optional ``[--plot FILE]`` given."""
    import shlex

    command = re.split(r"\s+#|;|\s>>|\s2>|\s\|", command)[0]
    return shlex.split(command.replace("$(date +%F)", "2026-12-07").replace("[", "").replace("]", ""))


def test_every_command_a_page_shows_parses_with_the_command_lines_options():
    """README.md, docs/nightly.md, docs/verify.md: the commands they show (the nightly command, the
    cron line, the verify examples...) name options that exist and values they take: an option
    renamed or removed, or a value no longer taken, leaves a doc's command behind and fails here."""
    import typer.main

    from gpu_pipeline.cli import app

    group = typer.main.get_command(app)
    shown, broken = 0, []
    for page in COMMAND_PAGES:
        for command in _shown_commands((REPO / page).read_text(encoding="utf-8")):
            name, *arguments = _arguments(command)
            if name not in group.commands:
                broken.append(f"{page}: gpu-pipeline {command}: no command {name!r}")
                continue
            try:
                group.commands[name].make_context(name, list(arguments)).close()  # (it empties the list it is given)
            except Exception as error:  # click's usage errors (typer carries a copy of click from 0.28 on)
                if arguments:  # (a bare `gpu-pipeline fit` names the command, it is no command line)
                    broken.append(f"{page}: gpu-pipeline {command}: {getattr(error, 'format_message', error.__str__)()}")
            shown += 1
    assert shown >= 30 and not broken, broken  # (the pages show about 35)


def test_the_pages_that_show_verify_against_opencv_say_how_to_install_opencv(monkeypatch):
    """`pip install .` installs no OpenCV: the README's first verify command, `gpu-pipeline verify
    --against-opencv`, exited 2 on a fresh install, and neither page said OpenCV was needed."""
    from gpu_pipeline.diagnostics.verify import OpenCvOracle

    monkeypatch.setitem(sys.modules, "cv2", None)  # (import cv2 raises, as where it is not installed)
    install = re.search(r"pip install \S+", OpenCvOracle.unavailable_reason()).group(0)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    verify_section = readme[readme.index("## Verify your machine"):readme.index("## Scale")]
    verify_md = (REPO / "docs" / "verify.md").read_text(encoding="utf-8")
    for page, text in (("README.md", verify_section), ("docs/verify.md", verify_md)):
        assert f"`{install}`" in text, page


def test_the_readme_says_how_to_install_every_extra():
    """A fresh `pip install .` has none of the extras: `--format parquet` (the README's usage shows it)
    and `evaluate --plot` (its labels section shows it) exited 2 asking for a package the README never
    named, where it names `pip install ".[dask]"` and the cuda extras."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [extra for extra in extras if extra != "test" and f'pip install ".[{extra}]"' not in readme]
    assert missing == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_docs_install_extras_from_the_checkout(doc):
    """gpu-pipeline is installed from its checkout (`pip install .`), no package index holds it:
    docs/distributed.md's `pip install 'gpu-pipeline[dask]'` "on every worker" found no distribution
    on a worker without gpu-pipeline. An extra is installed as the README installs it, `".[dask]"`."""
    assert not re.findall(r"pip install [^`\n]*gpu-pipeline\[", doc.read_text(encoding="utf-8"))
