"""A worker's session (worker/session.py) in-process: the master's messages queued
on a fake socket, the worker's answers read off it. The steps themselves:
test_worker_steps.py; a whole session through a worker process: test_cluster.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.worker_helpers import write_shard
from tpi.comm.data_link import DataListener
from tpi.comm.links import Inbound
from tpi.comm.wire import Kind, Message, decode, encode_control
from tpi.planning.request import PROBE_MANIFEST
from tpi.worker.master_channel import PeerLost
from tpi.worker.options import WorkerOptions
from tpi.worker.session import Session
from tpi.worker.store import ShardStore

SESSION = 515
MASTER = b"master"


class Drained(Exception):
    """The test's script is over: the session would wait for more."""


class ScriptedEndpoint:
    def __init__(self, script: list[tuple[Kind, dict]]) -> None:
        self.script = [
            Inbound(MASTER, 9, [encode_control(k, {"session": SESSION, **b})]) for k, b in script
        ]
        self.sent: list[Message] = []
        self.closed_fds: set[int] = set()

    def recv(self, timeout_s: float) -> Inbound | None:
        if not self.script:
            raise Drained
        return self.script.pop(0)

    def send(self, peer: bytes, frames: list) -> bool:
        self.sent.append(decode(frames))
        return True

    def kinds(self) -> list[Kind]:
        return [m.kind for m in self.sent]


def _session(endpoint, tmp_path, manifest: str, listener=None) -> Session:
    hello = {
        "session": SESSION,
        "rank": 1,
        "world": 2,
        "manifest": manifest,
        "tpi_version": "test",
        "nonce": "00" * 16,
        "auth": "none",
    }
    inb = Inbound(MASTER, 9, [encode_control(Kind.HELLO, hello)])
    return Session(endpoint, ShardStore(tmp_path / "store"), inb, hello, WorkerOptions(), listener)


def test_a_probe_session_offers_the_data_port_links_peers_and_ends_when_told(tmp_path):
    listener = DataListener("127.0.0.1", 0)
    endpoint = ScriptedEndpoint([(Kind.PEERS, {"links": []}), (Kind.END, {"reason": "probe done"})])
    try:
        why = _session(endpoint, tmp_path, PROBE_MANIFEST, listener).run()
    finally:
        listener.close()
    assert why == "master ended the session (probe done)"
    welcome, peered = endpoint.sent
    assert welcome.kind == Kind.WELCOME and welcome.body["data_port"] == listener.port
    assert peered.kind == Kind.PEERED and peered.body["failed"] == ""


def test_a_peer_that_cannot_be_reached_is_named_in_peered(tmp_path):
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    link = {"rank": 2, "ticket": "ab" * 16, "host": "127.0.0.1", "port": port}
    endpoint = ScriptedEndpoint([(Kind.PEERS, {"links": [link]}), (Kind.END, {"reason": "x"})])
    _session(endpoint, tmp_path, PROBE_MANIFEST).run()
    closed.close()
    peered = next(m for m in endpoint.sent if m.kind == Kind.PEERED)
    assert f"cannot reach rank 2 at 127.0.0.1:{port}" in peered.body["failed"]


def test_a_session_whose_master_skips_load_ends_with_the_reason(tmp_path):
    manifest = write_shard(tmp_path / "store" / "shards" / "x", {"a.bin": b"abc"})
    endpoint = ScriptedEndpoint([(Kind.STATS_REQUEST, {})])
    why = _session(endpoint, tmp_path, manifest).run()
    assert endpoint.kinds() == [Kind.WELCOME] and endpoint.sent[0].body["have_shard"] is True
    assert why == "expected LOAD, got STATS_REQUEST"


def test_a_lost_direct_link_is_reported_with_the_other_workers_rank(tmp_path, monkeypatch):
    """A rank whose direct link to another worker breaks mid-step tells its master
    which one (ERROR with peer_rank), then waits for the next master."""
    import tpi.worker.session as session_module

    manifest = write_shard(tmp_path / "store" / "shards" / "x", {"a.bin": b"abc"})
    memory = SimpleNamespace(to_dict=lambda: {"window": 1}, describe=lambda: "window 1")
    runtime = SimpleNamespace(
        memory=memory,
        layers=SimpleNamespace(resident_bytes=0),
        decoder=SimpleNamespace(max_positions=64),
        close=lambda: None,
    )
    loaded = SimpleNamespace(runtime=runtime, stage_layers=(1, 2), load_seconds=0.1)
    monkeypatch.setattr(session_module, "load_rank", lambda *a: loaded)

    class BrokenSteps:
        def __init__(self, *a):
            pass

        def step(self, msg):
            raise PeerLost(3, "the peer closed the data link")

    monkeypatch.setattr(session_module, "RankSteps", BrokenSteps)
    load = {"dtype": "fp32", "wire_dtype": "fp32", "direct_hops": True}
    endpoint = ScriptedEndpoint([(Kind.LOAD, load)])
    # A STEP's frames as the master sends them (a data kind: built by hand).
    import torch

    from tpi.comm.wire import StepHeader, encode_data

    header = StepHeader(SESSION, 1, 0, 1, torch.float32, (1, 4), (0, 0, 0, 1))
    endpoint.script.append(Inbound(MASTER, 9, [encode_data(Kind.STEP, header), bytes(16)]))
    why = _session(endpoint, tmp_path, manifest).run()
    assert endpoint.kinds() == [Kind.WELCOME, Kind.READY, Kind.ERROR]
    error = endpoint.sent[-1].body
    assert error["peer_rank"] == 3 and "lost the direct link to rank 3" in error["message"]
    assert why.startswith("error: lost the direct link to rank 3")
    assert endpoint.sent[1].body["memory"] == {"window": 1}


@pytest.fixture(autouse=True)
def _no_watchdog_wait(monkeypatch):
    # The channel polls the fake socket; nothing here waits on real time.
    import tpi.worker.master_channel as channel

    monkeypatch.setattr(channel, "POLL_S", 0.01)
