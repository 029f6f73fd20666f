"""``gpu-pipeline info``: versions, backends with reasons, GPU, CPU threads and numba setup, for people and machines."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpu_pipeline import __version__
from gpu_pipeline.diagnostics import info
from gpu_pipeline.engine import cores
from gpu_pipeline.backends import registry
from gpu_pipeline.cli import app
from tests.backend_doubles import NeverAvailable

runner = CliRunner()


@pytest.fixture
def unavailable_backend():
    registry.register(NeverAvailable.name, lambda: NeverAvailable, "test backend")
    yield NeverAvailable
    registry.unregister(NeverAvailable.name)


def test_a_backend_that_fails_to_import_gives_one_line_and_a_cpu_backend_that_fails_to_start_its_error():
    """registry: a backend whose module cannot be imported is unavailable in one line (an error message
    of several lines broke info's table and the exit-2 line); a CPU backend that fails as it starts is
    a bug to see whole, its own error, not a BackendUnavailable (which the command line turns into a
    one-line exit 2, as for a GPU another process holds)."""
    from gpu_pipeline.backends import BackendUnavailable
    from gpu_pipeline.backends.reference import ReferenceBackend

    def broken_import():
        raise ImportError("libfoo.so: cannot open shared object file\nsecond line of the loader")

    class Failing(ReferenceBackend):
        def __init__(self, threads=None):
            raise RuntimeError("a bug in the backend")

    registry.register("broken-import", broken_import)
    registry.register("failing-cpu", lambda: Failing)
    try:
        assert registry.unavailable_reason("broken-import") == (
            "cannot import: ImportError: libfoo.so: cannot open shared object file")
        with pytest.raises(RuntimeError, match="a bug in the backend") as caught:
            registry.create("failing-cpu")
        assert not isinstance(caught.value, BackendUnavailable)
    finally:
        registry.unregister("broken-import")
        registry.unregister("failing-cpu")


def info_json() -> dict:
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_lists_versions_and_every_backend_with_its_reason(unavailable_backend):
    found = info_json()
    assert found["gpu_pipeline"] == __version__
    assert found["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert set(info.PACKAGES) <= set(found["packages"])
    for name in ("numpy", "numba", "pillow", "tifffile", "imagecodecs", "typer", "rich"):
        assert found["packages"][name]["version"] == importlib.metadata.version(name)
    assert [b["name"] for b in found["backends"]] == registry.backend_names()
    for backend in found["backends"]:
        reason = registry.unavailable_reason(backend["name"])
        assert backend == {"name": backend["name"], "available": reason is None, "reason": reason}
    assert {"name": NeverAvailable.name, "available": False, "reason": NeverAvailable.REASON} in found["backends"]


def test_json_describes_cpu_numba_and_gpu():
    import numba

    found = info_json()
    assert found["cpu"]["logical_cores"] == os.cpu_count()
    assert 1 <= found["cpu"]["usable_cores"] <= os.cpu_count()
    from gpu_pipeline.engine.cores import usable_cores

    pool = numba.config.NUMBA_NUM_THREADS  # the label models' prange kernels use at most the usable cores
    assert found["numba"]["threads"] == (pool if "NUMBA_NUM_THREADS" in os.environ else min(pool, usable_cores()))
    assert found["numba"]["threading_layer"] == numba.threading_layer()
    assert os.path.isdir(found["numba"]["cache_dir"])
    gpu = found["gpu"]
    assert (gpu["devices"] == []) == (gpu["reason"] is not None)


def test_human_output_names_packages_backends_and_threads(unavailable_backend):
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    words = " ".join(result.stdout.split())  # table cells may wrap
    assert f"numpy {importlib.metadata.version('numpy')}" in words
    for name in registry.backend_names():
        assert name in result.stdout
    assert f"unavailable: {NeverAvailable.REASON}" in words
    assert "threading layer" in result.stdout and "GPU" in result.stdout
    numba_info = info_json()["numba"]  # verify.md: "numba cache: FOLDER (set NUMBA_CACHE_DIR to choose another)"
    origin = "from NUMBA_CACHE_DIR" if numba_info["cache_dir_from_env"] else "set NUMBA_CACHE_DIR to choose another"
    assert f"numba cache: {numba_info['cache_dir']} ({origin})\n" in result.stdout


def test_human_output_reads_as_verify_mds_sample(monkeypatch):
    """docs/verify.md: the first line names the version, Python and platform; "GPU: none: REASON"
    without a GPU, else one line per device (name, compute capability, total and free memory, SMs)
    and the driver's version; numba's threads and threading layer, with the one requested."""
    import platform

    found = info_json()
    assert found["python"] == {"version": platform.python_version(), "implementation": platform.python_implementation()}
    assert found["platform"] == platform.platform()
    monkeypatch.setattr(info, "gpu_info", lambda: {"devices": [], "reason": "no usable CUDA GPU (test)",
                                                   "driver_version": None})
    lines = runner.invoke(app, ["info"]).stdout.splitlines()
    assert lines[0] == (f"gpu-pipeline {__version__} on {platform.python_implementation()} "
                        f"{platform.python_version()}, {platform.platform()}")
    assert "GPU: none: no usable CUDA GPU (test)" in lines
    numba_info = found["numba"]
    assert (f"numba: {numba_info['threads']} threads, threading layer {numba_info['threading_layer']} "
            f"(requested: {numba_info['threading_layer_requested']})") in lines
    device = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
              "memory_total_bytes": 80 << 30, "memory_free_bytes": 79 << 30, "multiprocessors": 132}
    monkeypatch.setattr(info, "gpu_info", lambda: {"devices": [device], "reason": None, "driver_version": "13.0"})
    lines = runner.invoke(app, ["info"]).stdout.splitlines()
    line = "GPU 0: NVIDIA H100 80GB HBM3, compute capability 9.0, 80.0 GiB (79.0 GiB free), 132 SMs"
    assert line in lines and lines[lines.index(line) + 1] == "CUDA driver: 13.0"


@pytest.mark.parametrize("args, message", [(["--bogus"], "No such option: --bogus"),
                                           (["extra"], "unexpected extra argument"),
                                           (["--json", "yes"], "unexpected extra argument")])
def test_bad_arguments_exit_2_and_print_nothing(args, message):
    result = runner.invoke(app, ["info", *args])
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_versions_come_from_package_metadata_without_importing_the_packages():
    """verify.md: "CuPy is never imported just to print its version" (nor the others: an import of
    CuPy or OpenCV takes seconds, and may fail where the version still shows)."""
    code = ("import sys; from gpu_pipeline.diagnostics import info; info.package_versions(); "
            "print(sorted(m for m in ('cupy', 'cv2', 'dask', 'pyarrow', 'skimage', 'numba') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr


def test_missing_packages_are_reported_not_installed(monkeypatch):
    monkeypatch.setattr(info, "PACKAGES", {**info.PACKAGES, "nonesuch": ("nonesuch-dist-xyz",)})
    assert info.package_versions()["nonesuch"] == {"distribution": None, "version": None}
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0 and "not installed" in result.stdout


def test_numba_environment_settings_are_reported(tmp_path):
    """A fresh process, since numba reads its environment once, at import."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_THREADING_LAYER": "workqueue",
           "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "info", "--json"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    numba_info = json.loads(proc.stdout)["numba"]
    from gpu_pipeline.backends._numba_setup import kernel_source_digest  # kernels go to a folder per source digest

    keyed = str(tmp_path / "cache" / f"kernels-{kernel_source_digest()}")
    assert numba_info == {"threads": 1, "threading_layer_requested": "workqueue", "threading_layer": "workqueue",
                          "cache_dir": keyed, "cache_dir_from_env": True}


def test_the_cuda_simulator_is_not_reported_as_a_gpu():
    """verify.md: under NUMBA_ENABLE_CUDASIM=1, info says the simulator is not a GPU."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    proc = subprocess.run([sys.executable, "-m", "gpu_pipeline.cli", "info", "--json"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    gpu = json.loads(proc.stdout)["gpu"]
    assert (gpu["devices"], gpu["reason"]) == ([], "NUMBA_ENABLE_CUDASIM=1: the CUDA simulator is not a GPU")


def test_human_output_counts_the_cores():
    found = info_json()
    result = runner.invoke(app, ["info"])
    cpu = found["cpu"]
    assert f"CPU: {cpu['logical_cores']} logical cores ({cpu['physical_cores']} physical), {cpu['usable_cores']} " \
           "usable by this process" in result.stdout


def test_physical_cores_count_each_core_once_whatever_its_hardware_threads(tmp_path):
    """Hand-worked: four logical CPUs, two cores of two hyperthreads each (0 with 2, 1 with 3; the
    listing's order is the kernel's), an offline fifth without a topology, and a file that is no CPU."""
    for cpu, siblings in {"cpu0": "0,2", "cpu1": "1,3", "cpu2": "0,2", "cpu3": "1,3"}.items():
        (tmp_path / cpu / "topology").mkdir(parents=True)
        (tmp_path / cpu / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    (tmp_path / "cpu4").mkdir()
    (tmp_path / "cpufreq").mkdir()
    (tmp_path / "online").write_text("0-3\n")
    assert cores.physical_cores(str(tmp_path)) == 2
    (tmp_path / "cpu1" / "topology" / "thread_siblings_list").write_text("1\n")  # (3 offline: 1 alone)
    (tmp_path / "cpu3" / "topology" / "thread_siblings_list").write_text("3\n")
    assert cores.physical_cores(str(tmp_path)) == 3
    assert cores.physical_cores(str(tmp_path / "missing")) is None  # (not Linux)


def test_memory_usable_by_the_run_and_its_control_group_limit(monkeypatch):
    """verify.md's ``memory`` keys, and the line: what bounds the large images a run decodes at once."""
    from gpu_pipeline.diagnostics import info

    found = info_json()["memory"]
    assert found["usable_bytes"] == min(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
                                        found["limit_bytes"] or 1 << 62)
    monkeypatch.setattr(info, "usable_memory", lambda: 700 << 20)
    monkeypatch.setattr(info, "memory_limit", lambda: 700 << 20)
    assert "memory: 0.7 GiB usable by this process (control group memory limit: 0.7 GiB)" in runner.invoke(
        app, ["info"]).stdout
    monkeypatch.setattr(info, "usable_memory", lambda: 24 << 30)
    monkeypatch.setattr(info, "memory_limit", lambda: None)
    assert "memory: 24.0 GiB usable by this process\n" in runner.invoke(app, ["info"]).stdout


@pytest.mark.gpu
def test_a_real_gpu_is_described():
    gpu = info_json()["gpu"]
    assert gpu["reason"] is None and gpu["devices"]
    for device in gpu["devices"]:
        assert device["name"] and device["memory_total_bytes"] >= device["memory_free_bytes"] > 0
        major, _ = map(int, device["compute_capability"].split("."))
        assert major >= 3 and device["multiprocessors"] > 0
    assert gpu["driver_version"][0].isdigit()


def test_docs_list_the_packages_info_lists():
    """docs/verify.md's sample and its JSON key named ten packages when info listed thirteen."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "verify.md").read_text()
    key = re.search(r"\| `packages` \| .* for (.*?); both `null`", text).group(1)
    assert [name.strip() for name in key.split(",")] == list(info.PACKAGES)
    sample = text.split("$ gpu-pipeline info", 1)[1].split("backends", 1)[0]
    assert re.findall(r"^  (\S+) +\d", sample, re.MULTILINE) == list(info.PACKAGES)


def test_the_cores_are_the_usable_ones_and_a_quota_of_one_is_one_cpu(monkeypatch):
    """docs/verify.md: ``usable_cores``, the cores every default count follows (a CPU quota's), not
    ``os.cpu_count()``."""
    monkeypatch.setattr(info, "usable_cores", lambda: 1)
    monkeypatch.setattr(info, "cpu_quota", lambda: 1.0)
    monkeypatch.setattr(info, "physical_cores", lambda: None)  # (as on macOS: no such line part)
    found = info.collect_info()
    assert found["cpu"] == {"logical_cores": os.cpu_count(), "physical_cores": None, "usable_cores": 1,
                            "cpu_quota": 1.0}
    result = runner.invoke(app, ["info"])
    line = f"CPU: {os.cpu_count()} logical cores, 1 usable by this process (control group CPU quota: 1 CPU)\n"
    assert line in result.stdout, result.stdout


def test_numba_threads_are_those_the_label_models_kernels_use(monkeypatch):
    """docs/verify.md: numba's ``threads`` is what the label models' prange kernels use (the usable
    cores), not numba's whole pool."""
    from gpu_pipeline.backends import _numba_setup

    monkeypatch.setattr(_numba_setup, "_parallel_threads", 1)
    assert info.numba_info()["threads"] == 1


def test_without_a_gpu_the_reason_is_the_drivers_first_line(monkeypatch):
    """The sample of docs/verify.md: "GPU: none: no usable CUDA GPU (CUDA driver library cannot be found.)"."""
    numba = pytest.importorskip("numba")
    cuda = pytest.importorskip("numba.cuda")
    if numba.config.ENABLE_CUDASIM:
        pytest.skip("the CUDA simulator is reported as such")
    from numba.cuda.cudadrv.driver import driver

    monkeypatch.setattr(cuda, "is_available", lambda: False)
    monkeypatch.setattr(driver, "initialization_error", "\nCUDA driver library cannot be found.\nEnsure that a "
                                                        "compatible NVIDIA driver is installed.\n")
    assert info.gpu_info() == {"devices": [], "reason": "no usable CUDA GPU (CUDA driver library cannot be found.)",
                               "driver_version": None}
    for error in (None, "", "\n"):  # ("\n" gave "CUDA probe failed (IndexError: list index out of range)")
        monkeypatch.setattr(driver, "initialization_error", error)
        assert info.gpu_info()["reason"] == "no usable CUDA GPU (no CUDA device found)"
