"""A later pipeline stage, as the master drives it.

Its group of workers gets the hidden states entering the stage (a STEP to the
group), works on its own, and its lead rank returns the stage's output
(HIDDEN). Through the master, a group of several ranks sums its partials through
it, the hub of that allreduce with zeros as its own partial.

With direct hops, every stage after the first is one `RemoteStage` to the
master: a chain that starts at stage 1's group and whose output comes back from
the last stage's lead; in between, each stage hands its output straight to the
next one and each group's allreduce is hubbed by its own lead (worker.peers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tpi.comm.inbox import Inbox
from tpi.comm.links import LinkLost, WorkerLink
from tpi.comm.star_master import StarMaster
from tpi.comm.step_broadcast import StepBroadcaster
from tpi.comm.wire import Kind, Message, payload_tensor
from tpi.model.batch import BatchStep
from tpi.model.partition import Stage

STAGE_TRAFFIC = frozenset({Kind.PARTIAL, Kind.HIDDEN})


@dataclass
class RemoteStage:
    """A later stage, as the master drives it."""

    index: int  # the stage whose output comes back (a chain's last)
    stage: Stage  # the layers it covers (a chain: from its first stage's to its last's)
    links: list[WorkerLink]  # the group its input goes to, lead first
    broadcast: StepBroadcaster  # STEP to that group
    hub: StarMaster | None  # the group's allreduce through the master (None: not hubbed here)
    # Who sends the output back (default: the group's lead), and the ranks of a
    # chain's later stages (watched: a lost link among them fails the pass).
    output_from: WorkerLink | None = None
    others: list[WorkerLink] = field(default_factory=list)
    ranks: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self.ranks = {link.rank for link in [*self.links, *self.others]}

    @property
    def lead(self) -> WorkerLink:
        return self.output_from or self.links[0]

    def where(self) -> str:
        first, end = self.stage.layers
        if self.others:
            return f"in pipeline stages up to {self.index} (layers {first}-{end - 1})"
        return f"in pipeline stage {self.index} (layers {first}-{end - 1})"

    def patience(self, timeout_s: float) -> float:
        """How long the stage may stay silent: a group's allreduces arrive every
        phase, a stage of one rank says nothing until its output (2 phases a layer).
        Dead or frozen ranks are noticed sooner, by their links (heartbeats)."""
        return timeout_s if self.hub is not None else timeout_s * 2 * self.num_layers

    def blame(self, timeout_s: float) -> LinkLost:
        """The rank to name when the stage stays silent: one whose partial is missing
        from the oldest open sum, else the lead (which owes the output)."""
        culprit = self.lead
        key = self.hub.reducer.oldest_open() if self.hub is not None else None
        if key is not None:
            missing = [r for r in self.hub.reducer.missing(key) if r != 0]
            if missing:
                culprit = self.hub.members[missing[0] - 1]
        return LinkLost(culprit.rank, culprit.name, f"no reply in {timeout_s:g} s", self.where())

    @property
    def num_layers(self) -> int:
        return self.stage.layers[1] - self.stage.layers[0]

    def start(self, h: torch.Tensor, batch: BatchStep, step: int, pieces: int = 1) -> None:
        """Send the stage its input for `step` (its group then works on its own)."""
        self.broadcast.hidden(h, batch, pieces, step=step)

    def output(self, link: WorkerLink, msg: Message, step: int, shape) -> torch.Tensor:
        """The stage's output from a HIDDEN message, checked."""
        got = msg.data
        if link.rank != self.lead.rank or got.stage != self.index or got.step != step:
            raise LinkLost(
                link.rank, link.name, f"sent a stage output it does not owe {got}", self.where()
            )
        if tuple(got.shape) != tuple(shape):
            raise LinkLost(
                link.rank, link.name, f"sent a stage output of shape {got.shape}", self.where()
            )
        return payload_tensor(msg.payload, got)

    def run(self, h: torch.Tensor, batch: BatchStep, pieces: int, inbox: Inbox, timeout_s: float):
        """The stage, start to output, for the step in progress (nothing else in flight)."""
        step = self.broadcast.clock.step
        if self.hub is not None:
            self.hub.reducer.expect(step)
        self.start(h, batch, step, pieces)
        while True:
            try:
                link, msg = inbox.take(
                    STAGE_TRAFFIC, self.patience(timeout_s), self.ranks, where=self.where()
                )
            except TimeoutError:
                raise self.blame(timeout_s) from None
            if msg.kind == Kind.PARTIAL and self.hub is not None:
                self.hub.absorb(link, msg)
            elif msg.kind == Kind.HIDDEN:
                return self.output(link, msg, step, h.shape).to(h.dtype)
            else:
                raise LinkLost(
                    link.rank, link.name, "sent a partial in a stage of one", self.where()
                )
