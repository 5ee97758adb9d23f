"""The two int8 digits AArch64's int8 dot-product kernels take activations as
(tpi/kernels/digits_arm.h), computed in torch with the same float32 steps: what
those kernels multiply, and so the reference their results are held to.

    x ~= s * (a + b / 254),  s = max|x| / 127 per block (a row, or a weight group)
"""

from __future__ import annotations

import torch

SPLIT = 254.0


def digits(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 x (M, K) -> (a, b) int8 (M, K) and s float32 (M, K / block)."""
    m, k = x.shape
    xb = x.float().reshape(m, k // block, block)
    mx = xb.abs().amax(dim=-1)
    inv = torch.where(mx > 0, torch.tensor(127.0) / mx, torch.zeros_like(mx))
    t = xb * inv[..., None]
    a = torch.round(t)
    b = torch.round((t - a) * torch.tensor(SPLIT))
    s = mx / torch.tensor(127.0)
    return a.reshape(m, k).to(torch.int8), b.reshape(m, k).to(torch.int8), s


def as_digits(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernels see it, in float64: s * (a + b / 254)."""
    a, b, s = digits(x, block)
    m, k = x.shape
    v = (a.double() + b.double() / SPLIT).reshape(m, k // block, block) * s.double()[..., None]
    return v.reshape(m, k)
