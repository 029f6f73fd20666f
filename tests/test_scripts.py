"""The benchmark and model scripts that docs/ tells people to run, each run on a tiny workload.

Their figures are measured elsewhere (docs/benchmarks.md); here each script runs end to end, as
documented, on the bundled tiles, and its report must hold what the docs quote. Two of them had
stopped working unnoticed (a stand-in decoder that no longer fitted the engine, an import of a
helper that had been renamed): this is what catches that.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TILES = REPO / "data" / "eurosat"

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-30000:]}"
    return done


def test_bench_stages_times_every_stage(tmp_path):
    report = tmp_path / "stages.json"
    run_script("bench_stages.py", "--tiles", "64", "--scenes", "1", "--repeat", "1", "--tiles-from", str(TILES),
               "--json", str(report))
    stages = json.loads(report.read_text())
    for workload in ("tiles", "scenes"):
        assert set(stages[workload]) == {"decode", "plumbing", "compute", "labels", "records"}
        assert all(value > 0 for value in stages[workload].values()), stages[workload]


def test_bench_scale_tiles_and_engine_overhead(tmp_path):
    report = tmp_path / "scale.json"
    done = run_script("bench_scale.py", "--only", "tiles", "overhead", "--tiles", "200", "--repeat", "1",
                      "--decode", "threads", "processes", "--tiles-from", str(TILES), "--json", str(report))
    scale = json.loads(report.read_text())
    assert scale["engine_overhead_us"]["median"] > 0
    for decode in ("threads", "processes"):
        tiles = scale["tiles"][decode]
        assert tiles["files"] == 200
        assert tiles["opencv_pool_images_per_s"]["median"] > 0 and tiles["peak_rss_mib"]["median"] > 0
    assert "OpenCV Pool(" in done.stdout


def test_bench_dask_compares_the_same_records(tmp_path):
    pytest.importorskip("distributed", reason="the dask extra is not installed")
    report = tmp_path / "dask.json"
    # the script itself exits non-zero when the Dask run's records differ from the local run's; a run that
    # hangs (once seen in CI, never reproduced) is stopped with the stacks of its processes, for the next time
    run_script("bench_dask.py", "--files", "80", "--repeat", "1", "--tiles-from", str(TILES), "--json", str(report),
               "--timeout", "60", timeout=400)
    dask = json.loads(report.read_text())
    assert dask["small"]["files"] == 64 and dask["large"]["files"] == 80


def test_bench_dask_shows_the_stacks_of_processes_that_end_with_their_parent():
    """A hung run was stopped the command first: its Dask workers, which end when their parent does,
    were gone before their turn, and "the stacks of its processes" held the command's alone."""
    spec = importlib.util.spec_from_file_location("bench_dask", SCRIPTS / "bench_dask.py")
    bench_dask = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_dask)
    worker = ("import os, time\nparent = os.getppid()\nprint('up', flush=True)\n"
              "while os.getppid() == parent:\n    time.sleep(0.01)")  # (as a Dask worker watches its nanny)
    command = (f"import subprocess, sys, time\nworker = subprocess.Popen([sys.executable, '-c', {worker!r}], "
               "stdout=subprocess.PIPE)\nworker.stdout.readline()\nprint('up', flush=True)\ntime.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        assert process.stdout.readline() == "up\n"
        bench_dask.abort_with_stacks(process)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    dumps = stderr.split("Fatal Python error: Aborted")[1:]
    assert len(dumps) == 2 and all('File "<string>", line ' in dump for dump in dumps), stderr


def test_bench_dask_refuses_a_corpus_no_larger_than_the_small_one():
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_dask.py"), "--files", "64"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode != 0 and "--files must be more than the 64" in done.stderr


def test_bench_gpu_quick_without_a_gpu(tmp_path):
    report = tmp_path / "gpu.json"
    run_script("bench_gpu.py", "--quick", "--repeats", "1", "--json", str(report))
    bench = json.loads(report.read_text())
    assert set(bench["workloads"]) == {"1mp_rgb", "12mp_rgb", "tiles_64"}
    assert "numba" in json.dumps(bench["workloads"]["tiles_64"])


def test_bench_cpu_small(tmp_path):
    report = tmp_path / "cpu.json"
    run_script("bench_cpu.py", "--large", "2", "--large-size", "128", "--small", "16", "--repeats", "1",
               "--no-compile-time", "--no-profile", "--reference-megapixels", "0.05", "--skimage-megapixels", "0.1",
               "--eurosat", str(TILES), "--json", str(report))
    assert json.loads(report.read_text())["threads"] >= 1


def test_bench_labels_small():
    done = run_script("bench_labels.py", "--tiles", "32", "--batch-size", "16", "--repeats", "1")
    assert "default" in done.stdout


def test_engine_memory_with_decode_processes():
    done = run_script("engine_memory.py", str(TILES), "--batch-mp", "1", "--workers", "2", "--decode", "processes")
    assert "MiB" in done.stdout


def test_engine_memory_with_a_compute_slower_than_decoding():
    """``--compute-ms``: the stand-in backend takes that long a batch, so that decoders wait for room
    as where compute is the slower (the 2-core VM's runs never get there)."""
    done = run_script("engine_memory.py", str(TILES), "--batch-mp", "0.01", "--workers", "2", "--compute-ms", "20")
    files, seconds, batches = re.search(r"([\d,]+) files in ([\d.]+) s, (\d+) batches", done.stdout).groups()
    assert int(batches) >= int(files.replace(",", "")) // 3  # (0.01 MP: 2 tiles of 64 x 64 a batch)
    assert float(seconds) >= int(batches) * 0.02


def test_fit_eurosat_then_label_alternatives(tmp_path):
    model, features = tmp_path / "model.json", tmp_path / "features.npz"
    run_script("fit_eurosat.py", str(TILES), "--out", str(model), "--folds", "2", "--features", str(features))
    from gpu_pipeline.labels.model import load_model

    assert len(load_model(str(model)).classes) == 10
    done = run_script("label_alternatives.py", str(features), str(TILES), "--only", "centroid,knn")
    assert "centroid" in done.stdout and "knn" in done.stdout


def test_gil_parts_small(tmp_path):
    pytest.importorskip("gilknocker", reason="gilknocker is not installed (pip install gilknocker)")
    report = tmp_path / "gil.json"
    done = run_script("gil_parts.py", str(TILES), "--repeat", "1", "--json", str(report))
    parts = json.loads(report.read_text())
    assert parts["images"] == 50 and set(parts["kernel_us_per_tile"]) == {"gray_histograms", "edge_maps"}
    for way in ("as is", "idle kernels", "+ no dicts", "+ files found before"):
        assert way in done.stdout and len(parts[way]["gil_us_per_image"]) == 1


@pytest.mark.parametrize("option, path, said", [("--cli", "cli", "gpu-pipeline run"),
                                                ("--batches", "batches", "gpu_pipeline.run_batches")])
def test_gil_parts_of_the_command_line_and_of_run_batches(tmp_path, option, path, said):
    """The ways of a path that makes no dicts: as is, idle kernels, + files found before."""
    pytest.importorskip("gilknocker", reason="gilknocker is not installed (pip install gilknocker)")
    report = tmp_path / "gil.json"
    done = run_script("gil_parts.py", str(TILES), "--repeat", "1", option, "--json", str(report))
    parts = json.loads(report.read_text())
    assert parts["path"] == path and parts["images"] == 50 and "+ no dicts" not in parts
    assert said in done.stdout
    for way in ("as is", "idle kernels", "+ files found before"):
        assert len(parts[way]["gil_us_per_image"]) == 1


def test_gil_parts_without_gilknocker_says_so():
    code = ("import runpy, sys; sys.modules['gilknocker'] = None; "
            f"sys.argv = ['gil_parts.py', {str(TILES)!r}]; "
            f"runpy.run_path({str(SCRIPTS / 'gil_parts.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 2 and "needs gilknocker: pip install gilknocker" in done.stderr


def test_gil_parts_idles_the_kernels_of_every_numba_backend():
    """The stand-ins must reach the command line's backend too, not only the API's (they once did
    not, and its "idle kernels" figure had the real kernels in it)."""
    import importlib.util

    import numpy as np

    from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend
    from gpu_pipeline.config import PipelineConfig

    spec = importlib.util.spec_from_file_location("gil_parts", SCRIPTS / "gil_parts.py")
    gil_parts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gil_parts)
    tiles = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    fresh = NumbaCpuBackend(threads=1)  # made after the script was loaded, as the command line makes its own
    assert fresh.process(tiles, PipelineConfig()).histograms.any()
    with gil_parts.idle_kernels({"gray_histograms": 0.0, "edge_maps": 0.0}):
        idle = NumbaCpuBackend(threads=1).process(tiles, PipelineConfig())
    assert not idle.histograms.any() and not idle.edge_counts.any()
    assert fresh.process(tiles, PipelineConfig()).histograms.any()  # put back


@pytest.mark.parametrize("backend", ["cupy", "cuda"])
def test_the_gpu_made_to_fail_says_why_it_cannot_run_without_a_gpu(backend):
    """scripts/device_failure_check.py (run by scripts/gpu_check.sh on a lent GPU machine) starts,
    and where there is no GPU says so in one line, exit 2, rather than failing at the device run."""
    from tests.gpu import real_gpu_reason

    if real_gpu_reason() is None:
        pytest.skip("a real GPU: scripts/gpu_check.sh makes it fail, in a process of its own")
    done = subprocess.run([sys.executable, str(SCRIPTS / "device_failure_check.py"), backend], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.startswith(f"{backend}: cannot run here: backend '{backend}' is unavailable"), done.stdout
    assert done.stderr == ""



SHARED = REPO.parent / "shared"
#: The steps of each part of scripts/device_check.sh for numba (batch: only the GPU backends), and
#: whether each writes a JSON beside its log
STEPS = {"scale": {"scale_numba": True}, "batch": {}, "bench": {"bench": True}, "api": {"api_numba": False},
         "engine": {"engine_1mp": False, "engine_32mp": False},
         "gil": {"gil_parts": True, "gil_parts_cli": True, "gil_parts_batches": True}}


def device_check(tmp_path: Path, shared: Path, parts: list[str]) -> Path:
    """scripts/device_check.sh on tiny sizes, numba only: every step of ``parts`` must write its log
    (and its JSON) and none may fail. The GPU machine it is for is lent for 15 minutes, seldom: a step
    that has drifted from the code must fail here, not there."""
    if importlib.util.find_spec("gilknocker") is None:  # (gil_parts.py says so in one line, tested above)
        parts = [part for part in parts if part != "gil"]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "TMPDIR": str(tmp_path), "SHARED": str(shared),
           "BACKENDS": "numba", "TILES": "200", "SCENES": "1", "PARTS": " ".join(parts),
           "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(tmp_path / "numba-cache"))}
    done = subprocess.run(["bash", str(SCRIPTS / "device_check.sh")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (out / "failures.txt").exists()
    steps = {name: with_json for part in parts for name, with_json in STEPS[part].items()}
    for name, with_json in steps.items():
        assert (out / f"{name}.log").read_text().strip(), name
        if with_json:
            assert json.loads((out / f"{name}.json").read_text()), name
    timed = [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()]
    assert sorted(timed) == sorted(set(steps) | ({"gil_per_tile"} & set(timed)))
    return out


def test_device_check_as_on_the_gpu_machine(tmp_path):
    """Where ../shared does not travel: the tiles at hand linked over and over, no gil_per_tile.py."""
    out = device_check(tmp_path, tmp_path / "no-shared", ["scale", "batch", "bench", "gil", "engine", "api"])
    assert json.loads((out / "scale_numba.json").read_text())["tiles"]["auto"]["files"] == 200
    if (out / "gil_parts.log").exists():
        assert "is absent" in (out / "gil_per_tile.log").read_text()
        assert json.loads((out / "gil_parts.json").read_text())["images"] == 200


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is absent (the EuroSAT tarball)")
def test_device_check_gil_with_the_shared_tiles_and_tool(tmp_path):
    """The tarball's tiles (extracted as gil_per_tile.py does, the first 200 taken) and
    ../shared/tools/gil_per_tile.py, whose gilknocker thread may abort the interpreter at exit."""
    pytest.importorskip("gilknocker", reason="gilknocker is not installed (pip install gilknocker)")
    out = device_check(tmp_path, SHARED, ["gil"])
    assert "200 images in" in (out / "gil_per_tile.log").read_text()
    assert (tmp_path / "gil_per_tile").is_dir() and not (tmp_path / "gil_per_tile.part").exists()


def test_device_check_without_a_gpu_says_so_in_a_line_each(tmp_path):
    """No GPU: the GPU backends' steps are left out with one line each and the GPU check ends at
    once, saying why, rather than running skipped tests and a CPU benchmark to its time limit."""
    from tests.gpu import real_gpu_reason

    if real_gpu_reason() is None:
        pytest.skip("a real GPU: these steps run there")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "TMPDIR": str(tmp_path),
           "SHARED": str(tmp_path / "no-shared"), "BACKENDS": "cuda cupy", "TILES": "20", "PARTS": "scale api gpu",
           "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(tmp_path / "numba-cache"))}
    done = subprocess.run(["bash", str(SCRIPTS / "device_check.sh")], capture_output=True, text=True, env=env,
                          timeout=90)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    failures = (out / "failures.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in failures] == ["cuda", "cupy", "gpu_check"], failures
    assert "unavailable, its steps left out" in failures[0] and failures[2] == "gpu_check: exit 1"
    said = (out / "gpu_check" / "status.txt").read_text().splitlines()
    assert len(said) == 1 and said[0].startswith("no GPU backend can run here: cuda: "), said
    assert [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()] == ["gpu_check"]
