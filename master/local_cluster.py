"""Start N worker daemons as local processes on loopback (for `tpi cluster`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpi.links import ClusterError, display_address

START_TIMEOUT_S = 60.0


@dataclass
class LocalWorker:
    index: int
    proc: subprocess.Popen
    port_file: Path
    log_path: Path
    address: str = ""


@dataclass
class LocalCluster:
    count: int
    base_dir: Path
    threads: int | None = None  # torch threads per worker
    extra_args: list[str] = field(default_factory=list)
    workers: list[LocalWorker] = field(default_factory=list)

    def start(self) -> list[str]:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(1, self.count + 1):
                wdir = self.base_dir / f"worker{i}"
                wdir.mkdir(exist_ok=True)
                port_file = wdir / "address"
                port_file.unlink(missing_ok=True)
                log_path = wdir / "worker.log"
                cmd = [
                    sys.executable,
                    "-m",
                    "worker",
                    "--listen",
                    "tcp://127.0.0.1:0",
                    "--store",
                    str(wdir / "store"),
                    "--port-file",
                    str(port_file),
                    *self.extra_args,
                ]
                env = dict(os.environ)
                if self.threads:
                    cmd += ["--threads", str(self.threads)]
                    # Idle OpenMP threads spin; on a shared machine that steals the cores.
                    env["OMP_NUM_THREADS"] = str(self.threads)
                # Own process group: Ctrl-C in the terminal reaches only the master,
                # which then stops the workers itself.
                with open(log_path, "ab") as log:
                    proc = subprocess.Popen(
                        cmd,
                        stdout=log,
                        stderr=log,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        env=env,
                    )
                self.workers.append(LocalWorker(i, proc, port_file, log_path))
            deadline = time.monotonic() + START_TIMEOUT_S
            for w in self.workers:
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
        except BaseException:
            self.stop()
            raise
        return [w.address for w in self.workers]

    def stop(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for w in self.workers:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.proc.pid, signal.SIGKILL)
                w.proc.wait()
        self.workers.clear()
