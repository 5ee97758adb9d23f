"""int4 weight layouts: the portable one splits store, and torch's packed ones.

A split stores 4-bit weights in the "rows" layout, the same whichever machine made
it: row n's K / 2 bytes in order, byte j holding k = 2j in its low nibble and
k = 2j + 1 in its high one (as GGUF's and safetensors' 4-bit formats keep rows).
Each machine makes the layout its own products read when it loads a shard
(`held_layout`, `to_held`): the native kernel's where that runs here (AArch64
reads "rows" as it is; x86 with AVX512-BF16/VBMI torch's "b64h"), else torch's.

`torch.ops.aten._weight_int4pack_mm_for_cpu` reads 4-bit weights in a layout that
depends on the CPU it runs on: rows are cut into blocks of BLOCK_N (64 with
AVX512, 32 with AVX2, 16 on AArch64, other sizes elsewhere), each block is stored
K-major, and two rows share a byte: row n with row n + BLOCK_N/2 in a full AVX
block ("half" pairing), neighbouring rows otherwise ("adjacent"). Splits made
before "rows" stored the making machine's torch layout and name it (e.g. "b64h")
in their manifest: they load anywhere, repacked the same way.

Values are unsigned nibbles 0..15 (torch subtracts 8 when it dequantizes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tpi.errors import TpiError
from tpi.kernels import int4_matmul

ROW_MULTIPLE = 16  # the kernel handles row blocks of 16, 32, 48 or 64


@dataclass(frozen=True)
class Int4Layout:
    block_n: int  # 0: "rows" (no blocks)
    half_pairs: bool  # full blocks pair row n with n + block_n/2 (AVX); else n with n + 1

    @property
    def name(self) -> str:
        if self.block_n == 0:
            return "rows"
        return f"b{self.block_n}{'h' if self.half_pairs else 'a'}"

    @classmethod
    def parse(cls, name: str) -> Int4Layout:
        if name == "rows":
            return ROWS
        try:
            if name[0] != "b" or name[-1] not in "ha":
                raise ValueError
            layout = cls(int(name[1:-1]), name[-1] == "h")
        except (ValueError, IndexError):
            raise TpiError(f"unknown int4 weight layout {name!r}") from None
        if layout.block_n <= 0 or layout.block_n % 2:
            raise TpiError(f"unknown int4 weight layout {name!r}")
        return layout


ROWS = Int4Layout(0, False)  # what splits store (module docstring)
CANDIDATES = tuple(Int4Layout(b, h) for b in (64, 32, 16, 128) for h in (True, False))


def pack(q: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    """Nibbles (N, K) uint8 in 0..15 -> packed uint8 (N, K/2) in `layout`."""
    n, k = q.shape
    if layout == ROWS:
        if k % 2:
            raise ValueError(f"int4 packing needs an even width, got {n}x{k}")
        return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    if n % ROW_MULTIPLE or k % 2:
        raise ValueError(f"int4 packing needs rows % {ROW_MULTIPLE} == 0, got {n}x{k}")
    b = layout.block_n
    full = n // b * b
    out = torch.empty(n * k // 2, dtype=torch.uint8)
    if full:  # every full block at once: (blocks, K, b), K-major within each
        blocks = q[:full].reshape(n // b, b, k).transpose(1, 2)
        if layout.half_pairs:
            lo, hi = blocks[..., : b // 2], blocks[..., b // 2 :]
        else:
            lo, hi = blocks[..., 0::2], blocks[..., 1::2]
        out[: full * k // 2] = (lo | (hi << 4)).reshape(-1)
    if full < n:  # a last, partial block: neighbouring rows paired
        tail = q[full:].t()
        out[full * k // 2 :] = (tail[:, 0::2] | (tail[:, 1::2] << 4)).reshape(-1)
    return out.view(n, k // 2)


def unpack(packed: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    """Packed uint8 (N, K/2) in `layout` -> nibbles (N, K) uint8."""
    n, half_k = packed.shape
    k = 2 * half_k
    if layout == ROWS:
        return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, k)
    flat = packed.reshape(-1)
    q = torch.empty(n, k, dtype=torch.uint8)
    b = layout.block_n
    full = n // b * b
    if full:
        chunk = flat[: full * half_k].view(n // b, k, b // 2)
        lo, hi = chunk & 0x0F, chunk >> 4
        if layout.half_pairs:
            blocks = torch.cat([lo, hi], dim=2)
        else:
            blocks = torch.stack([lo, hi], dim=3).reshape(n // b, k, b)
        q[:full] = blocks.transpose(1, 2).reshape(full, k)
    if full < n:
        chunk = flat[full * half_k :].view(k, (n - full) // 2)
        q[full:] = torch.stack([chunk & 0x0F, chunk >> 4], dim=2).reshape(k, n - full).t()
    return q


def torch_pack(q: torch.Tensor) -> torch.Tensor:
    """Pack with this machine's own torch kernel (the ground truth)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


@functools.cache
def native_layout() -> Int4Layout | None:
    """The layout this machine's torch uses (None if it is none of the known ones)."""
    g = torch.Generator().manual_seed(0)
    # 112 rows: full and partial blocks for every candidate block size.
    probe = torch.randint(0, 16, (112, 64), generator=g, dtype=torch.int32).to(torch.uint8)
    want = torch_pack(probe)
    for layout in CANDIDATES:
        if torch.equal(pack(probe, layout), want):
            return layout
    return None


def disk_layout() -> Int4Layout:
    """The layout new splits are written in, on every machine."""
    return ROWS


def kernel_layout() -> Int4Layout | None:
    """The layout this machine's native int4 kernel reads (None: no kernel here)."""
    code = int4_matmul.layout_code()
    if code is None:
        return None
    return ROWS if code == 0 else Int4Layout(code // 2, bool(code % 2))


@functools.cache
def held_layout() -> Int4Layout | None:
    """The layout int4 weights are held in on this machine: the native kernel's where
    it runs, else torch's (None: torch's is none of the known ones)."""
    return kernel_layout() or native_layout()


def to_held(packed: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    """`packed` (stored in `layout`) in the layout this machine holds (`held_layout`)."""
    held = held_layout()
    if held == layout:
        return packed
    if layout == ROWS and held is not None:  # a split's: natively where built (~0.3 GB/s in torch)
        fast = int4_matmul.pack_blocks(packed, held.block_n, held.half_pairs)
        if fast is not None:
            return fast
    q = unpack(packed, layout)
    return pack(q, held) if held is not None else torch_pack(q)
