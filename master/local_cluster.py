"""Start N worker daemons as local processes on loopback (for `tpi cluster`),
optionally emulating small devices: memory and CPU caps (cgroups, where the
kernel lets us), and slow links (the user-space link shaper).

Emulated links: every byte between two devices crosses a relay with the link's
latency and bandwidth: the master's control and data links to each worker
(that worker's link), and the direct links between workers of a pipeline (the
slower of the two workers' links: a far device costs every link to it). The
master learns the relays' addresses from TPI_PEER_ROUTES (tpi.master.direct_hops)."""

from __future__ import annotations

import contextlib
import json
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
from tpi.emulation.link_shaper import LinkSpec, parse_duration, parse_rate, start_process
from tpi.errors import TpiError
from tpi.master.direct_hops import ROUTES_ENV
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

    def _pair_link(self, a: LocalWorker, b: LocalWorker) -> LinkSpec | None:
        """The emulated link between two workers: the slower of their links."""
        specs = [s for s in (self.link_of(a.index), self.link_of(b.index)) if s is not None]
        if not specs:
            return None
        rates = [s.rate_bps for s in specs if s.rate_bps]
        return LinkSpec(max(s.latency_s for s in specs), min(rates) if rates else None)

    def _start_shaper(self) -> None:
        """One relay process per distinct link setting, in front of every port a
        device reaches another by: the master's control and data links to each
        worker, and each worker's data port as its pipeline peers reach it."""
        routes: dict[LinkSpec, set[str]] = {}
        control: dict[LinkSpec, list[LocalWorker]] = {}
        wanted: list[tuple[str, str, LinkSpec]] = []  # (from, to worker address, spec)
        for w in self.workers:
            spec = self.link_of(w.index)
            if spec is not None and (spec.latency_s > 0 or spec.rate_bps):
                control.setdefault(spec, []).append(w)
                routes.setdefault(spec, set()).add(w.address)
        if not control:
            return
        for w in self.workers:
            target = f"127.0.0.1:{w.data_port}"
            for other in [None, *self.workers]:
                if other is w:
                    continue
                spec = self.link_of(w.index) if other is None else self._pair_link(other, w)
                if spec is not None and (spec.latency_s > 0 or spec.rate_bps):
                    routes.setdefault(spec, set()).add(target)
                    wanted.append(("master" if other is None else other.address, w.address, spec))
        mappings = self._relay(routes, control)
        final = {w.address: w.address for w in self.workers}
        for w in self.workers:
            for spec, members in control.items():
                if w in members:
                    final[w.address] = mappings[spec][w.address]
        for src, dst, spec in wanted:
            worker = next(w for w in self.workers if w.address == dst)
            relay = mappings[spec][f"127.0.0.1:{worker.data_port}"]
            self.routes.setdefault(final.get(src, src), {})[final[dst]] = relay
        for w in self.workers:
            w.address = final[w.address]
        self._old_routes = os.environ.get(ROUTES_ENV)
        os.environ[ROUTES_ENV] = json.dumps(self.routes)

    def _relay(
        self, routes: dict[LinkSpec, set[str]], control: dict[LinkSpec, list[LocalWorker]]
    ) -> dict[LinkSpec, dict[str, str]]:
        """Start the relay processes; returns each one's {target: relayed address}."""
        mappings = {}
        for k, (spec, targets) in enumerate(routes.items()):
            suffix = "" if k == 0 else f"-{k}"
            with open(self.base_dir / f"shaper{suffix}.log", "ab") as log:
                try:
                    proc, mappings[spec] = start_process(
                        sorted(targets),
                        spec,
                        self.base_dir / f"shaper{suffix}.json",
                        log,
                        START_TIMEOUT_S,
                        parent_fd=self._lifeline(),
                    )
                except TpiError as e:
                    raise ClusterError(f"{e} (see shaper{suffix}.log)") from None
            self.shapers.append(proc)
            self.shaper = self.shaper or proc
            self.relay_specs.update({relay: spec for relay in mappings[spec].values()})
        for spec, members in control.items():
            who = (
                ""
                if len(members) == len(self.workers)
                else f" (worker {', '.join(str(w.index) for w in members)})"
            )
            self.notes.append(
                f"links{who}: {spec.describe()} (user-space relay; round trip = 2 x latency)"
            )
        return mappings

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
        if hasattr(self, "_old_routes"):
            if self._old_routes is None:
                os.environ.pop(ROUTES_ENV, None)
            else:
                os.environ[ROUTES_ENV] = self._old_routes
            del self._old_routes
        for fd in self._lifelines:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._lifelines.clear()
