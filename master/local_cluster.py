"""Start N worker daemons as local processes on loopback (for `tpi cluster`),
optionally emulating small devices: memory and CPU caps (cgroups, where the
kernel lets us), and slow links (relays: tpi.master.link_relays)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpi.comm.links import ClusterError, display_address
from tpi.emulation.cgroups import Cgroup, CgroupFactory
from tpi.emulation.link_shaper import LinkSpec, parse_duration, parse_rate
from tpi.master.link_relays import LinkRelays
from tpi.system.lifeline import lifeline, spawn

START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class DeviceLimits:
    memory_bytes: int | None = None
    cpus: float | None = None

    @property
    def any(self) -> bool:
        return self.memory_bytes is not None or self.cpus is not None


def _describe(lim: DeviceLimits) -> str:
    what = []
    if lim.memory_bytes is not None:
        what.append(f"memory {lim.memory_bytes / 2**30:.2f} GiB")
    if lim.cpus is not None:
        what.append(f"{lim.cpus:g} CPUs")
    return ", ".join(what)


def link_from_flags(latency: str | None, bandwidth: str | None) -> LinkSpec | None:
    """--link-latency / --link-bandwidth as a shaper setting (None: unshaped)."""
    if not (latency or bandwidth):
        return None
    return LinkSpec(parse_duration(latency or "0ms"), parse_rate(bandwidth) if bandwidth else None)


@dataclass
class LocalWorker:
    index: int
    proc: subprocess.Popen
    port_file: Path
    log_path: Path
    address: str = ""
    cgroup: Cgroup | None = None
    data_port: int | None = None  # chosen here when links are emulated (relayed)


@dataclass
class LocalCluster:
    count: int
    base_dir: Path
    threads: int | None = None  # torch threads per worker
    extra_args: list[str] = field(default_factory=list)
    limits: DeviceLimits = field(default_factory=DeviceLimits)
    link: LinkSpec | None = None
    # Uneven clusters: one entry per worker (None: `limits` / `link` for all), and
    # the master's own caps (None: the memory cap of `limits`, no CPU cap).
    worker_limits: list[DeviceLimits] | None = None
    worker_links: list[LinkSpec | None] | None = None
    master_limits: DeviceLimits | None = None
    workers: list[LocalWorker] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is (and is not) emulated
    shaper: subprocess.Popen | None = None  # the first shaper (one per distinct link)
    shapers: list[subprocess.Popen] = field(default_factory=list)
    master_cgroup: Cgroup | None = None
    # Every relay's address and its link (emulated links only; tests and benchmarks).
    relay_specs: dict[str, LinkSpec] = field(default_factory=dict)
    # Where each device reaches each worker's data port (TPI_PEER_ROUTES), when relayed.
    routes: dict[str, dict[str, str]] = field(default_factory=dict)
    _relays: LinkRelays | None = None
    _cgroups: CgroupFactory | None = None
    _lifelines: list[int] = field(default_factory=list)  # write ends: closed when we exit

    def limits_of(self, i: int) -> DeviceLimits:
        """Caps of worker `i` (1-based)."""
        return self.worker_limits[i - 1] if self.worker_limits else self.limits

    def link_of(self, i: int) -> LinkSpec | None:
        return self.worker_links[i - 1] if self.worker_links else self.link

    def _lifeline(self) -> int:
        """A new lifeline: returns the read end to pass to a child (closed here after)."""
        read_end, write_end = lifeline()
        self._lifelines.append(write_end)
        return read_end

    def _shaped(self) -> bool:
        return any(
            (s := self.link_of(i)) is not None and (s.latency_s > 0 or s.rate_bps)
            for i in range(1, self.count + 1)
        )

    def _spawn(
        self, i: int, listen: str = "tcp://127.0.0.1:0", data_port: int | None = None
    ) -> LocalWorker:
        wdir = self.base_dir / f"worker{i}"
        wdir.mkdir(exist_ok=True)
        port_file = wdir / "address"
        port_file.unlink(missing_ok=True)
        log_path = wdir / "worker.log"
        cmd = [
            sys.executable,
            "-m",
            "tpi.worker",
            "--listen",
            listen,
            "--store",
            str(wdir / "store"),
            "--port-file",
            str(port_file),
            "--data-port",
            # Relayed links: a port chosen here, so the relays in front of it can be
            # made before the worker says where it listens. Otherwise any free port:
            # a restart on the old control port must not collide.
            str(data_port or (_free_port() if self._shaped() else 0)),
            "--parent-fd",
            str(parent_fd := self._lifeline()),
            *self.extra_args,
        ]
        env = dict(os.environ)
        if self.threads:
            cmd += ["--threads", str(self.threads)]
            # Idle OpenMP threads spin; on a shared machine that steals the cores.
            env["OMP_NUM_THREADS"] = str(self.threads)
        limits = self.limits_of(i)
        if limits.memory_bytes is not None:
            # Planned against even where no cgroup enforces it.
            cmd += ["--memory-budget", str(limits.memory_bytes)]
        with open(log_path, "ab") as log:
            proc = spawn(cmd, log, parent_fd, env)
        w = LocalWorker(i, proc, port_file, log_path)
        w.data_port = int(cmd[cmd.index("--data-port") + 1]) or None
        if self._cgroups is not None and limits.any:
            # Python takes ~0.1 s to start; the worker allocates nothing big before that.
            w.cgroup = self._cgroups.create(
                f"tpi-{os.getpid()}-w{i}", limits.memory_bytes, limits.cpus
            )
            w.cgroup.add(proc.pid)
        return w

    def _setup_limits(self) -> None:
        every = [self.limits_of(i) for i in range(1, self.count + 1)]
        if not any(lim.any for lim in every) and not (
            self.master_limits and self.master_limits.any
        ):
            return
        factory = CgroupFactory()
        if factory.available:
            self._cgroups = factory
            described = sorted({_describe(lim) for lim in every if lim.any})
            if self.worker_limits:
                described = [
                    f"worker {i}: {_describe(lim)}" for i, lim in enumerate(every, 1) if lim.any
                ]
            if described:
                self.notes.append(
                    f"device caps per worker: {'; '.join(described)} (cgroup {factory.mode})"
                )
        else:
            self.notes.append(
                f"device caps NOT enforced ({factory.reason}); workers still plan within the memory limit"
            )

    def _start_shaper(self) -> None:
        """The relays of the emulated links, if any (tpi.master.link_relays)."""
        relays = LinkRelays(self.base_dir, self._lifeline, START_TIMEOUT_S)
        relays.start(self.workers, self.link_of)
        self.shapers, self.shaper = relays.procs, relays.procs[0] if relays.procs else None
        self.relay_specs, self.routes = relays.specs, relays.routes
        self.notes += relays.notes
        self._relays = relays

    def start(self) -> list[str]:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._setup_limits()
            for i in range(1, self.count + 1):
                self.workers.append(self._spawn(i))
            deadline = time.monotonic() + START_TIMEOUT_S
            for w in self.workers:
                self._wait_address(w, deadline)
            self._start_shaper()
        except BaseException:
            self.stop()
            raise
        return [w.address for w in self.workers]

    def cap_master(self) -> bool:
        """Put this process (the master, a rank like the others) under the same memory
        cap as the workers (or its own caps, `master_limits`). Done after they started,
        so their groups are not nested in the master's; what the master already holds
        moves along (cgroup v1)."""
        lim = self.master_limits or DeviceLimits(self.limits.memory_bytes, None)
        if self._cgroups is None or not lim.any:
            return False
        self.master_cgroup = self._cgroups.create(
            f"tpi-{os.getpid()}-master", lim.memory_bytes, lim.cpus, move_charges=True
        )
        try:
            self.master_cgroup.add(os.getpid())
        except OSError as e:  # e.g. it already holds more than the cap
            self.master_cgroup.remove()
            self.master_cgroup = None
            self.notes.append(f"the master is NOT capped ({e.strerror or e})")
            return False
        self.notes.append(f"the master is capped too: {_describe(lim)}")
        return True

    def _wait_address(self, w: LocalWorker, deadline: float) -> None:
        while not w.port_file.exists():
            if w.proc.poll() is not None:
                tail = w.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise ClusterError(
                    f"local worker {w.index} exited: {tail[0] if tail else 'no output'}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"local worker {w.index} did not start within {START_TIMEOUT_S:g} s"
                )
            time.sleep(0.05)
        w.address = display_address(w.port_file.read_text().strip())

    def signal_worker(self, index: int, sig: int) -> None:
        """Send `sig` to worker `index` (1-based), e.g. SIGKILL or SIGSTOP (tests, soak runs)."""
        os.kill(self.workers[index - 1].proc.pid, sig)

    def restart(self, index: int) -> str:
        """Start worker `index` again, on the port it had (after it died or was killed)."""
        old = self.workers[index - 1]
        if old.proc.poll() is None:
            os.killpg(old.proc.pid, signal.SIGKILL)
        old.proc.wait()
        port = old.port_file.read_text().strip().rpartition(":")[2]
        w = self._spawn(index, f"tcp://127.0.0.1:{port}", old.data_port)
        self.workers[index - 1] = w
        self._wait_address(w, time.monotonic() + START_TIMEOUT_S)
        if old.address != display_address(old.port_file.read_text().strip()):
            w.address = old.address  # the master keeps talking through the same relay
        return w.address

    @staticmethod
    def _terminate(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        procs = [w.proc for w in self.workers] + self.shapers
        for p in procs:
            self._terminate(p)
        deadline = time.monotonic() + 5
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for w in self.workers:
            if w.cgroup is not None:
                w.cgroup.remove()
        if self.master_cgroup is not None:
            self.master_cgroup.leave(os.getpid())
            self.master_cgroup.remove()
            self.master_cgroup = None
        self.workers.clear()
        self.shaper = None
        self.shapers.clear()
        if self._relays is not None:
            self._relays.forget()
            self._relays = None
        for fd in self._lifelines:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._lifelines.clear()
