"""The star allreduce's parts over a fake transport: the pure reducer, the inbox
that files messages by kind, and rank 0's collective in both its modes (the
waiting thread drives the links; a reducer thread owns them during overlap)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
import zmq

from tpi.comm.inbox import Inbox
from tpi.comm.links import ClusterError, LinkLost, WorkerFailed
from tpi.comm.reducer import Reducer, pass_order
from tpi.comm.star_master import StarMaster
from tpi.comm.step_broadcast import StepClock
from tpi.comm.wire import (
    HeadHeader,
    HeadMode,
    Kind,
    Message,
    Phase,
    ProtocolError,
    SumHeader,
    decode,
    encode_control,
    encode_data,
    tensor_payload,
)

SESSION = 77


def partial_msg(step, layer, phase, pos, t, session=SESSION, dtype=torch.float32) -> Message:
    t = t.to(dtype)
    h = SumHeader(session, step, pos, layer, phase, t.dtype, tuple(t.shape))
    return decode([encode_data(Kind.PARTIAL, h), bytes(memoryview(tensor_payload(t)).cast("B"))])


def control_msg(kind: Kind, **body) -> Message:
    return decode([encode_control(kind, {"session": SESSION, **body})])


# --- the reducer ---------------------------------------------------------------------------


def test_sums_in_rank_order_whatever_the_arrival_order():
    parts = [torch.randn(3, 8, dtype=torch.float64).float() * 10**r for r in range(4)]
    expected = parts[0].clone()
    for p in parts[1:]:
        expected += p
    for order in ([1, 2, 3], [3, 2, 1], [2, 3, 1]):
        red = Reducer(4, torch.float32)
        red.expect(1)
        key = (1, 0, Phase.ATTENTION, 0)
        red.own(key, parts[0])
        for r in order:
            assert red.ready() == []
            assert red.add(r, key, torch.float32, parts[r])
        (total,) = red.ready()
        assert torch.equal(total.wire, expected)  # bit-identical: same order every time


def test_totals_leave_in_pass_order_embedding_first():
    red = Reducer(2, torch.float32)
    red.expect(3)
    keys = [(3, 1, Phase.ATTENTION, 0), (3, 0, Phase.MLP, 0), (3, 0, Phase.EMBED, 0)]
    for k in keys:
        red.own(k, torch.ones(2))
    # The later keys complete first; nothing leaves before the earliest is in.
    assert red.add(1, keys[0], torch.float32, torch.ones(2))
    assert red.add(1, keys[1], torch.float32, torch.ones(2))
    assert red.ready() == []
    assert red.add(1, keys[2], torch.float32, torch.ones(2))
    assert [t.key for t in red.ready()] == sorted(keys, key=pass_order)
    assert pass_order(keys[2]) < pass_order(keys[1])


def test_late_and_duplicate_frames_are_ignored():
    red = Reducer(2, torch.float32)
    red.expect(1)
    key = (1, 0, Phase.ATTENTION, 0)
    red.own(key, torch.ones(2))
    assert red.add(1, key, torch.float32, torch.ones(2))
    assert not red.add(1, key, torch.float32, torch.full((2,), 9.0))  # duplicate
    (total,) = red.ready()
    assert torch.equal(total.wire, torch.full((2,), 2.0))
    red.release(key)
    assert not red.add(1, key, torch.float32, torch.ones(2))  # late: already summed
    assert red.oldest_open() is None


def test_out_of_step_wrong_dtype_and_shape_are_protocol_errors():
    red = Reducer(2, torch.bfloat16)
    red.expect(5)
    with pytest.raises(ProtocolError, match="step 6 during step 5"):
        red.add(1, (6, 0, Phase.ATTENTION, 0), torch.bfloat16, torch.ones(2))
    with pytest.raises(ProtocolError, match="expected torch.bfloat16"):
        red.add(1, (5, 0, Phase.ATTENTION, 0), torch.float32, torch.ones(2))
    red.own((5, 1, Phase.MLP, 0), torch.ones(2))
    with pytest.raises(ProtocolError, match="shapes"):
        red.add(1, (5, 1, Phase.MLP, 0), torch.bfloat16, torch.ones(3))


def test_a_pipelined_pass_accepts_its_steps_in_order_and_a_hub_adds_zeros():
    red = Reducer(3, torch.float32)
    red.expect(4, 6)  # three micro-batches in flight
    with pytest.raises(ProtocolError, match="step 3 during step 4..6"):
        red.add(1, (3, 0, Phase.ATTENTION, 0), torch.float32, torch.ones(2))
    with pytest.raises(ProtocolError, match="step 7 during step 4..6"):
        red.add(1, (7, 0, Phase.ATTENTION, 0), torch.float32, torch.ones(2))
    for step in (4, 5):
        key = (step, 0, Phase.ATTENTION, 0)
        red.own_zeros(key, (2,))  # rank 0 hubs a group it computes nothing for
        red.own_zeros(key, (2,))  # once per key
        assert red.add(1, key, torch.float32, torch.full((2,), 1.5))
        assert red.add(2, key, torch.float32, torch.full((2,), 2.0))
        (total,) = red.ready()
        assert torch.equal(total.wire, torch.full((2,), 3.5))
        red.release(key)
    # Back to step 4 after step 5 is summed: late, ignored.
    assert red.is_late((4, 1, Phase.ATTENTION, 0))
    assert not red.add(1, (4, 1, Phase.ATTENTION, 0), torch.float32, torch.ones(2))
    assert red.oldest_open() is None


def test_wire_rounding_is_the_same_for_every_rank():
    """Rank 0's own partial is rounded to the wire dtype like a worker's, and the
    embedding sum always travels in fp32."""
    red = Reducer(2, torch.bfloat16)
    red.expect(1)
    x = torch.tensor([1.0 + 2**-10, 3.0])
    red.own((1, 0, Phase.ATTENTION, 0), x)
    red.add(1, (1, 0, Phase.ATTENTION, 0), torch.bfloat16, x.to(torch.bfloat16))
    red.own((1, 0, Phase.EMBED, 0), x)
    red.add(1, (1, 0, Phase.EMBED, 0), torch.float32, x)
    embed, attn = red.ready()
    assert embed.wire.dtype == torch.float32 and torch.equal(embed.wire, 2 * x)
    assert attn.wire.dtype == torch.bfloat16
    assert torch.equal(attn.wire, (2 * x.to(torch.bfloat16).float()).to(torch.bfloat16))


# --- a fake transport -------------------------------------------------------------------------


@dataclass
class FakeLink:
    rank: int
    name: str
    sent: list = field(default_factory=list)  # (thread name, decoded message)
    lost: str | None = None
    data = None  # no data link: the waiting thread polls the inbox

    def send(self, frames):
        head = frames[0] if isinstance(frames[0], bytes) else bytes(frames[0])
        payload = bytes(memoryview(frames[1]).cast("B")) if len(frames) > 1 else None
        msg = decode([head] + ([payload] if payload is not None else []))
        self.sent.append((threading.current_thread().name, msg))

    send_data = send  # the allreduce's frames (a data link, on a real link)


class FakeLinks:
    """What the inbox needs of a LinkSet: links, a context, `receive` and `forget`."""

    def __init__(self, world: int) -> None:
        self.ctx = zmq.Context.instance()
        self.links = [FakeLink(r, f"10.0.0.{r}:5555") for r in range(1, world)]
        self.script: list[tuple[float, int, Message]] = []  # (due, rank, message)
        self.receiving_threads: set[str] = set()
        self._lock = threading.Lock()

    def forget(self, extra) -> None:
        self.forgotten = extra  # a closed wake socket's poller (LinkSet keeps one per socket)

    def deliver(self, rank: int, msg: Message, after_s: float = 0.0) -> None:
        with self._lock:
            self.script.append((time.monotonic() + after_s, rank, msg))

    def receive(self, timeout_s, ranks=None, extra=()):
        self.receiving_threads.add(threading.current_thread().name)
        deadline = time.monotonic() + timeout_s
        while True:
            for link in self.links:
                if link.lost and (ranks is None or link.rank in ranks):
                    raise LinkLost(link.rank, link.name, link.lost)
            now = time.monotonic()
            with self._lock:
                due = [s for s in self.script if s[0] <= now]
                self.script = [s for s in self.script if s[0] > now]
            ready = {s for s in extra if s.poll(0)}
            if due or ready:
                return [(self.links[r - 1], m) for _, r, m in due], ready
            if now >= deadline:
                return [], set()
            time.sleep(0.001)


# --- the inbox ---------------------------------------------------------------------------------


def test_a_message_of_another_kind_waits_for_whoever_asks_for_it():
    fake = FakeLinks(3)
    inbox = Inbox(fake, SESSION)
    head = decode(
        [
            encode_data(
                Kind.HEAD,
                HeadHeader(SESSION, 1, 0, 0, HeadMode.CANDIDATES, torch.float64, (1, 3)),
            ),
            bytes(24),
        ]
    )
    fake.deliver(2, head)
    fake.deliver(1, partial_msg(1, 0, 0, 0, torch.ones(2)))
    link, msg = inbox.take({Kind.PARTIAL}, 1.0)
    assert (link.rank, msg.kind) == (1, Kind.PARTIAL)
    link, msg = inbox.take({Kind.HEAD}, 0.1)  # filed while we waited for the partial
    assert (link.rank, msg.kind) == (2, Kind.HEAD)


def test_errors_refusals_other_sessions_and_timeouts():
    fake = FakeLinks(3)
    inbox = Inbox(fake, SESSION)
    fake.deliver(1, partial_msg(1, 0, 0, 0, torch.ones(2), session=SESSION + 1))  # stale session
    fake.deliver(1, control_msg(Kind.PING))  # a worker's probe: dropped
    with pytest.raises(TimeoutError):
        inbox.take({Kind.PARTIAL}, 0.05)
    fake.deliver(2, control_msg(Kind.ERROR, message="out of memory"))
    with pytest.raises(
        WorkerFailed, match=r"rank 2 \(10\.0\.0\.2:5555\) failed during layer 3: out of memory"
    ):
        inbox.take({Kind.PARTIAL}, 1.0, where="during layer 3")
    fake.deliver(1, decode([encode_control(Kind.REFUSE, {"reason": "busy"})]))
    with pytest.raises(ClusterError, match="refused: busy"):
        inbox.take({Kind.WELCOME}, 1.0)
    fake.links[1].lost = "connection lost"
    with pytest.raises(LinkLost, match=r"rank 2 .* stopped answering during layer 4"):
        inbox.take({Kind.PARTIAL}, 1.0, where="during layer 4")


# --- rank 0's collective --------------------------------------------------------------------------


def _master(world: int, timeout_s: float = 2.0) -> tuple[StarMaster, FakeLinks, StepClock]:
    fake = FakeLinks(world)
    clock = StepClock(step=1)
    return StarMaster(Inbox(fake, SESSION), clock, torch.float32, timeout_s), fake, clock


def test_the_waiting_thread_drives_the_links_and_sums():
    master, fake, _ = _master(3)
    x = torch.arange(4.0)
    fake.deliver(2, partial_msg(1, 0, 0, 0, 2 * x), after_s=0.02)
    fake.deliver(1, partial_msg(1, 0, 0, 0, x), after_s=0.01)
    total = master.allreduce(x, 0, Phase.ATTENTION)
    assert torch.equal(total, 4 * x)
    for link in fake.links:
        ((_, msg),) = link.sent
        assert msg.kind == Kind.SUM and msg.data.layer == 0
    assert master.stats.count == 1


def test_a_silent_worker_is_named():
    master, fake, _ = _master(3, timeout_s=0.2)
    fake.deliver(1, partial_msg(1, 0, 0, 0, torch.ones(2)))
    with pytest.raises(
        LinkLost, match=r"rank 2 \(10\.0\.0\.2:5555\) stopped answering during layer 0"
    ):
        master.allreduce(torch.ones(2), 0, Phase.ATTENTION)


def test_overlap_a_reducer_thread_alone_uses_the_links():
    """During pipelined(), totals are sent the moment their partials are in, by the
    reducer thread, never by the compute thread; the sums are right."""
    master, fake, _ = _master(3)
    chunks = [torch.full((2, 4), float(c + 1)) for c in range(4)]
    with master.pipelined():
        pending = []
        for c, x in enumerate(chunks):
            pending.append(master.start(x, 0, Phase.ATTENTION, pos=2 * c))
            for r in (1, 2):  # workers answer a little later, out of order
                fake.deliver(r, partial_msg(1, 0, 0, 2 * c, r * x), after_s=0.005 * (3 - r))
        totals = [master.wait(p) for p in pending]
    for x, total in zip(chunks, totals, strict=True):
        assert torch.equal(total, 4 * x)
    senders = {name for link in fake.links for name, _ in link.sent}
    assert senders == {"tpi-star-reducer"}
    assert fake.receiving_threads == {"tpi-star-reducer"}
    assert [m.data.pos for _, m in fake.links[0].sent] == [0, 2, 4, 6]  # in pass order


def test_overlap_hands_a_workers_error_to_the_compute_thread():
    master, fake, _ = _master(3)
    with (
        pytest.raises(WorkerFailed, match="rank 1 .* failed during an overlapped prefill: boom"),
        master.pipelined(),
    ):
        p = master.start(torch.ones(2), 0, Phase.ATTENTION, 0)
        fake.deliver(1, control_msg(Kind.ERROR, message="boom"), after_s=0.01)
        master.wait(p)


def test_overlap_timeout_names_the_missing_rank():
    master, fake, _ = _master(3, timeout_s=0.2)
    with pytest.raises(LinkLost, match=r"rank 1 .* during layer 2"), master.pipelined():
        p = master.start(torch.ones(2), 2, Phase.MLP, 0)
        fake.deliver(2, partial_msg(1, 2, 1, 0, torch.ones(2)))
        master.wait(p)


def test_a_closed_wake_socket_leaves_no_poller_behind():
    # Every overlapped pass polls the links with a wake socket of its own; a long
    # running server must not keep one poller per pass for good.
    from tpi.comm.links import LinkSet
    from tpi.comm.wake import WakePair

    links = LinkSet(zmq.Context.instance())
    for _ in range(3):
        wake = WakePair(links, "test")
        links.receive(0.0, extra=[wake.rx])
        wake.nudge()
        ready = links.receive(0.5, extra=[wake.rx])[1]
        assert wake.rx in ready
        wake.drain(ready)
        assert not wake.rx.poll(0)
        wake.close()
    assert links._extra_pollers == {}
