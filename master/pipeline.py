"""The master's side of a pipeline: its own stage, then every later stage.

Stage 0 (the master and its group) runs as a tensor-parallel forward whose star
allreduce spans only that group (tpi.master.forward). Each later stage is
started with the hidden states entering it and returns its output
(tpi.master.remote_stage), which starts the next stage or goes to the head.

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

import torch

from tpi.comm.links import LinkLost, WorkerLink
from tpi.comm.star_master import StarMaster
from tpi.comm.step_broadcast import StepBroadcaster
from tpi.comm.wake import WakePair
from tpi.comm.wire import Kind, Message
from tpi.master.forward import TensorParallelForward, local_waiting_seconds
from tpi.master.remote_stage import RemoteStage
from tpi.model.batch import BatchStep
from tpi.model.decoder import Decoder
from tpi.model.want import Want

HIDDEN = frozenset({Kind.HIDDEN})
PARTIALS = frozenset({Kind.PARTIAL})
ROUTER_POLL_S = 0.05  # the router re-checks for a stop request this often


class PipelineForward:
    """Every stage in turn: stage 0 here (with its group), then the later stages'
    groups, as micro-batches where that pays (GPipe)."""

    def __init__(self, first: TensorParallelForward) -> None:
        self.first = first
        self.stages: list[RemoteStage] = first.topology.later
        self.inbox = first.topology.inbox
        self.timeout_s = first.topology.timeout_s
        # A vocabulary-parallel head across stages: the final states go to the ranks
        # outside the last stage too (FINAL), each computing its vocabulary rows.
        self.final: StepBroadcaster | None = first.topology.final
        self.remote_seconds = 0.0  # waiting for later stages (their compute and links)

    @property
    def decoder(self) -> Decoder:
        return self.first.decoder

    def waiting_seconds(self) -> float:
        return local_waiting_seconds(self.decoder) + self.remote_seconds

    @property
    def can_gpipe(self) -> bool:
        """Whether a pass may become micro-batches through the stages: not with a
        head over every rank (its ranks take a pass's token ids, stage input and
        final states in turn), nor with LongRoPE, whose table is chosen by where a
        pass ends (each micro-batch would choose for itself)."""
        return self.final is None and not self.decoder.cfg.rope.long_factor

    @property
    def num_stages(self) -> int:
        return self.first.topology.stages

    def run(self, ids: list[int], batch: BatchStep, pieces: int, want: Want) -> torch.Tensor:
        """Final hidden states of one pass: embedded and run through every stage,
        as micro-batches (GPipe) where that pays."""
        if self.can_gpipe and len(batch.segments) == 1 and batch.tokens > 1:
            # A prompt: at least one micro-batch per stage, so that the stages work at
            # once. A batch of sequences is cut as the planner says: decode reads every
            # weight once per micro-batch, so more micro-batches than the overlap pays
            # for only add weight reads.
            pieces = max(pieces, min(self.num_stages, batch.tokens))
        if self.can_gpipe and pieces > 1:
            return self.gpipe(ids, batch, pieces, want)
        h = self.decoder.run(self.first.start(ids, batch, pieces, want), batch, pieces)
        t0 = time.perf_counter()
        for stage in self.stages:
            h = stage.run(h, batch, pieces, self.inbox, self.timeout_s)
        if self.final is not None and want.anything:
            self.final.final(h)
        self.remote_seconds += time.perf_counter() - t0
        return h

    def gpipe(self, ids: list[int], batch: BatchStep, pieces: int, want: Want) -> torch.Tensor:
        """Final hidden states of a pass cut into `pieces` micro-batches that flow
        through the stages one behind the other (one step each)."""
        parts = batch.pieces(pieces)
        subs = [BatchStep(p.segments, batch.release if k == 0 else ()) for k, p in enumerate(parts)]
        # Every STEP of stage 0 leaves now, before a router owns the sockets: its
        # workers run them in order, as the master does.
        inputs, steps = [], []
        clock = self.first.topology.first.broadcast.clock
        for p, sub in zip(parts, subs, strict=True):
            inputs.append(self.first.start(ids[p.start : p.end], sub, 1, want))
            steps.append(clock.step)
        router = _Router(self, dict(zip(steps, subs, strict=True)))
        outs = []
        with router.running():
            for h, step, sub in zip(inputs, steps, subs, strict=True):
                router.clock.step = step  # stage 0's allreduce keys
                router.submit(step, self.decoder.run(h, sub, 1))
            t0 = time.perf_counter()
            for step in steps:
                outs.append(router.result(step))
            self.remote_seconds += time.perf_counter() - t0
        return torch.cat(outs).to(self.decoder.dtype)


class _Router:
    """Owns the link sockets during a GPipe pass (see the module docstring)."""

    def __init__(self, forward: PipelineForward, batches: dict[int, BatchStep]) -> None:
        self.stages = forward.stages
        self.inbox = forward.inbox
        self.hidden_size = forward.decoder.cfg.hidden_size
        self.batches = batches
        self.clock = self.stages[0].broadcast.clock
        # A micro-batch may wait for every later stage: each may take its patience.
        self.patience = sum(st.patience(forward.timeout_s) for st in self.stages)
        self.timeout_s = forward.timeout_s
        first = forward.decoder.collective
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
        steps = sorted(self.batches)
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
        self.stages[index].start(h, self.batches[step], step)

    def _arrived(self, link: WorkerLink, msg: Message) -> None:
        step = msg.data.step
        if step not in self._at:
            raise LinkLost(link.rank, link.name, f"sent an output of step {step}, not in flight")
        index = self._at[step]
        rows = self.batches[step].tokens
        h = self.stages[index].output(link, msg, step, (rows, self.hidden_size))
        if index + 1 < len(self.stages):
            self._forward(index + 1, step, h)
        else:
            with self._cond:
                self._results[step] = h.clone()  # the frame's buffer goes back to zmq
                del self._at[step]
                self._cond.notify_all()
