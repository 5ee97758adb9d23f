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

import torch
import torch.nn.functional as F

from tpi.errors import TpiError
from tpi.quant.formats import QUANT_DTYPE, FloatT, Int8Weight, Weight, int8_fits

DEQUANT_MIN_TOKENS = 96


_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}
SCRATCH_MAX_BYTES = 32 << 20  # larger matrices get a fresh buffer: memory over speed


def _dequantized(w: Int8Weight) -> torch.Tensor:
    """w as bf16, in a buffer kept per shape where it is small: a fresh multi-MB
    tensor per matmul is mapped and faulted in page by page each time (measured:
    the dequantize then cost about as much as the GEMM)."""
    buf = _SCRATCH.get(w.shape)
    if buf is None:
        buf = torch.empty(w.shape, dtype=QUANT_DTYPE)
        if buf.numel() * buf.element_size() <= SCRATCH_MAX_BYTES:
            _SCRATCH[w.shape] = buf
    return torch.mul(w.q, w.scale[:, None], out=buf)


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, K) @ w.T (+ bias) -> (T, N) in x's dtype."""
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
    else:
        y = torch._weight_int4pack_mm_for_cpu(
            x.to(QUANT_DTYPE).contiguous(), w.packed, w.group_size, w.scale_zero
        )
    y = y.to(x.dtype)
    return y if bias is None else y + bias


def embedding_rows(ids: torch.Tensor, w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of an embedding table, in `dtype`."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w).to(dtype)
    if isinstance(w, FloatT):
        return w.rows(ids).to(dtype)
    if isinstance(w, Int8Weight):
        return w.rows(ids, dtype)
    raise TpiError("an int4 embedding table cannot be looked up (it is stored as int8)")
