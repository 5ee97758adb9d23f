"""Everything the master receives from its workers, filed by kind.

Whoever waits for one kind (partial sums, head outputs, pongs, handshake
answers) takes only that kind; a message of another kind that arrives meanwhile
waits in its own queue for whoever asks for it, so nothing is swallowed or
stashed on the side. A worker's ERROR is raised to whoever is waiting, whatever
they wait for: the session is broken either way.

An Inbox drives the link sockets, so exactly one thread may use it at a time
(the compute thread, or the reducer thread during an overlapped prefill, or a
pipeline's router thread during a micro-batched pass).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterable

import zmq

from tpi.comm.links import ClusterError, DataLinkLost, LinkLost, LinkSet, WorkerFailed, WorkerLink
from tpi.comm.wire import DataHeader, Kind, Message

# Kinds nobody waits for: a worker probing whether its master is alive.
DROPPED = frozenset({Kind.PING})
# Answers that may pile up unasked (a late PONG) are kept only this deep.
SHALLOW = {Kind.PONG: 16}


class Inbox:
    def __init__(self, links: LinkSet, session: int) -> None:
        self.links = links
        self.session = session
        self._filed: dict[Kind, deque[tuple[WorkerLink, Message]]] = defaultdict(deque)

    def take(
        self,
        kinds: Iterable[Kind],
        timeout_s: float,
        ranks: set[int] | None = None,
        where: str = "",
    ) -> tuple[WorkerLink, Message]:
        """The oldest message of `kinds` (from `ranks`, if given).

        Raises TimeoutError when none arrives in time, LinkLost when a link we
        wait on is gone, ClusterError when a worker reports an error."""
        kinds = kinds if isinstance(kinds, frozenset) else frozenset(kinds)
        deadline = time.monotonic() + timeout_s
        while True:
            got = self._take_filed(kinds, ranks)
            if got is not None:
                return got
            self.receive(max(0.0, deadline - time.monotonic()), ranks, where)
            if time.monotonic() >= deadline and (got := self._take_filed(kinds, ranks)) is None:
                raise TimeoutError

    def pop(
        self, kinds: Iterable[Kind], ranks: set[int] | None = None
    ) -> tuple[WorkerLink, Message] | None:
        """The oldest filed message of `kinds` (from `ranks`, if given), without
        receiving anything."""
        return self._take_filed(kinds if isinstance(kinds, frozenset) else frozenset(kinds), ranks)

    def _take_filed(
        self, kinds: frozenset[Kind], ranks: set[int] | None
    ) -> tuple[WorkerLink, Message] | None:
        for kind in kinds:
            queue = self._filed.get(kind)
            if not queue:
                continue
            for i, (link, msg) in enumerate(queue):
                if ranks is None or link.rank in ranks:
                    del queue[i]
                    return link, msg
        return None

    def receive(
        self,
        timeout_s: float,
        ranks: set[int] | None = None,
        where: str = "",
        extra: Iterable[zmq.Socket] = (),
    ) -> set[zmq.Socket]:
        """File whatever arrives within `timeout_s` (returns once something did).

        `extra` sockets are polled too (a thread's wake-up socket); the ready
        ones are returned, unread."""
        try:
            arrived, ready = self.links.receive(timeout_s, ranks, extra)
        except LinkLost as e:
            raise LinkLost(e.rank, e.address, e.reason, where) from None
        for link, msg in arrived:
            self._file(link, msg, where)
        return ready

    def take_data(
        self, link: WorkerLink, kinds: frozenset[Kind], timeout_s: float, where: str = ""
    ) -> Message | None:
        """The next message of `kinds` on `link`'s data link (tpi.comm.data_link),
        waiting up to `timeout_s` (TimeoutError); None if what came was something
        else (filed like any message). A broken data link raises what its worker
        reported on the control link (WorkerFailed), else LinkLost."""
        try:
            msg = self.links.recv_data(link, timeout_s)
        except DataLinkLost as e:
            for got in e.arrived:
                self._file(*got, where)
            raise LinkLost(link.rank, link.name, link.lost or "data link lost", where) from None
        if msg.kind in kinds and msg.data.session == self.session:
            return msg
        self._file(link, msg, where)
        return None

    def _file(self, link: WorkerLink, msg: Message, where: str) -> None:
        body = msg.body
        session = body.session if isinstance(body, DataHeader) else body.get("session")
        if msg.kind == Kind.ERROR and session in (self.session, None):
            peer = body.get("peer_rank")
            if isinstance(peer, int) and 1 <= peer <= len(self.links.links) and peer != link.rank:
                # A worker lost its direct link to another (a pipeline hop): name that one.
                lost = self.links.links[peer - 1]
                why = f"rank {link.rank} ({link.name}) {body['message']}"
                raise LinkLost(peer, lost.name, why, where)
            raise WorkerFailed(link.rank, link.name, body["message"], where)
        if msg.kind == Kind.REFUSE:
            raise ClusterError(f"rank {link.rank} ({link.name}) refused: {body['reason']}")
        if msg.kind in DROPPED or session != self.session:
            return  # a probe, or a late frame of an earlier session
        queue = self._filed[msg.kind]
        queue.append((link, msg))
        if len(queue) > SHALLOW.get(msg.kind, 1 << 30):
            queue.popleft()
