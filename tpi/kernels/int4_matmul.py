"""Products of float32 rows with a 4-bit weight (int4_matmul.c): on x86, a few rows
(decode steps) with weights in torch's packed layout; on AArch64 any number of
rows, with weights in the layout splits store (tpi.quant.int4_pack's "rows").

torch's int4 kernel takes bfloat16 activations only: every product of a decode
step then costs two conversions besides, and its own products stream the packed
weights at 15-16 GB/s on a 2-core AVX-512 VM (SmolLM2's int4 layers: 4.2-4.4 ms
a token, 5.2 ms with the conversions). Prefills stay with torch's kernel, which
is the faster one there.

On AArch64 torch's int4 kernel cannot read the weights as held (tpi.quant.int4_pack
makes the layout of whichever kernel runs), so there this kernel takes prompts too.

Returns None when it cannot serve the call (no compiler, x86 without
AVX512-BF16/VBMI, an unsupported shape): the caller then uses torch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tpi.kernels.native import NativeLibrary

MAX_ROWS = 8  # x86: decode steps and small batches; above, torch's kernel
# x86's layout ("b64h", torch's own on AVX-512 machines): rows in blocks of 64, row n
# paired with row n + 32. AArch64 reads "rows": N in tiles of 4, x in chunks of 32.
BLOCK_ROWS = 64
HALF_PAIRS = True
K_MULTIPLE = 32
ROWS_LAYOUT = 0  # tpi_int4_layout's code for "rows"
ROWS_TILE = 4


def _bind(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.tpi_matmul_i4.argtypes = [p, i, i, p, p, i, i, p]
    lib.tpi_matmul_i4.restype = ctypes.c_int
    lib.tpi_int4_pack_blocks.argtypes = [p, i, i, i, ctypes.c_int, p]
    lib.tpi_int4_pack_blocks.restype = None
    for f in (lib.tpi_int4_supported, lib.tpi_int4_layout, lib.tpi_int4_activations):
        f.argtypes = []
        f.restype = ctypes.c_int


LIBRARY = NativeLibrary(Path(__file__).with_name("int4_matmul.c"), _bind)


def available() -> bool:
    """Whether this machine runs the kernel (built, with the instructions it needs)."""
    lib = LIBRARY.get()
    return lib is not None and bool(lib.tpi_int4_supported())


def layout_code() -> int | None:
    """The layout the kernel reads (tpi_int4_layout: 2 * block rows + 1 for half
    pairs, 0 for "rows"), None where it does not run."""
    lib = LIBRARY.get()
    if lib is None or not lib.tpi_int4_supported():
        return None
    return int(lib.tpi_int4_layout())


def activations() -> int:
    """How the kernel takes x: 0 as float32, 1 rounded to bfloat16, 2 as two int8
    digits per weight group (tpi.kernels.digits)."""
    lib = LIBRARY.get()
    return int(lib.tpi_int4_activations()) if lib is not None else 0


def _shape_ok(m: int, n: int, k: int, group: int, rows_layout: bool) -> bool:
    if rows_layout:
        return n % ROWS_TILE == 0 and k % K_MULTIPLE == 0 and group % K_MULTIPLE == 0
    return m <= MAX_ROWS and n % BLOCK_ROWS == 0 and k % K_MULTIPLE == 0 and group % 2 == 0


def matmul_int4(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int
) -> torch.Tensor | None:
    """x (M, K) @ w.T for w = (q - 8) * scale + zero (torch's int4 semantics), q packed
    (N, K / 2) in the kernel's layout (above), scale_zero (K / group, N, 2) bfloat16."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    code = layout_code()
    if (
        code is None
        or x.dtype != torch.float32
        or x.dim() != 2
        or x.shape[0] == 0
        or x.shape[1] != k
        or not group
        or k % group
        or not _shape_ok(x.shape[0], n, k, group, code == ROWS_LAYOUT)
        or packed.dtype != torch.uint8
        or scale_zero.dtype != torch.bfloat16
        or scale_zero.shape != (k // group, n, 2)
        or not (packed.is_contiguous() and scale_zero.is_contiguous())
    ):
        return None
    lib = LIBRARY.get()
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    ptrs = (packed.data_ptr(), scale_zero.data_ptr())
    if lib.tpi_matmul_i4(x.data_ptr(), x.shape[0], k, *ptrs, group, n, y.data_ptr()):
        return None
    return y


def pack_blocks(rows: torch.Tensor, block_n: int, half_pairs: bool) -> torch.Tensor | None:
    """int4 weights (N, K / 2) in the "rows" layout -> torch's block layout (block_n
    rows a block, pairs half a block apart or neighbours), or None without the library."""
    lib = LIBRARY.get()
    n, hk = rows.shape
    if lib is None or rows.dtype != torch.uint8 or n % 2 or block_n % 2:
        return None
    rows = rows.contiguous()
    out = torch.empty(n, hk, dtype=torch.uint8)
    lib.tpi_int4_pack_blocks(rows.data_ptr(), n, 2 * hk, block_n, int(half_pairs), out.data_ptr())
    return out
