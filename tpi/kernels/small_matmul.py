"""Products of a few rows with a float32 or int8 weight, read once (small_matmul.c).

Used by tpi.model.linear for decode steps: one row per sequence of a batch. torch's
kernels are slow exactly there (measured on a 2-core AVX-512 VM, weights from
DRAM, benchmarks/results/small_matmul.json): float32 weights held in blocks for
torch's batched matmul take 1.4-1.6x as long for 2-8 rows as for one, torch's int8
kernel 1.2-3x, and it takes bfloat16 activations only, so every product costs
two conversions besides.

Every function returns None when it cannot serve the call (no compiler, an
unsupported shape): the caller then uses torch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tpi.kernels.native import NativeLibrary

MAX_ROWS = 8  # float32: above this torch's GEMM is the better kernel (int8: no limit)
K_MULTIPLE = 16  # the kernels read rows 16 floats at a time


def _bind(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.tpi_matmul_f32.argtypes = [p, i, i, p, i, p]
    lib.tpi_matmul_f32_cols.argtypes = [p, i, i, p, i, i, p]
    lib.tpi_matmul_i8.argtypes = [p, i, i, p, p, i, p]
    lib.tpi_int8_rounds_to_bf16.argtypes = [i]
    lib.tpi_int8_activations.argtypes = [i]
    lib.tpi_int8_activations.restype = ctypes.c_int
    for f in (lib.tpi_matmul_f32, lib.tpi_matmul_f32_cols):
        f.restype = None
    lib.tpi_matmul_i8.restype = ctypes.c_int
    lib.tpi_int8_rounds_to_bf16.restype = ctypes.c_int


LIBRARY = NativeLibrary(Path(__file__).with_name("small_matmul.c"), _bind)
library = LIBRARY.get  # the compiled kernels (built on first call), or None


def _rows_ok(x: torch.Tensor, k: int, max_rows: int | None = MAX_ROWS) -> bool:
    return (
        x.dtype == torch.float32
        and x.dim() == 2
        and 0 < x.shape[0] <= (max_rows or x.shape[0])
        and x.shape[1] == k
        and k % K_MULTIPLE == 0
    )


def _out(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    return x, torch.empty(x.shape[0], n, dtype=torch.float32)


def matmul_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) @ w.T for a contiguous float32 w (N, K)."""
    n, k = w.shape
    lib = library()
    if lib is None or not _rows_ok(x, k) or w.dtype != torch.float32 or not w.is_contiguous():
        return None
    x, y = _out(x, n)
    lib.tpi_matmul_f32(x.data_ptr(), x.shape[0], k, w.data_ptr(), n, y.data_ptr())
    return y


def matmul_f32_cols(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) @ [b_0 | b_1 | ...] for contiguous float32 column blocks (S, K, Nb)."""
    s, k, nb = blocks.shape
    lib = library()
    if (
        lib is None
        or not _rows_ok(x, k)
        or nb % K_MULTIPLE
        or blocks.dtype != torch.float32
        or not blocks.is_contiguous()
    ):
        return None
    x, y = _out(x, s * nb)
    lib.tpi_matmul_f32_cols(x.data_ptr(), x.shape[0], k, blocks.data_ptr(), s, nb, y.data_ptr())
    return y


def matmul_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) @ (q * scale[:, None]).T for int8 q (N, K) and bfloat16 scale (N,)."""
    n, k = q.shape
    lib = library()
    if (
        lib is None
        or not _rows_ok(x, k, max_rows=None)
        or q.dtype != torch.int8
        or scale.dtype != torch.bfloat16
        or scale.shape != (n,)
        or not (q.is_contiguous() and scale.is_contiguous())
    ):
        return None
    x, y = _out(x, n)
    if lib.tpi_matmul_i8(
        x.data_ptr(), x.shape[0], k, q.data_ptr(), scale.data_ptr(), n, y.data_ptr()
    ):
        return None  # no memory for x in bfloat16: torch's kernel needs none
    return y


def int8_rounds_to_bf16(k: int) -> bool:
    """Whether matmul_int8 rounds activations of width k to bfloat16 on this CPU
    (AVX512-BF16 dot products) rather than multiplying them as float32."""
    lib = library()
    return bool(lib is not None and lib.tpi_int8_rounds_to_bf16(k))


AS_FLOAT32, AS_BF16, AS_DIGITS = 0, 1, 2  # how matmul_int8 takes its activations


def int8_activations(k: int) -> int:
    """How matmul_int8 takes activations of width k on this CPU: as float32, rounded
    to bfloat16 (x86 with AVX512-BF16) or as two int8 digits a row (AArch64 with dot
    products, tpi.kernels.digits)."""
    lib = library()
    return int(lib.tpi_int8_activations(k)) if lib is not None else AS_FLOAT32
