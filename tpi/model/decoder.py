"""Runs this rank's slice of every decoder layer for one forward pass.

The same class serves a single machine, the master and every worker; what
differs between them is only where layer weights come from (`LayerSource`) and
how partial sums are combined (`Collective`).

Overlapped prefill (NanoFlow's nano-batches): a block of tokens may be cut into
chunks that move through each layer one after the other, so that the allreduce
of chunk k is on the wire while chunk k+1 computes. Chunk k+1's attention reads
the keys and values chunk k has just written to the cache at the same layer, so
the result is the plain prefill's, up to float rounding of smaller matmuls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from tpi.model.config import ModelConfig
from tpi.model.kv_cache import KVCache
from tpi.model.layers import (
    PHASE_ATTENTION,
    PHASE_MLP,
    AttentionLayout,
    StepContext,
    attention_partial,
    mlp_partial,
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


def chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """[start, end) of `chunks` nearly equal consecutive pieces of `length` tokens."""
    chunks = max(1, min(chunks, length))
    base, extra = divmod(length, chunks)
    out, start = [], 0
    for c in range(chunks):
        end = start + base + (1 if c < extra else 0)
        out.append((start, end))
        start = end
    return out


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
        self.layout = AttentionLayout.for_slice(rank_slice, cfg.group_size, cfg.head_dim)
        # The KV cache never grows past the planned context (memory budget).
        self.max_positions = min(
            cfg.max_position_embeddings, max_positions or cfg.max_position_embeddings
        )
        self.cache = KVCache(
            cfg.num_layers, rank_slice.n_kv, cfg.head_dim, self.max_positions, dtype
        )
        self.rope = RotaryTables(cfg.rope, cfg.head_dim, dtype)

    def forward(self, h: torch.Tensor, pos: int, chunks: int = 1) -> torch.Tensor:
        """Hidden states (T, hidden) for tokens at positions [pos, pos + T).

        With chunks > 1 the block moves through the layers as that many
        consecutive pieces whose allreduces overlap the next piece's compute."""
        length = h.shape[0]
        self.cache.reserve(pos + length)
        bounds = chunk_bounds(length, chunks)
        steps = []
        for a, b in bounds:
            cos, sin = self.rope.get(pos + a, b - a)
            steps.append(StepContext(pos=pos + a, length=b - a, cos=cos, sin=sin, dtype=self.dtype))
        hs = [h[a:b] for a, b in bounds]
        pending: list[Any] = [None] * len(bounds)
        eps = self.cfg.rms_norm_eps
        col = self.collective

        def settle(c: int) -> None:
            # The residual add of chunk c's previous phase, once its sum is in.
            if pending[c] is not None:
                hs[c] = hs[c] + col.wait(pending[c])
                pending[c] = None

        self.layers.start_pass()
        with col.pipelined() if len(bounds) > 1 else contextlib.nullcontext():
            for i in range(self.cfg.num_layers):
                w = self.layers.acquire(i)
                window = self.cfg.sliding_windows[i]
                for c, step in enumerate(steps):
                    settle(c)
                    part = attention_partial(
                        hs[c], w, self.layout, self.cache, i, step, eps, window
                    )
                    pending[c] = col.start(part, i, PHASE_ATTENTION, step.pos)
                for c, step in enumerate(steps):
                    settle(c)
                    pending[c] = col.start(mlp_partial(hs[c], w, eps), i, PHASE_MLP, step.pos)
                del w
                self.layers.release(i)
            for c in range(len(steps)):
                settle(c)
        return hs[0] if len(hs) == 1 else torch.cat(hs)
