"""Emulated devices without docker: shaped links and memory caps are real."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.stepping import greedy
from tpi.cli import cli
from tpi.comm.links import ClusterError
from tpi.emulation.cgroups import CgroupFactory
from tpi.emulation.link_shaper import LinkSpec, parse_duration, parse_rate, serve
from tpi.master.engine import load_engine
from tpi.master.loader import open_model
from tpi.master.local_cluster import DeviceLimits, LocalCluster
from tpi.system.cgroup_limits import memory_limit

PROMPT = list(range(5, 25))


def test_units():
    assert (
        parse_duration("5ms") == 0.005
        and parse_duration("250us") == 0.00025
        and parse_duration("1s") == 1
    )
    assert (
        parse_rate("100mbit") == 100e6
        and parse_rate("1gbit") == 1e9
        and parse_rate("10MBps") == 80e6
    )


def _echo_server() -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def run():
        while True:
            c, _ = srv.accept()
            threading.Thread(
                target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(1 << 20), b"")],
                daemon=True,
            ).start()

    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1]


def test_shaper_never_beats_the_emulated_link():
    """Lower bounds hold by construction (no timing noise can make them pass falsely):
    a round trip takes at least 2 x latency, and data never flows faster than the rate."""
    port = _echo_server()

    async def run():
        spec = LinkSpec(0.005, 20e6)
        m = await serve([("127.0.0.1", port)], spec)
        host, p = m[f"127.0.0.1:{port}"].split(":")
        r, w = await asyncio.open_connection(host, int(p))
        rtts = []
        for _ in range(10):
            t = time.perf_counter()
            w.write(b"x" * 32)
            await w.drain()
            await r.readexactly(32)
            rtts.append(time.perf_counter() - t)
        size = 500_000
        t = time.perf_counter()
        w.write(b"y" * size)
        await w.drain()
        await r.readexactly(size)
        bulk = time.perf_counter() - t
        w.close()
        return rtts, bulk, size, spec

    rtts, bulk, size, spec = asyncio.run(run())
    assert min(rtts) >= 2 * spec.latency_s
    # Echoed both ways, each direction serializes `size` bytes at the rate.
    assert bulk >= size * 8 / spec.rate_bps + 2 * spec.latency_s


def test_three_node_cluster_over_5ms_links(llama_dir, tmp_path):
    """Each allreduce costs at least one emulated round trip, and tokens are unchanged.

    By causality a worker's partial for allreduce k+1 can only leave after the sum
    of allreduce k reached it, so on the master the ends of consecutive allreduces
    are at least one round trip apart. (A single call can be short: when the
    master was descheduled, the partials were already waiting for it.)
    """
    expected = greedy(load_engine(llama_dir), PROMPT, 6)
    latency = 0.005
    lc = LocalCluster(2, tmp_path, threads=1, link=LinkSpec(latency))
    addrs = lc.start()
    try:
        assert any("latency 5 ms" in n for n in lc.notes)
        lm = open_model(str(llama_dir), "fp32", quiet=True, workers=addrs)
        try:
            col = lm.cluster.topology.collective
            ends: list[tuple[int, float]] = []
            wait = col.wait  # an allreduce ends when its total is handed back

            def timed(pending):
                out = wait(pending)
                ends.append((pending.key[1], time.perf_counter()))
                return out

            col.wait = timed
            got = greedy(lm.engine, PROMPT, 6)
        finally:
            lm.close()
    finally:
        lc.stop()
    assert got == expected
    layers = load_engine(llama_dir).cfg.num_layers
    assert len(ends) == 2 * layers * (1 + 6)  # prefill + 6 decode passes, 2 per layer
    # Within a forward pass (between passes the master samples and broadcasts).
    spacing = [
        b - a
        for (la, a), (lb, b) in zip(ends, ends[1:], strict=False)
        if not (lb == 0 and la == layers - 1)
    ]
    assert len(spacing) == (2 * layers - 1) * 7
    assert min(spacing) >= 2 * latency, min(spacing)


cgroups = CgroupFactory()
needs_cgroups = pytest.mark.skipif(
    not cgroups.available, reason=f"cgroups unavailable: {cgroups.reason}"
)


@needs_cgroups
def test_cgroup_limit_is_applied_and_detected(tmp_path):
    limit = 300 * 1024 * 1024
    cg = cgroups.create(f"tpi-test-{os.getpid()}", limit, None)
    try:
        code = "from tpi.system.cgroup_limits import memory_limit; print(memory_limit())"
        proc = subprocess.Popen(
            [sys.executable, "-c", f"import time; time.sleep(0.3); {code}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        cg.add(proc.pid)
        out, _ = proc.communicate(timeout=60)
        assert int(out.strip()) == limit
    finally:
        cg.remove()


@needs_cgroups
def test_worker_under_a_too_small_cap_says_so(tmp_path):
    from tests.factories import make_model

    model = make_model(
        tmp_path / "m", "llama", hidden=256, heads=4, kv_heads=4, intermediate=1024, layers=8
    )
    cap = 200 * 1024 * 1024  # below a Python+torch worker's own footprint
    lc = LocalCluster(1, tmp_path / "w", threads=1, limits=DeviceLimits(memory_bytes=cap))
    addrs = lc.start()
    try:
        pid = lc.workers[0].proc.pid
        memory_cgroup = next(
            line
            for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            if ":memory:" in line
        ).split(":", 2)[2]
        assert f"tpi-{os.getpid()}-w1" in memory_cgroup
        with pytest.raises(
            ClusterError,
            match=r"rank 1 \(.*\) failed .*out of memory budget: need .* have 200\.00 MiB",
        ):
            open_model(str(model), "fp32", quiet=True, workers=addrs)
        assert lc.workers[0].proc.poll() is None  # refused, not killed
    finally:
        lc.stop()


def test_cluster_cli_reports_the_emulation(llama_dir, tmp_path):
    limit_before = memory_limit()
    res = CliRunner().invoke(
        cli,
        [
            "cluster",
            "--workers",
            "1",
            "--dir",
            str(tmp_path),
            "--mem-limit",
            "4GB",
            "--link-latency",
            "2ms",
            "--link-bandwidth",
            "100mbit",
            "generate",
            "--model",
            str(llama_dir),
            "-n",
            "3",
            "-t",
            "0",
            "Hello",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert "emulation: links: latency 2 ms each way, bandwidth 100 Mbit/s" in res.stderr
    assert "emulation: device caps" in res.stderr
    if cgroups.available:
        # --mem-limit is per rank: the master (here this process) ran capped, then left.
        assert "emulation: the master is capped too: memory 3.73 GiB" in res.stderr
        assert memory_limit() == limit_before


def test_per_rank_flags_take_one_value_or_one_per_rank():
    from tpi.master.cli import per_rank

    assert per_rank(None, 3, float, "--cpus", False) == [None, None, None]
    assert per_rank("0.5", 3, float, "--cpus", False) == [None, 0.5, 0.5]  # workers only
    assert per_rank("2", 3, int, "--mem-limit", True) == [2, 2, 2]  # every rank
    assert per_rank("1.0,none,0.25", 3, float, "--cpus", False) == [1.0, None, 0.25]
    import click

    with pytest.raises(click.BadParameter, match="lists 2 values; give 1 or 3"):
        per_rank("1,2", 3, float, "--cpus", False)


@needs_cgroups
def test_each_worker_gets_its_own_cpu_cap_and_link(tmp_path):
    from tpi.system.cgroup_limits import cpu_limit

    lc = LocalCluster(
        2,
        tmp_path,
        threads=1,
        worker_limits=[DeviceLimits(cpus=0.5), DeviceLimits(cpus=0.25)],
        worker_links=[None, LinkSpec(0.003)],
    )
    addrs = lc.start()
    try:
        quotas = []
        for w in lc.workers:
            cpu_cgroup = next(
                line.split(":", 2)[2]
                for line in Path(f"/proc/{w.proc.pid}/cgroup").read_text().splitlines()
                if ":cpu," in line or ":cpu:" in line or ":cpuacct,cpu:" in line
            )
            d = Path("/sys/fs/cgroup/cpu") / cpu_cgroup.lstrip("/")
            quotas.append(
                int((d / "cpu.cfs_quota_us").read_text())
                / int((d / "cpu.cfs_period_us").read_text())
            )
        assert quotas == [0.5, 0.25]
        # Worker 1 is reached directly, worker 2 through the one relay.
        assert addrs[0] == lc.workers[0].address and len(lc.shapers) == 1
        assert any("links (worker 2): latency 3 ms" in n for n in lc.notes)
        assert cpu_limit() is None  # the master (this process) is not capped here
    finally:
        lc.stop()


def test_a_far_worker_costs_every_link_to_it_and_every_device_pair_is_relayed(llama_dir, tmp_path):
    """Per-worker links: the master's links to each worker as given, a pair of workers
    the slower of their two (a far device is far from everyone), each data port behind
    a relay the master finds in TPI_PEER_ROUTES; a pipeline over them gives the
    single-node tokens with its hops direct."""
    import json
    import os

    from tpi.master.direct_hops import ROUTES_ENV

    links = [LinkSpec(0.002), LinkSpec(0.002), LinkSpec(0.01)]
    lc = LocalCluster(3, tmp_path, threads=1, worker_links=links)
    addrs = lc.start()
    try:
        routes = json.loads(os.environ[ROUTES_ENV])
        assert set(routes) == {"master", *addrs}
        assert all(set(routes[a]) == set(addrs) - {a} for a in addrs)
        assert set(routes["master"]) == set(addrs)
        latency = {
            (a, b): lc.relay_specs[relay].latency_s
            for a, to in routes.items()
            for b, relay in to.items()
        }
        w1, w2, w3 = addrs
        assert latency[(w1, w2)] == latency[(w2, w1)] == latency[("master", w1)] == 0.002
        assert latency[(w1, w3)] == latency[(w3, w2)] == latency[("master", w3)] == 0.01
        expected = greedy(load_engine(llama_dir), PROMPT, 6)
        lm = open_model(
            str(llama_dir), "fp32", quiet=True, workers=addrs, plan_mode="master | w1 | w2,w3"
        )
        try:
            assert lm.cluster.topology.direct
            assert greedy(lm.engine, PROMPT, 6) == expected
        finally:
            lm.close()
    finally:
        lc.stop()
    assert ROUTES_ENV not in os.environ
