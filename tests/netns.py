"""A small LAN of network namespaces for discovery tests: a bridge in a namespace
of its own and N hosts, each in its namespace with one veth on that bridge and
multicast routed to it. Nothing is created in (or sent on) the machine's own
namespace, so no test announces or listens on the machine's real interfaces."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "10.231.7"


def why_not() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"tpi-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    netns: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


@contextmanager
def lan(count: int) -> Iterator[list[Host]]:
    tag = f"tpi{os.getpid() % 100000}"
    switch = f"{tag}-sw"
    hosts = [Host(f"{tag}-h{i}", f"{SUBNET}.{i + 1}") for i in range(count)]
    made = []
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, h in enumerate(hosts):
            _ip("netns", "add", h.netns)
            made.append(h.netns)
            port = f"p{i}"
            _ip(*f"-n {switch} link add {port} type veth peer name eth0 netns {h.netns}".split())
            _ip("-n", switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _ip("-n", h.netns, "link", "set", "eth0", "multicast", "on", "up")
            _ip("-n", h.netns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        yield hosts
    finally:
        for ns in reversed(made):
            # Only this test's processes run in its namespaces: none may outlive them.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
