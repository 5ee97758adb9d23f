"""4-bit weights kept as a GGUF file had them (Q4_0 / Q4_1), in a sliceable form.

w[n, k] = q[n, k] * scale[n, k // g] + minimum[n, k // g], groups of g = 32
along the input dimension. `tpi convert-gguf --keep-quant` stores such weights
in the checkpoint instead of widening them to floats; everything that wants
floats gets them dequantized (bit-identical to the GGUF reader's own), and an
int4 split with the same group size cuts and packs the integers as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GGUF_GROUP = 32
# Names of the three tensors stored for a kept weight `X`: X + suffix.
Q_SUFFIX, SCALE_SUFFIX, MIN_SUFFIX = ".int4", ".int4_scale", ".int4_min"


@dataclass
class Int4Rows:
    q: torch.Tensor  # (N, K) uint8 in 0..15
    scale: torch.Tensor  # (N, K/g) float32
    minimum: torch.Tensor  # (N, K/g) float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        g = self.group
        w = self.q.float().view(n, k // g, g) * self.scale[..., None] + self.minimum[..., None]
        return w.view(n, k).to(dtype)

    def __getitem__(self, index) -> Int4Rows | torch.Tensor:
        """Rows [a:b], or columns [:, a:b] on group boundaries (what a split cuts)."""
        if not isinstance(index, tuple):
            return Int4Rows(self.q[index], self.scale[index], self.minimum[index])
        rows, cols = index
        g = self.group
        if cols.start % g or (cols.stop or self.q.shape[1]) % g:
            return self.dequantize()[index]  # a cut inside a group: floats, requantized later
        groups = slice(cols.start // g, (cols.stop or self.q.shape[1]) // g)
        return Int4Rows(self.q[rows, cols], self.scale[rows, groups], self.minimum[rows, groups])

    def contiguous(self) -> Int4Rows:
        return Int4Rows(self.q.contiguous(), self.scale.contiguous(), self.minimum.contiguous())

    def to_tinygemm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(nibbles (N, K), scale_zero (K/g, N, 2) bf16) for torch's int4 kernel, which
        computes (q - 8) * scale + zero: zero = minimum + 8 * scale."""
        zero = self.minimum + 8 * self.scale
        sz = torch.stack([self.scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16)
        return self.q, sz.contiguous()

    def stored(self, name: str) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of weight `name` (nibbles packed two per byte)."""
        packed = self.q[:, 0::2] | (self.q[:, 1::2] << 4)
        return {
            name + Q_SUFFIX: packed.contiguous(),
            name + SCALE_SUFFIX: self.scale.contiguous(),
            name + MIN_SUFFIX: self.minimum.contiguous(),
        }

    @classmethod
    def from_stored(
        cls, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
    ) -> Int4Rows:
        q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        return cls(q, scale.float(), minimum.float())


def cat_rows(parts: list) -> Int4Rows | torch.Tensor:
    """Stack weights by rows (q/k/v, gate/up): kept integers if all are, else floats."""
    if all(isinstance(p, Int4Rows) and p.group == parts[0].group for p in parts):
        return Int4Rows(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.minimum for p in parts]),
        )
    return torch.cat([p.dequantize() if isinstance(p, Int4Rows) else p for p in parts])


def from_gguf_blocks(data: np.ndarray, rows: int, cols: int, kind: str) -> Int4Rows:
    """Q4_0 / Q4_1 blocks of a GGUF tensor (rows x cols) as Int4Rows.

    A block holds 32 weights: fp16 d (and fp16 m for Q4_1), then 16 bytes whose
    low nibbles are weights 0..15 and high nibbles weights 16..31; Q4_0 decodes
    (q - 8) * d, Q4_1 q * d + m."""
    size = 18 if kind == "Q4_0" else 20
    blocks = np.ascontiguousarray(data).reshape(-1, size)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    if kind == "Q4_0":
        m = -8 * d
        qs = blocks[:, 2:]
    else:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).reshape(rows, cols)
    groups = cols // GGUF_GROUP
    return Int4Rows(
        torch.from_numpy(q.astype(np.uint8)),
        torch.from_numpy(d.reshape(rows, groups).copy()),
        torch.from_numpy(m.reshape(rows, groups).copy()),
    )
