"""The master's side of a pipeline: its own stage, then every later stage in turn.

Stage 0 (the master and its group) runs as a tensor-parallel decoder whose star
allreduce spans only that group. Each later stage is started with the current
hidden states (STEP to its group); a group of several ranks sums its partials
through the master, which hubs that allreduce with zeros as its own partial
(workers have no links to each other: every link is the master's, authenticated
and optionally encrypted); the stage's lead rank returns the stage's output
(HIDDEN), which starts the next stage or goes to the head.

A stage of one rank runs its layers with no message at all until its output:
that is what crosses a slow link once per token instead of twice per layer.
The price of routing through the master is a hop: stage k's output reaches
stage k+1 through the master, not directly (two link crossings instead of one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tpi.comm.inbox import Inbox
from tpi.comm.links import LinkLost, WorkerLink
from tpi.comm.star_master import StarMaster
from tpi.comm.step_broadcast import StepBroadcaster
from tpi.comm.wire import Kind, Phase, payload_tensor
from tpi.model.batch import BatchPlan
from tpi.model.decoder import Decoder
from tpi.model.partition import Stage

HIDDEN = frozenset({Kind.HIDDEN})
_PHASES = (Phase.ATTENTION, Phase.MLP)


@dataclass
class RemoteStage:
    """A later stage, as the master drives it."""

    index: int
    stage: Stage
    links: list[WorkerLink]  # the stage's group, lead first
    broadcast: StepBroadcaster  # STEP to the group
    hub: StarMaster | None  # the group's allreduce (None: a stage of one rank)

    @property
    def num_layers(self) -> int:
        return self.stage.layers[1] - self.stage.layers[0]

    def run(self, h: torch.Tensor, plan: BatchPlan, pieces: int, inbox: Inbox, timeout_s: float):
        self.broadcast.hidden(h, plan, pieces, advance=False)
        if self.hub is not None:
            self._hub_allreduces(h, plan, pieces)
        lead = self.links[0]
        try:
            _, msg = inbox.take(HIDDEN, timeout_s, {lead.rank}, where=self._where())
        except TimeoutError:
            raise LinkLost(
                lead.rank, lead.name, f"no reply in {timeout_s:g} s", self._where()
            ) from None
        got = msg.data
        if got.step != self.broadcast.clock.step or got.layer != self.index or got.shape != h.shape:
            raise LinkLost(lead.rank, lead.name, f"sent a wrong stage output {got}", self._where())
        return payload_tensor(msg.payload, got).to(h.dtype)

    def _where(self) -> str:
        first, end = self.stage.layers
        return f"in pipeline stage {self.index} (layers {first}-{end - 1})"

    def _hub_allreduces(self, h: torch.Tensor, plan: BatchPlan, pieces: int) -> None:
        """Sum the group's partials of every layer and phase, in the order its ranks
        start them (tpi.model.decoder: every piece's attention, then every MLP)."""
        parts = plan.pieces(pieces)
        zeros = [torch.zeros((p.end - p.start, h.shape[1]), dtype=h.dtype) for p in parts]
        hub = self.hub
        for layer in range(self.num_layers):
            for phase in _PHASES:
                pending = [
                    hub.start(z, layer, phase, p.start) for z, p in zip(zeros, parts, strict=True)
                ]
                for pend in pending:
                    hub.wait(pend)


class PipelineDecoder:
    """What the engine runs on a pipeline's master: a Decoder's interface over
    every stage (the master's own layers, then the later stages'), with the
    master's cache and window for what it asks of them."""

    def __init__(
        self, local: Decoder, stages: list[RemoteStage], inbox: Inbox, timeout_s: float
    ) -> None:
        self.local = local
        self.stages = stages
        self.inbox = inbox
        self.timeout_s = timeout_s
        self.remote_seconds = 0.0  # waiting for later stages (their compute and links)

    # The engine's view of rank 0's own decoder.
    @property
    def cfg(self):
        return self.local.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def caches(self):
        return self.local.caches

    @property
    def cache(self):
        return self.local.cache

    @property
    def max_positions(self) -> int:
        return self.local.max_positions

    @property
    def collective(self):
        return self.local.collective

    @property
    def layers(self):
        return self.local.layers

    def run(self, h: torch.Tensor, plan: BatchPlan, pieces: int = 1) -> torch.Tensor:
        h = self.local.run(h, plan, pieces)
        t0 = time.perf_counter()
        for stage in self.stages:
            h = stage.run(h, plan, pieces, self.inbox, self.timeout_s)
        self.remote_seconds += time.perf_counter() - t0
        return h

    def forward(self, h: torch.Tensor, pos: int, chunks: int = 1) -> torch.Tensor:
        return self.run(h, BatchPlan.single(pos, h.shape[0]), chunks)
