"""Expert-aware streaming: a rank reads from disk only the experts its tokens pick.

With the sliding window a mixture-of-experts layer streams as two parts. Its
dense part (norms, attention, router) is a layer file the loader thread reads
ahead like any layer. Its experts cannot be read ahead: which ones a token needs
is known only once the router has run on that layer's input, on every rank
alike (the router is replicated). So tpi.model.moe asks an ExpertSource for each
picked expert this rank holds, and here that is a cache of preallocated slots
per layer: a hit costs nothing, a miss reads that expert's span of the layer's
experts file (tpi.storage.expert_file) into the least recently used slot of the
layer, checks it against its crc32, and converts it as the window converts
layers. A decode token then reads (dense layer) + (picked experts not cached)
instead of every expert: for Qwen3-30B-A3B-shaped int4 layers, 8 of 128.

The cache is per layer because layers are visited in a cycle: one global LRU
smaller than a token's whole working set would evict every expert before the
next token comes back to its layer and never hit, while a few slots per layer
keep the experts the last tokens picked there, which the next token picks again
as often as the router repeats itself. With a slot for every held expert the
store is simply resident (everything read once, at load).

A decode token's picks are known together (moe_block hands them to `prepare`),
so the missing ones are read at once by a few reader threads, into slots that
none of the picked experts occupies: the compute thread runs the first expert
while the disk reads the others, and waits (time blocked on disk) only for what
is not in yet. A pass that picks more experts than a layer has slots (a prompt)
reads them one by one as it runs them, as do shards whose tensors must be
converted (one staging buffer).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tpi.model.moe import ExpertWeights
from tpi.model.weights import DOWN, GATE_UP
from tpi.quant.formats import weight_from_tensors
from tpi.quant.int4_pack import Int4Layout
from tpi.quant.quantize import memory_dtype
from tpi.runtime.slot_fill import converted_bytes, place, repack_int4
from tpi.storage.expert_file import ExpertFileLayout, ExpertSpan
from tpi.storage.tensor_file import ALIGN, read_span, tensor_views

READERS = 4  # concurrent expert reads (an SSD serves several at once)


@dataclass(frozen=True)
class ExpertLayouts:
    """Every MoE layer's experts file of one rank, and the slot size they need."""

    files: tuple[ExpertFileLayout | None, ...]  # per layer (None: a dense layer)
    dtype: torch.dtype
    quantized: bool
    convert: bool  # some tensor is held in another dtype, or misaligned in its span
    slot_bytes: int
    staging_bytes: int

    @classmethod
    def of(
        cls, files: tuple[ExpertFileLayout | None, ...], dtype: torch.dtype, quantized: bool
    ) -> ExpertLayouts:
        spans = [s for f in files if f is not None for s in f.experts.values()]

        def held(name: str, dt: torch.dtype) -> torch.dtype:
            return memory_dtype(name, dt, dtype, quantized)

        convert = any(
            held(name, dt) != dt or a % ALIGN for s in spans for name, dt, _, a, _ in s.tensors
        )

        def need(s: ExpertSpan) -> int:
            return converted_bytes(s.tensors, held) if convert else s.nbytes

        slot = max((need(s) for s in spans), default=0)
        staging = max((s.nbytes for s in spans), default=0) if convert else 0
        return cls(files, dtype, quantized, convert, slot, staging)

    @property
    def any(self) -> bool:
        return any(f is not None for f in self.files)

    def held_per_layer(self) -> int:
        """Experts this rank holds in a MoE layer (the same in every one)."""
        return max((len(f.experts) for f in self.files if f is not None), default=0)

    def moe_layers(self) -> int:
        return sum(f is not None for f in self.files)

    def cache_bytes(self, per_layer: int) -> int:
        """Memory for `per_layer` slots in every MoE layer, plus the staging buffer."""
        return self.moe_layers() * per_layer * self.slot_bytes + self.staging_bytes


class ExpertStore:
    """The expert slots of every MoE layer of a rank, and their reads."""

    def __init__(
        self,
        layouts: ExpertLayouts,
        per_layer: int,
        int4_layout: Int4Layout | None,
        repack_int4: bool,
        manifest_hash: str,
        stats,
    ) -> None:
        self.layouts = layouts
        self.per_layer = max(1, min(per_layer, layouts.held_per_layer()))
        self.int4_layout = int4_layout
        self.repack_int4 = repack_int4
        self.manifest_hash = manifest_hash
        self.stats = stats
        self._slots = {
            i: [torch.empty(layouts.slot_bytes, dtype=torch.uint8) for _ in range(self.per_layer)]
            for i, f in enumerate(layouts.files)
            if f is not None
        }
        self._staging = (
            torch.empty(layouts.staging_bytes, dtype=torch.uint8) if layouts.convert else None
        )
        # Per layer: expert -> (slot index, weights), least recently used first.
        self._cached: dict[int, OrderedDict[int, tuple[int, ExpertWeights]]] = {
            i: OrderedDict() for i in self._slots
        }
        # Reads in flight: (layer, expert) -> (slot index, future of its result).
        self._pending: dict[tuple[int, int], tuple[int, Future]] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def resident(self) -> bool:
        return self.per_layer >= self.layouts.held_per_layer()

    @property
    def resident_bytes(self) -> int:
        n = sum(s.numel() for slots in self._slots.values() for s in slots)
        return n + (self._staging.numel() if self._staging is not None else 0)

    def preload(self) -> None:
        """Read every held expert (a store with a slot for each)."""
        for layer, f in enumerate(self.layouts.files):
            if f is not None:
                for e in f.experts:
                    self.get(layer, e)

    def view(self, layer: int) -> StreamedExperts:
        return StreamedExperts(self, layer)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _free_slot(self, layer: int, keep: set[int]) -> int | None:
        """A slot of `layer` holding nothing, or its least recently used expert not in
        `keep` (evicted); None if every slot is taken by `keep` or a read in flight."""
        cached = self._cached[layer]
        taken = {slot for slot, _ in cached.values()}
        taken |= {slot for (lay, _), (slot, _) in self._pending.items() if lay == layer}
        for slot in range(self.per_layer):
            if slot not in taken:
                return slot
        for e, (slot, _) in cached.items():  # least recently used first
            if e not in keep:
                del cached[e]
                return slot
        return None

    def prepare(self, layer: int, experts: list[int]) -> None:
        """Start reading the experts of `experts` that are not cached, all at once,
        when the layer's slots can hold all of them."""
        if self.layouts.convert or len(experts) > self.per_layer:
            return
        keep = set(experts)
        for e in experts:
            if e in self._cached[layer] or (layer, e) in self._pending:
                continue
            slot = self._free_slot(layer, keep)
            if slot is None:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="tpi-expert-reader")
            buf = self._slots[layer][slot]
            self._pending[(layer, e)] = (slot, self._pool.submit(self._read, layer, e, buf))

    def get(self, layer: int, expert: int) -> ExpertWeights:
        cached = self._cached[layer]
        hit = cached.get(expert)
        if hit is not None:
            cached.move_to_end(expert)
            self.stats.expert_hits += 1
            return hit[1]
        pending = self._pending.pop((layer, expert), None)
        if pending is not None:
            slot, future = pending
            t0 = time.perf_counter()
            weights, nbytes, seconds = future.result()
            self.stats.blocked_seconds += time.perf_counter() - t0
        else:
            slot = self._free_slot(layer, set())
            if slot is None:  # every slot awaits a read of an abandoned pass: take them in
                for lay, e in [k for k in self._pending if k[0] == layer]:
                    self.get(lay, e)
                slot = self._free_slot(layer, set())
            t0 = time.perf_counter()
            weights, nbytes, seconds = self._read(layer, expert, self._slots[layer][slot])
            self.stats.blocked_seconds += time.perf_counter() - t0
        s = self.stats
        s.read_seconds += seconds
        s.bytes_read += nbytes
        s.expert_bytes_read += nbytes
        s.experts_loaded += 1
        cached[expert] = (slot, weights)
        return weights

    def _read(
        self, layer: int, expert: int, slot: torch.Tensor
    ) -> tuple[ExpertWeights, int, float]:
        """Read one expert into `slot`: (its weights, bytes read, seconds). Runs on a
        reader thread when prefetched (it touches only `slot`, never the cache)."""
        f = self.layouts.files[layer]
        span = f.experts[expert]
        t0 = time.perf_counter()
        raw = (self._staging if self.layouts.convert else slot)[: span.nbytes]
        read_span(f.path, span.begin, raw, drop_cache=True)
        span.verify(f.path, raw, self.manifest_hash)
        tensors = tensor_views(raw, list(span.tensors))
        if self.layouts.convert:
            lay = self.layouts
            tensors = place(
                tensors, slot, lambda name, dt: memory_dtype(name, dt, lay.dtype, lay.quantized)
            )
        if self.repack_int4:
            repack_int4(tensors, self.int4_layout)
        weights = ExpertWeights(
            weight_from_tensors(tensors, GATE_UP), weight_from_tensors(tensors, DOWN)
        )
        return weights, span.nbytes, time.perf_counter() - t0


class StreamedExperts:
    """One layer's experts as tpi.model.moe asks for them (an ExpertSource)."""

    def __init__(self, store: ExpertStore, layer: int) -> None:
        self.store = store
        self.layer = layer
        experts = store.layouts.files[layer].experts
        self.held = range(min(experts), max(experts) + 1)

    def prepare(self, experts: list[int]) -> None:
        self.store.prepare(self.layer, experts)

    def get(self, expert: int) -> ExpertWeights:
        return self.store.get(self.layer, expert)

    def nbytes(self) -> int:
        return 0  # the store's slots are counted once, by the store
