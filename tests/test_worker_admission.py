"""Who may start a session on a worker (worker/admission.py), against a fake
endpoint: the challenge, the proof, and what is refused or forgotten.
(Strangers flooding a real worker with HELLOs: test_hardening.py.)"""

from __future__ import annotations

import pytest

import tpi.worker.admission as admission
from tests.worker_helpers import SECRET, FakeEndpoint, inbound
from tpi.comm.auth import new_nonce, proof
from tpi.comm.wire import Kind
from tpi.worker.admission import Admission


def _hello(peer: bytes, session: int = 11, rank: int = 1, world: int = 2, auth: str = "hmac"):
    nonce = new_nonce()
    inb, msg = inbound(
        Kind.HELLO,
        peer,
        session=session,
        rank=rank,
        world=world,
        manifest="0" * 64,
        tpi_version="test",
        nonce=nonce,
        auth=auth,
    )
    return inb, msg, nonce


def _answer(adm: Admission, ep: FakeEndpoint, peer: bytes, nonce: str, secret: bytes = SECRET):
    """The master's AUTH for the last CHALLENGE `peer` got; returns Admission.auth's result."""
    challenge = [m for p, m in ep.sent if p == peer and m.kind == Kind.CHALLENGE][-1].body
    session = challenge["session"]
    assert challenge["proof"] == proof(SECRET, "worker", nonce, challenge["nonce"], session)
    given = proof(secret, "master", nonce, challenge["nonce"], session)
    inb, msg = inbound(Kind.AUTH, peer, session=session, proof=given)
    return adm.auth(inb, msg)


def test_a_master_that_proves_the_secret_gets_the_session_with_its_hello():
    ep = FakeEndpoint()
    adm = Admission(ep, SECRET)
    inb, msg, nonce = _hello(b"m1")
    assert adm.hello(inb, msg) is None  # challenged, not admitted yet
    assert ep.kinds(b"m1") == [Kind.CHALLENGE]
    started = _answer(adm, ep, b"m1", nonce)
    assert started is not None and started[0].peer == b"m1" and started[1] == msg.body


def test_a_wrong_secret_is_refused_in_one_line_and_cannot_retry_the_same_challenge():
    ep = FakeEndpoint()
    adm = Admission(ep, SECRET)
    inb, msg, nonce = _hello(b"m1")
    adm.hello(inb, msg)
    assert _answer(adm, ep, b"m1", nonce, secret=b"another-secret-0123456789abcdef") is None
    refusal = ep.sent[-1][1]
    assert refusal.kind == Kind.REFUSE and refusal.body == {
        "session": 11,
        "reason": "authentication failed: wrong shared secret",
    }
    # The challenge is used up: even the right proof now needs a new HELLO.
    assert _answer(adm, ep, b"m1", nonce) is None


def test_an_auth_for_another_session_is_refused():
    ep = FakeEndpoint()
    adm = Admission(ep, SECRET)
    inb, msg, nonce = _hello(b"m1", session=11)
    adm.hello(inb, msg)
    challenge = ep.sent[-1][1].body
    auth_inb, auth = inbound(
        Kind.AUTH, b"m1", session=12, proof=proof(SECRET, "master", nonce, challenge["nonce"], 12)
    )
    assert adm.auth(auth_inb, auth) is None
    assert ep.sent[-1][1].body["reason"] == "authentication failed: wrong shared secret"


def test_an_auth_nobody_asked_for_is_ignored_without_an_answer():
    ep = FakeEndpoint()
    adm = Admission(ep, SECRET)
    inb, msg = inbound(Kind.AUTH, b"stranger", session=1, proof="0" * 64)
    assert adm.auth(inb, msg) is None
    assert ep.sent == []


@pytest.mark.parametrize(
    "rank,world", [(0, 2), (2, 2), (1, 1), (1, admission.MAX_WORLD + 1), (-1, 4)]
)
def test_a_rank_outside_the_world_is_refused_before_any_challenge(rank, world):
    ep = FakeEndpoint()
    inb, msg, _ = _hello(b"m1", rank=rank, world=world)
    assert Admission(ep, SECRET).hello(inb, msg) is None
    assert ep.kinds() == [Kind.REFUSE]
    assert ep.sent[0][1].body == {"session": 11, "reason": f"bad rank {rank} of world {world}"}


def test_a_master_without_the_secret_is_told_how_to_set_it():
    ep = FakeEndpoint()
    inb, msg, _ = _hello(b"m1", auth="none")
    assert Admission(ep, SECRET).hello(inb, msg) is None
    reason = ep.sent[0][1].body["reason"]
    assert ep.kinds() == [Kind.REFUSE] and "TPI_SECRET or --secret-file" in reason


def test_without_a_secret_the_first_hello_starts_the_session_at_once():
    ep = FakeEndpoint()
    inb, msg, _ = _hello(b"m1", auth="none")
    assert Admission(ep, None).hello(inb, msg) == (inb, msg.body)
    assert ep.sent == []


def test_the_first_master_to_prove_the_secret_wins_the_others_ask_again():
    ep = FakeEndpoint()
    adm = Admission(ep, SECRET)
    hellos = {peer: _hello(peer) for peer in (b"m1", b"m2")}
    for inb, msg, _ in hellos.values():
        adm.hello(inb, msg)
    assert _answer(adm, ep, b"m2", hellos[b"m2"][2]) is not None
    assert _answer(adm, ep, b"m1", hellos[b"m1"][2]) is None  # its challenge was dropped


def test_only_the_newest_challenges_are_kept(monkeypatch):
    monkeypatch.setattr(admission, "MAX_PENDING", 3)
    ep = FakeEndpoint()
    adm = Admission(ep, SECRET)
    hellos = {bytes([65 + i]): _hello(bytes([65 + i])) for i in range(4)}
    for inb, msg, _ in hellos.values():
        adm.hello(inb, msg)
    assert _answer(adm, ep, b"A", hellos[b"A"][2]) is None  # the oldest, forgotten
    assert _answer(adm, ep, b"D", hellos[b"D"][2]) is not None


def test_a_challenge_answered_too_late_is_forgotten(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: clock[0])
    ep = FakeEndpoint()
    adm = Admission(ep, SECRET)
    on_time, late = _hello(b"on-time"), _hello(b"late")
    adm.hello(*late[:2])
    clock[0] += admission.AUTH_TIMEOUT_S - 1
    adm.hello(*on_time[:2])
    clock[0] += 1.5  # past the first challenge's deadline, within the second's
    sent = len(ep.sent)
    assert _answer(adm, ep, b"late", late[2]) is None
    assert len(ep.sent) == sent  # ignored like any stray frame: no refusal either
    assert _answer(adm, ep, b"on-time", on_time[2]) is not None
