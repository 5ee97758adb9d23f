"""Products of a few float32 rows with a 4-bit weight in torch's packed layout
(int4_matmul.c), for decode steps.

torch's int4 kernel takes bfloat16 activations only: every product of a decode
step then costs two conversions besides, and its own products stream the packed
weights at 15-16 GB/s on a 2-core AVX-512 VM (SmolLM2's int4 layers: 4.2-4.4 ms
a token, 5.2 ms with the conversions). Prefills stay with torch's kernel, which
is the faster one there.

Returns None when it cannot serve the call (no compiler, no AVX512-BF16/VBMI, an
unsupported shape): the caller then uses torch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tpi.kernels.native import NativeLibrary

MAX_ROWS = 8  # decode steps and small batches; above, torch's kernel
# The one packed layout the kernel reads (tpi.quant.int4_pack's "b64h", torch's own
# on AVX-512 machines): rows in blocks of 64, row n paired with row n + 32. The
# caller checks that its weights are packed so.
BLOCK_ROWS = 64
HALF_PAIRS = True
K_MULTIPLE = 32


def _bind(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.tpi_matmul_i4.argtypes = [p, i, i, p, p, i, i, p]
    lib.tpi_matmul_i4.restype = ctypes.c_int
    lib.tpi_int4_supported.argtypes = []
    lib.tpi_int4_supported.restype = ctypes.c_int


LIBRARY = NativeLibrary(Path(__file__).with_name("int4_matmul.c"), _bind)


def available() -> bool:
    """Whether this machine runs the kernel (built, with the instructions it needs)."""
    lib = LIBRARY.get()
    return lib is not None and bool(lib.tpi_int4_supported())


def matmul_int4(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int
) -> torch.Tensor | None:
    """x (M, K) @ w.T for w = (q - 8) * scale + zero (torch's int4 semantics), q packed
    (N, K / 2) in the layout above, scale_zero (K / group, N, 2) bfloat16."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    if (
        x.dtype != torch.float32
        or x.dim() != 2
        or not 0 < x.shape[0] <= MAX_ROWS
        or x.shape[1] != k
        or n % BLOCK_ROWS
        or k % K_MULTIPLE
        or group % 2
        or k % group
        or packed.dtype != torch.uint8
        or scale_zero.dtype != torch.bfloat16
        or scale_zero.shape != (k // group, n, 2)
        or not (packed.is_contiguous() and scale_zero.is_contiguous())
        or not available()
    ):
        return None
    lib = LIBRARY.get()
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    ptrs = (packed.data_ptr(), scale_zero.data_ptr())
    if lib.tpi_matmul_i4(x.data_ptr(), x.shape[0], k, *ptrs, group, n, y.data_ptr()):
        return None
    return y
