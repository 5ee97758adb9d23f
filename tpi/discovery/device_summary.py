"""The device summary a worker announces: what it can offer, in three numbers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil

from tpi.discovery.record import DeviceSummary
from tpi.system.cgroup_limits import cpu_limit, memory_limit


def device_summary(store: Path, budget_bytes: int | None = None) -> DeviceSummary:
    """Cores and memory this worker may use (cgroup limits and its own memory budget
    count) and the free disk where its shards go."""
    cores = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    quota = cpu_limit()
    if quota is not None:
        cores = min(cores, round(quota, 2))
    memory = [psutil.virtual_memory().total]
    memory += [m for m in (memory_limit(), budget_bytes) if m is not None]
    return DeviceSummary(cores, min(memory), _free_bytes(store))


def _free_bytes(path: Path) -> int:
    """Free space on the file system `path` is (or will be) on."""
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0
