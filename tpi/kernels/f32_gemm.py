"""Products of many float32 rows with a float32 weight held by rows (f32_gemm.c):
a prompt's projections, and batches larger than small_matmul's few rows.

On the 2-core AVX-512 VM, SmolLM2's 30 layers at 128 prompt rows take 148 ms
here against 181 through torch's GEMM on the model's per-thread weight blocks
and the copy of every output into place (184 vs 150 GFLOP/s); a 7B-shaped layer
247 against 419 ms (benchmarks/results/f32_gemm.json).

Returns None when it cannot serve the call (no compiler, another dtype or layout,
no memory for the packed x): the caller then uses torch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tpi.kernels.native import NativeLibrary


def _bind(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.tpi_gemm_f32.argtypes = [p, i, i, p, i, p]
    lib.tpi_gemm_f32.restype = ctypes.c_int


LIBRARY = NativeLibrary(Path(__file__).with_name("f32_gemm.c"), _bind)


def gemm_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) @ w.T for a contiguous float32 w (N, K), as a new (M, N) tensor."""
    n, k = w.shape
    if (
        x.dtype != torch.float32
        or w.dtype != torch.float32
        or x.dim() != 2
        or x.shape[0] == 0
        or x.shape[1] != k
        or not w.is_contiguous()
    ):
        return None
    lib = LIBRARY.get()
    if lib is None:
        return None
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if lib.tpi_gemm_f32(x.data_ptr(), x.shape[0], k, w.data_ptr(), n, y.data_ptr()):
        return None
    return y
