"""Who may talk to a worker, and who can read the traffic."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch
import zmq
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cluster_helpers import addresses, cluster_model, local_workers
from tests.stepping import greedy
from tpi.cli import cli
from tpi.comm.auth import AuthError
from tpi.comm.links import ClusterError
from tpi.comm.wire import PROTOCOL_VERSION, Kind, decode, encode_control
from tpi.master.engine import load_engine
from tpi.master.loader import open_model
from tpi.model.linear import embedding_rows

PROMPT = list(range(5, 25))


def _raw_hello(address: str, auth: str, then=None, timeout_ms: int = 5000) -> list:
    """Talk to a worker as a hand-made client; return the decoded replies."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{address}")
    hello = {
        "session": 7,
        "rank": 1,
        "world": 2,
        "manifest": "0" * 64,
        "tpi_version": "x",
        "nonce": "ab" * 16,
        "auth": auth,
    }
    s.send_multipart([encode_control(Kind.HELLO, hello)])
    replies = []
    try:
        while s.poll(timeout_ms):
            msg = decode(s.recv_multipart())
            replies.append(msg)
            if msg.kind == Kind.CHALLENGE and then is not None:
                s.send_multipart([encode_control(Kind.AUTH, then)])
                continue
            break
    finally:
        s.close()
        ctx.term()
    return replies


def test_unauthenticated_clients_are_refused(tmp_path):
    with local_workers(1, tmp_path) as lc:
        addr = addresses(lc)[0]
        no_auth = _raw_hello(addr, "none")
        assert (
            no_auth[-1].kind == Kind.REFUSE
            and "requires the cluster's shared secret" in no_auth[-1].body["reason"]
        )
        forged = _raw_hello(addr, "hmac", then={"session": 7, "proof": "00" * 32})
        assert [m.kind for m in forged] == [Kind.CHALLENGE, Kind.REFUSE]
        assert "authentication failed" in forged[-1].body["reason"]


def test_wrong_or_missing_secret_on_the_master(llama_dir, tmp_path, monkeypatch):
    with local_workers(1, tmp_path) as lc:
        monkeypatch.setenv("TPI_SECRET", "a-completely-different-secret-value")
        with pytest.raises(ClusterError, match=r"rank 1 \(.*\) failed authentication"):
            open_model(str(llama_dir), "fp32", quiet=True, workers=addresses(lc))
        monkeypatch.delenv("TPI_SECRET")
        with pytest.raises(AuthError, match="needs the cluster's shared secret"):
            open_model(str(llama_dir), "fp32", quiet=True, workers=addresses(lc))
        res = CliRunner().invoke(
            cli, ["generate", "--model", str(llama_dir), "--workers", addresses(lc)[0], "hi"]
        )
        assert (
            res.exit_code == 1 and "shared secret" in res.stderr and "Traceback" not in res.output
        )
        with pytest.raises(ClusterError, match="requires the cluster's shared secret"):
            open_model(str(llama_dir), "fp32", quiet=True, workers=addresses(lc), insecure=True)


def test_insecure_worker_is_not_trusted_by_a_master_with_a_secret(llama_dir, tmp_path):
    with local_workers(1, tmp_path, extra_args=["--insecure"]) as lc:
        with pytest.raises(ClusterError, match="did not prove the shared secret"):
            open_model(str(llama_dir), "fp32", quiet=True, workers=addresses(lc))
        with cluster_model(llama_dir, addresses(lc), insecure=True) as lm:  # both sides opted out
            assert greedy(lm.engine, PROMPT, 3) == greedy(load_engine(llama_dir), PROMPT, 3)


class Tap:
    """A TCP relay that records every byte it forwards (an eavesdropper on the link)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.captured = bytearray()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    self.captured += data
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        async def handle(cr, cw):
            sr, sw = await asyncio.open_connection(*self.target)
            await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

        async def main():
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            self.ready.set()
            await asyncio.Event().wait()

        self.loop.run_until_complete(main())


@pytest.mark.parametrize("curve", [False, True])
def test_eavesdropper_reads_activations_only_without_curve(llama_dir, tmp_path, curve):
    keys = tmp_path / "keys"
    assert CliRunner().invoke(cli, ["keygen", str(keys)]).exit_code == 0
    extra = ["--curve", str(keys)] if curve else []
    with local_workers(1, tmp_path / "w", extra_args=extra) as lc:
        tap = Tap(addresses(lc)[0])
        with cluster_model(llama_dir, [tap.address], curve_dir=str(keys) if curve else None) as lm:
            # The data link travels unencrypted: never opened under CurveZMQ.
            assert (lm.cluster.links.links[0].data is None) is curve
            ids = PROMPT
            lm.engine.prefill(ids)
            # The hidden states the master ships to the worker for this prompt:
            head = lm.engine.vocab.head
            secret_bytes = embedding_rows(torch.tensor(ids), head.embed, torch.float32)
            secret_bytes = secret_bytes.numpy().tobytes()
        time.sleep(0.2)
        captured = bytes(tap.captured)
        assert len(captured) > 100_000  # the shard push and the step went through the tap
        found = secret_bytes[:256] in captured
        assert found is (not curve)


def test_curve_worker_refuses_a_master_without_its_keys(llama_dir, tmp_path):
    keys = tmp_path / "keys"
    CliRunner().invoke(cli, ["keygen", str(keys)])
    other = tmp_path / "other"
    CliRunner().invoke(cli, ["keygen", str(other)])
    with local_workers(1, tmp_path / "w", extra_args=["--curve", str(keys)]) as lc:
        import tpi.master.connection as connection

        old = connection.HANDSHAKE_TIMEOUT_S, connection.CONNECT_TIMEOUT_S
        connection.HANDSHAKE_TIMEOUT_S = connection.CONNECT_TIMEOUT_S = 3.0
        try:
            with pytest.raises(ClusterError, match="does not answer"):
                open_model(
                    str(llama_dir), "fp32", quiet=True, workers=addresses(lc), curve_dir=str(other)
                )
            with pytest.raises(ClusterError, match="does not answer"):  # plaintext master
                open_model(str(llama_dir), "fp32", quiet=True, workers=addresses(lc))
        finally:
            connection.HANDSHAKE_TIMEOUT_S, connection.CONNECT_TIMEOUT_S = old


def test_keygen_files_and_permissions(tmp_path):
    d = tmp_path / "k"
    res = CliRunner().invoke(cli, ["keygen", str(d)])
    assert res.exit_code == 0
    for name in (
        "secret",
        "master.key",
        "master.key_secret",
        "worker.key",
        "worker.key_secret",
        "authorized/master.key",
    ):
        assert (d / name).is_file(), name
    for name in ("secret", "master.key_secret", "worker.key_secret"):
        assert (d / name).stat().st_mode & 0o077 == 0, name
    assert CliRunner().invoke(cli, ["keygen", str(d)]).exit_code != 0  # will not overwrite


# --- fuzzing a live worker daemon ------------------------------------------------------------

_kinds = st.sampled_from([int(k) for k in Kind] + [0, 99, 255])
_frames = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=3),
    st.builds(
        lambda k, body, v: [bytes([0x54, 0x50, v, k]) + body],
        _kinds,
        st.binary(max_size=64),
        st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION + 1]),
    ),
    st.builds(
        lambda k, body: [encode_control(Kind(k), body)],
        st.sampled_from([int(k) for k in Kind]),
        st.dictionaries(
            st.sampled_from(
                [
                    "session",
                    "rank",
                    "world",
                    "manifest",
                    "nonce",
                    "auth",
                    "proof",
                    "file",
                    "offset",
                    "total",
                    "dtype",
                ]
            ),
            st.one_of(st.integers(-5, 5), st.text(max_size=8), st.booleans(), st.none()),
            max_size=6,
        ),
    ),
)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    with local_workers(1, tmp_path_factory.mktemp("fuzz")) as lc:
        ctx = zmq.Context()
        yield lc, ctx
        ctx.term()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(_frames, min_size=1, max_size=4))
def test_fuzzed_frames_never_take_the_daemon_down(fuzz_target, batch):
    lc, ctx = fuzz_target
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{addresses(lc)[0]}")
    for frames in batch:
        s.send_multipart(frames)
    s.poll(50)
    s.close()
    assert lc.workers[0].proc.poll() is None


def test_after_fuzzing_a_real_master_is_served(fuzz_target, llama_dir):
    lc, _ = fuzz_target
    # Raw garbage on the TCP port too (not even ZMTP).
    with socket.create_connection(tuple(addresses(lc)[0].split(":"))) as raw:
        raw.sendall(b"\xff" * 300 + b"GET / HTTP/1.0\r\n\r\n")
    time.sleep(0.3)
    assert lc.workers[0].proc.poll() is None
    with cluster_model(llama_dir, addresses(lc)) as lm:
        assert greedy(lm.engine, PROMPT, 4) == greedy(load_engine(llama_dir), PROMPT, 4)
