"""What `pip install ".[cuda13]"` gives a new user: a stack whose numba-cuda can load its array support.

numba-cuda 0.30.4 (the newest release) registers ``np.row_stack``, which numpy 2.5 removed; Python 3.12
and later resolve numpy 2.5 unless the extras bound it (issue #20). CI runs Python 3.11, where numpy 2.4
is the newest anyway, so this resolves the extras for the newer Pythons found here (pyenv puts them in
``$(pyenv root)/versions``, or name one with ``GPU_PIPELINE_PACKAGING_PYTHON``). A dry run only: about
12 s each, nothing installed. ``scripts/check_cuda_install.py`` installs the resolved stack in a venv and
imports numba-cuda's array support (minutes and a few hundred MB: not run in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Python versions whose newest numpy is 2.5 or later; the extras must still resolve numpy < 2.5.
NEWER_PYTHONS = ("3.12", "3.13")
#: pip's words for "the index could not be reached": the test is skipped, not failed, offline.
OFFLINE_SIGNS = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                 "ConnectTimeout", "Max retries exceeded", "Name or service not known")


def _python(version: str) -> str | None:
    """An interpreter of ``version`` (major.minor) on this machine, or None."""
    candidates = []
    if os.environ.get("GPU_PIPELINE_PACKAGING_PYTHON"):
        candidates.append(os.environ["GPU_PIPELINE_PACKAGING_PYTHON"])
    pyenv = shutil.which("pyenv")
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    if pyenv and not root.is_dir():
        root = Path(subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip())
    candidates += sorted(str(p) for p in root.glob(f"versions/{version}.*/bin/python{version}"))
    candidates.append(shutil.which(f"python{version}") or "")
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, check=False)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


def resolve_extra(python: str, extra: str, tmp_path: Path) -> dict[str, str]:
    """Distribution name -> version that ``pip install ".[extra]"`` would install with ``python``."""
    report = tmp_path / f"report-{extra}.json"
    done = subprocess.run(
        [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         f".[{extra}]"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    if done.returncode != 0:
        if any(sign in done.stderr for sign in OFFLINE_SIGNS):
            pytest.skip(f"the package index cannot be reached: {done.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip could not resolve .[{extra}] for {python}:\n{done.stderr[-3000:]}")
    installed = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installed}


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


@pytest.mark.slow
@pytest.mark.parametrize("version", NEWER_PYTHONS)
def test_the_cuda13_extra_resolves_a_numpy_that_numba_cuda_can_load(version, tmp_path):
    python = _python(version)
    if python is None:
        pytest.skip(f"no Python {version} here (pyenv install {version}, or set GPU_PIPELINE_PACKAGING_PYTHON)")
    resolved = resolve_extra(python, "cuda13", tmp_path)
    assert "numba-cuda" in resolved, resolved
    assert _release(resolved["numpy"]) < (2, 5), (
        f"Python {version} resolves numpy {resolved['numpy']} with numba-cuda {resolved['numba-cuda']}: "
        "numba-cuda 0.30.4 cannot import its array support on numpy 2.5 (np.row_stack)")


def test_both_cuda_extras_bound_numpy_below_2_5():
    """The bound is in both GPU extras (cuda12 resolves like cuda13; one dry run is enough for CI)."""
    import tomllib
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("cuda12", "cuda13"):
        assert "numpy<2.5" in [requirement.replace(" ", "") for requirement in extras[extra]], extra


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory):
    """The wheel ``pip install .`` builds, and everything pip printed while building it (``-v``: pip 23
    hides the build backend's warnings, pip 25 and later print them to every user)."""
    out = tmp_path_factory.mktemp("wheel")
    # a copy without build/: setuptools puts whatever an earlier build left there into the wheel
    source = out / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", "out"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--wheel-dir", str(out), str(source)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    if done.returncode != 0:
        if any(sign in done.stdout + done.stderr for sign in OFFLINE_SIGNS):
            pytest.skip("the package index cannot be reached to fetch setuptools for the build")
        pytest.fail(f"pip wheel failed:\n{(done.stdout + done.stderr)[-3000:]}")
    (wheel,) = out.glob("gpu_pipeline-*.whl")
    return wheel, done.stdout + done.stderr


@pytest.mark.slow
def test_the_wheel_builds_without_warnings(built_wheel):
    """No deprecation (setuptools stops building a ``license = {text = ...}`` table from 2027-02-18)
    and no "Package ... is absent from the packages configuration" for each sample folder."""
    _, output = built_wheel
    warnings = [line.strip() for line in output.splitlines()
                if "Warning" in line and "Location 'file:" not in line]  # pip's notes on local indexes
    assert not warnings, "\n".join(warnings[:10])


@pytest.mark.slow
def test_the_wheel_ships_the_sample_set_models_kernels_and_licence(built_wheel):
    """`pip install . && gpu-pipeline run` (the README's first line) runs on the files the wheel carries."""
    import zipfile

    wheel, _ = built_wheel
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    data = REPO / "data"
    samples = {f"gpu_pipeline/sample_data/{p.relative_to(data).as_posix()}"
               for p in data.rglob("*") if p.is_file()}
    assert samples and samples <= names, sorted(samples - names)[:10]
    for shipped in ("gpu_pipeline/labels/models/eurosat.json", "gpu_pipeline/labels/models/eurosat-cnn.json",
                    "gpu_pipeline/backends/cupy_pipeline.cu", "cpu_reference/stages.py"):
        assert shipped in names, shipped
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in metadata.splitlines()


def test_the_supported_pythons_and_the_parquet_floor():
    """Python 3.10 (past its end of life since 2026-10) resolves pyarrow 25 at most, which cannot read
    back the Parquet output's error rows: the project needs 3.11 and pyarrow 26 wherever pyarrow is."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    pyarrows = [requirement.split("#")[0].replace(" ", "") for extra in project["optional-dependencies"].values()
                for requirement in extra if requirement.startswith("pyarrow")]
    assert pyarrows and set(pyarrows) == {"pyarrow>=26"}


def test_the_wheels_carried_to_the_gpu_machine_hold_numpy_below_2_5():
    """The lent GPU machine has numpy 2.5 and no imagecodecs; scripts/device_env.sh puts the carried
    numpy first on the path, so it must be one that numba-cuda can load with."""
    fetched = (REPO / "scripts" / "fetch_gpu_wheels.sh").read_text()
    assert '"numpy>=2.4,<2.5"' in fetched and " imagecodecs " in fetched


def test_ci_runs_the_other_supported_pythons():
    """The README says CI runs `.ci/pythons` on 3.12 and 3.13 after the whole suite on 3.11 (CI's
    python3): the step stays in `.ci/run`, with those versions, the package's classifiers name the
    same Pythons, and the script names only test files that exist (pytest would stop on a missing
    one, but only on a machine that has the Python)."""
    import re
    import tomllib

    assert re.search(r"^\.ci/pythons$", (REPO / ".ci" / "run").read_text(), re.MULTILINE)
    script = (REPO / ".ci" / "pythons").read_text()
    assert "GPU_PIPELINE_EXAMPLES=0.5 " in script and "half of them on 3.12 and 3.13 (`GPU_PIPELINE_EXAMPLES=0.5`" \
        in " ".join((REPO / "README.md").read_text(encoding="utf-8").split())  # (the README says so)
    others = re.search(r"versions=\(([\d. ]+)\)", script).group(1).split()
    assert others == ["3.12", "3.13"]
    classifiers = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["classifiers"]
    named = [c.rsplit(" ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert named == ["3.11", *others]
    listed = re.findall(r"tests/test_\w+\.py", script)
    assert len(listed) >= 10 and all((REPO / name).is_file() for name in listed), listed



def test_ci_runs_the_readmes_first_command_in_a_fresh_copy():
    """The README says CI runs its first command (install, then the main job on the bundled sample
    data), not only the test command: `.ci/run` takes it from the README, as it takes the test
    command, and runs it in a copy of the checkout without the test command's .venv."""
    script = (REPO / ".ci" / "run").read_text()
    assert "/<!-- run-command -->/" in script and "/<!-- test-command -->/" in script
    assert 'tar --exclude=./.venv --exclude=./.git -cf - . | tar -xf - -C "$fresh"' in script
    assert '(cd "$fresh" && bash -euo pipefail -c "$run_command")' in script
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "CI runs the first command in a fresh copy of the checkout" in readme

def test_ci_tests_one_python_with_the_numpy_that_pip_install_dot_gives():
    """The README: CI's 3.12 gets the cuda extra (numpy held below 2.5), 3.13 the test extra alone,
    so numpy 2.5, what `pip install .` gives on 3.12 and later; CI's 3.11 never sees numpy 2.5."""
    import re
    import subprocess

    readme = " ".join((REPO / "README.md").read_text().split())
    assert "3.12 (with the `cuda13` extra, so numpy 2.4) and 3.13 (with `test` alone, so numpy 2.5" in readme
    extras = {}
    for version in ("3.12", "3.13"):
        run = subprocess.run(["bash", "-c", f'source <(sed -n "/^extras()/,/^}}/p" .ci/pythons); extras {version}'],
                             cwd=REPO, capture_output=True, text=True, check=True)
        extras[version] = run.stdout.strip()
    assert extras == {"3.12": "test,cuda13", "3.13": "test"}
    assert 'pip install -q --disable-pip-version-check -e ".[$(extras "$version")]"' in \
        (REPO / ".ci" / "pythons").read_text()
