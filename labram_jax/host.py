"""What this host gives a run: its memory and its CPUs, as the container's cgroup limits say, else the machine's.

A container on a large machine sees the machine's RAM in /proc/meminfo and all its cores in sched_getaffinity;
its real budget is the cgroup's: memory.max and cpu.max (cgroup v2), memory.limit_in_bytes and
cpu.cfs_quota_us / cpu.cfs_period_us (v1). The tightest limit on the process's cgroup path (or its ancestors, each
of which also binds it) wins. A path the mount does not show (a cgroup namespace) is read at the mount's root.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

UNLIMITED = 2 ** 62  # v1 writes "no limit" as a page-rounded 2^63 - 1


def _cgroup_paths(proc_self: Path) -> dict[str, str]:
    """controller -> the process's cgroup path ("" names the v2 unified hierarchy)."""
    paths = {}
    try:
        lines = proc_self.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _candidates(folder: Path, path: str) -> list[Path]:
    """The cgroup folder of `path` under a mounted hierarchy and each ancestor up to the mount's root."""
    here = folder / path.lstrip("/")
    if not here.is_dir():
        return [folder]
    chain = [here]
    while chain[-1] != folder and folder in chain[-1].parents:
        chain.append(chain[-1].parent)
    return chain


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _folders(root: Path, proc_self: Path, controller: str) -> list[Path]:
    """The cgroup folders that bind this process for `controller`: the v2 unified hierarchy's, then v1's."""
    paths = _cgroup_paths(proc_self)
    folders = _candidates(root, paths[""]) if "" in paths else []
    if controller in paths:
        folders += _candidates(root / controller, paths[controller])
    return folders


def memory_bytes(root: str | os.PathLike = "/sys/fs/cgroup", proc_self: str | os.PathLike = "/proc/self/cgroup",
                 physical: int | None = None) -> int:
    """The bytes this process may use: the smallest cgroup memory limit, else the machine's RAM."""
    if physical is None:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    best = physical
    for folder in _folders(Path(root), Path(proc_self), "memory"):
        for name in ("memory.max", "memory.limit_in_bytes"):  # v2 ("max" when unlimited), v1
            text = _read(folder / name)
            if text is not None and text.isdigit() and int(text) < UNLIMITED:
                best = min(best, int(text))
    return best


def cpu_count(root: str | os.PathLike = "/sys/fs/cgroup", proc_self: str | os.PathLike = "/proc/self/cgroup",
              affinity: int | None = None) -> int:
    """The CPUs this process may keep busy: its affinity, capped by the smallest cgroup CPU quota (rounded up)."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0))
    best = affinity
    for folder in _folders(Path(root), Path(proc_self), "cpu"):
        v2 = (_read(folder / "cpu.max") or "").split()  # "QUOTA PERIOD", or "max PERIOD"
        v1 = [_read(folder / "cpu.cfs_quota_us") or "", _read(folder / "cpu.cfs_period_us") or ""]  # -1: none
        for quota, period in (v2 if len(v2) == 2 else ["", ""], v1):
            if quota.isdigit() and period.isdigit() and int(period) > 0:
                best = min(best, max(1, math.ceil(int(quota) / int(period))))
    return best


def resident_bytes(statm: str | os.PathLike = "/proc/self/statm") -> int:
    """This process's resident memory now (0 where /proc does not say)."""
    fields = (_read(Path(statm)) or "").split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") if len(fields) > 1 and fields[1].isdigit() else 0
