"""Linear layers over float or weight-only quantized weights: the one matmul of the model math.

Quantized weights stay quantized in memory and are multiplied by torch's packed
weight-only kernels. Those kernels are fast only with bfloat16 activations
(measured on a 2-core AVX512 VM, 11008x4096, one token: fp32 8.6 ms, bf16 4.6 ms,
int8 1.6 ms and int4 1.2 ms with bf16 activations, but 19 ms and 38 ms with fp32
activations), so the input of a quantized (or bf16-stored) matmul is rounded to
bf16 and its output returned in the caller's dtype; norms, attention, residuals
and the KV cache keep the compute dtype.

For long prefills the per-token kernels lose to one dequantization plus a bf16
GEMM (int8 at 512 tokens: 349 ms vs 64 + 106 ms), so int8 switches over above
DEQUANT_MIN_TOKENS rows; that copy is per forward pass of many tokens, never per
token of a decode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tpi.errors import TpiError

QUANT_DTYPE = torch.bfloat16  # activations and scales of the quantized kernels
DEQUANT_MIN_TOKENS = 192
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
    """Group-wise asymmetric int4 in torch's packed layout (see tpi.int4_pack):
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


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, K) @ w.T (+ bias) -> (T, N) in x's dtype."""
    if isinstance(w, torch.Tensor):
        if w.dtype == x.dtype:
            return F.linear(x, w, bias)
        y = F.linear(x.to(w.dtype), w)
    elif isinstance(w, Int8Weight):
        xq = x.to(QUANT_DTYPE).contiguous()
        if x.shape[0] >= DEQUANT_MIN_TOKENS or not int8_fits(w.shape):
            y = F.linear(xq, w.dequantize())
        else:
            y = torch.ops.aten._weight_int8pack_mm(xq, w.q, w.scale)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(QUANT_DTYPE).contiguous(), w.packed, w.group_size, w.scale_zero
        )
    y = y.to(x.dtype)
    return y if bias is None else y + bias


def embedding_rows(ids: torch.Tensor, w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of an embedding table, in `dtype`."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w).to(dtype)
    if isinstance(w, Int8Weight):
        return w.rows(ids, dtype)
    raise TpiError("an int4 embedding table cannot be looked up (it is stored as int8)")


def weight_from_tensors(t: Mapping[str, torch.Tensor], name: str) -> Weight | None:
    """The weight `name` of a layer/head file, float or quantized; None if absent."""
    if name in t:
        return t[name]
    if name + INT8_SUFFIX in t:
        return Int8Weight(t[name + INT8_SUFFIX], t[name + INT8_SCALE])
    if name + INT4_SUFFIX in t:
        return Int4Weight(t[name + INT4_SUFFIX], t[name + INT4_SCALE_ZERO])
    return None
