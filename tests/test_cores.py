"""The cores the defaults use: the affinity mask capped by a control group's CPU quota.

The control group files are laid out in a temporary folder as the kernel shows them (mountinfo,
/proc/self/cgroup, the cgroup file system), so each case is hand-worked: what Docker (``--cpus``),
Kubernetes (a limit on the pod and on the container) and a plain cgroup v1 machine present.
"""

from __future__ import annotations

import os

import pytest

from gpu_pipeline.engine import cores

# a mountinfo line: id parent major:minor root mount-point options - type source super-options
V2_LINE = "35 24 0:30 {root} {point} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_LINE = "32 31 0:29 {root} {point} rw,relatime - cgroup cgroup rw,{controllers}\n"
OTHER_LINES = ("23 1 254:1 / / rw,relatime - ext4 /dev/vda rw\n"
               "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n")


def _files(tmp_path, mounts: str, membership: str) -> tuple[str, str]:
    mountinfo, cgroup = tmp_path / "mountinfo", tmp_path / "cgroup"
    mountinfo.write_text(OTHER_LINES + mounts)
    cgroup.write_text(membership)
    return str(mountinfo), str(cgroup)


def _group(folder, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def test_docker_cpus_on_cgroup_v2(tmp_path):
    """``docker run --cpus 1.5``: the container's own namespace, its group is the mount's root."""
    point = tmp_path / "fs"
    _group(point, cpu_max="150000 100000")
    assert cores.cpu_quota(*_files(tmp_path, V2_LINE.format(root="/", point=point), "0::/\n")) == 1.5


def test_kubernetes_limits_on_the_pod_and_the_container_the_smallest_wins(tmp_path):
    point = tmp_path / "fs"
    _group(point / "kubepods", cpu_max="max 100000")
    _group(point / "kubepods" / "pod1", cpu_max="400000 100000")
    _group(point / "kubepods" / "pod1" / "ctr", cpu_max="300000 100000")
    files = _files(tmp_path, V2_LINE.format(root="/", point=point), "0::/kubepods/pod1/ctr\n")
    assert cores.cpu_quota(*files) == 3.0
    (point / "kubepods" / "pod1" / "cpu.max").write_text("250000 100000\n")  # a tighter limit above
    assert cores.cpu_quota(*files) == 2.5


def test_no_limit_anywhere_is_none(tmp_path):
    point = tmp_path / "fs"
    _group(point / "user.slice", cpu_max="max 100000")  # the root group has no cpu.max at all
    assert cores.cpu_quota(*_files(tmp_path, V2_LINE.format(root="/", point=point), "0::/user.slice\n")) is None


def test_cgroup_v1_quota_and_period(tmp_path):
    point = tmp_path / "cpu,cpuacct"
    _group(point / "docker" / "abc", cpu_cfs_quota_us="50000", cpu_cfs_period_us="100000")
    _group(point, cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    files = _files(tmp_path, V1_LINE.format(root="/", point=point, controllers="cpu,cpuacct"),
                   "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cores.cpu_quota(*files) == 0.5
    (point / "docker" / "abc" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert cores.cpu_quota(*files) is None


def test_a_mount_of_the_group_itself_and_one_that_does_not_show_it(tmp_path):
    """Without a cgroup namespace, Docker mounts the container's own group (mountinfo's root is
    ``/docker/abc``); a mount whose root is another group says nothing about this one."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    _group(mine, cpu_max="200000 100000")
    _group(other, cpu_max="100000 100000")
    _group(tmp_path / "abc", cpu_max="50000 100000")  # where "other" + "../abc" would lead
    mounts = (V2_LINE.format(root="/docker/abc", point=mine) + V2_LINE.format(root="/docker/xyz", point=other))
    assert cores.cpu_quota(*_files(tmp_path, mounts, "0::/docker/abc\n")) == 2.0


def test_a_group_named_with_two_dots_is_read_and_a_path_out_of_the_namespace_is_not(tmp_path):
    """``..quota`` is a name; ``/../sibling`` (a group outside this cgroup namespace) says nothing
    about this process: abspath made it ``/sibling``, another group's limit."""
    point = tmp_path / "fs"
    _group(point / "..quota", cpu_max="50000 100000")
    _group(point / "sibling", cpu_max="100000 100000")
    line = V2_LINE.format(root="/", point=point)
    assert cores.cpu_quota(*_files(tmp_path, line, "0::/..quota\n")) == 0.5
    assert cores.cpu_quota(*_files(tmp_path, line, "0::/../sibling\n")) is None


def test_a_mount_point_with_a_space_is_unescaped(tmp_path):
    point = tmp_path / "cgroup fs"
    _group(point, cpu_max="100000 100000")
    line = V2_LINE.format(root="/", point=str(point).replace(" ", "\\040"))
    assert cores.cpu_quota(*_files(tmp_path, line, "0::/\n")) == 1.0


def test_a_mount_point_with_a_backslash_is_unescaped_once(tmp_path):
    """The kernel writes a backslash as ``\\134``: a folder named ``cgroup\\040fs`` (a backslash, then
    040) is written ``cgroup\\134040fs``, which must not become ``cgroup fs``."""
    point = tmp_path / "cgroup\\040fs"
    _group(point, cpu_max="100000 100000")
    _group(tmp_path / "cgroup fs", cpu_max="50000 100000")  # where unescaping twice would lead
    line = V2_LINE.format(root="/", point=str(point).replace("\\", "\\134"))
    assert cores.cpu_quota(*_files(tmp_path, line, "0::/\n")) == 1.0


def test_the_cpuset_controller_is_not_the_cpu_controller(tmp_path):
    """cgroup v1 names controllers in lists: ``cpu`` is in ``cpu,cpuacct`` but not in ``cpuset``,
    whose mount and whose membership (another group) say nothing of the CPU quota."""
    cpu, cpuset = tmp_path / "cpu,cpuacct", tmp_path / "cpuset"
    _group(cpu, cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    _group(cpu / "elsewhere", cpu_cfs_quota_us="50000", cpu_cfs_period_us="100000")  # the cpuset's path
    _group(cpuset, cpu_cfs_quota_us="50000", cpu_cfs_period_us="100000")  # a decoy: not a cpu mount
    mounts = (V1_LINE.format(root="/", point=cpu, controllers="cpu,cpuacct")
              + V1_LINE.format(root="/", point=cpuset, controllers="cpuset"))
    assert cores.cpu_quota(*_files(tmp_path, mounts, "3:cpuset:/elsewhere\n4:cpu,cpuacct:/\n")) is None


def test_the_groups_read_stop_at_the_mount(tmp_path):
    """The folder holding the mount point is no group of it: a cpu.max there is not read."""
    point = tmp_path / "fs"
    _group(point / "ctr", cpu_max="max 100000")
    _group(tmp_path, cpu_max="50000 100000")
    assert cores.cpu_quota(*_files(tmp_path, V2_LINE.format(root="/", point=point), "0::/ctr\n")) is None


def test_v1_mounts_without_the_cpu_controller_are_not_read(tmp_path):
    point = tmp_path / "memory"
    _group(point, cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")  # a decoy: not a cpu mount
    files = _files(tmp_path, V1_LINE.format(root="/", point=point, controllers="memory"), "4:cpu:/\n5:memory:/\n")
    assert cores.cpu_quota(*files) is None


def test_unreadable_or_odd_files_mean_no_limit(tmp_path):
    assert cores.cpu_quota(str(tmp_path / "no-mountinfo"), str(tmp_path / "no-cgroup")) is None
    point = tmp_path / "fs"
    _group(point, cpu_max="lots 100000")
    assert cores.cpu_quota(*_files(tmp_path, V2_LINE.format(root="/", point=point) + "garbage\n", "0::/\n")) is None
    # a line of a type and its fields but too few before them (it raised IndexError)
    assert cores.cpu_quota(*_files(tmp_path, "- cgroup2 cgroup2 rw\n", "0::/\n")) is None


def test_memory_limits_v2_kubernetes_the_smallest_wins(tmp_path):
    """``docker run --memory``, a Kubernetes limit on the pod and on the container: the smallest
    group's limit; ``max`` is none."""
    point = tmp_path / "fs"
    _group(point / "kubepods", memory_max="max")
    _group(point / "kubepods" / "pod1", memory_max=str(3 << 30))
    _group(point / "kubepods" / "pod1" / "ctr", memory_max=str(2 << 30))
    files = _files(tmp_path, V2_LINE.format(root="/", point=point), "0::/kubepods/pod1/ctr\n")
    assert cores.memory_limit(*files) == 2 << 30
    (point / "kubepods" / "pod1" / "memory.max").write_text(f"{1 << 30}\n")  # a tighter limit above
    assert cores.memory_limit(*files) == 1 << 30
    for group in ("kubepods/pod1/ctr", "kubepods/pod1"):
        (point / group / "memory.max").write_text("max\n")
    assert cores.memory_limit(*files) is None


def test_memory_limit_v1_and_its_no_limit(tmp_path):
    """cgroup v1 (this development VM): memory.limit_in_bytes, the memory controller's mount only;
    no limit reads as 2^63 less a page."""
    point, decoy = tmp_path / "memory", tmp_path / "cpu"
    _group(point / "docker" / "abc", memory_limit_in_bytes=str(700 << 20))
    _group(point, memory_limit_in_bytes="9223372036854771712")
    _group(decoy / "docker" / "abc", memory_limit_in_bytes=str(1 << 20))  # not a memory mount
    mounts = (V1_LINE.format(root="/", point=point, controllers="memory")
              + V1_LINE.format(root="/", point=decoy, controllers="cpu"))
    files = _files(tmp_path, mounts, "4:memory:/docker/abc\n1:cpu:/docker/abc\n0::/\n")
    assert cores.memory_limit(*files) == 700 << 20
    (point / "docker" / "abc" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cores.memory_limit(*files) is None
    assert cores.cpu_quota(*files) is None  # (the cpu mount holds no cpu files)


@pytest.mark.parametrize("limit, expected", [(700 << 20, 700 << 20), (None, 64 << 30), (1 << 50, 64 << 30)])
def test_usable_memory_is_the_machine_capped_by_the_limit(monkeypatch, limit, expected):
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PHYS_PAGES": 16 << 20, "SC_PAGE_SIZE": 4096}[name])
    monkeypatch.setattr(cores, "memory_limit", lambda: limit)
    assert cores.usable_memory() == expected


@pytest.mark.parametrize("affinity, quota, expected", [
    (64, 4.0, 4),      # a 4-CPU limit on a 64-core node
    (64, 1.5, 2),      # rounded up: 1.5 CPUs of time keep two threads busy half the time
    (64, 0.25, 1),     # at least one
    (2, 8.0, 2),       # a quota above the mask does not add cores
    (16, None, 16),    # no quota: the mask
])
def test_usable_cores_is_the_mask_capped_by_the_quota(monkeypatch, affinity, quota, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(cores, "cpu_quota", lambda: quota)
    assert cores.usable_cores() == expected


@pytest.mark.parametrize("count, expected", [(12, 12), (None, 1)])
def test_usable_cores_without_an_affinity_mask_are_the_machines(monkeypatch, count, expected):
    """Not on Linux: no mask and no control groups, so every core the machine has (1 when unknown)."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: count)
    monkeypatch.setattr(cores, "cpu_quota", lambda: 1.0)  # (what a Linux group's would cap: not read here)
    assert cores.usable_cores() == expected


def test_the_defaults_follow_the_quota(monkeypatch):
    """Decoders (``--workers``) and the numba backend's compute threads (``--threads``), unless given."""
    from gpu_pipeline.backends.numba_cpu import NumbaCpuBackend
    from gpu_pipeline.engine.decoding import decoder_count

    monkeypatch.setattr(cores, "cpu_quota", lambda: 1.0)
    assert decoder_count(None) == 1
    assert decoder_count(3) == 3
    backend = NumbaCpuBackend()
    try:
        assert backend.threads == 1
    finally:
        backend.close()


def test_info_shows_the_quota(monkeypatch):
    from typer.testing import CliRunner

    from gpu_pipeline.cli.app import app
    from gpu_pipeline.diagnostics import info

    monkeypatch.setattr(info, "cpu_quota", lambda: 1.5)
    monkeypatch.setattr(cores, "cpu_quota", lambda: 1.5)
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "(control group CPU quota: 1.5 CPUs)" in result.stdout
    assert f"{min(len(os.sched_getaffinity(0)), 2)} usable by this process" in result.stdout


# The labels' prange kernels run on numba's own pool, which numba sizes by the affinity mask alone.
_PRANGE_THREADS = """
import sys
import numba
from gpu_pipeline.engine import cores
from gpu_pipeline.backends import _numba_setup
cores.cpu_quota = lambda: float(sys.argv[1])
if not _numba_setup.parallel_kernels_usable():
    print("serial")
else:
    chosen = _numba_setup.parallel_or_serial("parallel", "serial")
    print(chosen, numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
"""


@pytest.mark.parametrize("numba_threads", [None, "2"])
def test_prange_kernels_run_on_at_most_the_usable_cores(numba_threads):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores to tell a cap of 1 from the default")
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "NUMBA_NUM_THREADS"}
    if numba_threads is not None:
        env["NUMBA_NUM_THREADS"] = numba_threads  # the user's own setting wins
    done = subprocess.run([sys.executable, "-c", _PRANGE_THREADS, "1"], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    if done.stdout.strip() == "serial":
        pytest.skip("no thread-safe threading layer here: the serial twins run")
    chosen, threads, pool = done.stdout.split()
    assert chosen == "parallel"
    assert int(threads) == (int(pool) if numba_threads else 1)
