"""The arithmetic of the star allreduce, without sockets or threads.

Rank 0 collects one partial per rank for every key (step, layer, phase, pos),
adds them in one reduction over the rank rows whatever the arrival order (so
sums are deterministic), and hands out each total once every partial is in, oldest
first in the order a forward pass starts them (so workers receive totals in
the order they wait for them).

Partials are rounded to the wire dtype on every rank, rank 0's own included,
and rank 0 uses exactly the total it sends, so every rank holds a bit-identical
residual stream whatever the wire dtype. (The embedding sum of a
vocabulary-parallel step always travels in fp32: it is a gather, not a sum of
approximations, and must arrive exact.)

A frame for a key already summed is late or a duplicate and is ignored; a
partial of a step not in flight (the current one, or those of a pipelined pass:
`expect`), or of the wrong shape or dtype, is a protocol error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from tpi.comm.wire import Phase, ProtocolError, tensor_payload

Key = tuple[int, int, int, int]  # (step, layer, phase, pos): pos tells prefill chunks apart
POOLED_PER_SHAPE = 4  # slot buffers kept for reuse per (shape, dtype)


def pass_order(key: Key) -> Key:
    """Keys in the order a forward pass starts them: the embedding sum before layer 0."""
    step, layer, phase, pos = key
    return (step, -1 if phase == Phase.EMBED else layer, phase, pos)


def wire_dtype_for(phase: int, wire: torch.dtype) -> torch.dtype:
    return torch.float32 if phase == Phase.EMBED else wire


@dataclass
class _Slots:
    """One row per rank, flat float32, with the row views made once (an indexing
    op per partial costs as much as the copy for a decode-sized vector). Float32
    partials are copied and summed through numpy views of the same memory: a
    numpy call on a decode-sized vector costs a fraction of a torch op's dispatch,
    and an allreduce makes several per rank."""

    buf: torch.Tensor  # (world, numel)
    rows: list[torch.Tensor]
    arrays: list[np.ndarray]  # the same rows, as numpy views

    @classmethod
    def new(cls, world: int, numel: int) -> _Slots:
        buf = torch.empty((world, numel), dtype=torch.float32)
        return cls(buf, list(buf.unbind(0)), list(buf.numpy()))


@dataclass
class _Reduction:
    slots: _Slots
    shape: tuple[int, ...]
    wire: torch.dtype
    have: set[int] = field(default_factory=set)
    own_dtype: torch.dtype | None = None
    total: torch.Tensor | None = None  # the wire-dtype sum, once everyone is in
    received: int = 0  # bytes of remote partials


@dataclass(frozen=True)
class Pending:
    key: Key  # what a collective's `wait` hands back the total of


@dataclass(frozen=True)
class Total:
    key: Key
    wire: torch.Tensor  # the sum as sent (wire dtype)
    own_dtype: torch.dtype  # what rank 0 computes in
    received: int  # bytes of remote partials summed into it
    payload: np.ndarray  # the bytes to send: `wire`'s memory, as numpy


class Reducer:
    def __init__(self, world: int, wire_dtype: torch.dtype) -> None:
        self.world = world
        self.wire_dtype = wire_dtype
        self.step = 0  # the (last) step partials may belong to
        # A pipelined pass sends several steps (micro-batches) at once: partials of
        # steps first_step..step are accepted, in pass order.
        self.first_step = 0
        self._open: dict[Key, _Reduction] = {}
        self._done: Key = (0, 0, 0, 0)  # pass_order of the last key summed
        self._pool: dict[tuple[int, torch.dtype], list[_Slots]] = {}

    def _reduction(self, key: Key, shape: tuple[int, ...]) -> _Reduction:
        red = self._open.get(key)
        if red is None:
            wire = wire_dtype_for(key[2], self.wire_dtype)
            numel = math.prod(shape)
            pool = self._pool.get((numel, wire))
            slots = pool.pop() if pool else _Slots.new(self.world, numel)
            red = self._open[key] = _Reduction(slots, shape, wire)
        elif red.shape != shape:
            raise ProtocolError(f"partials of shapes {red.shape} and {shape} for {key}")
        return red

    def own(self, key: Key, partial: torch.Tensor) -> None:
        """Rank 0's partial, rounded exactly as a worker's is by the wire."""
        red = self._reduction(key, tuple(partial.shape))
        if red.wire == partial.dtype == torch.float32:
            red.slots.arrays[0][:] = partial.numpy().reshape(-1)
        else:
            rounded = partial if red.wire == partial.dtype else partial.to(red.wire)
            red.slots.rows[0].copy_(rounded.view(-1))
        red.have.add(0)
        red.own_dtype = partial.dtype

    def expect(self, first: int, last: int | None = None) -> None:
        """Partials of steps first..last (default: first alone) may arrive now."""
        self.first_step, self.step = first, first if last is None else last

    def own_zeros(self, key: Key, shape: tuple[int, ...]) -> None:
        """Rank 0 as the hub of a group it computes nothing for: its row is zero."""
        red = self._reduction(key, shape)
        if 0 not in red.have:
            red.slots.rows[0].zero_()
            red.have.add(0)
            red.own_dtype = red.wire

    def is_late(self, key: Key) -> bool:
        """Whether `key` was already summed (a frame for it is late or a duplicate)."""
        return pass_order(key) <= self._done

    def add(
        self, rank: int, key: Key, dtype: torch.dtype, tensor: torch.Tensor | np.ndarray
    ) -> bool:
        """A worker's partial (any shape view of its values: a tensor, or a numpy
        array of float32 values); False if it was late or a duplicate (ignored)."""
        if self.is_late(key):
            return False
        if not self.first_step <= key[0] <= self.step:
            steps = f"{self.first_step}..{self.step}" if self.first_step < self.step else self.step
            raise ProtocolError(f"rank {rank} sent a partial of step {key[0]} during step {steps}")
        red = self._reduction(key, tuple(tensor.shape))
        if rank in red.have:
            return False
        if dtype != red.wire:
            raise ProtocolError(f"rank {rank} sent {dtype} for {key}, expected {red.wire}")
        if isinstance(tensor, np.ndarray):
            red.slots.arrays[rank][:] = tensor.reshape(-1)
            red.received += tensor.nbytes
        else:
            red.slots.rows[rank].copy_(tensor.view(-1))
            red.received += tensor.numel() * tensor.element_size()
        red.have.add(rank)
        return True

    def ready(self) -> list[Total]:
        """Totals that just became complete, oldest first; stops at the first
        incomplete key so totals leave in pass order."""
        out = []
        keys = self._open if len(self._open) == 1 else sorted(self._open, key=pass_order)
        for key in keys:
            red = self._open[key]
            if red.total is not None:
                continue
            if len(red.have) < self.world:
                break
            # One deterministic reduction over the rank rows (rank order, every time).
            rows = red.slots.arrays
            flat = rows[0] + rows[1] if len(rows) > 1 else rows[0].copy()
            for row in rows[2:]:
                flat += row
            if red.wire == torch.float32:
                red.total, payload = torch.from_numpy(flat).view(red.shape), flat
            else:
                red.total = torch.from_numpy(flat).to(red.wire).view(red.shape)
                payload = tensor_payload(red.total)
            self._done = max(self._done, pass_order(key))
            own = red.own_dtype or red.wire
            out.append(Total(key, red.total, own, red.received, payload))
        return out

    def release(self, key: Key) -> None:
        """Forget a handed-out total; its slot buffer is reused."""
        red = self._open.pop(key)
        pool = self._pool.setdefault((red.slots.buf.shape[1], red.wire), [])
        if len(pool) < POOLED_PER_SHAPE:
            pool.append(red.slots)

    def missing(self, key: Key) -> list[int]:
        """Ranks whose partial for `key` has not arrived."""
        red = self._open.get(key)
        return [r for r in range(self.world) if red is None or r not in red.have]

    def oldest_open(self) -> Key | None:
        waiting = [k for k, red in self._open.items() if red.total is None]
        return min(waiting, key=pass_order, default=None)
