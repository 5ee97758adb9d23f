"""Runs this rank's slice of every decoder layer for one forward pass.

The same class serves a single machine, the master and every worker; what
differs between them is only where layer weights come from (`LayerSource`) and
how partial sums are combined (`Collective`).

A pass runs a BatchStep (tpi.model.batch): one or more sequences, each with its
own cache slot and position; the matmuls run on all their rows at once.

Overlap (NanoFlow's nano-batches): a pass may be cut into pieces that move
through each layer one after the other, so that the allreduce of piece k is on
the wire while piece k+1 computes: chunks of one long prompt, or groups of the
sequences of a batch. A chunk's attention reads the keys and values the chunk
before it has just written to the cache at the same layer, so the result is the
plain pass's, up to float rounding of smaller matmuls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from tpi.model.batch import BatchStep, Piece
from tpi.model.config import ModelConfig
from tpi.model.kv_cache import KVCache, SlotCaches
from tpi.model.layers import (
    PHASE_ATTENTION,
    PHASE_MLP,
    AttentionLayout,
    SequenceStep,
    StepContext,
    attention_partial,
    mlp_partial,
    residual_add,
)
from tpi.model.partition import RankSlice
from tpi.model.rope import RotaryTables
from tpi.model.weights import LayerWeights


class LayerSource(Protocol):
    """Hands out layer weights in order; may load and evict them behind the scenes."""

    def start_pass(self) -> None: ...

    def acquire(self, layer: int) -> LayerWeights: ...

    def release(self, layer: int) -> None: ...


class Collective(Protocol):
    """Sums partials over ranks: `start` hands one over, `wait` returns the total."""

    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor: ...

    def start(self, partial: torch.Tensor, layer: int, phase: int, pos: int) -> Any: ...

    def wait(self, pending: Any) -> torch.Tensor: ...

    def pipelined(self) -> contextlib.AbstractContextManager: ...


class LocalCollective:
    """World size 1: a partial sum is already the whole sum."""

    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor:
        return partial

    def start(self, partial: torch.Tensor, layer: int, phase: int, pos: int) -> torch.Tensor:
        return partial

    def wait(self, pending: torch.Tensor) -> torch.Tensor:
        return pending

    @contextlib.contextmanager
    def pipelined(self) -> Iterator[None]:
        yield


class Decoder:
    def __init__(
        self,
        cfg: ModelConfig,
        rank_slice: RankSlice,
        layers: LayerSource,
        collective: Collective,
        dtype: torch.dtype = torch.float32,
        max_positions: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.layers = layers
        self.collective = collective
        self.dtype = dtype
        self.layout = AttentionLayout.for_model(rank_slice, cfg)
        # The KV cache never grows past the planned context (memory budget).
        self.max_positions = min(
            cfg.max_position_embeddings, max_positions or cfg.max_position_embeddings
        )
        self.caches = SlotCaches(
            cfg.num_layers, rank_slice.n_kv, cfg.head_dim, self.max_positions, dtype
        )
        self.rope = RotaryTables(cfg.rope, cfg.head_dim, dtype)
        self.rope_local = (
            RotaryTables(cfg.rope_local, cfg.head_dim, dtype) if cfg.rope_local else None
        )

    @property
    def cache(self) -> KVCache:
        """The cache of slot 0 (the only one of a single-sequence engine)."""
        return self.caches.get(0)

    def forward(self, h: torch.Tensor, pos: int, chunks: int = 1) -> torch.Tensor:
        """Hidden states (T, hidden) for tokens at positions [pos, pos + T) of slot 0.

        With chunks > 1 the block moves through the layers as that many
        consecutive pieces whose allreduces overlap the next piece's compute."""
        return self.run(h, BatchStep.single(pos, h.shape[0]), chunks)

    def _context(self, piece: Piece, ends: dict[int, int]) -> StepContext:
        """`ends`: where each slot's rows of the whole pass end (LongRoPE's choice is
        made per pass, whatever the pieces)."""
        seqs = [SequenceStep(g.pos, g.length, self.caches.get(g.slot)) for g in piece.segments]

        def rows(rope: RotaryTables) -> tuple[torch.Tensor, torch.Tensor]:
            parts = [rope.get(g.pos, g.length, ends[g.slot]) for g in piece.segments]
            if len(parts) == 1:
                return parts[0]
            return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])

        cos, sin = rows(self.rope)
        local = rows(self.rope_local) if self.rope_local is not None else None
        return StepContext(seqs, cos, sin, self.dtype, local)

    @torch.inference_mode()
    def run(self, h: torch.Tensor, batch: BatchStep, pieces: int = 1) -> torch.Tensor:
        """Hidden states (T, hidden) of the rows of `batch`, cut into at most
        `pieces` pieces whose allreduces overlap the next piece's compute.

        Runs in inference mode: no autograd bookkeeping on any op of the pass
        (the layers' few hundred small ops, and the allreduces' views and copies:
        an allreduce at world 3 measured 0.30 -> 0.29 ms, a SmolLM2 token ~3%)."""
        for slot in batch.release:
            self.caches.release(slot)
        for seg in batch.segments:
            self.caches.get(seg.slot).reserve(seg.end)
        parts = batch.pieces(pieces)
        ends = {seg.slot: seg.end for seg in batch.segments}
        steps = [self._context(p, ends) for p in parts]
        hs = [h[p.start : p.end] for p in parts]
        # A piece's allreduces are told apart by its first row (same on every rank).
        keys = [p.start for p in parts]
        # Per piece: its allreduce in flight, and the norm its sum takes (Gemma).
        pending: list[tuple[Any, torch.Tensor | None] | None] = [None] * len(parts)
        cfg = self.cfg
        col = self.collective

        def settle(c: int) -> None:
            # The residual add of piece c's previous phase, once its sum is in.
            if pending[c] is not None:
                handle, post = pending[c]
                hs[c] = residual_add(hs[c], col.wait(handle), post, cfg)
                pending[c] = None

        def kept(t: torch.Tensor | None) -> torch.Tensor | None:
            # A post norm is applied after the layer is released (the sliding window
            # may then reuse its slot): keep a copy of the small vector.
            return None if t is None else t.clone()

        self.layers.start_pass()
        with col.pipelined() if len(parts) > 1 else contextlib.nullcontext():
            for i in range(self.cfg.num_layers):
                w = self.layers.acquire(i)
                window = cfg.sliding_windows[i]
                post_attn, post_mlp = kept(w.post_attn_norm), kept(w.post_mlp_norm)
                for c, step in enumerate(steps):
                    settle(c)
                    part = attention_partial(hs[c], w, self.layout, i, step, cfg, window)
                    pending[c] = (col.start(part, i, PHASE_ATTENTION, keys[c]), post_attn)
                for c in range(len(steps)):
                    settle(c)
                    part = mlp_partial(hs[c], w, cfg)
                    pending[c] = (col.start(part, i, PHASE_MLP, keys[c]), post_mlp)
                del w
                self.layers.release(i)
            for c in range(len(steps)):
                settle(c)
        return hs[0] if len(hs) == 1 else torch.cat(hs)
