"""Linux control groups: read this process's limits, and create capped groups.

Both cgroup v1 (one hierarchy per controller, limits inherited from every
ancestor) and v2 (unified) are handled. Creating groups needs root (or a
delegated subtree); where that is not possible the caller gets the reason.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60


def _own_paths() -> dict[str, str]:
    """controller -> cgroup path of this process ("" key: the v2 unified path)."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            out[""] = path
        for c in controllers.split(","):
            if c:
                out[c] = path
    return out


def _v1_dir(controller: str) -> Path | None:
    for name in (controller, f"{controller},cpuacct", f"cpuacct,{controller}"):
        d = ROOT / name
        if (d / "cgroup.procs").exists():
            return d
    return None


def _v2_dir() -> Path | None:
    for d in (ROOT, ROOT / "unified"):
        if (d / "cgroup.controllers").exists():
            return d
    return None


def _read_int(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    if raw == "max":
        return UNLIMITED
    try:
        return int(raw)
    except ValueError:
        return None


def memory_limit() -> int | None:
    """The tightest memory limit on this process's cgroup and its ancestors."""
    own = _own_paths()
    limits = []
    v1 = _v1_dir("memory")
    if v1 is not None and "memory" in own:
        d = v1 / own["memory"].lstrip("/")
        while True:
            v = _read_int(d / "memory.limit_in_bytes")
            if v is not None:
                limits.append(v)
            if d == v1 or v1 not in d.parents:
                break
            d = d.parent
    v2 = _v2_dir()
    if v2 is not None and "" in own:
        d = v2 / own[""].lstrip("/")
        while d != v2 and v2 in d.parents:
            v = _read_int(d / "memory.max")
            if v is not None:
                limits.append(v)
            d = d.parent
    real = [v for v in limits if v < UNLIMITED]
    return min(real) if real else None


@dataclass
class Cgroup:
    """A group created by us; processes are added by pid; removed when empty."""

    dirs: list[Path] = field(default_factory=list)
    procs_files: list[Path] = field(default_factory=list)

    def add(self, pid: int) -> None:
        for f in self.procs_files:
            f.write_text(str(pid))

    def remove(self) -> None:
        for d in self.dirs:
            with contextlib.suppress(OSError):
                d.rmdir()


class CgroupFactory:
    """Creates child groups under this process's own groups with memory/CPU caps."""

    def __init__(self) -> None:
        self.own = _own_paths()
        self.reason = ""
        self.mode = self._detect()

    def _detect(self) -> str:
        if os.geteuid() != 0:
            self.reason = "creating cgroups needs root (or a delegated cgroup)"
            return ""
        if _v1_dir("memory") is not None and "memory" in self.own:
            return "v1"
        v2 = _v2_dir()
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

    def create(self, name: str, memory_bytes: int | None, cpus: float | None) -> Cgroup:
        cg = Cgroup()
        if self.mode == "v1":
            if memory_bytes is not None:
                d = _v1_dir("memory") / self.own["memory"].lstrip("/") / name
                d.mkdir(exist_ok=True)
                (d / "memory.limit_in_bytes").write_text(str(memory_bytes))
                cg.dirs.append(d)
                cg.procs_files.append(d / "cgroup.procs")
            cpu_root = _v1_dir("cpu")
            if cpus is not None and cpu_root is not None and "cpu" in self.own:
                d = cpu_root / self.own["cpu"].lstrip("/") / name
                d.mkdir(exist_ok=True)
                period = _read_int(d / "cpu.cfs_period_us") or 100_000
                (d / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
                cg.dirs.append(d)
                cg.procs_files.append(d / "cgroup.procs")
        elif self.mode == "v2":
            d = _v2_dir() / self.own[""].lstrip("/") / name
            d.mkdir(exist_ok=True)
            if memory_bytes is not None:
                (d / "memory.max").write_text(str(memory_bytes))
            if cpus is not None and (d / "cpu.max").exists():
                (d / "cpu.max").write_text(f"{int(cpus * 100_000)} 100000")
            cg.dirs.append(d)
            cg.procs_files.append(d / "cgroup.procs")
        return cg
