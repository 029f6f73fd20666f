"""The cost of Dask: `gpu-pipeline run --dask local:N` against a local run, same tiles, same backend.

    python scripts/bench_dask.py --files 27000 --backend numba --json dask.json

Takes the EuroSAT tiles as bench_scale.py does (the shared tarball extracted, else ../shared/data/eurosat_rgb
or data/eurosat, or the JPEGs of ``--tiles-from FOLDER``, replicated by hard links), then
runs the real command line, alternating local and Dask runs ``--repeat`` times (best run kept, the
machine is shared). Reports wall seconds and images/s of the whole command, and the fixed cost (cluster
start and stop, worker imports) from the same two commands on a small corpus, so that the per-image
overhead is what is left. Checks that both outputs hold the same records.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from bench_scale import REPO, file_list, tile_files  # noqa: E402

SMALL_CORPUS = 64


def steady_rate(images: int, seconds: float) -> float | None:
    """Images a second beyond the fixed cost, or None when the larger run was not slower (too few files)."""
    return round(images / seconds, 1) if seconds > 0 else None


def abort_with_stacks(process: subprocess.Popen) -> None:
    """SIGABRT the command and every process it started: under PYTHONFAULTHANDLER each prints its threads'
    stacks. All are stopped first, then aborted one at a time, the command last: aborted first, it took
    its Dask workers with it (they end when their parent does) before their turn, and none moves on
    when another ends."""
    try:
        import psutil  # comes with distributed

        pids = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - the command's own stacks are still worth having
        pids = []
    pids = [*reversed(pids), process.pid]  # (the deepest first: no process is left without its parent)
    for pid in pids:
        _signal(pid, signal.SIGSTOP)
    for pid in pids:
        _signal(pid, signal.SIGABRT)
        _signal(pid, signal.SIGCONT)  # (the abort is taken before any of its code runs on)
        time.sleep(0.5)  # one dump at a time: they share the pipe


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:  # (it has ended)
        pass


def timed_run(folder: Path, out: Path, backend: str, extra: list[str], timeout: float) -> float:
    command = [sys.executable, "-m", "gpu_pipeline.cli", "run", str(folder), "--out", str(out),
               "--backend", backend, "-q", "--overwrite", *extra]
    start = time.perf_counter()
    # a run that hangs is stopped with a stack dump of every process, so that it says where it waits
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        abort_with_stacks(process)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        sys.exit(f"{' '.join(command)} still ran after {timeout:g} s; the stacks of its processes:\n{stderr}")
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}): {stderr}")
    return seconds


def records_by_path(out: Path) -> dict[str, str]:
    records = {}
    for line in out.read_text().splitlines():
        records[json.loads(line)["path"]] = line
    return records


def compare(folder: Path, scratch: Path, backend: str, dask: str, repeat: int, timeout: float) -> dict:
    local_out, dask_out = scratch / "local.jsonl", scratch / "dask.jsonl"
    local_s = dask_s = float("inf")
    for _ in range(repeat):  # alternate, so both see the same background load
        local_s = min(local_s, timed_run(folder, local_out, backend, [], timeout))
        dask_s = min(dask_s, timed_run(folder, dask_out, backend, ["--dask", dask], timeout))
    local, distributed = records_by_path(local_out), records_by_path(dask_out)
    if local != distributed:
        sys.exit(f"the Dask run's records differ from the local run's ({len(distributed)} vs {len(local)})")
    return {"files": len(local), "local_s": round(local_s, 2), "dask_s": round(dask_s, 2),
            "local_images_per_s": round(len(local) / local_s, 1), "dask_images_per_s": round(len(local) / dask_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=27_000)
    parser.add_argument("--tiles-from", type=Path, help="take the tiles from the JPEGs under this folder "
                        "(default: the EuroSAT tiles)")
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--dask", default="local:2", help="what --dask gets (default: local:2)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds one run may take before it is stopped with its stacks printed (default: 3600)")
    args = parser.parse_args()
    if args.files <= SMALL_CORPUS:
        sys.exit(f"--files must be more than the {SMALL_CORPUS} of the small corpus (the fixed cost)")

    report = {"backend": args.backend, "dask": args.dask, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-dask-") as scratch:
        scratch = Path(scratch)
        tiles = tile_files(scratch, args.files, args.tiles_from)
        small = compare(file_list(scratch, "small", tiles[:SMALL_CORPUS]), scratch, args.backend, args.dask,
                        args.repeat, args.timeout)
        large = compare(file_list(scratch, "large", tiles), scratch, args.backend, args.dask, args.repeat, args.timeout)
    fixed_s = small["dask_s"] - small["local_s"]
    extra = large["files"] - small["files"]
    steady_local = steady_rate(extra, large["local_s"] - small["local_s"])
    steady_dask = steady_rate(extra, large["dask_s"] - small["dask_s"])
    report.update(small=small, large=large, fixed_overhead_s=round(fixed_s, 2),
                  steady_local_images_per_s=steady_local, steady_dask_images_per_s=steady_dask,
                  throughput_ratio=round(large["dask_images_per_s"] / large["local_images_per_s"], 3))
    print(f"{args.backend}, {os.cpu_count()} cores, best of {args.repeat}")
    for name, run in (("small", small), ("large", large)):
        print(f"{run['files']:>7} files: local {run['local_s']:>7.2f} s ({run['local_images_per_s']:>7.0f} img/s) | "
              f"--dask {args.dask} {run['dask_s']:>7.2f} s ({run['dask_images_per_s']:>7.0f} img/s)")
    if steady_local is None or steady_dask is None:
        print(f"Dask fixed cost {fixed_s:.2f} s; the large corpus did not take longer than the small one: too few "
              f"--files for a steady state; whole-run ratio {report['throughput_ratio']:.2f}")
    else:
        print(f"Dask fixed cost {fixed_s:.2f} s; steady state local {steady_local:.0f} img/s, "
              f"Dask {steady_dask:.0f} img/s; whole-run ratio {report['throughput_ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
