"""``gpu-pipeline info``: what this machine offers, for bug reports and before a long run.

Versions come from installed package metadata (no GPU library is imported just for its version);
backends are asked why they cannot run; the GPU is probed through numba.cuda only after
``cuda.is_available()``, which fails softly without a driver. Every probe that can fail is caught
and reported as text: ``info`` itself must work on any machine.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpu_pipeline import __version__
from gpu_pipeline.backends import registry
from gpu_pipeline.engine.cores import cpu_quota, memory_limit, physical_cores, usable_cores, usable_memory
from gpu_pipeline.errors import one_line

#: Packages reported, by the name shown; the value lists the distributions that provide it.
PACKAGES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "numba": ("numba",),
    "numba-cuda": ("numba-cuda",),
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"),
    "pillow": ("pillow",),
    "tifffile": ("tifffile",),
    "imagecodecs": ("imagecodecs",),
    "typer": ("typer",),
    "rich": ("rich",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
               "opencv-contrib-python"),
    "scikit-image": ("scikit-image",),
    "pyarrow": ("pyarrow",),  # --format parquet
    "dask": ("distributed",),  # --dask
}


def package_versions() -> dict[str, dict[str, str | None]]:
    """For each package of :data:`PACKAGES`: the installed distribution and its version, or None."""
    found = {}
    for shown, distributions in PACKAGES.items():
        found[shown] = {"distribution": None, "version": None}
        for distribution in distributions:
            try:
                found[shown] = {"distribution": distribution, "version": importlib.metadata.version(distribution)}
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def backend_status() -> list[dict[str, Any]]:
    """Every registered backend, available or not, with the reason when not."""
    statuses = []
    for name in registry.backend_names():
        reason = registry.unavailable_reason(name)
        statuses.append({"name": name, "available": reason is None, "reason": reason})
    return statuses


def _cuda_gpus() -> tuple[list[dict[str, Any]], str | None]:
    """The CUDA devices (name, memory, compute capability) and, when there are none, why."""
    try:
        import numba
        from numba import cuda
    except Exception as exc:
        return [], f"numba-cuda cannot be imported ({one_line(exc)})"
    if numba.config.ENABLE_CUDASIM:
        return [], "NUMBA_ENABLE_CUDASIM=1: the CUDA simulator is not a GPU"
    try:
        if not cuda.is_available():  # safe without a driver: it records why instead of raising
            from numba.cuda.cudadrv.driver import driver

            detail = (driver.initialization_error or "").strip().splitlines()  # (a blank error: no line)
            return [], f"no usable CUDA GPU ({detail[0] if detail else 'no CUDA device found'})"
        devices = []
        for index, device in enumerate(cuda.gpus):
            with device:
                free, total = cuda.current_context().get_memory_info()
            name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
            devices.append({
                "index": index, "name": name,
                "compute_capability": ".".join(map(str, device.compute_capability)),
                "memory_total_bytes": int(total), "memory_free_bytes": int(free),
                "multiprocessors": int(device.MULTIPROCESSOR_COUNT),
            })
        return devices, None
    except Exception as exc:
        return [], f"CUDA probe failed ({one_line(exc)})"


def gpu_info() -> dict[str, Any]:
    devices, reason = _cuda_gpus()
    info: dict[str, Any] = {"devices": devices, "reason": reason, "driver_version": None}
    if devices:
        try:
            from numba.cuda.cudadrv.driver import driver

            info["driver_version"] = ".".join(map(str, driver.get_version()))
        except Exception as exc:
            info["driver_version"] = f"unknown ({one_line(exc)})"
    return info


def numba_info() -> dict[str, Any]:
    """Threads, threading layer and kernel cache, set up as the numba backend sets them up."""
    try:
        import numba

        from gpu_pipeline.backends import _numba_setup
    except Exception as exc:
        return {"error": f"numba cannot be imported ({one_line(exc)})"}
    _numba_setup.choose_threading_layer()
    info: dict[str, Any] = {
        "threads": None,
        "threading_layer_requested": numba.config.THREADING_LAYER,
        "threading_layer": None,
        "cache_dir": None,
        "cache_dir_from_env": bool(os.environ.get("NUMBA_CACHE_DIR")),
    }
    try:
        numba.get_num_threads()  # starts the thread pool: the layer is then known
        info["threads"] = _numba_setup.parallel_threads()  # what the label models' prange kernels use
        info["threading_layer"] = numba.threading_layer()
    except Exception as exc:  # e.g. a requested layer whose library is missing
        info["threading_layer"] = f"cannot start ({one_line(exc)})"
    # The folder the kernels are cached in: kernels-<digest of the kernel sources> in the chosen one.
    info["cache_dir"] = _numba_setup.CACHE_DIR
    return info


def collect_info() -> dict[str, Any]:
    """Everything ``info --json`` prints (docs/verify.md describes the keys)."""
    backends = backend_status()
    return {
        "gpu_pipeline": __version__,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "platform": platform.platform(),
        "packages": package_versions(),
        "backends": backends,
        "gpu": gpu_info(),
        "cpu": {"logical_cores": os.cpu_count(), "physical_cores": physical_cores(), "usable_cores": usable_cores(),
                "cpu_quota": cpu_quota()},
        "memory": {"usable_bytes": usable_memory(), "limit_bytes": memory_limit()},
        "numba": numba_info(),
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def print_info(console: Console, info: dict[str, Any]) -> None:
    """The human form of :func:`collect_info`."""
    console.print(f"[bold]gpu-pipeline {info['gpu_pipeline']}[/] on {info['python']['implementation']} "
                  f"{info['python']['version']}, {info['platform']}")
    versions = Table(title="packages", box=box.SIMPLE_HEAD)
    versions.add_column("package")
    versions.add_column("version")
    for shown, package in info["packages"].items():
        installed = package["version"]
        if installed and package["distribution"] != shown:
            installed += f" ({package['distribution']})"
        versions.add_row(shown, installed or "[dim]not installed")
    console.print(versions)

    backends = Table(title="backends", box=box.SIMPLE_HEAD)
    backends.add_column("backend", no_wrap=True)
    backends.add_column("status")
    for backend in info["backends"]:
        status = "[green]available" if backend["available"] else f"[yellow]unavailable[/]: {escape(backend['reason'])}"
        backends.add_row(backend["name"], status)
    console.print(backends)

    gpu = info["gpu"]
    if gpu["devices"]:
        for device in gpu["devices"]:
            console.print(f"GPU {device['index']}: {device['name']}, compute capability "
                          f"{device['compute_capability']}, {_gib(device['memory_total_bytes'])} "
                          f"({_gib(device['memory_free_bytes'])} free), {device['multiprocessors']} SMs")
        console.print(f"CUDA driver: {gpu['driver_version']}")
    else:
        console.print(f"GPU: none: {escape(gpu['reason'])}")

    cpu, numba = info["cpu"], info["numba"]
    quota = "" if cpu["cpu_quota"] is None else \
        f" (control group CPU quota: {cpu['cpu_quota']:g} CPU{'' if cpu['cpu_quota'] <= 1 else 's'})"
    physical = "" if cpu["physical_cores"] is None else f" ({cpu['physical_cores']} physical)"
    console.print(f"CPU: {cpu['logical_cores']} logical cores{physical}, {cpu['usable_cores']} usable by this "
                  f"process{quota}")
    memory = info["memory"]
    if memory["usable_bytes"] is not None:
        limit = "" if memory["limit_bytes"] is None else f" (control group memory limit: {_gib(memory['limit_bytes'])})"
        console.print(f"memory: {_gib(memory['usable_bytes'])} usable by this process{limit}")
    if "error" in numba:
        console.print(f"numba: {escape(numba['error'])}")
        return
    console.print(f"numba: {numba['threads']} threads, threading layer {numba['threading_layer']} "
                  f"(requested: {numba['threading_layer_requested']})")
    cache = numba["cache_dir"] or "none writable: kernels are compiled at every start"
    origin = "from NUMBA_CACHE_DIR" if numba["cache_dir_from_env"] else "set NUMBA_CACHE_DIR to choose another"
    console.print(f"numba cache: {escape(cache)} ({origin})")
