"""Star allreduce, rank 0's side: workers send partial sums here, rank 0 adds
them (tpi.comm.reducer) and sends each total back. One round trip per
allreduce, 2(N-1) messages, no ring hops: the right shape when link latency
dominates.

Allreduces can overlap computation: `start` hands over this rank's partial and
returns at once, `wait` delivers the total. Outside an overlapped prefill the
thread that waits drives the sockets itself. Inside one (`pipelined()`), a
reducer thread owns every link socket for the duration: the compute thread
hands its partials over a queue and wakes the reducer through an inproc socket
of its own, and never touches a link socket, because ZeroMQ sockets must not
be used by two threads. The reducer receives partials and sends each total the
moment its last partial is in, while the compute thread works on the next chunk.
A pipeline's router thread (tpi.master.pipeline) takes the reducer's place the
same way (`handed_over`, `pump`) during a micro-batched pass.

In a pipeline, a StarMaster sums one stage's group (`members`): stage 0's with
rank 0's own partials, a later stage's as its hub (`absorb`: rank 0 computes
nothing for that group and adds zeros).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator

import torch

from tpi.comm.inbox import Inbox
from tpi.comm.links import LinkLost, WorkerLink
from tpi.comm.reducer import Key, Pending, Reducer, Total
from tpi.comm.step_broadcast import StepClock
from tpi.comm.traffic import AllreduceStats
from tpi.comm.wake import WakePair
from tpi.comm.wire import (
    Kind,
    Message,
    Phase,
    SumHeader,
    encode_data,
    payload_array,
    payload_tensor,
)

PARTIALS = frozenset({Kind.PARTIAL})
REDUCER_POLL_S = 0.05  # the reducer thread re-checks for a stop request this often
DIRECT_QUIET_S = 0.2  # a data link this quiet: look at the control links too


def _where(key: Key) -> str:
    return "in the embedding" if key[2] == Phase.EMBED else f"during layer {key[1]}"


class StarMaster:
    """The Collective of rank 0 (see tpi.model.decoder)."""

    def __init__(
        self,
        inbox: Inbox,
        clock: StepClock,
        wire_dtype: torch.dtype,
        timeout_s: float,
        stats: AllreduceStats | None = None,
        members: list[WorkerLink] | None = None,
    ) -> None:
        self.inbox = inbox
        self.links = inbox.links
        self.session = inbox.session
        self.clock = clock
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        # The workers whose partials are summed: all of them, or a pipeline stage's
        # group (rank 0 then hubs the group's allreduce, with its own partial or zeros).
        self.members = list(self.links.links if members is None else members)
        self._row = {link.rank: i for i, link in enumerate(self.members, start=1)}
        self._ranks = set(self._row)
        self.world = len(self.members) + 1
        self.stats = stats or AllreduceStats()
        self.reducer = Reducer(self.world, wire_dtype)
        self._totals: dict[Key, Total] = {}
        # Set while a reducer thread owns the sockets (an overlapped prefill).
        self._cond = threading.Condition()
        self._handoff: queue.SimpleQueue | None = None
        self._wake: Callable[[], None] | None = None
        self._error: BaseException | None = None

    # --- Collective ------------------------------------------------------------------

    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor:
        return self.wait(self.start(partial, layer, phase, self.clock.pos))

    def start(self, partial: torch.Tensor, layer: int, phase: int, pos: int) -> Pending:
        t0 = time.perf_counter()
        key = (self.clock.step, layer, phase, pos)
        if self._handoff is not None:
            if self._error is not None:
                raise self._error
            self._handoff.put((key, partial))
            self._wake_reducer()
        else:
            self.reducer.expect(self.clock.step)
            self.reducer.own(key, partial)
            self._totals.update(self._send_sums(self.reducer.ready()))
        self.stats.seconds += time.perf_counter() - t0
        return Pending(key)

    def wait(self, pending: Pending) -> torch.Tensor:
        t0 = time.perf_counter()
        key = pending.key
        total = self._wait_threaded(key) if self._handoff is not None else self._wait_here(key)
        wire = total.wire
        out = wire if wire.dtype == total.own_dtype else wire.to(total.own_dtype)
        sent = (self.world - 1) * total.wire.numel() * total.wire.element_size()
        self.stats.record(time.perf_counter() - t0, sent, total.received)
        return out

    # --- the thread that waits drives the sockets ------------------------------------------

    def _wait_here(self, key: Key) -> Total:
        if all(link.data is not None for link in self.members):
            return self._wait_direct(key)
        deadline = time.monotonic() + self.timeout_s
        while key not in self._totals:
            try:
                link, msg = self.inbox.take(
                    PARTIALS,
                    max(0.0, deadline - time.monotonic()),
                    self._ranks,
                    where=_where(key),
                )
            except TimeoutError:
                self._timeout(key)
            self._add(link, msg)
            self._totals.update(self._send_sums(self.reducer.ready()))
        self.reducer.release(key)
        return self._totals.pop(key)

    def _wait_direct(self, key: Key) -> Total:
        """`_wait_here` when every member has a data link: read each missing
        partial straight from its worker's data link, in turn (no poll over every
        socket per message: at decode sizes that costs more than the message).
        The control links are looked at whenever a data link is quiet for
        DIRECT_QUIET_S, so an ERROR or a dropped link is seen as before."""
        deadline = time.monotonic() + self.timeout_s
        where = _where(key)
        while (got := self.inbox.pop(PARTIALS, self._ranks)) is not None:
            self._add(*got)  # filed while someone else received (a head gather)
        while key not in self._totals:
            rows = [r for r in self.reducer.missing(key) if r]
            if not rows:  # only rank 0's own partial could be missing: never started
                raise RuntimeError(f"allreduce {key} waited for before it was started")
            link = self.members[rows[0] - 1]
            try:
                left = max(0.0, min(DIRECT_QUIET_S, deadline - time.monotonic()))
                msg = self.inbox.take_data(link, PARTIALS, left, where)
            except TimeoutError:
                self.inbox.receive(0.0, self._ranks, where)
                if time.monotonic() >= deadline:
                    self._timeout(key)
                continue
            if msg is not None:
                self._add(link, msg)
            self._totals.update(self._send_sums(self.reducer.ready()))
        self.reducer.release(key)
        return self._totals.pop(key)

    def _add(self, link: WorkerLink, msg: Message) -> None:
        h = msg.data
        key = h.key
        if h.dtype == torch.float32:  # the reducer copies it as numpy (see reducer._Slots)
            values = payload_array(msg.payload, h)
        else:
            values = payload_tensor(msg.payload, h)
        self.reducer.add(self._row[link.rank], key, h.dtype, values)

    def _send_sums(self, totals: list[Total]) -> dict[Key, Total]:
        """Send each total to every worker (by the thread that owns the sockets)."""
        for t in totals:
            step, layer, phase, pos = t.key
            shape = tuple(t.wire.shape)
            header = SumHeader(self.session, step, pos, layer, phase, t.wire.dtype, shape)
            frames = [encode_data(Kind.SUM, header), t.payload]
            for link in self.members:
                link.send_data(frames)
        return {t.key: t for t in totals}

    def _timeout(self, key: Key) -> None:
        missing = [r for r in self.reducer.missing(key) if r != 0] or [1]
        link = self.members[missing[0] - 1]
        raise LinkLost(link.rank, link.name, f"no reply in {self.timeout_s:g} s", _where(key))

    # --- overlap: a reducer thread owns the sockets ----------------------------------------

    @contextlib.contextmanager
    def pipelined(self) -> Iterator[None]:
        wake = WakePair(self.links, "reducer")
        self.reducer.expect(self.clock.step)
        self._stop = False
        try:
            with self.handed_over(wake.nudge):
                thread = threading.Thread(
                    target=self._drive, args=(wake,), name="tpi-star-reducer", daemon=True
                )
                thread.start()  # from here until join, only that thread touches the link sockets
                try:
                    yield
                finally:
                    self._stop = True
                    wake.nudge()
                    thread.join()
        finally:
            wake.close()

    @contextlib.contextmanager
    def handed_over(self, wake: Callable[[], None]) -> Iterator[None]:
        """While inside, another thread owns the link sockets and calls `pump`: the
        compute thread's partials go through a queue, and `wake` tells that thread."""
        self._error = None
        self._handoff = queue.SimpleQueue()
        self._wake = wake
        try:
            yield
        finally:
            self._wake = None
            self._handoff = None
            if self._error is not None:
                err, self._error = self._error, None
                raise err

    def pump(self) -> None:
        """The socket owner's turn (a reducer or pipeline thread): take the partials
        handed over and received, and send every total now complete."""
        with self._cond:
            while not self._handoff.empty():
                key, partial = self._handoff.get_nowait()
                self.reducer.own(key, partial)
            while (got := self.inbox.pop(PARTIALS, self._ranks)) is not None:
                self._add(*got)
            totals = self.reducer.ready()
        if totals:
            sent = self._send_sums(totals)  # outside the lock: the sockets are ours
            with self._cond:
                self._totals.update(sent)
                self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The socket owner broke: whoever waits for a total gets `error`."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    # --- hub: rank 0 sums a group it computes nothing for ------------------------------------

    def absorb(self, link: WorkerLink, msg: Message) -> None:
        """A group member's partial: summed with the others' (rank 0 adds zeros), and
        each total sent back as soon as it is complete (nobody on rank 0 waits for it)."""
        h = msg.data
        key = h.key
        if self.reducer.is_late(key):
            return  # late or duplicate: opening a reduction for it would stall the rest
        self.reducer.own_zeros(key, tuple(h.shape))
        self._add(link, msg)
        for t in self._send_sums(self.reducer.ready()).values():
            self.reducer.release(t.key)
            nbytes = t.wire.numel() * t.wire.element_size()
            self.stats.record(0.0, len(self.members) * nbytes, t.received)

    def _wake_reducer(self) -> None:
        self._wake()

    def _wait_threaded(self, key: Key) -> Total:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while key not in self._totals:
                if self._error is not None:
                    raise self._error
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    self._timeout(key)
            self.reducer.release(key)
            return self._totals.pop(key)

    def _drive(self, wake: WakePair) -> None:
        try:
            while True:
                ready = self.inbox.receive(
                    REDUCER_POLL_S, where="during an overlapped prefill", extra=[wake.rx]
                )
                wake.drain(ready)
                self.pump()
                if self._stop and self._handoff.empty():
                    return
        except BaseException as e:  # handed to the compute thread in wait()
            self.fail(e)
