"""Allreduce study: tpi's star allreduce vs a ring allreduce (ours, over ZeroMQ)
vs torch.distributed gloo, for N = 2..8 ranks, 4 KB..1 MB messages and emulated
link latency 0, 1, 5, 10 ms (one way, by the user-space link shaper on every
link; gloo's own connections cannot be relayed, so gloo runs at 0 ms only).

Every rank is its own process. The star side runs tpi's production code
(StarMaster / StarWorker over the same sockets the cluster uses). On a machine
with fewer cores than ranks, the processes share cores: compare algorithms
within one row, not across machines.

    python benchmarks/allreduce.py [--max-world 8] [--quick]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
LATENCIES_MS = [0, 1, 5, 10]
SESSION = 1


def _iters(latency_ms: float, world: int, quick: bool) -> int:
    base = 4 if quick else (20 if latency_ms <= 1 else 8)
    return max(3, base if world <= 4 else base // 2)


# --- shaping ---------------------------------------------------------------------------------


class Shaper:
    def __init__(self, targets: list[str], latency_ms: float, workdir: Path) -> None:
        from tpi.emulation.link_shaper import LinkSpec, start_process

        self.proc = None
        self.map = {t: t for t in targets}
        if latency_ms <= 0:
            return
        ready = workdir / f"shaper-{os.getpid()}-{time.monotonic_ns()}.json"
        self.proc, self.map = start_process(targets, LinkSpec(latency_ms / 1000), ready)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


# --- star (tpi's production code) --------------------------------------------------------------


def _star_worker(conn, iters_by_size: dict[int, int], data_link: bool) -> None:
    import torch
    import zmq

    from tpi.comm.data_link import DataListener, new_ticket
    from tpi.comm.links import WorkerEndpoint
    from tpi.comm.star_worker import StarWorker
    from tpi.worker.master_channel import MasterChannel

    torch.set_num_threads(1)  # one core per emulated device, as `tpi cluster` does
    ctx = zmq.Context()
    ep = WorkerEndpoint(ctx, "tcp://127.0.0.1:0")
    listener, ticket = DataListener("127.0.0.1", 0), new_ticket()
    conn.send((ep.address.replace("tcp://", ""), listener.port if data_link else 0, ticket))
    hello = None
    while hello is None:  # the master's first PING tells us who it is
        hello = ep.recv(1.0)
    # The worker's production receive path (session checks, PINGs answered).
    channel = MasterChannel(ep, hello, SESSION, rank=1)
    if data_link:  # as a session opens it (worker.session)
        channel.data = listener.accept(SESSION, ticket, 30.0, 60.0)
    w = StarWorker(channel, SESSION, torch.float32)
    step = 0
    with torch.inference_mode():  # as a worker's forward pass runs
        for size, iters in iters_by_size.items():
            x = torch.ones(size // 4)
            for _ in range(iters):
                step += 1
                w.step = step
                w.allreduce(x, 0, 0)
    conn.recv()  # wait until the master is done before closing
    channel.close_data()
    listener.close()
    ep.close()
    ctx.term()


def run_star(
    world: int,
    latency_ms: float,
    iters_by_size: dict[int, int],
    workdir: Path,
    per_call: bool = False,
    data_link: bool = False,
) -> dict:
    """Mean seconds per allreduce by size (or, with `per_call`, every call's time).
    `data_link`: the partial sums travel over tpi's data links (unshaped: only
    without emulated latency), else over ZeroMQ."""
    import torch
    import zmq

    from tpi.comm.data_link import connect
    from tpi.comm.inbox import Inbox
    from tpi.comm.links import LinkSet
    from tpi.comm.star_master import StarMaster
    from tpi.comm.step_broadcast import StepClock
    from tpi.comm.wire import Kind, encode_control

    # spawn, not fork: a child forked after the parent ran torch's thread pool
    # can deadlock in its first parallel op (OpenMP is not fork-safe).
    mpctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(world - 1):
        a, b = mpctx.Pipe()
        p = mpctx.Process(target=_star_worker, args=(b, iters_by_size, data_link), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    offers = [a.recv() for a in pipes]
    addrs = [addr for addr, _, _ in offers]
    shaper = Shaper(addrs, latency_ms, workdir)
    ctx = zmq.Context()
    links = LinkSet(ctx)
    for r, (addr, data_port, ticket) in enumerate(offers, start=1):
        link = links.connect(r, f"tcp://{shaper.map[addr]}")
        link.send([encode_control(Kind.PING, {"session": SESSION})])
        if data_port:
            links.attach_data(link, connect("127.0.0.1", data_port, SESSION, ticket, 60.0, 10.0))
    clock = StepClock()
    master = StarMaster(Inbox(links, SESSION), clock, torch.float32, timeout_s=60)
    out = {}
    step = 0
    try:
        with torch.inference_mode():  # as the master's forward pass runs
            for size, iters in iters_by_size.items():
                x = torch.ones(size // 4)
                warm = min(2, iters - 1)
                calls = []
                for i in range(iters):
                    step += 1
                    clock.step = step
                    t0 = time.perf_counter()
                    master.allreduce(x, 0, 0)
                    if i >= warm:
                        calls.append(time.perf_counter() - t0)
                out[size] = calls if per_call else sum(calls) / len(calls)
    finally:
        for a in pipes:
            a.send("done")
        for p in procs:
            p.join(10)
        links.close()
        ctx.term()
        shaper.close()
    return out


# --- ring (ours, over ZeroMQ) -------------------------------------------------------------------


def _ring_rank(rank: int, world: int, conn, iters_by_size: dict[int, int]) -> None:
    import numpy as np
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    conn.send(f"127.0.0.1:{port}")
    next_addr = conn.recv()  # the (possibly shaped) address of rank+1's PULL
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://{next_addr}")
    conn.send("connected")
    conn.recv()  # everyone connected
    times = {}
    for size, iters in iters_by_size.items():
        n = size // 4
        data = np.ones(n, dtype=np.float32)
        bounds = np.linspace(0, n, world + 1).astype(int)
        chunks = [slice(bounds[i], bounds[i + 1]) for i in range(world)]
        warm = min(2, iters - 1)
        for it in range(iters):
            if it == warm:
                t0 = time.perf_counter()
            # Reduce-scatter: after N-1 steps rank r owns the full sum of chunk r+1.
            for s in range(world - 1):
                send_idx = (rank - s) % world
                recv_idx = (rank - s - 1) % world
                push.send(data[chunks[send_idx]], copy=False)
                data[chunks[recv_idx]] += np.frombuffer(pull.recv(), dtype=np.float32)
            # All-gather: circulate the reduced chunks.
            for s in range(world - 1):
                send_idx = (rank - s + 1) % world
                recv_idx = (rank - s) % world
                push.send(data[chunks[send_idx]], copy=False)
                data[chunks[recv_idx]] = np.frombuffer(pull.recv(), dtype=np.float32)
        times[size] = (time.perf_counter() - t0) / (iters - warm)
    conn.send(times)
    conn.recv()
    push.close(linger=0)
    pull.close(linger=0)
    ctx.term()


def run_ring(
    world: int, latency_ms: float, iters_by_size: dict[int, int], workdir: Path
) -> dict[int, float]:
    mpctx = mp.get_context("fork")
    pipes, procs = [], []
    for r in range(world):
        a, b = mpctx.Pipe()
        p = mpctx.Process(target=_ring_rank, args=(r, world, b, iters_by_size), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    addrs = [a.recv() for a in pipes]
    shaper = Shaper(addrs, latency_ms, workdir)
    try:
        for r, a in enumerate(pipes):
            a.send(shaper.map[addrs[(r + 1) % world]])
        for a in pipes:
            a.recv()
        for a in pipes:
            a.send("go")
        results = [a.recv() for a in pipes]
        for a in pipes:
            a.send("done")
        for p in procs:
            p.join(10)
    finally:
        shaper.close()
    return {size: max(r[size] for r in results) for size in iters_by_size}


# --- gloo --------------------------------------------------------------------------------------


def _gloo_rank(rank: int, world: int, port: int, conn, iters_by_size: dict[int, int]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    times = {}
    for size, iters in iters_by_size.items():
        x = torch.ones(size // 4)
        warm = min(2, iters - 1)
        dist.barrier()
        for it in range(iters):
            if it == warm:
                t0 = time.perf_counter()
            dist.all_reduce(x)
        times[size] = (time.perf_counter() - t0) / (iters - warm)
    conn.send(times)
    dist.destroy_process_group()


def run_gloo(world: int, iters_by_size: dict[int, int]) -> dict[int, float]:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mpctx = mp.get_context("spawn")
    pipes, procs = [], []
    for r in range(world):
        a, b = mpctx.Pipe()
        p = mpctx.Process(target=_gloo_rank, args=(r, world, port, b, iters_by_size), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    results = [a.recv() for a in pipes]
    for p in procs:
        p.join(30)
    return {size: max(r[size] for r in results) for size in iters_by_size}


def _bare_rank(conn, floats: int, calls: int, transport: str) -> None:
    """A worker of the bare round trip: send a vector, receive the sum, no tpi code."""
    import socket

    import numpy as np
    import zmq

    x = np.ones(floats, np.float32)
    if transport == "zmq":
        ctx = zmq.Context()
        s = ctx.socket(zmq.ROUTER)
        conn.send(s.bind_to_random_port("tcp://127.0.0.1"))
        ident, _ = s.recv_multipart()
        for _ in range(calls):
            s.send_multipart([ident, b"h" * 24, x])
            s.recv_multipart(copy=False)
        conn.recv()
        s.close(linger=0)
        ctx.term()
        return
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(24 + 4 * floats)
    view = memoryview(buf)
    for _ in range(calls):
        sock.sendall(b"h" * 24 + x.tobytes())
        got = 0
        while got < len(buf):
            got += sock.recv_into(view[got:])
    conn.recv()
    sock.close()


def run_bare(world: int, floats: int, calls: int, transport: str) -> list[float]:
    """The floor under any star allreduce: the same message pattern with bare
    pyzmq DEALER/ROUTER or plain TCP sockets and a numpy sum, nothing else."""
    import socket

    import numpy as np
    import zmq

    mpctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(world - 1):
        a, b = mpctx.Pipe()
        p = mpctx.Process(target=_bare_rank, args=(b, floats, calls, transport), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    own, times = np.ones(floats, np.float32), []
    ctx = zmq.Context() if transport == "zmq" else None
    socks = []
    for a in pipes:
        port = a.recv()
        if ctx is not None:
            d = ctx.socket(zmq.DEALER)
            d.connect(f"tcp://127.0.0.1:{port}")
            d.send(b"hi")
        else:
            d = socket.create_connection(("127.0.0.1", port))
            d.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(d)
    buf = bytearray(24 + 4 * floats)
    view = memoryview(buf)
    for _ in range(calls):
        t0 = time.perf_counter()
        total = own.copy()
        for d in socks:
            if ctx is not None:
                _, payload = d.recv_multipart(copy=False)
                total += np.frombuffer(payload.buffer, np.float32)
            else:
                got = 0
                while got < len(buf):
                    got += d.recv_into(view[got:])
                total += np.frombuffer(buf, np.float32, offset=24)
        for d in socks:
            if ctx is not None:
                d.send_multipart([b"h" * 24, total])
            else:
                d.sendall(b"h" * 24 + total.tobytes())
        times.append(time.perf_counter() - t0)
    for a in pipes:
        a.send("done")
    for p in procs:
        p.join(10)
    for d in socks:
        d.close()
    if ctx is not None:
        ctx.term()
    return times[2:]


def per_call_overhead(world: int, floats: int, calls: int, rounds: int, out: str | None) -> None:
    """One size, no emulated latency: the median cost of one star allreduce call,
    what a decode step pays 2 x layers times (issue target: <= 0.3 ms at world 3
    for SmolLM2's 576 floats), over tpi's data links and over ZeroMQ, beside the
    bare floors of both transports; the four alternate, `rounds` times."""
    import statistics

    variants = {
        "star_data_link": lambda tmp: run_star(
            world, 0, {4 * floats: calls}, tmp, per_call=True, data_link=True
        )[4 * floats],
        "star_zeromq": lambda tmp: run_star(world, 0, {4 * floats: calls}, tmp, per_call=True)[
            4 * floats
        ],
        "bare_tcp": lambda tmp: run_bare(world, floats, calls, "tcp"),
        "bare_zeromq": lambda tmp: run_bare(world, floats, calls, "zmq"),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for name, run in variants.items():
                times[name] += [1000 * t for t in run(Path(tmp))]
    data = {"world": world, "floats": floats, "calls_per_round": calls, "rounds": rounds}
    for name, ms in times.items():
        q = statistics.quantiles(ms, n=10)
        data[name] = {
            "median_ms": round(statistics.median(ms), 4),
            "p10_ms": round(q[0], 4),
            "p90_ms": round(q[-1], 4),
        }
    data["note"] = (
        "loopback, every rank its own process, all on this 2-core machine; star_*: tpi's "
        "StarMaster/StarWorker; bare_*: the same exchange with nothing but sockets and a sum"
    )
    click.echo(data, err=True)
    click.echo(f"wrote {write_result('allreduce_call', data, out)}")


@click.command()
@click.option("--max-world", default=8, show_default=True)
@click.option("--quick", is_flag=True, help="Fewer iterations (a smoke run).")
@click.option(
    "--per-call",
    "per_call_world",
    type=int,
    default=None,
    metavar="WORLD",
    help="Only the median cost of one call at this world size (576 floats, no latency).",
)
@click.option("--floats", default=576, show_default=True, help="With --per-call: vector length.")
@click.option(
    "--calls", default=2000, show_default=True, help="With --per-call: calls timed per round."
)
@click.option("--rounds", default=3, show_default=True, help="With --per-call: rounds.")
@click.option("--out", default=None)
def main(
    max_world: int,
    quick: bool,
    per_call_world: int | None,
    floats: int,
    calls: int,
    rounds: int,
    out: str | None,
) -> None:
    import torch

    torch.set_num_threads(1)  # the star master, like every rank, gets one core
    if per_call_world:
        return per_call_overhead(per_call_world, floats, calls, rounds, out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for world in range(2, max_world + 1):
            for latency in LATENCIES_MS:
                iters = {s: _iters(latency, world, quick) for s in SIZES}
                star = run_star(world, latency, iters, workdir)
                ring = run_ring(world, latency, iters, workdir)
                gloo = run_gloo(world, iters) if latency == 0 else {}
                for size in SIZES:
                    row = {
                        "world": world,
                        "latency_ms": latency,
                        "bytes": size,
                        "star_ms": round(1000 * star[size], 3),
                        "ring_ms": round(1000 * ring[size], 3),
                        "gloo_ms": round(1000 * gloo[size], 3) if gloo else None,
                        "ring_over_star": round(ring[size] / star[size], 2),
                    }
                    rows.append(row)
                    click.echo(row, err=True)
    wins = sum(r["ring_over_star"] > 1 for r in rows)
    data = {
        "sizes": SIZES,
        "latencies_ms": LATENCIES_MS,
        "rows": rows,
        "star_faster_in": f"{wins} of {len(rows)} configurations",
        "note": "latency is one way per link (a round trip costs 2x); all ranks on one machine",
    }
    click.echo(f"wrote {write_result('allreduce', data, out)}")


if __name__ == "__main__":
    main()
