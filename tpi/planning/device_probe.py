"""A node measures itself: cores, CPU quota and sustained speed, memory, the read
speed of its store's disk, and (tpi.planning.slice_probe) its layer slices.

What takes time is cached in $TPI_HOME/profiles, one file per device identity
(host, CPU, torch threads, CPU quota, versions): it survives restarts, a new cap
or thread count is a new identity, and `refresh` measures again. Memory is read
afresh every time: it changes while a node runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from tpi import __version__
from tpi.kernels.build import kernels_summary
from tpi.model.config import ModelConfig
from tpi.planning.profile import SCHEMA, DeviceFacts, SliceProfile, slices_key
from tpi.planning.slice_probe import PROBE_BYTES, Setting, measure_head, measure_point, shape_key
from tpi.storage.atomic import atomic_write_text
from tpi.storage.file_lock import file_lock
from tpi.system.cgroup_limits import cpu_limit, memory_limit
from tpi.system.process_memory import rss_bytes

SUSTAIN_S = 1.2  # long enough to cross a dozen CFS periods (100 ms) of a CPU quota
DISK_PROBE_BYTES = 64 << 20
DISK_CHUNK = 8 << 20

Echo = Callable[[str], None]


def _cpu_name() -> str:
    if platform.machine().lower() in ("aarch64", "arm64"):
        return arm_cpu_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Arm's own cores by MIDR part number (implementer 0x41), the ones small boards carry.
ARM_PARTS = {
    0xD03: "Cortex-A53",
    0xD04: "Cortex-A35",
    0xD05: "Cortex-A55",
    0xD07: "Cortex-A57",
    0xD08: "Cortex-A72",
    0xD09: "Cortex-A73",
    0xD0A: "Cortex-A75",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1",
    0xD0D: "Cortex-A77",
    0xD40: "Neoverse-V1",
    0xD41: "Cortex-A78",
    0xD44: "Cortex-X1",
    0xD46: "Cortex-A510",
    0xD47: "Cortex-A710",
    0xD49: "Neoverse-N2",
    0xD4B: "Cortex-A78C",
}


def arm_cpu_name(sys_root: Path = Path("/")) -> str:
    """An AArch64 CPU's name: the board's (device tree, "Raspberry Pi 5 Model B") and
    the core's (from its MIDR_EL1 register as Linux shows it). Never /proc/cpuinfo's
    "model name": ARM kernels print none, and under emulation it is the host's."""
    parts = []
    with contextlib.suppress(OSError):
        model = (sys_root / "proc/device-tree/model").read_bytes().rstrip(b"\0").decode()
        parts.append(model.strip())
    midr = sys_root / "sys/devices/system/cpu/cpu0/regs/identification/midr_el1"
    with contextlib.suppress(OSError, ValueError):
        value = int(midr.read_text().strip(), 16)
        implementer, part = (value >> 24) & 0xFF, (value >> 4) & 0xFFF
        if implementer == 0x41 and part in ARM_PARTS:
            parts.append(ARM_PARTS[part])
        else:
            parts.append(f"implementer {implementer:#x} part {part:#x}")
    return ", ".join(parts + ["aarch64"])


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def identity() -> dict:
    """What a cached profile is valid for."""
    limit = cpu_limit()
    return {
        "schema": SCHEMA,
        "host": socket.gethostname(),
        "cpu": _cpu_name(),
        "kernels": kernels_summary(),
        "cores": _cores(),
        "threads": torch.get_num_threads(),
        "cpu_limit": round(limit, 3) if limit is not None else None,
        "torch": torch.__version__,
        "tpi": __version__,
    }


def profiles_dir() -> Path:
    from tpi.paths import tpi_home

    return tpi_home() / "profiles"


def cache_path(ident: dict | None = None) -> Path:
    ident = ident or identity()
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return profiles_dir() / f"device-{digest}.json"


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and data.get("schema") == SCHEMA else {}
    except (OSError, ValueError):
        return {}


def measure_sustained(seconds: float = SUSTAIN_S) -> float:
    """Share of its best short-run speed this process keeps over `seconds`."""
    x = torch.randn(64, 512)
    w = torch.randn(512, 512)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - t0)
    count, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        x @ w
        count += 1
    return max(0.01, min(1.0, count * best / elapsed))


def measure_disk(directory: Path) -> float | None:
    """Cold read speed (bytes/s) of the disk holding `directory`: a file written,
    synced, dropped from the page cache, then read back as the loader reads."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".tpi-disk-probe-", dir=directory)
    try:
        block = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(DISK_PROBE_BYTES >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(DISK_CHUNK)
        t0 = time.perf_counter()
        with open(name, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        return DISK_PROBE_BYTES / max(time.perf_counter() - t0, 1e-9)
    except OSError:
        return None
    finally:
        os.unlink(name)


def _memory() -> tuple[int, int]:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def device_facts(
    store: Path | None,
    budget_bytes: int | None = None,
    refresh: bool = False,
    echo: Echo | None = None,
) -> DeviceFacts:
    """This node's facts: measured ones from the cache unless `refresh`."""
    ident = identity()
    path = cache_path(ident)
    with file_lock(profiles_dir() / ".lock"):
        cached = {} if refresh else _load(path)
        dev = cached.get("device", {})
        changed = False
        t0 = time.perf_counter()
        if "sustained" not in dev:
            if echo:
                echo("measuring sustained CPU speed...")
            dev["sustained"] = measure_sustained()
            changed = True
        disks = dev.setdefault("disks", {})
        disk_key = None
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
            disk_key = str(os.stat(store).st_dev)
            if disk_key not in disks:
                if echo:
                    echo(f"measuring disk read speed under {store}...")
                disks[disk_key] = measure_disk(store)
                changed = True
        if changed:
            dev["probe_seconds"] = round(
                dev.get("probe_seconds", 0.0) + time.perf_counter() - t0, 3
            )
            dev["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            cached.update({"schema": SCHEMA, "identity": ident, "device": dev})
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(cached, indent=1))
    total, available = _memory()
    return DeviceFacts(
        host=ident["host"],
        cpu=ident["cpu"],
        kernels=ident["kernels"],
        cores=ident["cores"],
        threads=ident["threads"],
        cpu_limit=cpu_limit(),
        sustained=float(dev["sustained"]),
        memory_total=total,
        memory_available=available,
        memory_limit=memory_limit(),
        budget_bytes=budget_bytes,
        rss_bytes=rss_bytes(),
        disk_read_bytes_per_s=disks.get(disk_key) if disk_key else None,
        disk_path=str(store) if store is not None else None,
        torch=ident["torch"],
        tpi=ident["tpi"],
        measured_at=dev.get("measured_at", ""),
        probe_seconds=float(dev.get("probe_seconds", 0.0)),
    )


def slice_profile(
    cfg: ModelConfig,
    setting: Setting,
    points: list[tuple[int, int, int]],
    head_rows: int | None = None,
    refresh: bool = False,
    echo: Echo | None = None,
    probe_bytes: int = PROBE_BYTES,
) -> SliceProfile:
    """Timings of these slice shapes (q heads, KV heads, MLP columns) of a model
    shaped like `cfg`, measured once per device identity and cached."""
    path = cache_path()
    key = slices_key(shape_key(cfg), setting.key())
    with file_lock(profiles_dir() / ".lock"):
        data = _load(path)
    table = data.get("slices", {}).get(key, {}) if not refresh else {}
    have = {(p["q"], p["kv"], p["mlp"]): p for p in table.get("points", [])}
    head = table.get("head")
    todo = [pt for pt in points if tuple(pt) not in have]
    for i, (q, kv, mlp) in enumerate(todo):
        if echo:
            echo(
                f"timing layer slice {i + 1}/{len(todo)} ({q} heads, {mlp} MLP columns, {setting.key()})"
            )
        have[(q, kv, mlp)] = measure_point(cfg, setting, q, kv, mlp, probe_bytes).to_dict()
    if head_rows and (head is None or head.get("rows") != head_rows):
        if echo:
            echo("timing the LM head")
        head = measure_head(cfg, setting, head_rows).to_dict()
    if todo or head != table.get("head"):
        with file_lock(profiles_dir() / ".lock"):
            data = _load(path) or {"schema": SCHEMA, "identity": identity()}
            data.setdefault("slices", {})[key] = {
                "setting": setting.key(),
                "points": list(have.values()),
                "head": head,
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(data, indent=1))
    wanted = [have[tuple(pt)] for pt in points]
    return SliceProfile(setting.key(), tuple(wanted), head if head_rows else None)


def probe_budget(facts: DeviceFacts) -> int:
    """Layer copies a probe may hold here: at most PROBE_BYTES, and a third of what
    this node may still use (a 400 MB device must not be pushed over its cap)."""
    room = facts.capacity[0] - facts.rss_bytes
    return int(max(16 << 20, min(PROBE_BYTES, room // 3)))
