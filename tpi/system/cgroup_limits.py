"""Linux control groups: where this process's groups are, and its memory limit.

Both cgroup v1 (one hierarchy per controller, limits inherited from every
ancestor) and v2 (unified) are handled.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60


def own_paths() -> dict[str, str]:
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


def v1_dir(controller: str) -> Path | None:
    for name in (controller, f"{controller},cpuacct", f"cpuacct,{controller}"):
        d = ROOT / name
        if (d / "cgroup.procs").exists():
            return d
    return None


def v2_dir() -> Path | None:
    for d in (ROOT, ROOT / "unified"):
        if (d / "cgroup.controllers").exists():
            return d
    return None


def read_int(path: Path) -> int | None:
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


def _own_chain(controller: str) -> list[Path]:
    """This process's cgroup directories for `controller` (v1) and in the unified
    hierarchy (v2), each followed by its ancestors: a limit anywhere up counts."""
    own = own_paths()
    dirs = []
    v1 = v1_dir(controller)
    if v1 is not None and controller in own:
        d = v1 / own[controller].lstrip("/")
        while True:
            dirs.append(d)
            if d == v1 or v1 not in d.parents:
                break
            d = d.parent
    v2 = v2_dir()
    if v2 is not None and "" in own:
        d = v2 / own[""].lstrip("/")
        while d != v2 and v2 in d.parents:
            dirs.append(d)
            d = d.parent
    return dirs


def memory_limit() -> int | None:
    """The tightest memory limit on this process's cgroup and its ancestors."""
    limits = [
        v
        for d in _own_chain("memory")
        for name in ("memory.limit_in_bytes", "memory.max")
        if (v := read_int(d / name)) is not None and v < UNLIMITED
    ]
    return min(limits) if limits else None


def cpu_limit() -> float | None:
    """CPU cores this process's cgroup (or an ancestor) may use: the tightest CFS
    quota / period (v1 cpu.cfs_quota_us, v2 cpu.max); None without a quota.

    An emulated 0.25-core device runs at full speed for 25 ms of every 100 ms and
    then waits, so a short timing sees a fast machine: the planner needs this, and
    a timing long enough to cross several periods, to know the real pace."""
    limits = []
    for d in _own_chain("cpu"):
        # A directory has only its own version's files, so reading both kinds in
        # every directory needs no record of which hierarchy it came from.
        quota, period = read_int(d / "cpu.cfs_quota_us"), read_int(d / "cpu.cfs_period_us")
        if quota is not None and period and 0 < quota < UNLIMITED:
            limits.append(quota / period)
        try:
            quota_text, period_text = (d / "cpu.max").read_text().split()
            if quota_text != "max":
                limits.append(int(quota_text) / int(period_text))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None
