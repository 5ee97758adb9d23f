"""Runs this rank's slice of every decoder layer for one forward pass.

The same class serves a single machine, the master and every worker; what
differs between them is only where layer weights come from (`LayerSource`) and
how partial sums are combined (`Collective`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from tpi.config import ModelConfig
from tpi.kv_cache import KVCache
from tpi.layers import AttentionLayout, StepContext, decoder_layer
from tpi.partition import RankSlice
from tpi.rope import RotaryTables
from tpi.weights import LayerWeights


class LayerSource(Protocol):
    """Hands out layer weights in order; may load and evict them behind the scenes."""

    def start_pass(self) -> None: ...

    def acquire(self, layer: int) -> LayerWeights: ...

    def release(self, layer: int) -> None: ...


class Collective(Protocol):
    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor: ...


class ResidentLayers:
    """All layers held in memory; nothing to load or evict."""

    def __init__(self, layers: list[LayerWeights]) -> None:
        self.layers = layers

    def start_pass(self) -> None:
        pass

    def acquire(self, layer: int) -> LayerWeights:
        return self.layers[layer]

    def release(self, layer: int) -> None:
        pass

    def nbytes(self) -> int:
        return sum(w.nbytes() for w in self.layers)


class LocalCollective:
    """World size 1: a partial sum is already the whole sum."""

    def allreduce(self, partial: torch.Tensor, layer: int, phase: int) -> torch.Tensor:
        return partial


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

    def forward(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        """Hidden states (T, hidden) for tokens at positions [pos, pos + T)."""
        length = h.shape[0]
        self.cache.reserve(pos + length)
        cos, sin = self.rope.get(pos, length)
        step = StepContext(pos=pos, length=length, cos=cos, sin=sin, dtype=self.dtype)
        eps = self.cfg.rms_norm_eps
        self.layers.start_pass()
        for i in range(self.cfg.num_layers):
            w = self.layers.acquire(i)

            def allreduce(x: torch.Tensor, phase: int, _layer: int = i) -> torch.Tensor:
                return self.collective.allreduce(x, _layer, phase)

            h = decoder_layer(
                h, w, self.layout, self.cache, i, step, eps, self.cfg.sliding_windows[i], allreduce
            )
            del w
            self.layers.release(i)
        return h
