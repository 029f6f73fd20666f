"""How many cores this process may use: what every default count of threads and processes follows.

Two things limit it besides the machine: the affinity mask (``taskset``, a cpuset) and a CPU quota
of the control group the process runs in, which is how a container's ``--cpus`` or a Kubernetes
CPU limit is applied: a job limited to 4 CPUs on a 64-core node sees 64 cores in its affinity mask
and would start 64 decode processes and 64 compute threads that the kernel then throttles to 4
CPUs' worth of time. The quota is read as Go's runtime and the JVM read it: cgroup v2's
``cpu.max`` or cgroup v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, of the process's group and
each group above it up to the mount (the smallest wins), rounded up to whole cores.
"""

from __future__ import annotations

import math
import os

MOUNTINFO = "/proc/self/mountinfo"
CGROUP = "/proc/self/cgroup"


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by its control group's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux: no affinity mask and no control groups either
        return os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else max(1, cores)


def cpu_quota(mountinfo: str = MOUNTINFO, cgroup: str = CGROUP) -> float | None:
    """The CPU time this process's control group may use, in CPUs (``1.5``: 150 ms a 100 ms
    period); None when no group above it sets one, or where this cannot be read (not Linux)."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
            mounts = [_mount(line) for line in fh]
        with open(cgroup, encoding="utf-8", errors="surrogateescape") as fh:
            memberships = [line.rstrip("\n").split(":", 2) for line in fh]
    except OSError:
        return None
    limits = []
    for member in memberships:
        if len(member) != 3:
            continue
        _, controllers, path = member
        version = 2 if controllers == "" else 1 if "cpu" in controllers.split(",") else None
        for mount in mounts:
            if mount is None or version is None or mount[2] != version:
                continue
            root, point = mount[0], mount[1]
            if ".." in path.split("/") or ".." in root.split("/"):  # outside this namespace's view
                continue
            relative = os.path.relpath(path, root)
            if relative == ".." or relative.startswith("../"):  # this group lies outside what this mount shows
                continue
            limits += _limits_up_to(os.path.normpath(os.path.join(point, relative)), point, version)
    return min(limits) if limits else None


def _mount(line: str) -> tuple[str, str, int] | None:
    """(root, mount point, cgroup version) of a cgroup v2 mount or a v1 mount with the cpu
    controller in /proc/self/mountinfo's ``line``; None for any other mount."""
    fields = line.split()
    if "-" not in fields:
        return None
    after = fields[fields.index("-") + 1:]
    if len(fields) < 5 or len(after) < 3:
        return None
    if after[0] == "cgroup2":
        version = 2
    elif after[0] == "cgroup" and "cpu" in after[2].split(","):
        version = 1
    else:
        return None
    return _unescaped(fields[3]), _unescaped(fields[4]), version


def _unescaped(field: str) -> str:
    r"""A mountinfo path: the kernel writes space, tab, newline and backslash as ``\040`` etc."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def _limits_up_to(folder: str, top: str, version: int) -> list[float]:
    """The quotas (in CPUs) set by ``folder``'s group and each group above it, up to ``top``."""
    limits = []
    while True:
        limit = _limit(folder, version)
        if limit is not None:
            limits.append(limit)
        if len(folder) <= len(top):  # at the mount (or past it, were the names odd)
            return limits
        folder = os.path.dirname(folder)


def _limit(folder: str, version: int) -> float | None:
    """One group's quota in CPUs; None when it sets none (``max``, ``-1``) or has no such file."""
    try:
        if version == 2:
            with open(os.path.join(folder, "cpu.max"), encoding="ascii") as fh:
                quota, period = (fh.read().split() + ["100000"])[:2]
        else:
            with open(os.path.join(folder, "cpu.cfs_quota_us"), encoding="ascii") as fh:
                quota = fh.read().strip()
            with open(os.path.join(folder, "cpu.cfs_period_us"), encoding="ascii") as fh:
                period = fh.read().strip()
        quota_us, period_us = int(quota), int(period)
    except (OSError, ValueError):  # "max", a missing file, something unexpected: no limit known
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None
