"""Star allreduce: workers send partial sums to the master, the master adds them
in fixed rank order and sends the total back. One round trip per allreduce,
2(N-1) messages, no ring hops: the right shape when link latency dominates.

Partials are rounded to the wire dtype on every rank, the master's own
included, and the master uses exactly the total it sends, so every rank holds a
bit-identical residual stream whatever the wire dtype. (The embedding sum of a
vocabulary-parallel step always travels in fp32: it is a gather, not a sum of
approximations, and must arrive exact.)

Allreduces can overlap computation: `start` hands over this rank's partial and
returns at once, `wait` delivers the total. During an overlapped prefill
(`pipelined()`), a thread on the master receives partials and sends each total
the moment the last partial is in, while the compute thread works on the next
chunk; otherwise the waiting thread drives the sockets itself.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tpi.links import ClusterError, LinkLost, LinkSet, WorkerLink
from tpi.wire import (
    DataHeader,
    Kind,
    Message,
    ProtocolError,
    encode_control,
    encode_data,
    ids_payload,
    payload_tensor,
    tensor_payload,
)

STEP_LAYER = 0xFFFF  # layer field of a STEP message (it precedes every layer)
EMBED_LAYER = 0xFFFE  # layer field of the vocabulary-parallel embedding sum
HEAD_LAYER = 0xFFFD  # layer field of HEAD messages (logits or token candidates)
PHASE_EMBED = 2  # phase of the embedding sum (attention and MLP are 0 and 1)

Key = tuple[int, int, int, int]  # (step, layer, phase, pos): pos tells prefill chunks apart


def pass_order(key: Key) -> Key:
    """Keys in the order a forward pass starts them: the embedding sum before layer 0."""
    step, layer, phase, pos = key
    return (step, -1 if layer == EMBED_LAYER else layer, phase, pos)


def wire_dtype_for(phase: int, wire: torch.dtype) -> torch.dtype:
    return torch.float32 if phase == PHASE_EMBED else wire


@dataclass
class AllreduceStats:
    count: int = 0
    seconds: float = 0.0  # time the compute thread spent inside allreduce (start + wait)
    bytes_sent: int = 0
    bytes_received: int = 0

    def record(self, seconds: float, sent: int, received: int) -> None:
        self.count += 1
        self.seconds += seconds
        self.bytes_sent += sent
        self.bytes_received += received

    def to_dict(self) -> dict:
        return {
            "allreduces": self.count,
            "allreduce_seconds": round(self.seconds, 6),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }


@dataclass
class _Reduction:
    key: Key
    slots: torch.Tensor  # (world, *shape) float32, one row per rank
    wire: torch.dtype
    have: set[int] = field(default_factory=set)
    own_dtype: torch.dtype | None = None
    total: torch.Tensor | None = None  # the wire-dtype sum, once everyone is in
    received: int = 0


@dataclass(frozen=True)
class Pending:
    key: Key  # what `wait` will hand back the total of


class StarMaster:
    """Rank 0's side: broadcasts each step's input, reduces every layer phase,
    gathers the vocabulary-parallel head's outputs."""

    def __init__(
        self, links: LinkSet, session: int, wire_dtype: torch.dtype, timeout_s: float
    ) -> None:
        self.links = links
        self.session = session
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        self.world = len(links.links) + 1
        self.step = 0
        self.pos = 0
        self.stats = AllreduceStats()
        self._open: dict[Key, _Reduction] = {}
        self._done: Key = (0, 0, 0, 0)  # pass_order of the last key summed and sent
        self._pool: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        # Messages the reducer received that are not partials (a worker's HEAD can
        # arrive before the reducer thread stops): kept for gather_head.
        self._stash: list[tuple[WorkerLink, Message]] = []

    # --- step input ----------------------------------------------------------------------

    def begin_step(self, h: torch.Tensor, pos: int, chunks: int = 1) -> None:
        """Ship the step's input hidden states to every worker."""
        self.step += 1
        self.pos = pos
        header = DataHeader(
            self.session, self.step, pos, STEP_LAYER, chunks, h.dtype, tuple(h.shape)
        )
        frames = [encode_data(Kind.STEP, header), tensor_payload(h)]
        for link in self.links.links:
            link.send(frames)
        self.stats.bytes_sent += (self.world - 1) * h.numel() * h.element_size()

    def begin_step_tokens(self, ids: list[int], pos: int, chunks: int, head: dict) -> None:
        """Vocabulary-parallel step: only the token ids (and what the head should return)."""
        self.step += 1
        self.pos = pos
        body = {
            "session": self.session,
            "step": self.step,
            "pos": pos,
            "chunks": chunks,
            "head": head,
        }
        frames = [encode_control(Kind.STEP_TOKENS, body), ids_payload(ids)]
        for link in self.links.links:
            link.send(frames)
        self.stats.bytes_sent += (self.world - 1) * (8 * len(ids) + len(frames[0]))

    # --- allreduce -----------------------------------------------------------------------

    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor:
        return self.wait(self.start(partial, layer, phase, self.pos))

    def start(self, partial: torch.Tensor, layer: int, phase: int, pos: int) -> Pending:
        t0 = time.perf_counter()
        key = (self.step, layer, phase, pos)
        wire = wire_dtype_for(phase, self.wire_dtype)
        with self._cond:
            red = self._reduction(key, tuple(partial.shape), wire)
            if tuple(red.slots.shape[1:]) != tuple(partial.shape):
                raise ProtocolError(
                    f"a worker sent shape {tuple(red.slots.shape[1:])} for {key}, "
                    f"this rank has {tuple(partial.shape)}"
                )
            # Round our own partial exactly as a worker's is rounded by the wire.
            red.slots[0].copy_(partial.to(wire))
            red.have.add(0)
            red.own_dtype = partial.dtype
            self._complete()
            self._cond.notify_all()
        self.stats.seconds += time.perf_counter() - t0
        return Pending(key)

    def wait(self, pending: Pending) -> torch.Tensor:
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        where = (
            f"during layer {pending.key[1]}" if pending.key[1] < EMBED_LAYER else "in the embedding"
        )
        while True:
            with self._cond:
                if self._error is not None:
                    raise self._error
                red = self._open.get(pending.key)
                if red is not None and red.total is not None:
                    del self._open[pending.key]
                    break
                if self._thread is not None:
                    if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                        self._timeout(pending.key, where)
                    continue
            self._progress(deadline, where)  # nobody else drives the sockets: we do
        total = red.total.to(red.own_dtype)
        self._release(red)
        sent = (self.world - 1) * red.total.numel() * red.total.element_size()
        self.stats.record(time.perf_counter() - t0, sent, red.received)
        return total

    def _reduction(self, key: Key, shape: tuple[int, ...], wire: torch.dtype) -> _Reduction:
        red = self._open.get(key)
        if red is None:
            pool = self._pool.get((shape, wire), [])
            slots = pool.pop() if pool else torch.empty((self.world, *shape), dtype=torch.float32)
            red = self._open[key] = _Reduction(key, slots, wire)
        return red

    def _release(self, red: _Reduction) -> None:
        pool = self._pool.setdefault((tuple(red.slots.shape[1:]), red.wire), [])
        if len(pool) < 4:
            pool.append(red.slots)

    def _timeout(self, key: Key, where: str) -> None:
        red = self._open.get(key)
        missing = [r for r in range(1, self.world) if red is None or r not in red.have]
        r = min(missing) if missing else 1
        lk = self.links.links[r - 1]
        raise LinkLost(r, lk.name, f"no reply in {self.timeout_s:g} s", where)

    def _progress(self, deadline: float, where: str, quiet_ok: bool = False) -> None:
        """Receive one message and sum whatever became complete; nothing by the
        deadline is a timeout (or, with `quiet_ok`, just nothing yet)."""
        try:
            link, msg = self.links.recv(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            if quiet_ok:
                return
            with self._cond:
                pending = min(self._open, key=pass_order, default=(self.step, 0, 0, 0))
            self._timeout(pending, where)
        except LinkLost as e:
            raise LinkLost(e.rank, e.address, e.reason, where) from None
        if msg.kind == Kind.ERROR:
            raise ClusterError(
                f"rank {link.rank} ({link.name}) failed {where}: {msg.body['message']}"
            )
        if msg.kind != Kind.PARTIAL:
            if msg.kind == Kind.HEAD:
                with self._cond:
                    self._stash.append((link, msg))
            return  # else e.g. a PING probe; nothing to do mid-step
        h = msg.data
        key = (h.step, h.layer, h.phase, h.pos)
        with self._cond:
            if h.session != self.session or pass_order(key) <= self._done:
                return  # late or duplicate frame: never summed
            if h.step != self.step:
                raise ProtocolError(
                    f"rank {link.rank} sent a partial of step {h.step} during step {self.step}"
                )
            red = self._reduction(key, h.shape, wire_dtype_for(h.phase, self.wire_dtype))
            if link.rank in red.have:
                return
            if tuple(red.slots.shape[1:]) != h.shape or h.dtype != red.wire:
                raise ProtocolError(
                    f"rank {link.rank} sent {h.dtype} {h.shape} for {key}, "
                    f"expected {red.wire} {tuple(red.slots.shape[1:])}"
                )
            red.slots[link.rank].copy_(payload_tensor(msg.payload, h))
            red.have.add(link.rank)
            red.received += h.nbytes()
            self._complete()
            self._cond.notify_all()

    def _complete(self) -> None:
        """Sum and send every reduction whose partials are all in, oldest first (so
        workers receive totals in the order they started them). Holds the lock."""
        for key in sorted(self._open, key=pass_order):
            red = self._open[key]
            if red.total is not None:
                continue
            if len(red.have) < self.world:
                return
            # Fixed rank order, whatever the arrival order: deterministic sums.
            total = red.slots[0].clone()
            for r in range(1, self.world):
                total.add_(red.slots[r])
            red.total = total.to(red.wire)
            step, layer, phase, pos = key
            header = DataHeader(self.session, step, pos, layer, phase, red.wire, tuple(total.shape))
            frames = [encode_data(Kind.SUM, header), tensor_payload(red.total)]
            for link in self.links.links:
                link.send(frames)
            self._done = max(self._done, pass_order(key))

    @contextlib.contextmanager
    def pipelined(self) -> Iterator[None]:
        """Overlap: a thread receives partials and sends totals while this thread computes.

        Nothing else may use the sockets meanwhile (ZeroMQ sockets are single-threaded)."""
        self._stop = False
        self._error = None
        self._thread = threading.Thread(target=self._drive, name="tpi-star-reducer", daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            self._thread.join()
            self._thread = None
            if self._error is not None:
                err, self._error = self._error, None
                raise err

    def _drive(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stop:
                        return
                self._progress(
                    time.monotonic() + 0.05, "during an overlapped prefill", quiet_ok=True
                )
        except BaseException as e:  # handed to the compute thread in wait()
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        with self._cond:
            self._error = e
            self._cond.notify_all()

    # --- vocabulary-parallel head -----------------------------------------------------------

    def gather_head(self, round_: int) -> dict[int, torch.Tensor]:
        """Every worker's HEAD output of this step (round 0, or a top-p refill round)."""
        got: dict[int, torch.Tensor] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(got) < self.world - 1:
            waiting = set(range(1, self.world)) - set(got)
            try:
                if self._stash:
                    link, msg = self._stash.pop(0)
                else:
                    link, msg = self.links.recv(max(0.0, deadline - time.monotonic()), waiting)
            except TimeoutError:
                r = min(waiting)
                raise LinkLost(
                    r,
                    self.links.links[r - 1].name,
                    f"no reply in {self.timeout_s:g} s",
                    "in the LM head",
                ) from None
            except LinkLost as e:
                raise LinkLost(e.rank, e.address, e.reason, "in the LM head") from None
            if msg.kind == Kind.ERROR:
                raise ClusterError(
                    f"rank {link.rank} ({link.name}) failed in the LM head: {msg.body['message']}"
                )
            if msg.kind != Kind.HEAD:
                continue
            h = msg.data
            if h.session != self.session or (h.step, h.phase) < (self.step, round_):
                continue  # late
            if (h.step, h.phase, h.layer) != (self.step, round_, HEAD_LAYER):
                raise ProtocolError(
                    f"rank {link.rank} sent head output {(h.step, h.phase)}, expected {(self.step, round_)}"
                )
            got[link.rank] = payload_tensor(msg.payload, h).clone()
            self.stats.bytes_received += h.nbytes()
        return got

    def request_more(self, round_: int, count: int) -> None:
        body = {"session": self.session, "step": self.step, "round": round_, "count": count}
        frames = [encode_control(Kind.HEAD_MORE, body)]
        for link in self.links.links:
            link.send(frames)
        self.stats.bytes_sent += (self.world - 1) * len(frames[0])


class WorkerChannel(Protocol):
    """What the worker session offers the collective: send, and wait for a SUM."""

    def send(self, frames: list) -> None: ...

    def wait_sum(self, expected: DataHeader) -> Message: ...


class StarWorker:
    """A worker's side: send my partial, receive the total."""

    def __init__(self, channel: WorkerChannel, session: int, wire_dtype: torch.dtype) -> None:
        self.channel = channel
        self.session = session
        self.wire_dtype = wire_dtype
        self.step = 0
        self.pos = 0
        self.stats = AllreduceStats()
        self._started: dict[Key, tuple[DataHeader, torch.dtype]] = {}

    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor:
        return self.wait(self.start(partial, layer, phase, self.pos))

    def start(self, partial: torch.Tensor, layer: int, phase: int, pos: int) -> Pending:
        t0 = time.perf_counter()
        wire = partial.to(wire_dtype_for(phase, self.wire_dtype)).contiguous()
        header = DataHeader(
            self.session, self.step, pos, layer, phase, wire.dtype, tuple(wire.shape)
        )
        self.channel.send([encode_data(Kind.PARTIAL, header), tensor_payload(wire)])
        key = (self.step, layer, phase, pos)
        self._started[key] = (header, partial.dtype)
        self.stats.seconds += time.perf_counter() - t0
        return Pending(key)

    def wait(self, pending: Pending) -> torch.Tensor:
        t0 = time.perf_counter()
        header, dtype = self._started.pop(pending.key)
        msg = self.channel.wait_sum(header)
        total = payload_tensor(msg.payload, msg.data).to(dtype, copy=True)
        self.stats.record(time.perf_counter() - t0, header.nbytes(), msg.data.nbytes())
        return total

    @contextlib.contextmanager
    def pipelined(self) -> Iterator[None]:
        yield  # a worker's sends never block and it only waits for totals: nothing to run

    def send_head(self, out: torch.Tensor, round_: int) -> None:
        """This rank's HEAD output for the current step (logits slice or candidates)."""
        out = out.contiguous()
        header = DataHeader(
            self.session, self.step, self.pos, HEAD_LAYER, round_, out.dtype, tuple(out.shape)
        )
        self.channel.send([encode_data(Kind.HEAD, header), tensor_payload(out)])
        self.stats.bytes_sent += header.nbytes()
