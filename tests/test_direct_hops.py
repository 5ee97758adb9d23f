"""Direct hops between workers, in-process: the links they open (worker/peers.py),
the group allreduce their lead hubs (tpi/comm/group_hub.py), and a lost direct
link named by the master. End to end through worker processes: test_pipeline.py."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
import torch

from tpi.comm.data_link import DataLink, DataListener, new_ticket
from tpi.comm.group_hub import GroupHub
from tpi.comm.inbox import Inbox
from tpi.comm.links import LinkLost, WorkerFailed
from tpi.comm.star_worker import StarWorker
from tpi.comm.wire import Kind, Message, Phase, SumHeader, decode, encode_control
from tpi.worker.peers import PeerLink, PeerSetupFailed, open_peer_links, peer_links

SESSION = 91


def _listener() -> DataListener:
    return DataListener("127.0.0.1", 0)


def test_each_worker_gets_a_link_to_each_peer_and_strangers_are_dropped():
    a, b = _listener(), _listener()
    t_ab, t_cb = new_ticket(), new_ticket()
    # b accepts from a and from c; a connects to b; a stranger knocks on b first.
    stranger = socket.create_connection(("127.0.0.1", b.port))
    stranger.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(16))
    got: dict = {}

    def accept():
        got["b"] = open_peer_links([PeerLink(1, t_ab), PeerLink(3, t_cb)], b, SESSION, 5.0)

    t = threading.Thread(target=accept)
    t.start()
    from_a = open_peer_links([PeerLink(2, t_ab, "127.0.0.1", b.port)], a, SESSION, 5.0)
    from_c = open_peer_links([PeerLink(2, t_cb, "127.0.0.1", b.port)], None, SESSION, 5.0)
    t.join(10)
    assert set(got["b"]) == {1, 3} and set(from_a) == {2} and set(from_c) == {2}
    from_a[2].send([b"hello", b"x"])
    assert got["b"][1].recv(2.0) == [b"hello", bytearray(b"x")]
    stranger.settimeout(2.0)
    with contextlib.suppress(ConnectionResetError):  # reset: its junk was never read
        assert stranger.recv(10) == b""  # closed at its opening
    for link in [*got["b"].values(), *from_a.values(), *from_c.values()]:
        link.close()
    for end in (stranger, a, b):
        end.close()


def test_a_peer_that_cannot_be_reached_or_does_not_come_is_named():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # never listening
    port = closed.getsockname()[1]
    with pytest.raises(PeerSetupFailed, match=f"cannot reach rank 4 at 127.0.0.1:{port}"):
        open_peer_links([PeerLink(4, new_ticket(), "127.0.0.1", port)], None, SESSION, 1.0)
    lonely = _listener()
    import tpi.worker.peers as peers

    beats = []
    old, peers.ACCEPT_TIMEOUT_S = peers.ACCEPT_TIMEOUT_S, 1.2
    try:
        with pytest.raises(PeerSetupFailed, match=r"did not connect in time .*\[5\]"):
            open_peer_links(
                [PeerLink(5, new_ticket())], lonely, SESSION, 1.0, lambda: beats.append(1)
            )
    finally:
        peers.ACCEPT_TIMEOUT_S = old
    assert len(beats) >= 2  # a watchdog hears the wait is alive
    with pytest.raises(PeerSetupFailed, match="no data port"):
        open_peer_links([PeerLink(5, new_ticket())], None, SESSION, 1.0)
    closed.close()
    lonely.close()


@pytest.mark.parametrize(
    "entry",
    [
        {"rank": 0, "ticket": "ab"},
        {"rank": True, "ticket": "ab"},
        {"rank": 2, "ticket": "zz"},
        {"rank": 2, "ticket": ""},
        {"rank": 2, "ticket": "ab", "host": "h"},
        {"rank": 2, "ticket": "ab", "host": "h", "port": 70000},
        "rank 2",
    ],
)
def test_a_peers_message_no_master_sends_is_refused(entry):
    from tpi.comm.wire import ProtocolError

    msg = decode([encode_control(Kind.PEERS, {"session": SESSION, "links": [entry]})])
    with pytest.raises(ProtocolError, match="malformed PEERS"):
        peer_links(msg)


def _pair() -> tuple[DataLink, DataLink]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        x = socket.create_connection(server.getsockname())
        y, _ = server.accept()
    return DataLink(x, 5.0), DataLink(y, 5.0)


def test_a_groups_lead_sums_its_members_partials_in_rank_order():
    """Lead (rank 2) and members 3 and 5 of a later stage, each with a direct link
    to the lead: every rank gets the same total, summed in rank order."""
    lead_ends, member_ends = {}, {}
    for r in (3, 5):
        lead_ends[r], member_ends[r] = _pair()

    def receive(link: DataLink, rank: int) -> Message:
        return decode(link.recv(5.0))

    hub = GroupHub(lead_ends, receive, lambda r, f: lead_ends[r].send(f), SESSION, torch.float32)

    class Channel:  # a member's: its partials to the lead, the lead's sums back
        def __init__(self, link):
            self.link = link

        def send_data(self, frames):
            self.link.send(frames)

        def wait_sum(self, expected: SumHeader) -> Message:
            msg = decode(self.link.recv(5.0))
            assert msg.kind == Kind.SUM and msg.data.key == expected.key
            return msg

    parts = {
        r: torch.randn(2, 6, dtype=torch.float64).float() * 10**i for i, r in enumerate((2, 3, 5))
    }
    expected = (parts[2] + parts[3]) + parts[5]
    members = {r: StarWorker(Channel(member_ends[r]), SESSION, torch.float32) for r in (3, 5)}
    for col in (hub, *members.values()):
        col.begin(7, 0)
    pending = {r: m.start(parts[r], 1, Phase.MLP, 0) for r, m in members.items()}
    total = hub.wait(hub.start(parts[2], 1, Phase.MLP, 0))
    assert torch.equal(total, expected)
    for r, m in members.items():
        assert torch.equal(m.wait(pending[r]), expected)
    assert hub.stats.count == 1


def test_a_worker_that_lost_its_direct_link_gets_the_other_one_named():
    from tests.test_star_allreduce import FakeLinks

    fake = FakeLinks(4)  # ranks 1..3
    inbox = Inbox(fake, SESSION)
    body = {"session": SESSION, "message": "lost the direct link to rank 3: closed", "peer_rank": 3}
    fake.deliver(2, decode([encode_control(Kind.ERROR, body)]))
    with pytest.raises(LinkLost) as lost:
        inbox.take({Kind.PARTIAL}, 1.0)
    assert lost.value.rank == 3 and "rank 2" in str(lost.value)
    fake.deliver(1, decode([encode_control(Kind.ERROR, {"session": SESSION, "message": "oom"})]))
    with pytest.raises(WorkerFailed) as failed:
        inbox.take({Kind.PARTIAL}, 1.0)
    assert failed.value.rank == 1
