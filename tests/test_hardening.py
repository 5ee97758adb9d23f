"""What a hostile network, a flaky disk and careless clients try: each test
reproduces one way tpi could be broken, and checks it no longer is."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import zmq

from tests.cluster_helpers import addresses, cluster_model, local_workers, wait_for
from tests.serve_helpers import TPI, live_server
from tests.stepping import greedy
from tpi.comm.links import ClusterError, LinkLost
from tpi.comm.wire import Kind, encode_control
from tpi.master.engine import load_engine
from tpi.master.loader import MemoryOptions, open_model
from tpi.storage.manifest import ShardError, layer_file, read_manifest
from tpi.storage.split import split_model

PROMPT = list(range(5, 25))
REPO = Path(__file__).resolve().parents[1]


# --- 1. an unauthenticated peer cannot reserve a worker -----------------------------------


class HelloPest:
    """A peer that knows no secret and sends a HELLO every `every_s`, never answering."""

    def __init__(self, address: str, every_s: float = 0.1) -> None:
        self.address = address
        self.every_s = every_s
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{self.address}")
        while not self._stop.is_set():
            hello = {
                "session": secrets.randbits(62),
                "rank": 1,
                "world": 2,
                "manifest": "0" * 64,
                "tpi_version": "0",
                "nonce": secrets.token_hex(16),
                "auth": "hmac",
            }
            sock.send(encode_control(Kind.HELLO, hello))
            self.sent += 1
            while sock.poll(0):
                sock.recv_multipart()  # challenges, refusals: ignored
            self._stop.wait(self.every_s)
        sock.close()
        ctx.term()

    def __enter__(self) -> HelloPest:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_stranger_repeating_hellos_cannot_keep_masters_out(llama_dir, tmp_path):
    with local_workers(1, tmp_path) as lc, HelloPest(addresses(lc)[0]) as pest:
        time.sleep(0.5)
        for _ in range(15):
            t0 = time.monotonic()
            with cluster_model(llama_dir, addresses(lc)) as lm:
                assert greedy(lm.engine, PROMPT, 2)
            assert time.monotonic() - t0 < 20
        assert pest.sent >= 5  # it was at it all along


def test_one_unanswered_hello_does_not_make_the_worker_wait(llama_dir, tmp_path):
    with local_workers(1, tmp_path) as lc:
        with cluster_model(llama_dir, addresses(lc)):
            pass  # the shard is pushed once; what follows times the handshake only
        ctx = zmq.Context()
        stranger = ctx.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.connect(f"tcp://{addresses(lc)[0]}")
        hello = {
            "session": 1,
            "rank": 1,
            "world": 2,
            "manifest": "0" * 64,
            "tpi_version": "0",
            "nonce": "00" * 16,
            "auth": "hmac",
        }
        stranger.send(encode_control(Kind.HELLO, hello))
        assert stranger.poll(5000)  # challenged at once
        t0 = time.monotonic()
        with cluster_model(llama_dir, addresses(lc)):
            took = time.monotonic() - t0
        stranger.close()
        ctx.term()
    assert took < 5, f"the real master waited {took:.1f} s behind the stranger"


# --- 2. silent corruption of a shard file -------------------------------------------------------


def _flip_keeping_size_and_mtime(path: Path, offset: int = -100) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_flipped_byte_in_a_workers_shard_is_named_not_computed_with(llama_dir, tmp_path):
    with local_workers(1, tmp_path / "w") as lc:
        with cluster_model(llama_dir, addresses(lc)) as lm:  # pushed and verified once
            expected = greedy(lm.engine, PROMPT, 4)
        shard = next((lc.workers[0].log_path.parent / "store" / "shards").iterdir())
        _flip_keeping_size_and_mtime(shard / layer_file(1))
        with (
            pytest.raises(ClusterError, match=r"layer_001\.safetensors is corrupt"),
            cluster_model(llama_dir, addresses(lc)) as lm,
        ):
            greedy(lm.engine, PROMPT, 4)
        # The corrupt shard was dropped: the next session pushes it again and works.
        with cluster_model(llama_dir, addresses(lc)) as lm:
            assert greedy(lm.engine, PROMPT, 4) == expected


@pytest.mark.parametrize("window", [None, 1])
def test_a_flipped_byte_in_the_masters_split_is_named(llama_dir, tmp_path, window):
    split = split_model(llama_dir, tmp_path / "split", [1.0])
    memory = MemoryOptions(window=window)
    lm = open_model(str(split), "fp32", quiet=True, memory=memory)  # verified: remembered
    lm.close()
    _flip_keeping_size_and_mtime(split / "rank0" / layer_file(2))
    with pytest.raises(ShardError, match=r"layer_002\.safetensors is corrupt"):
        lm = open_model(str(split), "fp32", quiet=True, memory=memory)
        try:
            greedy(lm.engine, PROMPT, 2)
        finally:
            lm.close()


def test_every_shard_file_carries_its_checksum(llama_dir, tmp_path):
    split = split_model(llama_dir, tmp_path / "split", [1.0, 1.0])
    manifest, _ = read_manifest(split / "rank1")
    import zlib

    for name, meta in manifest.files.items():
        assert meta["crc32"] == zlib.crc32((split / "rank1" / name).read_bytes()), name


# --- 6. a port in use ---------------------------------------------------------------------------


def test_serve_on_a_port_in_use_says_so_before_loading_anything(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    t0 = time.monotonic()
    run = subprocess.run(
        [TPI, "serve", "--port", str(port), "--model", str(tmp_path / "not-loaded-yet")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    busy.close()
    assert run.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in run.stderr
    assert "serving" not in run.stderr and "Traceback" not in run.stderr
    assert time.monotonic() - t0 < 15


# --- 7. local workers die with their parent -------------------------------------------------------

PARENT = """
import os, sys, time, json
from pathlib import Path
from tpi.master.local_cluster import LocalCluster
from tpi.emulation.link_shaper import LinkSpec
lc = LocalCluster(2, Path(sys.argv[1]), threads=1, link=LinkSpec(0.001))
lc.start()
pids = [w.proc.pid for w in lc.workers] + [lc.shaper.pid]
Path(sys.argv[2]).write_text(json.dumps(pids))
if sys.argv[3] == "crash":
    os.abort()
time.sleep(600)
"""


@pytest.mark.parametrize("ending", ["sigterm", "sigkill", "crash"])
def test_local_workers_and_shaper_die_with_their_parent(tmp_path, ending):
    import json

    pids_file = tmp_path / "pids.json"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "cluster"), str(pids_file), ending],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(pids_file.exists, 60), "the parent did not start its workers"
        pids = json.loads(pids_file.read_text())
        assert all(psutil.pid_exists(p) for p in pids)
        if ending == "sigterm":
            parent.send_signal(signal.SIGTERM)
        elif ending == "sigkill":
            parent.kill()
        parent.wait(30)

        def gone() -> bool:
            alive = []
            for p in pids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                        alive.append(p)
            return not alive

        assert wait_for(gone, 15), "children outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        with contextlib.suppress(Exception):
            for p in json.loads(pids_file.read_text()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)


# --- 8a. a worker with a smaller context ----------------------------------------------------------


def test_a_workers_own_context_limit_caps_the_master(llama_dir, tmp_path):
    with local_workers(2, tmp_path, extra_args=["--max-context", "24"]) as lc:
        lm = open_model(str(llama_dir), "fp32", quiet=True, workers=addresses(lc))
        try:
            assert lm.engine.max_positions == 24
            from tpi.errors import PromptError

            with pytest.raises(PromptError, match="context window"):
                greedy(lm.engine, list(range(5, 35)), 2)
            assert len(greedy(lm.engine, PROMPT, 3)) == 3  # within the limit: works
        finally:
            lm.close()


# --- 8d. frames bigger than any legitimate message --------------------------------------------------


def test_an_oversized_frame_is_refused_unbuffered(llama_dir, tmp_path):
    with local_workers(1, tmp_path) as lc:
        worker = psutil.Process(lc.workers[0].proc.pid)
        before = worker.memory_info().rss
        ctx = zmq.Context()
        for _ in range(3):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 1000)
            s.connect(f"tcp://{addresses(lc)[0]}")
            s.send(bytes(100 << 20))
            time.sleep(1.0)
            s.close()
        ctx.term()
        time.sleep(1.0)
        grown = worker.memory_info().rss - before
        assert grown < 40 << 20, f"worker RSS grew by {grown / 2**20:.0f} MiB"
        with cluster_model(llama_dir, addresses(lc)) as lm:
            assert greedy(lm.engine, PROMPT, 2)


def test_the_master_never_sends_a_frame_bigger_than_the_limit(llama_dir, tmp_path):
    from tpi.comm.wire import MAX_FRAME_BYTES

    with local_workers(1, tmp_path) as lc, cluster_model(llama_dir, addresses(lc)) as lm:
        hidden = lm.engine.cfg.hidden_size
        assert lm.engine.max_pass_tokens == MAX_FRAME_BYTES // (4 * hidden)
        lm.engine.max_pass_tokens = 7  # as a huge model would: prompts run in pieces
        got = lm.engine.prefill(PROMPT)
    ref = load_engine(llama_dir).prefill(PROMPT)
    assert (got - ref).abs().max() <= 1e-4


# --- 8e. a worker whose Python hangs ----------------------------------------------------------------

HUNG_WORKER = """
import sys, threading, ctypes
import tpi.model.decoder as decoder
real = decoder.mlp_partial
calls = [0]
def hang_on_the_tenth_call(*a, **kw):
    calls[0] += 1
    if calls[0] == 10:
        if sys.argv[1] == "deadlock":
            lock = threading.Lock(); lock.acquire(); lock.acquire()
        else:  # stuck in a C call (one that releases the GIL, as blocking calls do)
            ctypes.CDLL(None).pause()
    return real(*a, **kw)
decoder.mlp_partial = hang_on_the_tenth_call
from tpi.cli import cli
cli(["worker", *sys.argv[2:]], prog_name="tpi")
"""


@pytest.mark.parametrize("how", ["deadlock", "c_call"])
def test_a_hung_worker_is_named_within_seconds(llama_dir, tmp_path, how):
    base = tmp_path / "hung"
    base.mkdir()
    port_file = base / "address"
    log = open(base / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HUNG_WORKER,
            how,
            "--listen",
            "tcp://127.0.0.1:0",
            "--store",
            str(base / "store"),
            "--port-file",
            str(port_file),
            "--threads",
            "1",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        assert wait_for(port_file.exists, 60)
        address = port_file.read_text().strip().replace("tcp://", "")
        lm = open_model(str(llama_dir), "fp32", quiet=True, workers=[address])
        try:
            t0 = time.monotonic()
            with pytest.raises(LinkLost, match=r"rank 1 \(127\.0\.0\.1:\d+\) stopped answering"):
                greedy(lm.engine, PROMPT, 20)
            took = time.monotonic() - t0
        finally:
            lm.close()
        assert took < 10, f"named after {took:.1f} s"
        assert worker.wait(10) == 3
        assert "made no progress" in (base / "worker.log").read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()


# --- 8f. a late data frame while asking for stats ---------------------------------------------------


def test_a_late_data_frame_during_a_stats_request_is_filed_not_fatal():
    from tests.test_star_allreduce import SESSION, FakeLinks, control_msg, partial_msg
    from tpi.comm.inbox import Inbox
    from tpi.master.cluster import ClusterSession

    fake = FakeLinks(2)
    session = object.__new__(ClusterSession)  # no split, no sockets: just the stats exchange
    session.links, session.session, session.world = fake, SESSION, 2
    session.inbox = Inbox(fake, SESSION)
    fake.deliver(1, partial_msg(3, 0, 0, 0, torch.ones(4)))  # late, from the last step
    fake.deliver(1, control_msg(Kind.STATS, stats={"steps": 5}), after_s=0.02)
    assert session.stats() == {1: {"steps": 5}}
    assert any(m.kind == Kind.STATS_REQUEST for _, m in fake.links[0].sent)


# --- tpi serve: careless and hostile clients -----------------------------------------------------------


@pytest.fixture(scope="module")
def smol_server():
    # The embedded model: slow enough that a 400-token answer takes many seconds.
    with live_server(["-t", "0", "--queue-size", "4"]) as base:
        yield base


def _busy(base: str) -> bool:
    return httpx.get(base + "/health", timeout=10).json()["busy"]


def test_a_non_streaming_request_stops_when_its_client_leaves(smol_server):
    def ask():
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(
                smol_server + "/v1/completions",
                json={"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0},
                timeout=1.5,  # the client gives up and closes the connection
            )

    t = threading.Thread(target=ask)
    t.start()
    assert wait_for(lambda: _busy(smol_server), 10)
    t.join()
    left = time.monotonic()
    assert wait_for(lambda: not _busy(smol_server), 10)
    assert time.monotonic() - left < 4
    recent = httpx.get(smol_server + "/health", timeout=10).json()["recent"]
    assert recent[-1]["finish_reason"] == "cancelled"
    assert recent[-1]["completion_tokens"] < 400


def test_a_huge_body_is_refused_without_stalling_or_keeping_memory(smol_server):
    server = _server_process(smol_server)
    before = server.memory_info().rss
    stalls = []

    def probe():
        for _ in range(20):
            t0 = time.monotonic()
            httpx.get(smol_server + "/health", timeout=10)
            stalls.append(time.monotonic() - t0)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    body = b'{"prompt": "' + b"a" * (20 << 20) + b'", "max_tokens": 1}'
    t0 = time.monotonic()
    r = httpx.post(
        smol_server + "/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    took = time.monotonic() - t0
    prober.join()
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert took < 3 and max(stalls) < 1.0
    # Under the body limit but far over the context: refused before tokenizing.
    t0 = time.monotonic()
    r = httpx.post(
        smol_server + "/v1/completions",
        json={"prompt": "word " * 300_000, "max_tokens": 1},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - t0 < 2
    assert server.memory_info().rss - before < 100 << 20


def _server_process(base: str) -> psutil.Process:
    port = int(base.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return psutil.Process(conn.pid)
    raise AssertionError("server process not found")


# --- 8b, 8c: a cluster behind tpi serve -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fail", "continue"])
def test_health_notices_a_worker_that_died_while_idle(llama_dir, tmp_path, policy):
    """With --on-worker-loss fail /health turns to 503 down; with continue (the
    default) the server re-plans over the survivor at once and says so."""
    with local_workers(2, tmp_path) as lc:
        args = ["--model", str(llama_dir), "--workers", ",".join(addresses(lc)), "-t", "0"]
        with live_server([*args, "--on-worker-loss", policy]) as base:
            assert httpx.get(base + "/health", timeout=10).status_code == 200
            lc.signal_worker(2, signal.SIGKILL)

            def down() -> bool:
                r = httpx.get(base + "/health", timeout=10)
                return r.status_code == 503 and r.json()["status"] == "down"

            def replanned() -> bool:
                r = httpx.get(base + "/health", timeout=10).json()
                return r["status"] == "ok" and r["world"] == 2 and len(r["recoveries"]) == 1

            assert wait_for(down if policy == "fail" else replanned, 20)


@pytest.mark.parametrize("max_batch", [1, 8])
def test_requests_queued_or_batched_at_a_cluster_failure_get_503_not_500(tmp_path, max_batch):
    """With --on-worker-loss fail, requests waiting behind a running one (--max-batch
    1), or running with it in one batch, all get 503 when a worker dies (the default,
    continue, is tests/test_elastic.py's)."""
    # The embedded model: a 300-token story runs long enough to queue behind it.
    args = ["-t", "0", "--max-batch", str(max_batch), "--on-worker-loss", "fail"]
    with (
        local_workers(2, tmp_path) as lc,
        live_server(["--workers", ",".join(addresses(lc)), *args]) as base,
    ):
        statuses = []

        def ask(i: int):
            r = httpx.post(
                base + "/v1/completions",
                json={"prompt": "Once upon a time", "max_tokens": 300},
                timeout=120,
            )
            statuses.append(r.status_code)

        first = threading.Thread(target=ask, args=(0,))
        first.start()
        assert wait_for(lambda: _busy(base), 10)
        queued = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
        for t in queued:
            t.start()
        state = "waiting" if max_batch == 1 else "running"
        want = 2 if max_batch == 1 else 3
        assert wait_for(lambda: httpx.get(base + "/health", timeout=10).json()[state] == want, 10)
        lc.signal_worker(2, signal.SIGKILL)
        for t in [first, *queued]:
            t.join(60)
    assert sorted(statuses) == [503, 503, 503], statuses


# --- 5. no valid JSON request gets a 500 -----------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from fastapi.testclient import TestClient

    from tests.factories import make_model
    from tpi.master.loader import LoadedModel
    from tpi.master.sampling import SamplingParams
    from tpi.master.serve.app import create_app
    from tpi.master.serve.model_holder import ModelHolder
    from tpi.text.tokenizer import TextTokenizer

    model = make_model(tmp_path_factory.mktemp("fuzz"), "llama", tied=True, seed=8)
    loaded = LoadedModel(model, load_engine(model), TextTokenizer(model), 0.0)
    app = create_app(ModelHolder(loaded), "m", SamplingParams(max_new_tokens=4), capacity=64)
    with TestClient(app) as client:
        yield client


def _text():
    from hypothesis import strategies as st

    # Any code point JSON can carry, with the awkward ones (lone surrogates, NUL,
    # line separators, a BOM, emoji) far more often than chance would pick them.
    awkward = st.sampled_from(["\ud800", "\udfff", "\x00", "\u2028", "\ufeff", "\U0001f642", "\\"])
    return st.text(alphabet=st.one_of(st.characters(exclude_categories=()), awkward), max_size=30)


def _number():
    from hypothesis import strategies as st

    edges = [
        0,
        1,
        -1,
        2**31,
        2**53,
        2**63 - 1,
        2**63,
        2**64,
        -(2**63) - 1,
        2**80,
        1e-300,
        1e300,
        -0.0,
        0.5,
        2.0,
        2.0000001,
    ]
    return st.one_of(
        st.sampled_from(edges),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=False, allow_infinity=False),
    )


def _json_values():
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), _number(), _text())
    return st.recursive(
        scalar,
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_text(), kids, max_size=3),
        max_leaves=6,
    )


def _request_bodies():
    from hypothesis import strategies as st

    anything = _json_values()

    def mostly(valid):
        # A field is usually well-formed (so the request gets as far as generating)
        # and sometimes anything at all.
        return st.one_of(valid, valid, valid, anything)

    sampling = {
        "temperature": mostly(st.one_of(st.floats(0.01, 2.0), _number())),
        "top_p": mostly(st.floats(0.01, 1.0)),
        "top_k": mostly(st.one_of(st.integers(0, 50), _number())),
        "max_tokens": mostly(st.one_of(st.integers(1, 6), _number())),
        "max_completion_tokens": mostly(st.integers(1, 6)),
        "seed": mostly(_number()),
        "stop": mostly(st.one_of(st.none(), _text(), st.lists(_text(), max_size=6))),
        "stream": mostly(st.booleans()),
        "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "n": mostly(st.just(1)),
        "model": mostly(_text()),
    }
    role = st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"])
    message = st.fixed_dictionaries({"role": role, "content": mostly(_text())})
    chat = st.fixed_dictionaries(
        {"messages": mostly(st.lists(message, min_size=1, max_size=3))}, optional=sampling
    )
    completion = st.fixed_dictionaries(
        {"prompt": mostly(st.one_of(_text(), st.lists(_text(), max_size=2)))}, optional=sampling
    )
    return st.one_of(
        st.tuples(st.just("/v1/chat/completions"), chat),
        st.tuples(st.just("/v1/completions"), completion),
    )


def test_no_valid_json_request_gets_a_server_error(api):
    import json

    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(request=_request_bodies())
    def check(request):
        path, body = request
        # Surrogates are valid in JSON text (\\ud800 escapes) though not in UTF-8.
        raw = json.dumps(body, ensure_ascii=True)
        r = api.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500, (r.status_code, r.text[:300], raw[:300])
        if r.status_code >= 400:
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["type"]
        elif not body.get("stream"):
            assert r.json()["choices"]

    check()
