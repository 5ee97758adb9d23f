"""The star allreduce of a later pipeline stage's group, hubbed by its lead.

With direct hops, a stage's group sums its partials without the master: each
member sends its PARTIAL over its direct link to the group's lead (a worker),
the lead adds them to its own in rank order (tpi.comm.reducer, as rank 0 does)
and sends the SUM back to every member, who waits for it as it waits for a
master's (tpi.comm.star_worker over the lead's link). One round trip inside the
group per allreduce, and none through the master.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

from tpi.comm.data_link import DataLink
from tpi.comm.reducer import Pending, Reducer, Total
from tpi.comm.traffic import AllreduceStats
from tpi.comm.wire import (
    Kind,
    Message,
    ProtocolError,
    SumHeader,
    encode_data,
    payload_array,
    payload_tensor,
)


class GroupHub:
    """The Collective of a later stage's lead (see tpi.model.decoder)."""

    def __init__(
        self,
        links: dict[int, DataLink],
        receive: Callable[[DataLink, int], Message],
        send: Callable[[int, list], None],
        session: int,
        wire_dtype: torch.dtype,
    ) -> None:
        # Members by rank; the reducer's rows: the lead's own 0, then members in rank order.
        self.links = links
        self.members = sorted(links)
        self._row = {rank: i for i, rank in enumerate(self.members, start=1)}
        self.receive = receive  # the next message on a member's link (the master watched)
        self.send = send  # a frame to a member over its link
        self.session = session
        self.wire_dtype = wire_dtype
        self.reducer = Reducer(len(self.members) + 1, wire_dtype)
        self.step = 0
        self.pos = 0
        self.stats = AllreduceStats()
        self._totals: dict[tuple, Total] = {}

    def begin(self, step: int, pos: int) -> None:
        """A new step: its allreduces are keyed by it (see StarWorker.begin)."""
        self.step, self.pos = step, pos
        self.reducer.expect(step)

    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor:
        return self.wait(self.start(partial, layer, phase, self.pos))

    def start(self, partial: torch.Tensor, layer: int, phase: int, pos: int) -> Pending:
        t0 = time.perf_counter()
        key = (self.step, layer, phase, pos)
        self.reducer.own(key, partial)  # rounded as a member's partial is by the wire
        self._sum_ready()
        self.stats.seconds += time.perf_counter() - t0
        return Pending(key)

    def wait(self, pending: Pending) -> torch.Tensor:
        t0 = time.perf_counter()
        key = pending.key
        while key not in self._totals:
            rows = [r for r in self.reducer.missing(key) if r]
            if not rows:
                raise RuntimeError(f"allreduce {key} waited for before it was started")
            rank = self.members[rows[0] - 1]
            self._add(rank, self.receive(self.links[rank], rank))
            self._sum_ready()
        total = self._totals.pop(key)
        self.reducer.release(key)
        wire = total.wire
        out = wire if wire.dtype == total.own_dtype else wire.to(total.own_dtype)
        sent = len(self.members) * wire.numel() * wire.element_size()
        self.stats.record(time.perf_counter() - t0, sent, total.received)
        return out

    @contextlib.contextmanager
    def pipelined(self) -> Iterator[None]:
        yield  # the lead reads its members' links as it waits: nothing runs apart

    def _add(self, rank: int, msg: Message) -> None:
        h = msg.data
        if msg.kind != Kind.PARTIAL or not isinstance(h, SumHeader):
            raise ProtocolError(f"rank {rank} sent {msg.kind.name} where a partial sum was due")
        values = payload_array(msg.payload, h) if h.dtype == torch.float32 else None
        if values is None:
            values = payload_tensor(msg.payload, h)
        self.reducer.add(self._row[rank], h.key, h.dtype, values)

    def _sum_ready(self) -> None:
        """Send every total now complete to each member."""
        for t in self.reducer.ready():
            step, layer, phase, pos = t.key
            header = SumHeader(self.session, step, pos, layer, phase, t.wire.dtype, t.wire.shape)
            frames = [encode_data(Kind.SUM, header), t.payload]
            for rank in self.members:
                self.send(rank, frames)
            self._totals[t.key] = t
