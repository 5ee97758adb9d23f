"""The worker daemon's idle loop (worker/daemon.py) on a loopback socket, in this
process: what it answers before a session, how it starts one after the
challenge, and that a session ending in any way leaves it waiting for the next.
The session itself is a stand-in here (worker/session.py has tests of its own)."""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import threading
from collections.abc import Iterator

import pytest
import zmq

import tpi.worker.daemon as daemon_mod
from tests.worker_helpers import SECRET
from tpi.comm.auth import new_nonce, proof
from tpi.comm.links import Inbound
from tpi.comm.wire import MAGIC, PROTOCOL_VERSION, Kind, Message, decode, encode_control
from tpi.worker.daemon import WorkerDaemon
from tpi.worker.options import WorkerOptions

WAIT_MS = 5000


class StandInSession:
    """What the daemon needs of a session; `plan` says how each one ends."""

    started: list[dict] = []
    plan: list = []

    def __init__(self, endpoint, store, inb, body, options, data_listener) -> None:
        self.rank, self.world = body["rank"], body["world"]
        self.handover = None
        StandInSession.started.append(body)

    def run(self) -> str:
        how = StandInSession.plan.pop(0) if StandInSession.plan else "master ended the session"
        if isinstance(how, Exception):
            raise how
        if isinstance(how, Inbound):
            self.handover = how
            return "master disconnected"
        return how


@pytest.fixture
def worker(tmp_path, monkeypatch) -> Iterator[dict]:
    """A daemon with a stand-in session, not yet serving: `start()` runs its loop
    on a thread (`max_sessions` read then)."""
    monkeypatch.setattr(daemon_mod, "IDLE_POLL_S", 0.02)
    monkeypatch.setattr(daemon_mod, "Session", StandInSession)
    StandInSession.started, StandInSession.plan = [], []
    d = WorkerDaemon(
        "tcp://127.0.0.1:0", tmp_path, options=WorkerOptions(data_port=None, secret=SECRET)
    )
    stop = threading.Event()
    state = {"daemon": d, "stop": stop, "max_sessions": None, "ctx": zmq.Context()}
    thread = threading.Thread(target=lambda: d.serve(stop, state["max_sessions"]), daemon=True)
    state["thread"], state["start"] = thread, thread.start
    try:
        yield state
    finally:
        stop.set()
        if thread.ident is None:
            d.close()  # never served (serve closes it on the way out)
        thread.join(5)
        state["ctx"].destroy(linger=0)
    assert not thread.is_alive()


def _master(state: dict, name: bytes) -> zmq.Socket:
    s = state["ctx"].socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, name)
    s.connect(state["daemon"].address)
    return s


def _reply(sock: zmq.Socket) -> Message:
    assert sock.poll(WAIT_MS), "the worker did not answer"
    return decode(sock.recv_multipart())


def _ask(sock: zmq.Socket, frame: bytes) -> Message:
    sock.send_multipart([frame])
    return _reply(sock)


def _hello_frame(session: int, nonce: str, version: int = PROTOCOL_VERSION) -> bytes:
    body = {
        "session": session,
        "rank": 1,
        "world": 2,
        "manifest": "0" * 64,
        "tpi_version": "test",
        "nonce": nonce,
        "auth": "hmac",
    }
    return struct.pack("<2sBB", MAGIC, version, Kind.HELLO) + json.dumps(body).encode()


def _authenticate(sock: zmq.Socket, session: int) -> None:
    """HELLO, then the AUTH answering the worker's CHALLENGE."""
    nonce = new_nonce()
    challenge = _ask(sock, _hello_frame(session, nonce))
    assert challenge.kind == Kind.CHALLENGE
    given = proof(SECRET, "master", nonce, challenge.body["nonce"], session)
    sock.send_multipart([encode_control(Kind.AUTH, {"session": session, "proof": given})])


def _wait(predicate, what: str) -> None:
    done = threading.Event()
    for _ in range(500):  # 5 s at most
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_idle_worker_refuses_what_is_not_a_hello_in_one_line(worker):
    worker["start"]()
    m = _master(worker, b"m1")
    assert _ask(m, b"garbage!").body == {"reason": "not a tpi message"}
    old = _ask(m, _hello_frame(1, new_nonce(), version=PROTOCOL_VERSION - 1))
    assert old.kind == Kind.REFUSE and old.body["reason"] == (
        f"protocol version {PROTOCOL_VERSION - 1}, this worker speaks {PROTOCOL_VERSION} "
        "(upgrade one side)"
    )
    stats = _ask(m, encode_control(Kind.STATS_REQUEST, {"session": 1}))
    assert stats.body == {"reason": "no session: send HELLO first (got STATS_REQUEST)"}
    # A late END of a finished session is dropped without an answer: the next
    # answer is the PING's, sent after it on the same connection.
    m.send_multipart([encode_control(Kind.END, {"session": 1, "reason": "bye"})])
    ping = _ask(m, encode_control(Kind.PING, {"session": 1}))
    assert ping.body == {"reason": "no session: send HELLO first (got PING)"}
    assert StandInSession.started == []


def test_a_session_starts_after_the_proof_and_max_sessions_ends_the_daemon(worker):
    worker["max_sessions"] = 1
    worker["start"]()
    m = _master(worker, b"m1")
    _authenticate(m, session=42)
    worker["thread"].join(5)
    assert not worker["thread"].is_alive()  # served its one session, then closed
    assert [b["session"] for b in StandInSession.started] == [42]
    assert worker["daemon"].sessions_served == 1
    assert worker["daemon"].endpoint.sock.closed


def test_a_session_that_fails_leaves_the_worker_waiting_for_the_next(worker, caplog):
    StandInSession.plan = [RuntimeError("boom"), "master ended the session"]
    worker["start"]()
    m = _master(worker, b"m1")
    with caplog.at_level(logging.INFO, logger="tpi.worker"):
        _authenticate(m, session=1)
        _wait(lambda: worker["daemon"].sessions_served == 1, "the failed session")
        _authenticate(m, session=2)  # answered: the daemon survived
        _wait(lambda: worker["daemon"].sessions_served == 2, "the second session")
    assert [b["session"] for b in StandInSession.started] == [1, 2]
    assert "session ended: internal error: boom; waiting for a master" in caplog.text


def test_a_hello_handed_over_by_a_vanished_masters_session_is_answered(worker):
    newcomer = _master(worker, b"m2")
    newcomer.send_multipart([encode_control(Kind.PONG, {"session": 0})])  # connected
    StandInSession.plan = [Inbound(b"m2", 0, [_hello_frame(7, new_nonce())])]
    worker["start"]()
    m = _master(worker, b"m1")
    assert _reply(newcomer).body["reason"].startswith("no session")  # its PONG, refused
    _authenticate(m, session=6)
    # The newcomer gets its CHALLENGE without sending its HELLO again.
    challenge = _reply(newcomer)
    assert challenge.kind == Kind.CHALLENGE and challenge.body["session"] == 7


def test_stop_ends_an_idle_daemon_promptly_and_closes_its_socket(worker):
    worker["start"]()
    worker["stop"].set()
    worker["thread"].join(2)
    assert not worker["thread"].is_alive()
    with contextlib.closing(worker["ctx"].socket(zmq.REP)) as s:  # the port is free again
        s.bind(worker["daemon"].address)
