"""One decode token's attention half or MLP half in one native call (decode_layer.c).

A half-layer of a decode step is five kernels (a norm, two products, attention or
the activation between them); called one by one from Python they cost more in
dispatch, views and allocations than SmolLM2's attention arithmetic. Here each
half is one call; the caller describes each product's weight by a `Mat` (which
kind of weight, pointers, shape), as this package knows pointers and shapes only.

Every function returns None when it cannot serve the call (no compiler, a shape
it does not take): the caller then runs the op-by-op path.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tpi.kernels.decode_ops import cache_step_args, contiguous_f32
from tpi.kernels.native import NativeLibrary

F32, INT8, INT4 = 1, 2, 3  # Mat.kind: float32 rows, int8 rows with scales, packed int4


class Mat(ctypes.Structure):
    """A weight (n, k) of one product: `w` and `scale` point into tensors the caller
    keeps alive as long as the Mat is used."""

    _fields_ = [
        ("kind", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("group", ctypes.c_int64),
    ]


def _bind(lib: ctypes.CDLL) -> None:
    p, i, f, m = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.POINTER(Mat)
    lib.tpi_attention_half.argtypes = [p, i, p, f, m, m, p, p, i, p, p, i, i, i, i, i, f, p]
    lib.tpi_attention_half.restype = ctypes.c_int
    lib.tpi_mlp_half.argtypes = [p, i, p, f, m, m, p]
    lib.tpi_mlp_half.restype = ctypes.c_int


LIBRARY = NativeLibrary(Path(__file__).with_name("decode_layer.c"), _bind)


def library() -> ctypes.CDLL | None:
    return LIBRARY.get()


def _row(h: torch.Tensor, norm: torch.Tensor) -> bool:
    hidden = norm.numel()
    return (
        h.dim() == 2
        and h.shape == (1, hidden)
        and norm.shape == (hidden,)
        and contiguous_f32(h, norm)
    )


def attention_half(
    h: torch.Tensor,
    norm: torch.Tensor,
    eps: float,
    qkv: Mat,
    o: Mat,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: int,
    n_q: int,
    scale: float,
) -> torch.Tensor | None:
    """This rank's attention output (1, hidden) for one token h (1, hidden) at `pos`:
    RMSNorm by `norm`, the qkv product (n_q query heads, then the KV heads), rotary
    (tpi.model.rope's rotate-half tables), k and v written to `keys`/`values`
    (n_kv, capacity, hd) at `pos`, attention over [0, pos], the o product."""
    lib = library()
    n_kv, _, hd = keys.shape
    hidden = norm.numel()
    if (
        lib is None
        or not _row(h, norm)
        or (step := cache_step_args(cos, signed_sin, keys, values, pos, n_q, scale)) is None
        or qkv.k != hidden
        or qkv.n != (n_q + 2 * n_kv) * hd
        or o.k != n_q * hd
        or o.n != hidden
    ):
        return None
    out = torch.empty(1, hidden, dtype=torch.float32)
    mats = (ctypes.byref(qkv), ctypes.byref(o))
    rc = lib.tpi_attention_half(
        h.data_ptr(), hidden, norm.data_ptr(), eps, *mats, *step, out.data_ptr()
    )
    return out if rc == 0 else None


def mlp_half(
    h: torch.Tensor, norm: torch.Tensor, eps: float, gate_up: Mat, down: Mat
) -> torch.Tensor | None:
    """This rank's gated-MLP output (1, hidden) for one token h (1, hidden): RMSNorm by
    `norm`, the gate/up product (gate rows first), silu(gate) * up, the down product."""
    lib = library()
    hidden = norm.numel()
    if (
        lib is None
        or not _row(h, norm)
        or gate_up.k != hidden
        or gate_up.n % 2
        or down.k != gate_up.n // 2
        or down.n != hidden
    ):
        return None
    out = torch.empty(1, hidden, dtype=torch.float32)
    args = (ctypes.byref(gate_up), ctypes.byref(down), out.data_ptr())
    rc = lib.tpi_mlp_half(h.data_ptr(), hidden, norm.data_ptr(), eps, *args)
    return out if rc == 0 else None
