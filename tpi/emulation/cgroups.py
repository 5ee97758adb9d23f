"""Create capped Linux control groups for emulated devices (memory, CPU).

Creating groups needs root (or a delegated subtree); where that is not possible
the caller gets the reason. Reading limits lives in tpi.system.cgroup_limits.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from tpi.system.cgroup_limits import own_paths, read_int, v1_dir, v2_dir


@dataclass
class Cgroup:
    """A group created by us; processes are added by pid; removed when empty."""

    dirs: list[Path] = field(default_factory=list)
    procs_files: list[Path] = field(default_factory=list)

    def add(self, pid: int) -> None:
        for f in self.procs_files:
            f.write_text(str(pid))

    def leave(self, pid: int) -> None:
        """Move `pid` back to the parent groups (a group still holding it cannot be removed)."""
        for f in self.procs_files:
            with contextlib.suppress(OSError):
                (f.parent.parent / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for d in self.dirs:
            with contextlib.suppress(OSError):
                d.rmdir()


class CgroupFactory:
    """Creates child groups under this process's own groups with memory/CPU caps."""

    def __init__(self) -> None:
        self.own = own_paths()
        self.reason = ""
        self.mode = self._detect()

    def _detect(self) -> str:
        if os.geteuid() != 0:
            self.reason = "creating cgroups needs root (or a delegated cgroup)"
            return ""
        if v1_dir("memory") is not None and "memory" in self.own:
            return "v1"
        v2 = v2_dir()
        if v2 is not None and "" in self.own:
            d = v2 / self.own[""].lstrip("/")
            controllers = (d / "cgroup.subtree_control").read_text().split() if d.exists() else []
            if "memory" in controllers:
                return "v2"
            self.reason = f"cgroup v2 memory controller not enabled under {d}"
            return ""
        self.reason = "no cgroup memory controller mounted"
        return ""

    @property
    def available(self) -> bool:
        return bool(self.mode)

    def create(
        self, name: str, memory_bytes: int | None, cpus: float | None, move_charges: bool = False
    ) -> Cgroup:
        """A new group with these caps. `move_charges`: memory a process already holds
        moves with it when added (cgroup v1 only; v2 charges stay where they were made),
        for a process capped after it started, such as a master capping itself."""
        cg = Cgroup()
        if self.mode == "v1":
            if memory_bytes is not None:
                d = v1_dir("memory") / self.own["memory"].lstrip("/") / name
                d.mkdir(exist_ok=True)
                (d / "memory.limit_in_bytes").write_text(str(memory_bytes))
                if move_charges:
                    with contextlib.suppress(OSError):  # 3: anonymous and page-cache pages
                        (d / "memory.move_charge_at_immigrate").write_text("3")
                cg.dirs.append(d)
                cg.procs_files.append(d / "cgroup.procs")
            cpu_root = v1_dir("cpu")
            if cpus is not None and cpu_root is not None and "cpu" in self.own:
                d = cpu_root / self.own["cpu"].lstrip("/") / name
                d.mkdir(exist_ok=True)
                period = read_int(d / "cpu.cfs_period_us") or 100_000
                (d / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
                cg.dirs.append(d)
                cg.procs_files.append(d / "cgroup.procs")
        elif self.mode == "v2":
            d = v2_dir() / self.own[""].lstrip("/") / name
            d.mkdir(exist_ok=True)
            if memory_bytes is not None:
                (d / "memory.max").write_text(str(memory_bytes))
            if cpus is not None and (d / "cpu.max").exists():
                (d / "cpu.max").write_text(f"{int(cpus * 100_000)} 100000")
            cg.dirs.append(d)
            cg.procs_files.append(d / "cgroup.procs")
        return cg
