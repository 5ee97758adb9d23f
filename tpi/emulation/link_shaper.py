"""A user-space link emulator: a TCP relay that adds latency and limits bandwidth.

The kernel here has no netem qdisc, so `tpi cluster --link-latency/--link-bandwidth`
puts this relay between the master and each worker. Each direction is modelled
as a FIFO link: a chunk departs when the link is free and its bits have been
serialized at the given rate, and is delivered one propagation delay later:

    depart  = max(arrival, previous depart) + bytes * 8 / rate
    deliver = depart + latency

The latency applies per direction, as `tc netem delay` on each container's
egress does in the docker emulation, so a round trip costs 2 x latency.
At most `window_bytes` are queued per direction; beyond that the relay stops
reading, and TCP pushes back on the sender as a slow link would.

Run as a process: python -m tpi.emulation.link_shaper --route TARGET ... --latency 5ms
--bandwidth 100mbit --ready-file F (F receives {"TARGET": "127.0.0.1:PORT"}).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tpi.errors import TpiError
from tpi.system.lifeline import spawn, watch_parent

READ_CHUNK = 64 * 1024


def parse_duration(text: str) -> float:
    """'5ms', '0.5ms', '100us', '1s', '0' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(us|ms|s|)\s*", str(text))
    if not m:
        raise TpiError(f"cannot read duration {text!r} (use e.g. 5ms)")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "": 1e-3}[m.group(2)]


_RATE_UNITS = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "bps": 8,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}


def parse_rate(text: str) -> float:
    """'100mbit', '1gbit', '10MBps' -> bits per second (tc's units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise TpiError(f"cannot read bandwidth {text!r} (use e.g. 100mbit, 1gbit, 10MBps)")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


@dataclass(frozen=True)
class LinkSpec:
    latency_s: float = 0.0
    rate_bps: float | None = None
    window_bytes: int = 4 * 1024 * 1024

    def describe(self) -> str:
        rate = f"{self.rate_bps / 1e6:g} Mbit/s" if self.rate_bps else "unlimited"
        return f"latency {self.latency_s * 1000:g} ms each way, bandwidth {rate}"


class _Direction:
    """One direction of one connection: a FIFO link with delay and rate."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queued = 0
        self.room = asyncio.Event()
        self.room.set()
        self.free_at = 0.0

    async def pump_in(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    break
                now = loop.time()
                serialize = len(chunk) * 8 / self.spec.rate_bps if self.spec.rate_bps else 0.0
                self.free_at = max(now, self.free_at) + serialize
                self.queued += len(chunk)
                if self.queued >= self.spec.window_bytes:
                    self.room.clear()
                self.queue.put_nowait((self.free_at + self.spec.latency_s, chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            self.queue.put_nowait(None)

    async def pump_out(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await self.queue.get()) is not None:
                when, chunk = item
                delay = when - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(chunk)
                await writer.drain()
                self.queued -= len(chunk)
                if self.queued < self.spec.window_bytes:
                    self.room.set()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def _relay(client_r, client_w, target: tuple[str, int], spec: LinkSpec) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    up, down = _Direction(spec), _Direction(spec)
    try:
        await asyncio.gather(
            up.pump_in(client_r),
            up.pump_out(server_w),
            down.pump_in(server_r),
            down.pump_out(client_w),
        )
    except asyncio.CancelledError:
        # The shaper is shutting down. Returning (not re-raising) keeps
        # asyncio's connection callback from printing a traceback per link.
        server_w.close()
        client_w.close()


async def serve(
    routes: list[tuple[str, int]], spec: LinkSpec, host: str = "127.0.0.1"
) -> dict[str, str]:
    """Start one shaped listener per target; returns {"host:port" of target: "host:port" to use}."""
    mapping = {}
    for target in routes:
        server = await asyncio.start_server(
            lambda r, w, t=target: _relay(r, w, t, spec), host=host, port=0, reuse_address=True
        )
        port = server.sockets[0].getsockname()[1]
        mapping[f"{target[0]}:{target[1]}"] = f"{host}:{port}"
    return mapping


def start_process(
    routes: list[str],
    spec: LinkSpec,
    ready_file: Path,
    log=subprocess.DEVNULL,
    timeout_s=30.0,
    parent_fd: int | None = None,
) -> tuple[subprocess.Popen, dict[str, str]]:
    """Run the relay as its own process (`python -m tpi.emulation.link_shaper`), so its event
    loop never competes with the caller's; returns it and {route: shaped address}.

    `parent_fd`: the read end of a lifeline (tpi.system.lifeline); the relay stops
    when it closes, and it is closed here once passed on."""
    ready_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tpi.emulation.link_shaper", "--ready-file", str(ready_file)]
    cmd += ["--latency", f"{spec.latency_s * 1000}ms"]
    if spec.rate_bps:
        cmd += ["--bandwidth", f"{spec.rate_bps}bit"]
    for route in routes:
        cmd += ["--route", route]
    if parent_fd is not None:
        cmd += ["--parent-fd", str(parent_fd)]
    proc = spawn(cmd, log, parent_fd)
    deadline = time.monotonic() + timeout_s
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise TpiError("the link shaper did not start")
        time.sleep(0.05)
    return proc, json.loads(ready_file.read_text())


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m tpi.emulation.link_shaper", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--route", action="append", required=True, help="HOST:PORT to relay to (repeatable)"
    )
    p.add_argument("--latency", default="0ms")
    p.add_argument("--bandwidth", default=None)
    p.add_argument("--ready-file", required=True)
    p.add_argument("--parent-fd", type=int, default=None, help="stop when this pipe closes")
    a = p.parse_args(argv)
    spec = LinkSpec(parse_duration(a.latency), parse_rate(a.bandwidth) if a.bandwidth else None)

    async def run() -> None:
        mapping = await serve([_target(r) for r in a.route], spec)
        tmp = a.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(mapping, f)
        os.replace(tmp, a.ready_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if a.parent_fd is not None:
            watch_parent(a.parent_fd, lambda: loop.call_soon_threadsafe(stop.set))
        await stop.wait()

    asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
