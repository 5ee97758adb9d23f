"""KV-cache memory of a batch: what a sequence may come to hold, what the batch
holds, and whether one more sequence fits.

A sequence is admitted only while the worst case of every admitted sequence's
cache fits the budget; one that can never fit, even alone, is refused
(KVBudgetError), others wait for running ones to end.
"""

from __future__ import annotations

from collections.abc import Iterable

from tpi.errors import TpiError
from tpi.master.engine import Engine
from tpi.master.sequence import BatchSequence

KV_MIN_CAPACITY = 256  # tpi.model.kv_cache.KVCache grows from this, by doubling


class KVBudgetError(TpiError):
    """A request whose KV cache can never fit the budget, even running alone."""


def kv_positions_bound(positions: int, limit: int) -> int:
    """The most positions a sequence of `positions` tokens makes a cache allocate
    (caches grow by doubling, from KV_MIN_CAPACITY, up to `limit`)."""
    return min(limit, max(KV_MIN_CAPACITY, 2 * positions))


class KVBudget:
    """The KV bytes a batch may hold (None: no limit), counted on `engine`'s caches."""

    def __init__(self, limit_bytes: int | None, bytes_per_position: int) -> None:
        self.limit_bytes = limit_bytes
        self.bytes_per_position = bytes_per_position

    def need(self, engine: Engine, seq: BatchSequence) -> int:
        """The bytes `seq`'s cache may grow to (its worst case)."""
        positions = min(engine.max_positions, len(seq.prompt) + seq.params.max_new_tokens)
        return kv_positions_bound(positions, engine.max_positions) * self.bytes_per_position

    def slot_bytes(self, engine: Engine, slot: int) -> int:
        return engine.decoder.caches.capacity(slot) * self.bytes_per_position

    def in_use(self, engine: Engine, running: Iterable[BatchSequence], idle: Iterable[int]) -> int:
        """KV bytes held or promised: each running sequence's worst case (or what its
        slot already holds, if more), and the caches idle slots keep for reuse."""
        held = sum(max(s.kv_bytes, self.slot_bytes(engine, s.slot)) for s in running)
        return held + sum(self.slot_bytes(engine, slot) for slot in idle)

    def refuse_if_never_fits(self, engine: Engine, seq: BatchSequence) -> None:
        need = self.need(engine, seq)
        if self.limit_bytes is not None and need > self.limit_bytes:
            raise KVBudgetError(
                f"this request may need {need / 2**20:.1f} MiB of KV cache; "
                f"the budget is {self.limit_bytes / 2**20:.1f} MiB (ask for fewer tokens)"
            )

    def fits(
        self, engine: Engine, running: list[BatchSequence], idle: list[int], need: int
    ) -> bool:
        """Whether `need` more bytes fit beside what the batch holds."""
        if self.limit_bytes is None:
            return True
        return self.in_use(engine, running, idle) + need <= self.limit_bytes
