"""How many cores this process may use: what every default count of threads and processes follows.

Two things limit it besides the machine: the affinity mask (``taskset``, a cpuset) and a CPU quota
of the control group the process runs in, which is how a container's ``--cpus`` or a Kubernetes
CPU limit is applied: a job limited to 4 CPUs on a 64-core node sees 64 cores in its affinity mask
and would start 64 decode processes and 64 compute threads that the kernel then throttles to 4
CPUs' worth of time. The quota is read as Go's runtime and the JVM read it: cgroup v2's
``cpu.max`` or cgroup v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, of the process's group and
each group above it up to the mount (the smallest wins), rounded up to whole cores.

The memory a run may use (:func:`usable_memory`) is read the same way: the machine's, capped by the
memory limit of the process's control group (cgroup v2's ``memory.max``, v1's
``memory.limit_in_bytes``), which is how ``docker run --memory`` and a Kubernetes memory limit are
applied: past it the kernel kills the process, whatever the machine has.
"""

from __future__ import annotations

import math
import os

MOUNTINFO = "/proc/self/mountinfo"
CGROUP = "/proc/self/cgroup"
CPUS = "/sys/devices/system/cpu"


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, capped by its control group's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux: no affinity mask and no control groups either
        return os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else max(1, cores)


def physical_cores(cpus: str = CPUS) -> int | None:
    """The machine's cores, each counted once however many hardware threads it runs (16 logical
    cores are often 8 with two hyperthreads each, which share one core's units); None where
    Linux's CPU topology cannot be read."""
    siblings = set()
    try:
        names = os.listdir(cpus)
    except OSError:
        return None
    for name in names:
        if name.startswith("cpu") and name[3:].isdigit():
            try:  # the logical cores that share this one's core: the same text for each of them
                with open(os.path.join(cpus, name, "topology", "thread_siblings_list")) as file:
                    siblings.add(file.read().strip())
            except OSError:  # (an offline CPU has no topology)
                continue
    return len(siblings) or None


def usable_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, capped by its control group's memory
    limit; None where neither can be read."""
    try:
        machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        machine = None
    limits = [size for size in (machine, memory_limit()) if size is not None and size > 0]
    return min(limits) if limits else None


def cpu_quota(mountinfo: str = MOUNTINFO, cgroup: str = CGROUP) -> float | None:
    """The CPU time this process's control group may use, in CPUs (``1.5``: 150 ms a 100 ms
    period); None when no group above it sets one, or where this cannot be read (not Linux)."""
    return _smallest_limit("cpu", _cpu_limit, mountinfo, cgroup)


def memory_limit(mountinfo: str = MOUNTINFO, cgroup: str = CGROUP) -> int | None:
    """The bytes of memory this process's control group may use; None when no group above it
    sets a limit, or where this cannot be read (not Linux)."""
    return _smallest_limit("memory", _memory_limit, mountinfo, cgroup)


def _smallest_limit(controller: str, limit_of, mountinfo: str, cgroup: str):
    """The smallest ``limit_of(folder, version)`` over the groups of ``controller`` that hold this
    process, each from its own group up to the mount; None when none sets one."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
            mounts = [_mount(line, controller) for line in fh]
        with open(cgroup, encoding="utf-8", errors="surrogateescape") as fh:
            memberships = [line.rstrip("\n").split(":", 2) for line in fh]
    except OSError:
        return None
    limits = []
    for member in memberships:
        if len(member) != 3:
            continue
        _, controllers, path = member
        version = 2 if controllers == "" else 1 if controller in controllers.split(",") else None
        for mount in mounts:
            if mount is None or version is None or mount[2] != version:
                continue
            root, point = mount[0], mount[1]
            if ".." in path.split("/") or ".." in root.split("/"):  # outside this namespace's view
                continue
            relative = os.path.relpath(path, root)
            if relative == ".." or relative.startswith("../"):  # this group lies outside what this mount shows
                continue
            limits += _limits_up_to(os.path.normpath(os.path.join(point, relative)), point, version, limit_of)
    return min(limits) if limits else None


def _mount(line: str, controller: str) -> tuple[str, str, int] | None:
    """(root, mount point, cgroup version) of a cgroup v2 mount or a v1 mount with ``controller``
    in /proc/self/mountinfo's ``line``; None for any other mount."""
    fields = line.split()
    if "-" not in fields:
        return None
    after = fields[fields.index("-") + 1:]
    if len(fields) < 5 or len(after) < 3:
        return None
    if after[0] == "cgroup2":
        version = 2
    elif after[0] == "cgroup" and controller in after[2].split(","):
        version = 1
    else:
        return None
    return _unescaped(fields[3]), _unescaped(fields[4]), version


def _unescaped(field: str) -> str:
    r"""A mountinfo path: the kernel writes space, tab, newline and backslash as ``\040`` etc."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def _limits_up_to(folder: str, top: str, version: int, limit_of) -> list:
    """The limits (``limit_of``) set by ``folder``'s group and each group above it, up to ``top``."""
    limits = []
    while True:
        limit = limit_of(folder, version)
        if limit is not None:
            limits.append(limit)
        if len(folder) <= len(top):  # at the mount (or past it, were the names odd)
            return limits
        folder = os.path.dirname(folder)


def _cpu_limit(folder: str, version: int) -> float | None:
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


#: cgroup v1 says "no limit" with the largest multiple of the page size below 2^63.
_V1_NO_MEMORY_LIMIT = 1 << 62


def _memory_limit(folder: str, version: int) -> int | None:
    """One group's memory limit in bytes; None when it sets none (``max``, v1's huge number) or has no such file."""
    name = "memory.max" if version == 2 else "memory.limit_in_bytes"
    try:
        with open(os.path.join(folder, name), encoding="ascii") as fh:
            limit = int(fh.read().strip())
    except (OSError, ValueError):  # "max", a missing file, something unexpected: no limit known
        return None
    return limit if 0 < limit < _V1_NO_MEMORY_LIMIT else None
