"""Weight containers: a float tensor, per-row int8, or group-wise packed int4.

How each format is named inside a layer/head file (suffixes) and which shapes
torch's kernels accept live here, beside the containers, so the quantizer that
writes them (tpi.quant.quantize) and the matmul that reads them
(tpi.model.linear) agree by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

QUANT_DTYPE = torch.bfloat16  # activations and scales of the quantized kernels
# torch's int8 kernel reads the input dimension in blocks of 16: other widths
# crash it (seen with torch 2.13: K = 8, 24, 40 segfault). Splits keep such
# matrices bf16; a weight made elsewhere is dequantized instead.
INT8_K_MULTIPLE = 16
# Tensor-name suffixes inside a layer/head file.
INT8_SUFFIX, INT8_SCALE = ".q8", ".scale"
INT4_SUFFIX, INT4_SCALE_ZERO = ".q4", ".sz"


@dataclass
class Int8Weight:
    """Per-output-channel int8: w[n, k] ~= q[n, k] * scale[n]."""

    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) bf16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def nbytes(self) -> int:
        return _nbytes(self.q) + _nbytes(self.scale)

    def dequantize(self, dtype: torch.dtype = QUANT_DTYPE) -> torch.Tensor:
        return self.q.to(dtype) * self.scale.to(dtype)[:, None]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows `ids` (an embedding lookup)."""
        return F.embedding(ids, self.q).to(dtype) * self.scale.to(dtype)[ids][..., None]


@dataclass
class Int4Weight:
    """Group-wise asymmetric int4 in torch's packed layout (see tpi.quant.int4_pack):
    w[n, k] ~= (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]."""

    packed: torch.Tensor  # (N, K/2) uint8, this machine's native layout
    scale_zero: torch.Tensor  # (K/g, N, 2) bf16

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], 2 * self.packed.shape[1])

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scale_zero.shape[0]

    def nbytes(self) -> int:
        return _nbytes(self.packed) + _nbytes(self.scale_zero)


Weight = torch.Tensor | Int8Weight | Int4Weight


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_nbytes(w: Weight | None) -> int:
    if w is None:
        return 0
    return _nbytes(w) if isinstance(w, torch.Tensor) else w.nbytes()


def weight_rows(w: Weight) -> int:
    """Output features (rows) of a weight."""
    return w.shape[0]


def int8_fits(shape: tuple[int, ...]) -> bool:
    return shape[1] % INT8_K_MULTIPLE == 0


def weight_from_tensors(t: Mapping[str, torch.Tensor], name: str) -> Weight | None:
    """The weight `name` of a layer/head file, float or quantized; None if absent."""
    if name in t:
        return t[name]
    if name + INT8_SUFFIX in t:
        return Int8Weight(t[name + INT8_SUFFIX], t[name + INT8_SCALE])
    if name + INT4_SUFFIX in t:
        return Int4Weight(t[name + INT4_SUFFIX], t[name + INT4_SCALE_ZERO])
    return None
