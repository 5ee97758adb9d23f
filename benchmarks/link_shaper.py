"""How faithful the user-space link shaper is: measured round-trip time and
throughput through it against the latency and bandwidth it is set to.

    python benchmarks/link_shaper.py
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402
from tpi.emulation.link_shaper import LinkSpec, serve  # noqa: E402

SETTINGS = [
    (0.0, None),
    (1.0, None),
    (5.0, None),
    (10.0, None),
    (5.0, 10e6),
    (5.0, 100e6),
    (1.0, 1e9),
]


def _sink_server() -> int:
    """Echoes 64-byte pings; answers a bulk transfer with one byte when it has it all."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def handle(c: socket.socket) -> None:
        buf = b""
        while True:
            data = c.recv(1 << 20)
            if not data:
                return
            buf += data
            while buf:
                if buf[0:1] == b"P" and len(buf) >= 64:
                    c.sendall(buf[:64])
                    buf = buf[64:]
                elif buf[0:1] == b"B" and len(buf) >= 9:
                    n = int.from_bytes(buf[1:9], "little")
                    if len(buf) < 9 + n:
                        break
                    buf = buf[9 + n :]
                    c.sendall(b"k")
                else:
                    break

    def accept() -> None:
        while True:
            c, _ = srv.accept()
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


async def _measure(port: int, spec: LinkSpec) -> dict:
    mapping = await serve([("127.0.0.1", port)], spec)
    host, p = mapping[f"127.0.0.1:{port}"].split(":")
    r, w = await asyncio.open_connection(host, int(p))
    rtts = []
    for _ in range(60):
        t = time.perf_counter()
        w.write(b"P" * 64)
        await w.drain()
        await r.readexactly(64)
        rtts.append(time.perf_counter() - t)
    size = 8 << 20 if (spec.rate_bps or 1e12) >= 50e6 else 1 << 20
    t = time.perf_counter()
    w.write(b"B" + size.to_bytes(8, "little") + b"x" * size)
    await w.drain()
    await r.readexactly(1)
    dt = time.perf_counter() - t
    w.close()
    # One-way transfer time includes one latency for the data and one for the ack.
    serial = max(dt - 2 * spec.latency_s, 1e-9)
    return {
        "set_latency_ms": spec.latency_s * 1000,
        "set_bandwidth_mbit": spec.rate_bps / 1e6 if spec.rate_bps else None,
        "expected_rtt_ms": round(2 * spec.latency_s * 1000, 3),
        "rtt_ms_median": round(1000 * statistics.median(rtts), 3),
        "rtt_ms_p90": round(1000 * sorted(rtts)[int(0.9 * len(rtts))], 3),
        "throughput_mbit": round(size * 8 / serial / 1e6, 1),
    }


@click.command()
@click.option("--out", default=None)
def main(out):
    port = _sink_server()
    rows = []
    for latency_ms, rate in SETTINGS:
        row = asyncio.run(_measure(port, LinkSpec(latency_ms / 1000, rate)))
        click.echo(row, err=True)
        rows.append(row)
    click.echo(f"wrote {write_result('link_shaper', {'rows': rows}, out)}")


if __name__ == "__main__":
    main()
