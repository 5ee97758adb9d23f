"""Star allreduce: workers send partial sums to the master, the master adds them
in fixed rank order and sends the total back. One round trip per allreduce,
2(N-1) messages, no ring hops: the right shape when link latency dominates.

Partials are rounded to the wire dtype on every rank, the master's own
included, and the master uses exactly the total it sends, so every rank holds a
bit-identical residual stream whatever the wire dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tpi.links import ClusterError, LinkLost, LinkSet
from tpi.wire import (
    DataHeader,
    Kind,
    Message,
    ProtocolError,
    encode_data,
    payload_tensor,
    tensor_payload,
)

STEP_LAYER = 0xFFFF  # layer field of a STEP message (it precedes every layer)


@dataclass
class AllreduceStats:
    count: int = 0
    seconds: float = 0.0  # time inside allreduce (waiting + summing + sending)
    bytes_sent: int = 0
    bytes_received: int = 0
    per_call_seconds: list[float] = field(default_factory=list)
    keep_per_call: bool = False

    def record(self, seconds: float, sent: int, received: int) -> None:
        self.count += 1
        self.seconds += seconds
        self.bytes_sent += sent
        self.bytes_received += received
        if self.keep_per_call:
            self.per_call_seconds.append(seconds)

    def to_dict(self) -> dict:
        return {
            "allreduces": self.count,
            "allreduce_seconds": round(self.seconds, 6),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }


class StarMaster:
    """Rank 0's side: broadcasts each step's input and reduces every layer phase."""

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
        self._slots: dict[tuple[int, int], torch.Tensor] = {}

    def begin_step(self, h: torch.Tensor, pos: int) -> None:
        """Engine hook: ship the step's input hidden states to every worker."""
        self.step += 1
        self.pos = pos
        header = DataHeader(self.session, self.step, pos, STEP_LAYER, 0, h.dtype, tuple(h.shape))
        frames = [encode_data(Kind.STEP, header), tensor_payload(h)]
        for link in self.links.links:
            link.send(frames)
        self.stats.bytes_sent += (self.world - 1) * h.numel() * h.element_size()

    def _buffer(self, shape: tuple[int, int]) -> torch.Tensor:
        buf = self._slots.get(shape)
        if buf is None:
            buf = torch.empty((self.world, *shape), dtype=torch.float32)
            self._slots = {shape: buf} if len(self._slots) > 4 else {**self._slots, shape: buf}
        return buf

    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor:
        t0 = time.perf_counter()
        shape = tuple(partial.shape)
        slots = self._buffer(shape)
        # Round our own partial exactly as a worker's is rounded by the wire.
        slots[0].copy_(partial.to(self.wire_dtype))
        pending = set(range(1, self.world))
        received = 0
        where = f"during layer {layer}"
        while pending:
            try:
                link, msg = self.links.recv(self.timeout_s, pending)
            except TimeoutError:
                r = min(pending)
                lk = self.links.links[r - 1]
                raise LinkLost(r, lk.name, f"no reply in {self.timeout_s:g} s", where) from None
            except LinkLost as e:
                raise LinkLost(e.rank, e.address, e.reason, where) from None
            if msg.kind == Kind.ERROR:
                raise ClusterError(
                    f"rank {link.rank} ({link.name}) failed {where}: {msg.body['message']}"
                )
            if msg.kind != Kind.PARTIAL:
                continue  # e.g. a PING probe; nothing to do mid-step
            h = msg.data
            key = (h.step, h.layer, h.phase)
            if (
                h.session != self.session
                or key < (self.step, layer, phase)
                or link.rank not in pending
            ):
                continue  # late or duplicate frame: never summed
            if key != (self.step, layer, phase) or h.shape != shape:
                raise ProtocolError(
                    f"rank {link.rank} sent step/layer/phase {key} shape {h.shape}, "
                    f"expected {(self.step, layer, phase)} shape {shape}"
                )
            slots[link.rank].copy_(payload_tensor(msg.payload, h))
            received += h.nbytes()
            pending.discard(link.rank)
        # Fixed rank order, whatever the arrival order: deterministic sums.
        total = slots[0].clone()
        for r in range(1, self.world):
            total.add_(slots[r])
        wire_sum = total.to(self.wire_dtype)
        header = DataHeader(self.session, self.step, self.pos, layer, phase, self.wire_dtype, shape)
        frames = [encode_data(Kind.SUM, header), tensor_payload(wire_sum)]
        for link in self.links.links:
            link.send(frames)
        sent = (self.world - 1) * wire_sum.numel() * wire_sum.element_size()
        self.stats.record(time.perf_counter() - t0, sent, received)
        return wire_sum.to(partial.dtype)


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

    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor:
        t0 = time.perf_counter()
        wire = partial.to(self.wire_dtype).contiguous()
        header = DataHeader(
            self.session, self.step, self.pos, layer, phase, self.wire_dtype, tuple(wire.shape)
        )
        self.channel.send([encode_data(Kind.PARTIAL, header), tensor_payload(wire)])
        msg = self.channel.wait_sum(header)
        total = payload_tensor(msg.payload, msg.data).to(partial.dtype, copy=True)
        self.stats.record(time.perf_counter() - t0, header.nbytes(), msg.data.nbytes())
        return total
