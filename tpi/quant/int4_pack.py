"""torch's packed int4 weight layout, made portable across CPUs.

`torch.ops.aten._weight_int4pack_mm_for_cpu` reads 4-bit weights in a layout
that depends on the CPU it runs on: rows are cut into blocks of BLOCK_N
(64 with AVX512, 32 with AVX2 or the plain build, other sizes elsewhere), each
block is stored K-major, and two rows share a byte: row n with row n + BLOCK_N/2
in a full AVX block ("half" pairing), neighbouring rows otherwise ("adjacent").
A split made on one machine may be loaded on another, so the layout written to
disk is named (e.g. "b64h") in the manifest, and a node whose own layout differs
repacks on load (correct, just slower) instead of computing garbage.

Values are unsigned nibbles 0..15 (torch subtracts 8 when it dequantizes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tpi.errors import TpiError

ROW_MULTIPLE = 16  # the kernel handles row blocks of 16, 32, 48 or 64


@dataclass(frozen=True)
class Int4Layout:
    block_n: int
    half_pairs: bool  # full blocks pair row n with n + block_n/2 (AVX); else n with n + 1

    @property
    def name(self) -> str:
        return f"b{self.block_n}{'h' if self.half_pairs else 'a'}"

    @classmethod
    def parse(cls, name: str) -> Int4Layout:
        try:
            if name[0] != "b" or name[-1] not in "ha":
                raise ValueError
            return cls(int(name[1:-1]), name[-1] == "h")
        except (ValueError, IndexError):
            raise TpiError(f"unknown int4 weight layout {name!r}") from None


CANDIDATES = tuple(Int4Layout(b, h) for b in (64, 32, 16, 128) for h in (True, False))


def _pair_block(block: torch.Tensor, half: bool) -> torch.Tensor:
    """(K, nb) nibbles of one row block -> (K, nb/2) bytes."""
    if half:
        lo, hi = block[:, : block.shape[1] // 2], block[:, block.shape[1] // 2 :]
    else:
        lo, hi = block[:, 0::2], block[:, 1::2]
    return lo | (hi << 4)


def _unpair_block(packed: torch.Tensor, half: bool) -> torch.Tensor:
    """(K, nb/2) bytes -> (K, nb) nibbles."""
    lo, hi = packed & 0x0F, packed >> 4
    if half:
        return torch.cat([lo, hi], dim=1)
    return torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)


def _blocks(n: int, block_n: int):
    for start in range(0, n, block_n):
        yield start, min(block_n, n - start)


def pack(q: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    """Nibbles (N, K) uint8 in 0..15 -> packed uint8 (N, K/2) in `layout`."""
    n, k = q.shape
    if n % ROW_MULTIPLE or k % 2:
        raise ValueError(f"int4 packing needs rows % {ROW_MULTIPLE} == 0, got {n}x{k}")
    out = torch.empty(n * k // 2, dtype=torch.uint8)
    for start, nb in _blocks(n, layout.block_n):
        half = layout.half_pairs and nb == layout.block_n
        block = q[start : start + nb].t()  # (K, nb): K-major within the block
        out[start * k // 2 : (start + nb) * k // 2] = _pair_block(block, half).reshape(-1)
    return out.view(n, k // 2)


def unpack(packed: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    """Packed uint8 (N, K/2) in `layout` -> nibbles (N, K) uint8."""
    n, half_k = packed.shape
    k = 2 * half_k
    flat = packed.reshape(-1)
    q = torch.empty(n, k, dtype=torch.uint8)
    for start, nb in _blocks(n, layout.block_n):
        half = layout.half_pairs and nb == layout.block_n
        chunk = flat[start * half_k : (start + nb) * half_k].view(k, nb // 2)
        q[start : start + nb] = _unpair_block(chunk, half).t()
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
    """The layout new splits are written in: this machine's, so it loads as is."""
    return native_layout() or Int4Layout(64, True)


def to_native(packed: torch.Tensor, layout: Int4Layout) -> torch.Tensor:
    """`packed` (stored in `layout`) in the layout this machine's kernel reads."""
    native = native_layout()
    if native == layout:
        return packed
    q = unpack(packed, layout)
    return pack(q, native) if native is not None else torch_pack(q)
