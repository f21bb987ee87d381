"""The host's budget as its container sets it: cgroup v2 and v1 memory and CPU limits, on made-up cgroup trees."""
import os
from pathlib import Path

from labram_jax import host

GIB = 2 ** 30


def tree(root: Path, files: dict[str, str], proc_self: str) -> tuple[Path, Path]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    (root / "self_cgroup").write_text(proc_self)
    return root / "fs", root / "self_cgroup"


def test_cgroup_v2_limits_on_the_path_and_its_ancestors(tmp_path):
    fs, proc = tree(tmp_path, {"fs/job/memory.max": "max", "fs/job/cpu.max": "max 100000",
                               "fs/job/step/memory.max": str(8 * GIB), "fs/job/step/cpu.max": "150000 100000"},
                    "0::/job/step\n")
    assert host.memory_bytes(fs, proc, physical=512 * GIB) == 8 * GIB
    assert host.cpu_count(fs, proc, affinity=64) == 2  # 1.5 CPUs of quota keep 2 busy
    # the parent binds too
    (fs / "job" / "memory.max").write_text(f"{4 * GIB}\n")
    assert host.memory_bytes(fs, proc, physical=512 * GIB) == 4 * GIB


def test_cgroup_v1_limits(tmp_path):
    fs, proc = tree(tmp_path, {"fs/memory/docker/abc/memory.limit_in_bytes": str(24 * GIB),
                               "fs/cpu/docker/abc/cpu.cfs_quota_us": "200000",
                               "fs/cpu/docker/abc/cpu.cfs_period_us": "100000"},
                    "4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n0::/\n")
    assert host.memory_bytes(fs, proc, physical=256 * GIB) == 24 * GIB
    assert host.cpu_count(fs, proc, affinity=64) == 2
    assert host.cpu_count(fs, proc, affinity=1) == 1  # the affinity is tighter


def test_no_limit_or_no_cgroup_is_the_machine(tmp_path):
    # v1's "no limit" (2^63 - 1 rounded to pages), quota -1; a namespaced path read at the mount's root
    fs, proc = tree(tmp_path, {"fs/memory/memory.limit_in_bytes": "9223372036854771712",
                               "fs/cpu/cpu.cfs_quota_us": "-1", "fs/cpu/cpu.cfs_period_us": "100000"},
                    "4:memory:/not/in/this/namespace\n1:cpu:/\n")
    assert host.memory_bytes(fs, proc, physical=16 * GIB) == 16 * GIB
    assert host.cpu_count(fs, proc, affinity=8) == 8
    assert host.memory_bytes(tmp_path / "none", tmp_path / "none", physical=GIB) == GIB
    assert host.cpu_count(tmp_path / "none", tmp_path / "none", affinity=3) == 3
    # a namespaced path whose mount root carries the limit
    (fs / "memory" / "memory.limit_in_bytes").write_text(str(2 * GIB))
    assert host.memory_bytes(fs, proc, physical=16 * GIB) == 2 * GIB


def test_resident_memory_from_statm(tmp_path):
    (tmp_path / "statm").write_text("9000 1000 300 10 0 700 0\n")
    assert host.resident_bytes(tmp_path / "statm") == 1000 * os.sysconf("SC_PAGE_SIZE")
    assert host.resident_bytes(tmp_path / "none") == 0  # no /proc: nothing known to keep back
    assert host.resident_bytes() > 0  # this process, from the real /proc/self/statm
