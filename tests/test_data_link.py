"""The allreduce's direct TCP link (tpi.comm.data_link): framing, opening,
failures, and a cluster session that uses it against one that does not."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch

from tests.cluster_helpers import addresses, cluster_model, local_workers
from tests.stepping import step_logits
from tpi.comm.data_link import (
    OPEN_MAGIC,
    DataLinkClosed,
    DataListener,
    connect,
    new_ticket,
)
from tpi.comm.wire import (
    MAX_FRAME_BYTES,
    Kind,
    ProtocolError,
    SumHeader,
    decode,
    encode_data,
    payload_tensor,
    tensor_payload,
)

SESSION = 77
PROMPT = list(range(5, 25))
FOLLOW = list(range(40, 48))


@pytest.fixture
def pair():
    """A connected (master end, worker end) over loopback, opened as a session does."""
    listener = DataListener("127.0.0.1", 0)
    ticket = new_ticket()
    master = connect("127.0.0.1", listener.port, SESSION, ticket, 5.0, 5.0)
    worker = listener.accept(SESSION, ticket, 5.0, 5.0)
    yield master, worker
    master.close()
    worker.close()
    listener.close()


def _partial(t: torch.Tensor, layer: int = 3) -> list:
    h = SumHeader(SESSION, 9, 0, layer, 1, t.dtype, tuple(t.shape))
    return [encode_data(Kind.PARTIAL, h), tensor_payload(t)]


def test_frames_arrive_whole_and_in_order(pair):
    master, worker = pair
    sent = [torch.randn(1, 576) for _ in range(50)]  # many per receive: the buffer splits them
    for i, t in enumerate(sent):
        worker.send(_partial(t, layer=i))
    for i, t in enumerate(sent):
        msg = decode(master.recv(1.0))
        assert msg.kind == Kind.PARTIAL and msg.data.layer == i
        assert torch.equal(payload_tensor(msg.payload, msg.data), t)
    assert master.bytes_received == worker.bytes_sent


def test_a_payload_larger_than_the_socket_buffers_is_sent_in_parts(pair):
    master, worker = pair
    big = torch.randn(2048, 1024)  # 8 MB: many partial sends while the reader drains
    got = {}
    reader = threading.Thread(target=lambda: got.update(frames=master.recv(10.0)))
    reader.start()
    worker.send(_partial(big))
    reader.join(20)
    msg = decode(got["frames"])
    assert torch.equal(payload_tensor(msg.payload, msg.data), big)


def test_both_ends_sending_large_frames_at_once_do_not_wait_on_each_other(pair):
    """An overlapped prefill: a worker sends its next chunk's partial while the
    master sends the last chunk's sum, both larger than the socket buffers."""
    master, worker = pair
    a, b = torch.randn(3 << 20), torch.randn(3 << 20)  # 12 MB each
    got: dict = {}

    def exchange(end, mine, name):
        end.send(_partial(mine))
        got[name] = decode(end.recv(20.0))

    threads = [
        threading.Thread(target=exchange, args=(master, a, "master")),
        threading.Thread(target=exchange, args=(worker, b, "worker")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert torch.equal(payload_tensor(got["master"].payload, got["master"].data), b)
    assert torch.equal(payload_tensor(got["worker"].payload, got["worker"].data), a)


def test_nothing_within_the_timeout_raises_timeout(pair):
    master, _ = pair
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        master.recv(0.05)
    assert time.monotonic() - t0 < 2.0


def test_a_closed_peer_is_reported_not_waited_for(pair):
    master, worker = pair
    worker.close()
    with pytest.raises(DataLinkClosed):
        master.recv(2.0)


def _raw_master(link_timeout_s: float = 5.0):
    """A listener, a worker end, and a plain socket as the master's end that opened
    it (to send bytes no DataLink would)."""
    listener = DataListener("127.0.0.1", 0)
    ticket = new_ticket()
    raw = socket.create_connection(("127.0.0.1", listener.port))
    raw.sendall(struct.pack("<8sQ16s", OPEN_MAGIC, SESSION, ticket))
    return listener, listener.accept(SESSION, ticket, 5.0, link_timeout_s), raw


def test_a_message_that_stops_halfway_is_an_error():
    listener, worker, raw = _raw_master(link_timeout_s=0.2)
    raw.sendall(struct.pack("<II", 10, 100) + b"x" * 30)  # 110 bytes announced, 30 sent
    with pytest.raises(DataLinkClosed, match="halfway"):
        worker.recv(1.0)
    raw.close()
    worker.close()
    listener.close()


def test_an_oversized_frame_is_refused_before_it_is_buffered():
    listener, worker, raw = _raw_master()
    raw.sendall(struct.pack("<II", 40, MAX_FRAME_BYTES + 1))
    with pytest.raises(ProtocolError, match="too large"):
        worker.recv(1.0)
    raw.close()
    worker.close()
    listener.close()


def test_only_the_master_with_the_ticket_is_accepted():
    listener = DataListener("127.0.0.1", 0)
    ticket = new_ticket()
    strangers = [
        connect("127.0.0.1", listener.port, SESSION, new_ticket(), 5.0, 5.0),  # wrong ticket
        connect("127.0.0.1", listener.port, SESSION + 1, ticket, 5.0, 5.0),  # wrong session
    ]
    silent = socket.create_connection(("127.0.0.1", listener.port))  # says nothing at all
    silent.sendall(b"GET / HTTP/1.0\r\n")
    master = connect("127.0.0.1", listener.port, SESSION, ticket, 5.0, 5.0)
    worker = listener.accept(SESSION, ticket, 5.0, 5.0)
    worker.send(_partial(torch.ones(1, 8)))
    assert decode(master.recv(1.0)).kind == Kind.PARTIAL
    for s in strangers:  # dropped by the worker
        with pytest.raises(DataLinkClosed):
            s.recv(2.0)
        s.close()
    silent.close()
    with pytest.raises(TimeoutError):  # nobody else comes
        listener.accept(SESSION, ticket, 0.2, 5.0)
    for end in (master, worker, listener):
        end.close()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with local_workers(2, tmp_path_factory.mktemp("workers")) as lc:
        yield addresses(lc)


def test_a_session_sends_its_allreduces_over_the_data_links(llama_dir, workers):
    with cluster_model(llama_dir, workers, data_link=False) as off:
        assert all(link.data is None for link in off.cluster.links.links)
        expected = step_logits(off.engine, PROMPT, FOLLOW)
        zmq_bytes = [link.bytes_sent for link in off.cluster.links.links]
    # The same run with data links: the same sums, so the same logits to the bit.
    with cluster_model(llama_dir, workers, data_link=True) as on:
        links = on.cluster.links.links
        assert all(link.data is not None for link in links)
        got = step_logits(on.engine, PROMPT, FOLLOW)
        layers = on.engine.cfg.num_layers
        hidden = on.engine.cfg.hidden_size
        tokens = len(PROMPT) + len(FOLLOW)
        messages = 2 * layers * (1 + len(FOLLOW))  # one prefill pass, then a pass a token
        for link in links:
            # Every SUM went down the data link: a hidden vector per token, small headers.
            payload = 2 * layers * tokens * hidden * 4
            assert payload < link.data.bytes_sent < payload + messages * 64
            assert link.data.bytes_received == link.data.bytes_sent  # a partial for each
        stats = on.cluster.stats()
        assert all(s["allreduces"] == messages for s in stats.values())
    assert torch.equal(got, expected)
    assert all(b > 0 for b in zmq_bytes)


def test_a_worker_without_a_data_link_keeps_the_control_link(llama_dir, tmp_path):
    with (
        local_workers(1, tmp_path / "w", extra_args=["--data-port", "off"]) as lc,
        cluster_model(llama_dir, addresses(lc), data_link=True) as lm,
    ):
        assert lm.cluster.links.links[0].data is None
        step_logits(lm.engine, PROMPT, FOLLOW[:2])
        assert lm.cluster.topology.collective.stats.count > 0


@pytest.fixture
def star():
    """A StarMaster of world 2 over a real control link and data link, with the
    worker's ends (endpoint, peer id, data link) to act with."""
    import zmq

    from tpi.comm.inbox import Inbox
    from tpi.comm.links import LinkSet, WorkerEndpoint
    from tpi.comm.star_master import StarMaster
    from tpi.comm.step_broadcast import StepClock
    from tpi.comm.wire import encode_control

    ctx = zmq.Context()
    endpoint = WorkerEndpoint(ctx, "tcp://127.0.0.1:0")
    links = LinkSet(ctx)
    link = links.connect(1, endpoint.address)
    link.send([encode_control(Kind.PING, {"session": SESSION})])
    hello = None
    for _ in range(50):
        if (hello := endpoint.recv(0.1)) is not None:
            break
    listener, ticket = DataListener("127.0.0.1", 0), new_ticket()
    links.attach_data(link, connect("127.0.0.1", listener.port, SESSION, ticket, 5.0, 5.0))
    worker_data = listener.accept(SESSION, ticket, 5.0, 5.0)
    clock = StepClock(step=9)
    master = StarMaster(Inbox(links, SESSION), clock, torch.float32, timeout_s=5.0)
    yield master, endpoint, hello.peer, worker_data
    worker_data.close()
    listener.close()
    links.close()
    endpoint.close()
    ctx.term()


def test_the_star_sums_over_the_data_link(star):
    master, _, _, worker_data = star
    theirs = torch.randn(1, 16)
    worker_data.send(_partial(theirs, layer=3))
    mine = torch.randn(1, 16)
    total = master.allreduce(mine, 3, 1)
    assert torch.equal(total, mine + theirs)
    msg = decode(worker_data.recv(1.0))  # the worker gets the same total back
    assert msg.kind == Kind.SUM and torch.equal(payload_tensor(msg.payload, msg.data), total)


def test_a_worker_that_fails_mid_step_is_reported_with_its_reason(star):
    from tpi.comm.links import WorkerFailed
    from tpi.comm.wire import encode_control

    master, endpoint, peer, worker_data = star
    # What a failing worker session does: ERROR on the control link, then the
    # data link closes (worker.session); the master waits on the data link.
    body = {"session": SESSION, "message": "RuntimeError: out of memory"}
    endpoint.send(peer, [encode_control(Kind.ERROR, body)])
    worker_data.close()
    with pytest.raises(WorkerFailed, match="failed during layer 3: RuntimeError: out of memory"):
        master.allreduce(torch.ones(1, 16), 3, 1)


def test_a_silent_worker_times_out_naming_it(star):
    from tpi.comm.links import LinkLost

    master, *_ = star
    master.timeout_s = 0.5
    t0 = time.monotonic()
    with pytest.raises(LinkLost, match=r"rank 1 .* \(no reply in 0.5 s\)"):
        master.allreduce(torch.ones(1, 16), 3, 1)
    assert time.monotonic() - t0 < 3.0


def test_the_worker_data_port_option():
    import click

    from worker.cli import _data_port

    assert _data_port(None, "tcp://0.0.0.0:5555") == 5556  # the control port + 1
    assert _data_port(None, "tcp://127.0.0.1:0") == 0  # any free port beside a free one
    assert _data_port("7000", "tcp://0.0.0.0:5555") == 7000
    assert _data_port("off", "tcp://0.0.0.0:5555") is None
    for bad in ("abc", "70000", "-1"):
        with pytest.raises(click.BadParameter):
            _data_port(bad, "tcp://0.0.0.0:5555")


def test_ports_in_use_are_explained_not_fatal_for_the_data_link(tmp_path, caplog):
    import logging

    import zmq

    from tpi.comm.links import WorkerEndpoint
    from tpi.errors import TpiError
    from worker.daemon import WorkerDaemon
    from worker.options import WorkerOptions

    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    ctx = zmq.Context()
    try:
        # The control port taken (say, by another worker's data link): a clear error.
        with pytest.raises(TpiError, match="in use .*ports two apart"):
            WorkerEndpoint(ctx, f"tcp://127.0.0.1:{port}")
    finally:
        ctx.term()
    # The data port taken: the worker runs, its allreduces on the control port.
    with caplog.at_level(logging.WARNING, logger="tpi.worker"):
        daemon = WorkerDaemon("tcp://127.0.0.1:0", tmp_path, options=WorkerOptions(data_port=port))
    try:
        assert daemon.data_listener is None
        assert "no data link" in caplog.text
    finally:
        daemon.close()
        busy.close()
