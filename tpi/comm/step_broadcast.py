"""The master's messages that start a step on every worker, and the step count
they advance (which every other part of the master's collective reads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from tpi.comm.links import LinkSet, WorkerLink
from tpi.comm.traffic import AllreduceStats
from tpi.comm.wire import (
    FinalHeader,
    Kind,
    StepHeader,
    encode_control,
    encode_data,
    ids_payload,
    tensor_payload,
)


class StepRows(Protocol):
    """Which sequences a step's rows belong to (tpi.model.batch.BatchStep)."""

    @property
    def first_pos(self) -> int: ...

    def to_ints(self) -> list[int]: ...


@dataclass
class StepClock:
    """The forward pass in progress: its number and first position."""

    step: int = 0
    pos: int = 0


class StepBroadcaster:
    def __init__(
        self,
        links: LinkSet,
        session: int,
        clock: StepClock,
        stats: AllreduceStats,
        members: list[WorkerLink] | None = None,
    ) -> None:
        self.links = links
        self.session = session
        self.clock = clock
        self.stats = stats
        # Who a step starts on: every worker, or one pipeline stage's group.
        self.members = list(links.links if members is None else members)

    def _send_all(self, frames: list, nbytes: int) -> None:
        for link in self.members:
            link.send(frames)
        self.stats.bytes_sent += len(self.members) * nbytes

    def _advance(self, pos: int) -> int:
        self.clock.step += 1
        self.clock.pos = pos
        return self.clock.step

    def hidden(
        self, h: torch.Tensor, batch: StepRows, pieces: int = 1, step: int | None = None
    ) -> None:
        """A new step whose input is rank 0's embedded hidden states (STEP); with
        `step`, that step's input to a later pipeline stage."""
        pos = batch.first_pos
        step = self._advance(pos) if step is None else step
        header = StepHeader(
            self.session, step, pos, pieces, h.dtype, tuple(h.shape), tuple(batch.to_ints())
        )
        self._send_all(
            [encode_data(Kind.STEP, header), tensor_payload(h)], h.numel() * h.element_size()
        )

    def final(self, h: torch.Tensor) -> None:
        """A pipeline's final hidden states of the step in progress, to ranks outside
        its last stage, for their vocabulary rows of the head (FINAL)."""
        header = FinalHeader(self.session, self.clock.step, h.dtype, tuple(h.shape))
        self._send_all(
            [encode_data(Kind.FINAL, header), tensor_payload(h)], h.numel() * h.element_size()
        )

    def tokens(self, ids: list[int], batch: StepRows, pieces: int, head: dict) -> None:
        """A vocabulary-parallel step: only the token ids and what the head should return."""
        step = self._advance(batch.first_pos)
        body = {
            "session": self.session,
            "step": step,
            "batch": batch.to_ints(),
            "chunks": pieces,
            "head": head,
        }
        frames = [encode_control(Kind.STEP_TOKENS, body), ids_payload(ids)]
        self._send_all(frames, 8 * len(ids) + len(frames[0]))

    def more(self, row: int, round_: int, count: int) -> None:
        """Ask every rank for more top-p candidates of one row of this step (HEAD_MORE)."""
        body = {
            "session": self.session,
            "step": self.clock.step,
            "row": row,
            "round": round_,
            "count": count,
        }
        frames = [encode_control(Kind.HEAD_MORE, body)]
        self._send_all(frames, len(frames[0]))
