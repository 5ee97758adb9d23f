"""Round trip to tpi workers, measured from inside the master's container with
nothing but the standard library (the test pipes this file to `python -`).

A ZeroMQ peer answers the first 10 bytes of the ZMTP greeting (the signature) at
once, and sends the rest of its own greeting only after it has read ours. So the
time from sending our whole greeting to reading the peer's 11th byte is one round
trip over the real path (docker network, tc or the user-space relay), whatever the
worker does at the application level.

    python - HOST:PORT ... < docker_rtt_probe.py   ->   {"HOST:PORT": median seconds}
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time

# Signature, version 3.0, the NULL mechanism, as-server 0, filler: 64 bytes.
GREETING = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + bytes(32)
SAMPLES = 7


def round_trip(address: str) -> float:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = b""
        start = time.perf_counter()
        s.sendall(GREETING)
        while len(got) < 11:
            chunk = s.recv(64)
            if not chunk:
                raise SystemExit(f"{address} closed the connection during the greeting")
            got += chunk
        return time.perf_counter() - start


def main(addresses: list[str]) -> None:
    result = {a: statistics.median(round_trip(a) for _ in range(SAMPLES)) for a in addresses}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
