"""Weight containers: a float tensor (as stored, or transposed for decoding),
per-row int8, or group-wise packed int4.

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

from tpi.kernels import small_matmul

QUANT_DTYPE = torch.bfloat16  # activations and scales of the quantized kernels
# torch's int8 kernel reads the input dimension in blocks of 16: other widths
# crash it (seen with torch 2.13: K = 8, 24, 40 segfault). Splits keep such
# matrices bf16; a weight made elsewhere is dequantized instead.
INT8_K_MULTIPLE = 16
# Tensor-name suffixes inside a layer/head file.
INT8_SUFFIX, INT8_SCALE = ".q8", ".scale"
INT4_SUFFIX, INT4_SCALE_ZERO = ".q4", ".sz"
TRANSPOSED_SUFFIX = ".t"  # in memory only: a float weight held as FloatT blocks
WIDE = 16  # N >= WIDE * K: a "wide" matrix (an LM head), see FloatT


@dataclass
class FloatT:
    """A float weight w (N, K) held for decoding, in S blocks that torch's batched
    matmul computes in parallel, one per thread.

    A one-token product x @ w.T is bound by memory bandwidth, and how fast torch
    streams the weight depends on its layout (measured on the 2-core VM, SmolLM2
    shapes, weights read from DRAM): w as stored (N, K) goes through a single-
    threaded path at ~11 GB/s; w.T (K, N) reaches 12-20 GB/s from one core; split
    in 2 blocks for a bmm over 2 threads, rows of w (S, N/S, K) reach 16-26 GB/s
    for the layer matrices and columns of w.T (S, K, N/S) 35 GB/s for the wide LM
    head. The copy into blocks is made once, where the weight stays resident.

    The native kernels (tpi.kernels) read rows of w at any thread count, so where
    they are built a single thread holds rows too: SmolLM2's 30 layers at one
    thread, one row 20.5 ms against 26 for torch on w.T, 128 rows 314 against 345."""

    blocks: torch.Tensor  # (S, K, N/S) "cols", or (S, N/S, K) "rows"
    by_rows: bool

    def __post_init__(self) -> None:
        # The right-hand operand of the product, made once (no per-call view ops).
        b = self.blocks.transpose(1, 2) if self.by_rows else self.blocks
        self._rhs = b[0] if b.shape[0] == 1 else b

    @classmethod
    def of(cls, w: torch.Tensor, threads: int, out: torch.Tensor | None = None) -> FloatT:
        """`w` in blocks for `threads` threads, copied into `out` (a buffer of w's
        size and dtype) if given, else into new memory."""
        n, k = w.shape
        s = threads if threads > 1 and n % threads == 0 else 1
        # Rows of w, except for a very wide matrix (the LM head), whose column
        # blocks of w.T stream faster; and one block for torch alone: w.T.
        by_rows = n < WIDE * k and (s > 1 or small_matmul.library() is not None)
        cols = w.t().reshape(k, s, n // s).permute(1, 0, 2)
        view = w.reshape(s, n // s, k) if by_rows else cols
        if out is None:
            return cls(view.contiguous(), by_rows)
        blocks = out.view(view.shape)
        blocks.copy_(view)
        return cls(blocks, by_rows)

    @property
    def shape(self) -> tuple[int, int]:
        s, a, b = self.blocks.shape
        return (s * a, b) if self.by_rows else (s * b, a)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    @property
    def halves(self) -> bool:
        """Two row blocks: the first and second half of w's rows (gate and up)."""
        return self.by_rows and self.blocks.shape[0] == 2

    def nbytes(self) -> int:
        return _nbytes(self.blocks)

    def block_products(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, K) against each block: (S, T, N/S), block s holding outputs
        [s N/S, (s+1) N/S)."""
        if self._rhs.dim() == 2:
            return (x @ self._rhs)[None]
        return torch.bmm(x.expand(self._rhs.shape[0], *x.shape), self._rhs)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, K) @ w.T -> (T, N)."""
        if self._rhs.dim() == 2:
            return x @ self._rhs
        y = self.block_products(x)
        if x.shape[0] == 1:
            return y.view(1, -1)  # (S, 1, N/S) is already (1, N) in memory
        return y.transpose(0, 1).reshape(x.shape[0], -1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of w (an embedding lookup)."""
        s, a, b = self.blocks.shape
        if self.by_rows:
            return F.embedding(ids, self.blocks.view(s * a, b))
        return self.blocks[ids // b, :, ids % b]


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
        return F.embedding(ids, self.q).to(dtype) * self.scale[ids].to(dtype)[..., None]


@dataclass
class Int4Weight:
    """Group-wise asymmetric int4, packed (see tpi.quant.int4_pack):
    w[n, k] ~= (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]."""

    packed: torch.Tensor  # (N, K/2) uint8, in the layout this machine holds (held_layout)
    scale_zero: torch.Tensor  # (K/g, N, 2) bf16

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], 2 * self.packed.shape[1])

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scale_zero.shape[0]

    def nbytes(self) -> int:
        return _nbytes(self.packed) + _nbytes(self.scale_zero)


Weight = torch.Tensor | FloatT | Int8Weight | Int4Weight


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
    if name + TRANSPOSED_SUFFIX in t:
        return t[name + TRANSPOSED_SUFFIX]  # a FloatT already (never on disk)
    return None


def transposable(name: str, t: torch.Tensor, names: tuple[str, ...]) -> bool:
    """A float matrix among `names` (matmul weights) that decodes faster transposed."""
    return name in names and t.dim() == 2 and t.dtype.is_floating_point


def hold_transposed(tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict:
    """`tensors` with the float matrices among `names` held as FloatT (name + ".t"),
    in blocks for this process's torch threads."""
    threads = torch.get_num_threads()
    return {
        (k + TRANSPOSED_SUFFIX if transposable(k, v, names) else k): (
            FloatT.of(v, threads) if transposable(k, v, names) else v
        )
        for k, v in tensors.items()
    }
