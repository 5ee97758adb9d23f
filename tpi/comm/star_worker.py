"""Star allreduce, a worker's side: send my partial to rank 0, receive the total."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from tpi.comm.reducer import Key, Pending, wire_dtype_for
from tpi.comm.traffic import AllreduceStats
from tpi.comm.wire import (
    HeadHeader,
    HeadMode,
    Kind,
    Message,
    Phase,
    SumHeader,
    encode_data,
    payload_tensor,
    tensor_payload,
)


class MasterChannel(Protocol):
    """The worker's connection to its master, as the collective needs it."""

    def send(self, frames: list) -> None: ...

    def send_data(self, frames: list) -> None: ...  # an allreduce frame (a data link if any)

    def wait_sum(self, expected: SumHeader) -> Message: ...


@dataclass(frozen=True)
class _Summed:
    total: torch.Tensor  # a solo stage rank's partial: nothing to add it to


class StarWorker:
    """The Collective of a worker (see tpi.model.decoder)."""

    def __init__(
        self, channel: MasterChannel, session: int, wire_dtype: torch.dtype, solo: bool = False
    ) -> None:
        self.channel = channel
        self.session = session
        self.wire_dtype = wire_dtype
        # Alone in its pipeline stage: a partial is already the stage's sum, and
        # nothing goes on the wire until the stage's output (send_hidden).
        self.solo = solo
        # The step this rank runs (begin): its allreduces are keyed by it.
        self.step = 0
        self.pos = 0
        self.stats = AllreduceStats()
        self._started: dict[Key, tuple[SumHeader, torch.dtype]] = {}

    def begin(self, step: int, pos: int) -> None:
        """A new step starts on this rank (its STEP or STEP_TOKENS arrived): every
        allreduce until the next one belongs to it."""
        self.step, self.pos = step, pos

    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor:
        return self.wait(self.start(partial, layer, phase, self.pos))

    def start(self, partial: torch.Tensor, layer: int, phase: int, pos: int) -> Pending | _Summed:
        if self.solo and phase != Phase.EMBED:  # the embedding is summed over every rank
            return _Summed(partial)
        t0 = time.perf_counter()
        wire = partial.to(
            wire_dtype_for(phase, self.wire_dtype), memory_format=torch.contiguous_format
        )
        header = SumHeader(
            self.session, self.step, pos, layer, phase, wire.dtype, tuple(wire.shape)
        )
        self.channel.send_data([encode_data(Kind.PARTIAL, header), tensor_payload(wire)])
        key = (self.step, layer, phase, pos)
        self._started[key] = (header, partial.dtype)
        self.stats.seconds += time.perf_counter() - t0
        return Pending(key)

    def wait(self, pending: Pending | _Summed) -> torch.Tensor:
        if isinstance(pending, _Summed):
            return pending.total
        t0 = time.perf_counter()
        header, dtype = self._started.pop(pending.key)
        msg = self.channel.wait_sum(header)
        # A view of the received frame (it stays alive with the tensor), converted
        # only if the compute dtype differs: the caller adds it to the residual.
        total = payload_tensor(msg.payload, msg.data)
        if total.dtype != dtype:
            total = total.to(dtype)
        self.stats.record(time.perf_counter() - t0, header.nbytes(), msg.data.nbytes())
        return total

    @contextlib.contextmanager
    def pipelined(self) -> Iterator[None]:
        yield  # a worker's sends never block and it only waits for totals: nothing to run

    def send_head(self, out: torch.Tensor, round_: int, mode: HeadMode, row: int = 0) -> None:
        """This rank's HEAD output for one row of the current step: its logits slice
        or candidates."""
        out = out.contiguous()
        header = HeadHeader(self.session, self.step, row, round_, mode, out.dtype, tuple(out.shape))
        self.channel.send([encode_data(Kind.HEAD, header), tensor_payload(out)])
        self.stats.bytes_sent += header.nbytes()
