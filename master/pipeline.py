"""The master's side of a pipeline: its own stage, then every later stage.

Stage 0 (the master and its group) runs as a tensor-parallel decoder whose star
allreduce spans only that group. Each later stage is started with the hidden
states entering it (STEP to its group); a group of several ranks sums its
partials through the master, which hubs that allreduce with zeros as its own
partial (workers have no links to each other: every link is the master's,
authenticated and optionally encrypted); the stage's lead rank returns the
stage's output (HIDDEN), which starts the next stage or goes to the head.

A stage of one rank runs its layers with no message at all until its output:
that is what crosses a slow link once per token instead of twice per layer.
The price of routing through the master is a hop: stage k's output reaches
stage k+1 through the master, not directly (two link crossings instead of one).

GPipe: a pass cut into pieces (chunks of a prompt, groups of a batch's
sequences) becomes one step per piece, and the pieces flow through the stages
one behind the other: while the master computes piece k+1 of stage 0, stage 1
works on piece k. A router thread then owns every link socket (ZeroMQ sockets
are single-threaded): it sums stage 0's allreduces from partials the compute
thread hands over, hubs the later groups' allreduces, and passes each stage's
output on to the next stage as it arrives.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tpi.comm.inbox import Inbox
from tpi.comm.links import LinkLost, WorkerLink
from tpi.comm.star_master import StarMaster
from tpi.comm.step_broadcast import StepBroadcaster
from tpi.comm.wake import WakePair
from tpi.comm.wire import Kind, Message, payload_tensor
from tpi.model.batch import BatchPlan
from tpi.model.decoder import Decoder
from tpi.model.partition import Stage

HIDDEN = frozenset({Kind.HIDDEN})
PARTIALS = frozenset({Kind.PARTIAL})
STAGE_TRAFFIC = frozenset({Kind.PARTIAL, Kind.HIDDEN})
ROUTER_POLL_S = 0.05  # the router re-checks for a stop request this often


@dataclass
class RemoteStage:
    """A later stage, as the master drives it."""

    index: int
    stage: Stage
    links: list[WorkerLink]  # the stage's group, lead first
    broadcast: StepBroadcaster  # STEP to the group
    hub: StarMaster | None  # the group's allreduce (None: a stage of one rank)
    ranks: set[int] = field(init=False)

    def __post_init__(self) -> None:
        self.ranks = {link.rank for link in self.links}

    @property
    def lead(self) -> WorkerLink:
        return self.links[0]

    def where(self) -> str:
        first, end = self.stage.layers
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

    def start(self, h: torch.Tensor, plan: BatchPlan, step: int, pieces: int = 1) -> None:
        """Send the stage its input for `step` (its group then works on its own)."""
        self.broadcast.hidden(h, plan, pieces, step=step)

    def output(self, link: WorkerLink, msg: Message, step: int, shape) -> torch.Tensor:
        """The stage's output from a HIDDEN message, checked."""
        got = msg.data
        if link.rank != self.lead.rank or got.layer != self.index or got.step != step:
            raise LinkLost(
                link.rank, link.name, f"sent a stage output it does not owe {got}", self.where()
            )
        if tuple(got.shape) != tuple(shape):
            raise LinkLost(
                link.rank, link.name, f"sent a stage output of shape {got.shape}", self.where()
            )
        return payload_tensor(msg.payload, got)

    def run(self, h: torch.Tensor, plan: BatchPlan, pieces: int, inbox: Inbox, timeout_s: float):
        """The stage, start to output, for the step in progress (nothing else in flight)."""
        step = self.broadcast.clock.step
        if self.hub is not None:
            self.hub.reducer.expect(step)
        self.start(h, plan, step, pieces)
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


class PipelineDecoder:
    """What the engine runs on a pipeline's master: a Decoder's interface over
    every stage (the master's own layers, then the later stages'), with the
    master's cache and window for what it asks of them."""

    def __init__(
        self,
        local: Decoder,
        stages: list[RemoteStage],
        inbox: Inbox,
        timeout_s: float,
        final: StepBroadcaster | None = None,
    ) -> None:
        self.local = local
        self.stages = stages
        self.inbox = inbox
        self.timeout_s = timeout_s
        # A vocabulary-parallel head across stages: the final states go to the ranks
        # outside the last stage too (FINAL), each computing its vocabulary rows.
        self.final = final
        self.remote_seconds = 0.0  # waiting for later stages (their compute and links)

    @property
    def can_gpipe(self) -> bool:
        """Whether a pass may become micro-batches through the stages: not with a
        head over every rank (its ranks take a pass's token ids, stage input and
        final states in turn), nor with LongRoPE, whose table is chosen by where a
        pass ends (each micro-batch would choose for itself)."""
        return self.final is None and not self.local.cfg.rope.long_factor

    @property
    def num_stages(self) -> int:
        return len(self.stages) + 1

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

    def pass_through(
        self, vocab, ids: list[int], plan: BatchPlan, pieces: int, want: dict
    ) -> torch.Tensor:
        """Final hidden states of one pass of the engine: embedded and run through
        every stage, as micro-batches (GPipe) where that pays."""
        if self.can_gpipe and len(plan.segments) == 1 and plan.tokens > 1:
            # A prompt: at least one micro-batch per stage, so that the stages work at
            # once. A batch of sequences is cut as the planner says: decode reads every
            # weight once per micro-batch, so more micro-batches than the overlap pays
            # for only add weight reads.
            pieces = max(pieces, min(self.num_stages, plan.tokens))
        if self.can_gpipe and pieces > 1:
            return self.gpipe(vocab, ids, plan, pieces, want)
        return self.run(vocab.start(ids, plan, pieces, want), plan, pieces, want)

    def run(
        self, h: torch.Tensor, plan: BatchPlan, pieces: int = 1, want: dict | None = None
    ) -> torch.Tensor:
        """Every stage in turn for the step just started (stage 0 got its STEP);
        `want`: what the head is asked for (no final states are sent for none)."""
        h = self.local.run(h, plan, pieces)
        t0 = time.perf_counter()
        for stage in self.stages:
            h = stage.run(h, plan, pieces, self.inbox, self.timeout_s)
        if self.final is not None and (want or {}).get("mode") != "none":
            self.final.final(h)
        self.remote_seconds += time.perf_counter() - t0
        return h

    def forward(self, h: torch.Tensor, pos: int, chunks: int = 1) -> torch.Tensor:
        return self.run(h, BatchPlan.single(pos, h.shape[0]), chunks)

    def gpipe(
        self, vocab, ids: list[int], plan: BatchPlan, pieces: int, want: dict
    ) -> torch.Tensor:
        """Final hidden states of a pass cut into `pieces` micro-batches that flow
        through the stages one behind the other (one step each)."""
        parts = plan.pieces(pieces)
        subs = [BatchPlan(p.segments, plan.release if k == 0 else ()) for k, p in enumerate(parts)]
        # Every STEP of stage 0 leaves now, before a router owns the sockets: its
        # workers run them in order, as the master does.
        inputs, steps = [], []
        for p, sub in zip(parts, subs, strict=True):
            inputs.append(vocab.start(ids[p.start : p.end], sub, 1, want))
            steps.append(self.stages[0].broadcast.clock.step)
        router = _Router(self, dict(zip(steps, subs, strict=True)))
        outs = []
        with router.running():
            for h, step, sub in zip(inputs, steps, subs, strict=True):
                router.clock.step = step  # stage 0's allreduce keys
                router.submit(step, self.local.run(h, sub, 1))
            t0 = time.perf_counter()
            for step in steps:
                outs.append(router.result(step))
            self.remote_seconds += time.perf_counter() - t0
        return torch.cat(outs).to(self.dtype)


class _Router:
    """Owns the link sockets during a GPipe pass (see the module docstring)."""

    def __init__(self, decoder: PipelineDecoder, plans: dict[int, BatchPlan]) -> None:
        self.stages = decoder.stages
        self.inbox = decoder.inbox
        self.hidden_size = decoder.cfg.hidden_size
        self.plans = plans
        self.clock = self.stages[0].broadcast.clock
        # A micro-batch may wait for every later stage: each may take its patience.
        self.patience = sum(st.patience(decoder.timeout_s) for st in self.stages)
        self.timeout_s = decoder.timeout_s
        first = decoder.local.collective
        self.first = first if isinstance(first, StarMaster) else None
        self._handoff: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._results: dict[int, torch.Tensor] = {}
        self._at: dict[int, int] = {}  # step -> index into stages of where it is
        self._error: BaseException | None = None
        self._stop = False
        self._wake: WakePair | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[_Router]:
        """The router thread's lifetime: every link socket is its own while inside."""
        self._wake = WakePair(self.inbox.links, "pipeline")
        steps = sorted(self.plans)
        for owner in [self.first, *(st.hub for st in self.stages)]:
            if owner is not None:
                owner.reducer.expect(steps[0], steps[-1])
        handed = self.first.handed_over(self._wake.nudge) if self.first is not None else None
        try:
            with handed if handed is not None else contextlib.nullcontext():
                thread = threading.Thread(
                    target=self._drive, name="tpi-pipeline-router", daemon=True
                )
                thread.start()
                try:
                    yield self
                finally:
                    self._stop = True
                    self._wake.nudge()
                    thread.join()
            if self._error is not None:
                raise self._error
        finally:
            self._wake.close()

    def submit(self, step: int, h: torch.Tensor) -> None:
        """Stage 0's output of `step`: on to stage 1 (by the router thread)."""
        self._handoff.put((step, h))
        self._wake.nudge()

    def result(self, step: int) -> torch.Tensor:
        """The last stage's output of `step` (waits; raises what broke)."""
        deadline = time.monotonic() + self.patience
        with self._cond:
            while step not in self._results:
                if self._error is not None:
                    raise self._error
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise self.stages[self._at.get(step, 0)].blame(self.timeout_s)
            return self._results.pop(step)

    # --- the router thread ------------------------------------------------------------

    def _drive(self) -> None:
        try:
            while True:
                ready = self.inbox.receive(
                    ROUTER_POLL_S, where="in a pipelined pass", extra=[self._wake.rx]
                )
                self._wake.drain(ready)
                if self.first is not None:
                    self.first.pump()
                while not self._handoff.empty():
                    step, h = self._handoff.get_nowait()
                    self._forward(0, step, h)
                for stage in self.stages:
                    if stage.hub is not None:
                        while (got := self.inbox.pop(PARTIALS, stage.ranks)) is not None:
                            stage.hub.absorb(*got)
                while (got := self.inbox.pop(HIDDEN)) is not None:
                    self._arrived(*got)
                if self._stop and self._handoff.empty():
                    return
        except BaseException as e:  # handed to the compute thread
            if self.first is not None:
                self.first.fail(e)
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _forward(self, index: int, step: int, h: torch.Tensor) -> None:
        self._at[step] = index
        self.stages[index].start(h, self.plans[step], step)

    def _arrived(self, link: WorkerLink, msg: Message) -> None:
        step = msg.data.step
        if step not in self._at:
            raise LinkLost(link.rank, link.name, f"sent an output of step {step}, not in flight")
        index = self._at[step]
        rows = self.plans[step].tokens
        h = self.stages[index].output(link, msg, step, (rows, self.hidden_size))
        if index + 1 < len(self.stages):
            self._forward(index + 1, step, h)
        else:
            with self._cond:
                self._results[step] = h.clone()  # the frame's buffer goes back to zmq
                del self._at[step]
                self._cond.notify_all()
