"""The small per-layer operations of a float32 decode step as single native calls
(decode_ops.c): RMSNorm, and one token's rotary + cache write + attention; and
that attention for every row of a prompt; silu(gate) * up.

Every function returns None when it cannot serve the call (no compiler, a dtype,
shape or layout it does not handle): the caller then uses torch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tpi.kernels.native import NativeLibrary


def _bind(lib: ctypes.CDLL) -> None:
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.tpi_rms_norm_f32.argtypes = [p, i, i, p, f, p]
    lib.tpi_rms_norm_f32.restype = None
    lib.tpi_attend_one_f32.argtypes = [p, p, p, i, p, p, i, i, i, i, i, f, p]
    lib.tpi_attend_one_f32.restype = ctypes.c_int
    lib.tpi_attend_rows_f32.argtypes = [p, i, i, p, p, i, i, i, i, i, f, p]
    lib.tpi_attend_rows_f32.restype = ctypes.c_int
    lib.tpi_silu_mul_f32.argtypes = [p, p, i, i, i, p]
    lib.tpi_silu_mul_f32.restype = None


LIBRARY = NativeLibrary(Path(__file__).with_name("decode_ops.c"), _bind)


def contiguous_f32(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in ts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x / rms(x) * weight over the last dimension, for contiguous float32 x and weight."""
    k = x.shape[-1] if x.dim() else 0
    lib = LIBRARY.get()
    if lib is None or not k or weight.shape != (k,) or not contiguous_f32(x, weight):
        return None
    out = torch.empty_like(x)
    lib.tpi_rms_norm_f32(x.data_ptr(), x.numel() // k, k, weight.data_ptr(), eps, out.data_ptr())
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for float32 (T, n) gate and up with rows at the same stride
    (the halves of one fused gate/up product), as a new (T, n) tensor."""
    lib = LIBRARY.get()
    if (
        lib is None
        or gate.dim() != 2
        or gate.shape != up.shape
        or gate.stride() != up.stride()
        or gate.stride(1) != 1
        or gate.dtype != torch.float32
        or up.dtype != torch.float32
    ):
        return None
    t, n = gate.shape
    out = torch.empty(t, n, dtype=torch.float32)
    lib.tpi_silu_mul_f32(gate.data_ptr(), up.data_ptr(), gate.stride(0), t, n, out.data_ptr())
    return out


def cache_step_args(
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: int,
    n_q: int,
    scale: float,
) -> tuple | None:
    """The native attention's arguments for one token's rotary tables, this layer's
    cache buffers (n_kv, capacity, hd), position and heads (here and in a fused
    half-layer, tpi.kernels.decode_layer); None where they are not what it takes."""
    n_kv, cap, hd = keys.shape
    rot = cos.shape[-1] if cos.dim() else 0
    if (
        n_q % n_kv
        or not 0 <= pos < cap
        or rot > hd
        or rot % 2
        or cos.numel() != rot
        or signed_sin.numel() != rot
        or values.shape != keys.shape
        or not contiguous_f32(cos, signed_sin, keys, values)
    ):
        return None
    tables = (cos.data_ptr(), signed_sin.data_ptr(), rot)
    return (*tables, keys.data_ptr(), values.data_ptr(), cap, pos, n_q, n_kv, hd, scale)


def attend_one(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: int,
    n_q: int,
    scale: float,
    out: torch.Tensor,
) -> bool:
    """One token of one sequence: rotary (the rotate-half tables of tpi.model.rope)
    on its q and k heads, k and v stored at `pos` of this layer's cache buffers
    `keys`/`values` (n_kv, capacity, hd), and every q head's softmax attention over
    positions [0, pos] of its KV head, written to `out` (n_q * hd). qkv holds the
    n_q query heads, then the n_kv key and n_kv value heads. False: not done."""
    n_kv, _, hd = keys.shape
    lib = LIBRARY.get()
    if (
        lib is None
        or (step := cache_step_args(cos, signed_sin, keys, values, pos, n_q, scale)) is None
        or qkv.numel() != (n_q + 2 * n_kv) * hd
        or out.numel() != n_q * hd
        or not contiguous_f32(qkv, out)
    ):
        return False
    return lib.tpi_attend_one_f32(qkv.data_ptr(), *step, out.data_ptr()) == 0


def attend_rows(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int, scale: float
) -> torch.Tensor | None:
    """Causal attention of T rows at positions [pos, pos + T) of one sequence: q
    (T, n_q, hd), rotary applied, rows at any stride; keys/values this layer's cache
    buffers (n_kv, capacity, hd) holding positions [0, pos + T). Row t attends to
    [0, pos + t] exactly as attend_one would at its position. -> (T, n_q * hd)."""
    n_kv, cap, hd = keys.shape
    t, n_q = q.shape[0], q.shape[1]
    lib = LIBRARY.get()
    if (
        lib is None
        or q.dim() != 3
        or q.shape[2] != hd
        or t == 0
        or n_q % n_kv
        or not 0 <= pos <= cap - t
        or q.dtype != torch.float32
        or q.stride(2) != 1
        or q.stride(1) != hd
        or values.shape != keys.shape
        or not contiguous_f32(keys, values)
    ):
        return None
    out = torch.empty(t, n_q * hd, dtype=torch.float32)
    args = (q.data_ptr(), q.stride(0), t, keys.data_ptr(), values.data_ptr(), cap, pos)
    if lib.tpi_attend_rows_f32(*args, n_q, n_kv, hd, scale, out.data_ptr()):
        return None
    return out
