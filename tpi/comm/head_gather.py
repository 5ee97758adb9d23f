"""The master collects every worker's HEAD output of a step: its logits slice
or its token candidates (vocabulary-parallel head; see tpi.runtime.vocab_parallel)."""

from __future__ import annotations

import time

import torch

from tpi.comm.inbox import Inbox
from tpi.comm.links import LinkLost
from tpi.comm.step_broadcast import StepClock
from tpi.comm.traffic import AllreduceStats
from tpi.comm.wire import HeadMode, Kind, ProtocolError, payload_tensor

WHERE = "in the LM head"


class HeadGatherer:
    def __init__(
        self, inbox: Inbox, clock: StepClock, world: int, stats: AllreduceStats, timeout_s: float
    ) -> None:
        self.inbox = inbox
        self.clock = clock
        self.world = world
        self.stats = stats
        self.timeout_s = timeout_s

    def gather(
        self, round_: int, rows: tuple[int, ...] | list[int] = (0,)
    ) -> dict[tuple[int, int], tuple[HeadMode, torch.Tensor]]:
        """Every worker's HEAD of the current step and `round_` (0, or a top-p refill)
        for each of `rows` (the pass rows whose next token is chosen), by (rank, row)."""
        got: dict[tuple[int, int], tuple[HeadMode, torch.Tensor]] = {}
        deadline = time.monotonic() + self.timeout_s
        want = (self.clock.step, round_)
        every = {(r, row) for r in range(1, self.world) for row in rows}
        while len(got) < len(every):
            waiting = {r for r, _ in every - set(got)}
            try:
                link, msg = self.inbox.take(
                    {Kind.HEAD}, max(0.0, deadline - time.monotonic()), waiting, WHERE
                )
            except TimeoutError:
                r = min(waiting)
                name = self.inbox.links.links[r - 1].name
                raise LinkLost(r, name, f"no reply in {self.timeout_s:g} s", WHERE) from None
            h = msg.data
            if (h.step, h.round) < want:
                continue  # late: an earlier step or round
            key = (link.rank, h.row)
            if (h.step, h.round) != want or key not in every or key in got:
                raise ProtocolError(
                    f"rank {link.rank} sent head output {(h.step, h.round)} for row {h.row}, "
                    f"expected {want} for rows {sorted(rows)}"
                )
            got[key] = (HeadMode(h.mode), payload_tensor(msg.payload, h).clone())
            self.stats.bytes_received += h.nbytes()
        return got
