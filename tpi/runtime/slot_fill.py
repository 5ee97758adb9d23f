"""Placing a span of raw tensors read from disk into a preallocated slot.

The sliding window (whole layers) and the expert store (single experts) read the
same kind of span: tensors back to back, maybe in another float dtype than the one
held, maybe not aligned. Both size their slots and fill them by these rules, so a
slot sized here is always large enough for what is placed in it."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from tpi.quant.formats import INT4_SUFFIX, FloatT
from tpi.quant.int4_pack import Int4Layout, to_held
from tpi.storage.tensor_file import ALIGN

# (name, dtype on disk, shape, begin, end) as tensor_file lays a span out
SpanTensor = tuple[str, torch.dtype, tuple[int, ...], int, int]
HeldDtype = Callable[[str, torch.dtype], torch.dtype]
Held = torch.Tensor | FloatT  # what a slot holds for a tensor
# (name, raw tensor, held dtype, the slot's bytes for it) -> (name, what to hold) or None
Claim = Callable[[str, torch.Tensor, torch.dtype, torch.Tensor], tuple[str, Held] | None]


def aligned(n: int) -> int:
    """Converted tensors start on ALIGN-byte boundaries (see tpi.storage.tensor_file)."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def elem_size(dt: torch.dtype) -> int:
    """Bytes per element of `dt`."""
    return torch.empty((), dtype=dt).element_size()


def converted_bytes(tensors: Iterable[SpanTensor], held: HeldDtype) -> int:
    """Slot bytes a span needs once every tensor is in its held dtype, aligned."""
    return sum(
        aligned((b - a) // elem_size(dt) * elem_size(held(name, dt)))
        for name, dt, _, a, b in tensors
    )


def place(
    tensors: dict[str, torch.Tensor],
    slot: torch.Tensor,
    held: HeldDtype,
    special: Claim | None = None,
) -> dict[str, Held]:
    """Copy `tensors` (views of the raw span) into `slot`, each in its held dtype at
    an aligned offset. `special` may claim a tensor (e.g. to hold it transposed in
    blocks) by returning the name and object to keep instead of a plain copy."""
    offset, out = 0, {}
    for name, t in tensors.items():
        dt = held(name, t.dtype)
        n = t.numel() * elem_size(dt)
        claimed = special(name, t, dt, slot[offset : offset + n]) if special else None
        if claimed is not None:
            out[claimed[0]] = claimed[1]
        else:
            dst = slot[offset : offset + n].view(dt).view(t.shape)
            dst.copy_(t)
            out[name] = dst
        offset += aligned(n)
    return out


def repack_int4(tensors: dict[str, Held], layout: Int4Layout) -> None:
    """Turn int4 tensors stored in `layout` into the one this CPU holds, in place."""
    for name, t in tensors.items():
        if name.endswith(INT4_SUFFIX):
            t.copy_(to_held(t, layout))
