"""Drive the compose cluster through docker/*.sh for the end-to-end test: the
same scripts a user runs, plus docker queries by the project's compose label."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def engine_problem() -> str | None:
    """Why no docker engine can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 60 s"
    if info.returncode != 0:
        lines = info.stderr.strip().splitlines()
        return f"the docker engine does not answer ({lines[-1] if lines else 'no output'})"
    compose_v2 = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if compose_v2.returncode != 0 and shutil.which("docker-compose") is None:
        return "no docker compose"
    return None


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure, raise with its output's tail (not a bare exit code)."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-30:])
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{tail}")
    return res


@dataclass
class DockerCluster:
    project: str
    port: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def build(self) -> None:
        t0 = time.monotonic()
        run([str(DOCKER / "build.sh")], timeout=1800)
        self.timings["image build (s)"] = time.monotonic() - t0
        size = run(["docker", "image", "inspect", "-f", "{{.Size}}", "tpi:latest"], 60).stdout
        self.timings["image size (MB)"] = int(size) / 1e6

    def up(self, *args: str) -> str:
        t0 = time.monotonic()
        res = run(
            [str(DOCKER / "up.sh"), "--no-build", "--project", self.project]
            + ["--port", str(self.port), *args],
            timeout=1200,
        )
        self.timings["compose up to healthy (s)"] = time.monotonic() - t0
        return res.stdout.strip()

    def down(self) -> None:
        run([str(DOCKER / "down.sh"), "--project", self.project], timeout=300)

    def _label(self) -> str:
        return f"label=com.docker.compose.project={self.project}"

    def container(self, service: str) -> str:
        out = run(
            ["docker", "ps", "-aq", "--filter", self._label()]
            + ["--filter", f"label=com.docker.compose.service={service}"],
            60,
        ).stdout.split()
        assert len(out) == 1, f"{service}: expected one container, found {out}"
        return out[0]

    def exec(self, service: str, *cmd: str, stdin: str | None = None) -> str:
        args = ["docker", "exec"] + (["-i"] if stdin is not None else [])
        return run(args + [self.container(service), *cmd], 120, input=stdin).stdout

    def logs(self, service: str) -> str:
        res = run(["docker", "logs", self.container(service)], 60)
        return res.stdout + res.stderr

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of this project that still exist."""
        found = {}
        for kind in ("container", "network", "volume"):
            cmd = ["docker", kind, "ls", "-q", "--filter", self._label()]
            if kind == "container":
                cmd.insert(3, "-a")
            found[kind] = run(cmd, 60).stdout.split()
        return found

    def limits(self, service: str) -> dict[str, float]:
        """The container's own cgroup limits, read inside it (cgroup v2 or v1)."""
        script = (
            "cat /sys/fs/cgroup/memory.max 2>/dev/null"
            " || cat /sys/fs/cgroup/memory/memory.limit_in_bytes;"
            " cat /sys/fs/cgroup/cpu.max 2>/dev/null"
            " || echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)"
            " $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
        )
        memory, cpu = self.exec(service, "sh", "-c", script).strip().splitlines()
        quota, period = cpu.split()
        return {"memory": float(memory), "cpus": float(quota) / float(period)}

    def rtts(self, addresses: list[str]) -> dict[str, float]:
        """Median round trip (s) from the master's container to each address."""
        probe = (Path(__file__).parent / "docker_rtt_probe.py").read_text()
        return json.loads(self.exec("master", "python", "-", *addresses, stdin=probe))
