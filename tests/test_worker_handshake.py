"""A session's start on the worker (worker/handshake.py), the shard push it may
need (worker/shard_push.py) and a PROFILE_REQUEST (worker/profile_service.py),
each driven through a scripted master channel."""

from __future__ import annotations

import pytest
import zmq

import tpi.planning.device_probe as device_probe
from tests.worker_helpers import FakeChannel, message, shard_manifest, write_shard
from tpi.comm.wire import Kind
from tpi.planning.request import ProfileRequestError
from tpi.storage.manifest import MANIFEST_NAME, ShardError, sha256_bytes
from tpi.worker.handshake import Hello, Refused, admit
from tpi.worker.master_channel import SessionEnded
from tpi.worker.options import WorkerOptions
from tpi.worker.profile_service import serve_profile
from tpi.worker.shard_push import receive_push
from tpi.worker.store import ShardStore

FILES = {"a.bin": b"alpha" * 50, "b.bin": b"beta" * 40}


def _hello(manifest_hash: str) -> Hello:
    return Hello(
        session=5, rank=1, world=2, manifest_hash=manifest_hash, nonce="n", auth_mode="hmac"
    )


def _chunks(files: dict[str, bytes], size: int = 64) -> list:
    """PUSH_CHUNKs of every file, in pieces of `size` bytes, then PUSH_DONE."""
    out = []
    for name, data in files.items():
        for off in range(0, len(data), size):
            piece = zmq.Frame(data[off : off + size])
            out.append(
                message(Kind.PUSH_CHUNK, piece, session=5, file=name, offset=off, total=len(data))
            )
    return [*out, message(Kind.PUSH_DONE, session=5)]


def test_a_shard_in_the_store_is_welcomed_and_used_as_is(tmp_path):
    h = write_shard(tmp_path / "rank1", FILES)
    channel = FakeChannel([])
    offer = {"data_port": 6000, "ticket": "t"}
    got = admit(channel, _hello(h), WorkerOptions(), ShardStore(tmp_path), offer)
    assert got == tmp_path / "rank1"
    assert channel.answers == [
        (Kind.WELCOME, {"have_shard": True, "partial": {}, "data_port": 6000, "ticket": "t"})
    ]


def test_without_the_shard_and_without_pushes_the_master_is_refused_by_name(tmp_path):
    channel = FakeChannel([])
    with pytest.raises(Refused, match=r"no shard with manifest 000000000000\.\.\. in .*pushed"):
        admit(channel, _hello("0" * 64), WorkerOptions(accept_push=False), ShardStore(tmp_path))
    assert channel.answers == []


def test_a_pushed_shard_is_acknowledged_chunk_by_chunk_then_verified(tmp_path):
    raw = shard_manifest(FILES)
    h = sha256_bytes(raw)
    channel = FakeChannel(_chunks({**FILES, MANIFEST_NAME: raw}))
    store = ShardStore(tmp_path)
    got = admit(channel, _hello(h), WorkerOptions(), store)
    assert got == tmp_path / "shards" / h and store.find(h) == got
    assert channel.answers[0] == (Kind.WELCOME, {"have_shard": False, "partial": {}})
    acks = [body for kind, body in channel.answers if kind == Kind.PUSH_ACK]
    assert acks[:2] == [{"file": "a.bin", "next": 64}, {"file": "a.bin", "next": 128}]
    assert {a["file"]: a["next"] for a in acks} == {
        "a.bin": 250,
        "b.bin": 160,
        MANIFEST_NAME: len(raw),
    }
    assert channel.answers[-1] == (Kind.READY, {"verified": True})
    assert (got / "b.bin").read_bytes() == FILES["b.bin"]


def test_an_interrupted_push_is_offered_for_resumption(tmp_path):
    raw = shard_manifest(FILES)
    h = sha256_bytes(raw)
    store = ShardStore(tmp_path)
    store.write_chunk(h, "a.bin", 0, 250, FILES["a.bin"][:100])
    sent = _chunks({**FILES, MANIFEST_NAME: raw})
    rest = [m for m in sent if m.body.get("file") != "a.bin" or m.body["offset"] >= 64]
    channel = FakeChannel(rest)
    admit(channel, _hello(h), WorkerOptions(), store)
    assert channel.answers[0] == (Kind.WELCOME, {"have_shard": False, "partial": {"a.bin": 100}})
    assert channel.answers[-1][0] == Kind.READY


def test_a_message_other_than_a_chunk_ends_the_push(tmp_path):
    channel = FakeChannel([message(Kind.STATS_REQUEST, session=5)])
    with pytest.raises(SessionEnded, match="unexpected STATS_REQUEST during shard push"):
        receive_push(channel, ShardStore(tmp_path), "0" * 64)


def test_a_corrupt_push_is_refused_and_never_acknowledged_ready(tmp_path):
    raw = shard_manifest(FILES)
    h = sha256_bytes(raw)
    channel = FakeChannel(
        _chunks({"a.bin": FILES["a.bin"], "b.bin": b"x" * 160, MANIFEST_NAME: raw})
    )
    with pytest.raises(ShardError, match="b.bin is corrupt"):
        receive_push(channel, ShardStore(tmp_path), h)
    assert Kind.READY not in [kind for kind, _ in channel.answers]


def test_an_unsafe_file_name_in_a_push_is_refused(tmp_path):
    bad = message(Kind.PUSH_CHUNK, zmq.Frame(b"x"), session=5, file="../x", offset=0, total=1)
    with pytest.raises(ShardError, match="unsafe file name"):
        receive_push(FakeChannel([bad]), ShardStore(tmp_path), "0" * 64)
    assert not (tmp_path / "incoming").exists()  # refused before anything is written


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Device measurements that take no time (their values are what the test checks)."""
    monkeypatch.setenv("TPI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(device_probe, "measure_sustained", lambda *a: 0.75)
    monkeypatch.setattr(device_probe, "measure_disk", lambda *a: 123e6)


def test_a_profile_request_is_answered_with_this_devices_facts_and_budget(measured, tmp_path):
    channel = FakeChannel([])
    request = {"model": None, "settings": [], "points": [], "head_rows": None}
    msg = message(Kind.PROFILE_REQUEST, session=5, request=request)
    serve_profile(channel, msg, WorkerOptions(budget_bytes=300 << 20), ShardStore(tmp_path / "s"))
    [(kind, body)] = channel.answers
    device = body["profile"]["device"]
    assert kind == Kind.PROFILE and body["profile"]["slices"] == {}
    assert device["sustained"] == 0.75 and device["disk_read_bytes_per_s"] == 123e6
    assert device["budget_bytes"] == 300 << 20


def test_a_malformed_profile_request_is_refused_before_measuring(measured, tmp_path):
    msg = message(Kind.PROFILE_REQUEST, session=5, request={"points": "many"})
    channel = FakeChannel([])
    with pytest.raises(ProfileRequestError, match="malformed profile request"):
        serve_profile(channel, msg, WorkerOptions(), ShardStore(tmp_path))
    assert channel.answers == []
