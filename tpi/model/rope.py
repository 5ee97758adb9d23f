"""Rotary position embedding tables (HF "rotate_half" convention).

cos/sin are computed in float32 for all positions up to a capacity that grows
on demand, then cast to the compute dtype; every rank builds its own table, so
nothing rotary ever crosses the wire.

rotate_half(x) = cat(-x2, x1) is applied as roll(x, half) * [-sin1, sin2]: the
sign lives in the table, so a rotation costs three ops (mul, roll, addcmul),
and queries and keys are rotated together. With a partial rotary factor (Phi-4-
mini) only the first dimensions of each head are rotated, the rest pass.

LongRoPE (Phi-3/3.5) keeps two tables: the short factors while a sequence is
within the original context, the long ones once a pass reaches beyond it. As
transformers' forward does, the choice is made per forward pass, by the end of
the sequence's rows in it, and keys cached before the switch keep their short
rotation. (transformers' generate() instead recomputes the whole cache with the
long factors at the switch, Phi3ForCausalLM.prepare_inputs_for_generation; past
the original context, 4096 tokens for Phi-3.5-mini, the two can differ.)
"""

from __future__ import annotations

import math

import torch

from tpi.model.config import RopeConfig


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    return int(head_dim * rope.partial_rotary)


def inverse_frequencies(rope: RopeConfig, head_dim: int, long: bool = False) -> torch.Tensor:
    dim = rotary_dim(rope, head_dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope.rope_type == "longrope":
        ext = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (ext * rope.theta**exponents)
    inv = 1.0 / (rope.theta**exponents)
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


class _Table:
    def __init__(self, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype) -> None:
        self.inv_freq = inv_freq
        self.scale = scale
        self.dtype = dtype
        dim = 2 * inv_freq.numel()
        self.cos = torch.empty(0, dim, dtype=dtype)
        self.sin = torch.empty(0, dim, dtype=dtype)  # signed: [-sin, +sin] halves

    def get(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if end > self.cos.shape[0]:
            cap = max(end, 2 * self.cos.shape[0], 256)
            freqs = torch.outer(torch.arange(cap, dtype=torch.float32), self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
            # LongRoPE's attention factor scales both, in float32 (as transformers).
            self.cos = (emb.cos() * self.scale).to(self.dtype)
            self.sin = (sin * self.scale).to(self.dtype)
        return self.cos[start:end, None], self.sin[start:end, None]


class RotaryTables:
    def __init__(self, rope: RopeConfig, head_dim: int, dtype: torch.dtype) -> None:
        self.rope = rope
        self.inv_freq = inverse_frequencies(rope, head_dim)
        self.dtype = dtype
        scale = rope.attention_factor
        self._short = _Table(self.inv_freq, scale, dtype)
        self._long = (
            _Table(inverse_frequencies(rope, head_dim, long=True), scale, dtype)
            if rope.rope_type == "longrope"
            else None
        )

    def table_for(self, seq_end: int) -> int:
        """0 (short factors) or 1 (long) for a sequence whose rows end at `seq_end`."""
        return int(self._long is not None and seq_end > self.rope.original_max_position_embeddings)

    def get(
        self, start: int, length: int, seq_end: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions [start, start + length), each
        (length, 1, rotary_dim): they broadcast over (T, heads, rotary_dim).
        `seq_end`: where the sequence's rows of this pass end (LongRoPE's choice),
        when the pass runs in pieces."""
        end = start + length
        table = self._long if self.table_for(seq_end or end) else self._short
        return table.get(start, end)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, head_dim) by position (tables from RotaryTables.get); with
    tables narrower than head_dim, only the first dimensions (partial rotary)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(rot // 2, -1), signed_sin)
    xr = x[..., :rot]
    return torch.cat([torch.addcmul(xr * cos, xr.roll(rot // 2, -1), signed_sin), x[..., rot:]], -1)
