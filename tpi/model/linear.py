"""Linear layers over float or weight-only quantized weights: the one matmul of the model math.

Quantized weights stay quantized in memory and are multiplied by torch's packed
weight-only kernels. Those kernels are fast only with bfloat16 activations
(measured on a 2-core AVX512 VM, 11008x4096, one token: fp32 8.6 ms, bf16 4.6 ms,
int8 1.6 ms and int4 1.2 ms with bf16 activations, but 19 ms and 38 ms with fp32
activations), so the input of a quantized (or bf16-stored) matmul is rounded to
bf16 and its output returned in the caller's dtype; norms, attention, residuals
and the KV cache keep the compute dtype.

For long prefills torch's per-token kernels lose to one dequantization plus a bf16
GEMM (int8 at 512 tokens: 349 ms vs 64 + 106 ms), so without the native kernels int8
switches over above DEQUANT_MIN_TOKENS rows; that copy is per forward pass of many
tokens, never per token of a decode.

Products with float32 rows go to the native kernels where they are built
(tpi.kernels): float32 weights for a few rows (small_matmul; a decode step, one row
per sequence of a batch) and for more (f32_gemm; a prompt), int8 weights for any
number of rows (small_matmul; decode, batches and prefill: they read every weight
once for all rows, against activations rounded to bf16 where the CPU has bf16 dot
products, as torch's kernel rounds them; two int8 digits on AArch64 with dot
products; float32 as they are), and int4 weights (int4_matmul: on x86 a few rows,
torch's packed layout read as it is; on AArch64 any number, in the layout splits
store). Anything they cannot serve falls through to torch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tpi.errors import TpiError
from tpi.kernels.f32_gemm import gemm_f32
from tpi.kernels.int4_matmul import matmul_int4
from tpi.kernels.small_matmul import MAX_ROWS as SMALL_ROWS
from tpi.kernels.small_matmul import matmul_f32, matmul_f32_cols, matmul_int8
from tpi.quant.formats import QUANT_DTYPE, FloatT, Int4Weight, Int8Weight, Weight, int8_fits
from tpi.quant.int4_pack import held_layout, kernel_layout, native_layout, unpack

DEQUANT_MIN_TOKENS = 96


_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}
SCRATCH_MAX_BYTES = 32 << 20  # larger matrices get a fresh buffer: memory over speed


def _scratch_kept(shape: tuple[int, ...]) -> bool:
    return shape[0] * shape[1] * QUANT_DTYPE.itemsize <= SCRATCH_MAX_BYTES


def _dequantized(w: Int8Weight) -> torch.Tensor:
    """w as bf16, in a buffer kept per shape where it is small: a fresh multi-MB
    tensor per matmul is mapped and faulted in page by page each time (measured:
    the dequantize then cost about as much as the GEMM)."""
    buf = _SCRATCH.get(w.shape)
    if buf is None:
        buf = torch.empty(w.shape, dtype=QUANT_DTYPE)
        if _scratch_kept(w.shape):
            _SCRATCH[w.shape] = buf
    return torch.mul(w.q, w.scale[:, None], out=buf)


@functools.cache
def int4_packed_for_the_kernel() -> bool:
    """Whether this machine's int4 weights (held in tpi.quant.int4_pack.held_layout)
    are packed as the native int4 kernel reads them."""
    kernel = kernel_layout()
    return kernel is not None and held_layout() == kernel


def _int4_dequantized(w: Int4Weight) -> torch.Tensor:
    """w as float32, from a layout torch's int4 kernel does not read (AArch64's
    kernel's, with that kernel turned off after the weights were loaded)."""
    q = unpack(w.packed, held_layout()).float()
    n, k = q.shape
    s, z = w.scale_zero[..., 0].float().t(), w.scale_zero[..., 1].float().t()
    g = w.group_size
    return ((q.view(n, k // g, g) - 8) * s[..., None] + z[..., None]).view(n, k)


def _native(x: torch.Tensor, w: Weight) -> torch.Tensor | None:
    """x @ w.T by the native kernels, or None where they do not serve."""
    if x.dtype != torch.float32:
        return None
    if isinstance(w, Int8Weight):
        # Faster than torch's int8 kernel at every row count measured (a 7B-shaped
        # layer: 8 rows 14 vs 26 ms, 64 rows 92 vs 199 ms), and than dequantizing
        # for torch's bf16 GEMM (SmolLM2's layers, 2 threads: 128 rows 85 vs 123 ms,
        # 512 rows 316 vs 335 ms; a 7B-shaped layer 162 vs 385 ms and 663 vs 744 ms).
        # One kernel for every count keeps a sequence's numbers the same whether
        # its rows run alone, in a batch or in prefill chunks of any size.
        return matmul_int8(x, w.q, w.scale)
    if isinstance(w, Int4Weight):
        # A few rows (decode): no bf16 round trip around torch's kernel, and products
        # at memory speed (SmolLM2's int4 layers, one row: 3.2-3.4 vs 4.9-5.7 ms).
        if not int4_packed_for_the_kernel():
            return None
        return matmul_int4(x, w.packed, w.scale_zero, w.group_size)
    if isinstance(w, FloatT):
        if w.by_rows:
            return _float_rows(x, w.blocks.view(-1, w.blocks.shape[-1]))
        # Column blocks (an LM head): torch's transposed product is the faster
        # one for a single row (measured 3.1 vs 4.5 ms for SmolLM2's head).
        return matmul_f32_cols(x, w.blocks) if x.shape[0] > 1 else None
    if isinstance(w, torch.Tensor):
        return _float_rows(x, w)
    return None


def _float_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x @ w.T for a float weight held by rows: a few rows (decode) stream w once
    for all of them; more (a prompt) go to the GEMM, faster than torch's there
    (SmolLM2's layers at 128 rows: 148 vs 181 ms, tpi.kernels.f32_gemm)."""
    if x.shape[0] <= SMALL_ROWS:
        return matmul_f32(x, w)
    return gemm_f32(x, w)


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, K) @ w.T (+ bias) -> (T, N) in x's dtype."""
    y = _native(x, w)
    if y is None:
        return _torch_linear(x, w, bias)
    return y if bias is None else y + bias


def _torch_linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """linear() by torch's kernels."""
    if isinstance(w, FloatT):
        if w.dtype == x.dtype:
            y = w.matmul(x)
            return y if bias is None else y + bias
        y = w.matmul(x.to(w.dtype))
    elif isinstance(w, torch.Tensor):
        if w.dtype == x.dtype:
            return F.linear(x, w, bias)
        y = F.linear(x.to(w.dtype), w)
    elif isinstance(w, Int8Weight):
        xq = x.to(QUANT_DTYPE)
        if x.shape[0] >= DEQUANT_MIN_TOKENS or not int8_fits(w.shape):
            y = F.linear(xq, _dequantized(w))
        else:
            # The torch.* binding, not torch.ops: it releases the GIL and dispatches faster.
            y = torch._weight_int8pack_mm(xq.contiguous(), w.q, w.scale)
    elif held_layout() != native_layout():
        return F.linear(x, _int4_dequantized(w).to(x.dtype), bias)
    else:
        y = torch._weight_int4pack_mm_for_cpu(
            x.to(QUANT_DTYPE).contiguous(), w.packed, w.group_size, w.scale_zero
        )
    y = y.to(x.dtype)
    return y if bias is None else y + bias


def gate_and_up(
    x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of x @ w.T (+ bias) for a fused gate/up weight (gate rows first)."""
    y = _native(x, w)
    if y is None:
        if isinstance(w, FloatT) and w.halves and w.dtype == x.dtype and bias is None:
            gate, up = w.block_products(x)  # the two row blocks are gate and up: no copy
            return gate, up
        y = _torch_linear(x, w, bias)  # the native kernels already declined
    elif bias is not None:
        y = y + bias
    return y.chunk(2, dim=-1)


def embedding_rows(ids: torch.Tensor, w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of an embedding table, in `dtype`."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w).to(dtype)
    if isinstance(w, FloatT):
        return w.rows(ids).to(dtype)
    if isinstance(w, Int8Weight):
        return w.rows(ids, dtype)
    raise TpiError("an int4 embedding table cannot be looked up (it is stored as int8)")
