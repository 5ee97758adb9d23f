"""Rotary position embedding tables (HF "rotate_half" convention).

cos/sin are computed in float32 for all positions up to a capacity that grows
on demand, then cast to the compute dtype; every rank builds its own table, so
nothing rotary ever crosses the wire.

rotate_half(x) = cat(-x2, x1) is applied as roll(x, half) * [-sin1, sin2]: the
sign lives in the table, so a rotation costs three ops (mul, roll, addcmul),
and queries and keys are rotated together.
"""

from __future__ import annotations

import math

import torch

from tpi.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
        # the band in between interpolated smoothly.
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class RotaryTables:
    def __init__(self, rope: RopeConfig, head_dim: int, dtype: torch.dtype) -> None:
        self.inv_freq = inverse_frequencies(rope, head_dim)
        self.dtype = dtype
        self._cos = torch.empty(0, head_dim, dtype=dtype)
        self._sin = torch.empty(0, head_dim, dtype=dtype)  # signed: [-sin, +sin] halves

    def _grow(self, n: int) -> None:
        cap = max(n, 2 * self._cos.shape[0], 256)
        freqs = torch.outer(torch.arange(cap, dtype=torch.float32), self.inv_freq)
        self._cos = torch.cat([freqs, freqs], dim=-1).cos().to(self.dtype)
        self._sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1).to(self.dtype)

    def get(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions [start, start + length), each
        (length, 1, head_dim): they broadcast over (T, heads, head_dim)."""
        end = start + length
        if end > self._cos.shape[0]:
            self._grow(end)
        return self._cos[start:end, None], self._sin[start:end, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, head_dim) by position (tables from RotaryTables.get)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)
