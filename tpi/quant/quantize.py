"""Weight-only quantization of a split: what `tpi split --quant` stores.

- bf16: linear weights stored (and kept in memory) as bfloat16.
- int8: per-output-channel symmetric int8, one bf16 scale per row.
- int4: group-wise asymmetric int4 (groups of 32/64/128 along the input
  dimension), one bf16 scale and zero per group, packed for torch's kernel.

Only the matmul weights and the vocabulary tables are quantized; norms and
biases stay float. The embedding and LM head are int8 in both int modes: an
int4 table packed for the kernel cannot be indexed by row, and the head decides
every token (llama.cpp's 4-bit mixes keep it wider too). Measured on SmolLM2
with an int4 head: greedy tokens left the fp32 ones after 20 steps.
Scales are rounded to bf16 (what the kernels use) *before* the weights are
quantized against them, so the integers are chosen for the scale really used.
A matrix whose shape the int4 kernel cannot take (rows not a multiple of 16, or
inputs not a multiple of the group) falls back to int8, and one the int8
kernel cannot take to bf16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tpi.errors import TpiError
from tpi.quant.formats import (
    INT4_SCALE_ZERO,
    INT4_SUFFIX,
    INT8_SCALE,
    INT8_SUFFIX,
    QUANT_DTYPE,
    TRANSPOSED_SUFFIX,
    int8_fits,
)
from tpi.quant.int4_pack import ROW_MULTIPLE, Int4Layout, disk_layout, pack
from tpi.quant.int4_rows import Int4Rows

QUANT_MODES = ("none", "bf16", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
# Per-layer matmul weights (names in tpi.model.weights), and the head's tables.
LINEAR_NAMES = ("qkv", "o", "gate_up", "down")
HEAD_TABLES = ("embed", "lm_head")


class QuantError(TpiError):
    pass


@dataclass(frozen=True)
class QuantSpec:
    mode: str = "none"
    group_size: int = 32  # int4 only
    int4_layout: str | None = None  # int4 only: how packed weights are laid out on disk

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise QuantError(
                f"unknown quantization {self.mode!r} (choose {', '.join(QUANT_MODES)})"
            )
        if self.mode == "int4" and self.group_size not in GROUP_SIZES:
            raise QuantError(
                f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}"
            )
        if self.int4_layout is not None:
            try:
                Int4Layout.parse(self.int4_layout)
            except TpiError as e:
                raise QuantError(str(e)) from None

    @property
    def quantized(self) -> bool:
        """Linear weights keep their stored form in memory (not widened to the compute dtype)."""
        return self.mode != "none"

    @property
    def packing(self) -> Int4Layout:
        """The int4 layout weights are (or, in a new split, will be) packed in on disk."""
        return Int4Layout.parse(self.int4_layout or disk_layout().name)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict | None) -> QuantSpec:
        if not d:
            return cls()
        return cls(
            mode=str(d.get("mode", "none")),
            group_size=int(d.get("group_size", 32)),
            int4_layout=d.get("int4_layout"),
        )

    @classmethod
    def for_split(cls, mode: str, group_size: int = 32) -> QuantSpec:
        layout = disk_layout().name if mode == "int4" else None
        return cls(mode, group_size, layout)


_FORMAT_SUFFIXES = {
    s.lstrip(".")
    for s in (INT8_SUFFIX, INT8_SCALE, INT4_SUFFIX, INT4_SCALE_ZERO, TRANSPOSED_SUFFIX)
}


def weight_base(name: str) -> str:
    """The weight a stored tensor belongs to, without its format suffix (".q4") and
    without a namespace before it: "expert0007.gate_up.sz" -> "gate_up" (the experts
    of a mixture of experts are named so, tpi.model.weights)."""
    parts = name.split(".")
    while len(parts) > 1 and parts[-1] in _FORMAT_SUFFIXES:
        parts.pop()
    return parts[-1]


def memory_dtype(
    name: str, stored: torch.dtype, compute: torch.dtype, quantized: bool
) -> torch.dtype:
    """The dtype a shard tensor is held in: in a quantized shard the matmul weights and
    tables (and their scales) stay as stored; other floats take the compute dtype."""
    base = weight_base(name)
    if not stored.is_floating_point or (
        quantized and (base in LINEAR_NAMES or base in HEAD_TABLES)
    ):
        return stored
    return compute


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q int8 (N, K), scale bf16 (N,)), absmax per row.

    The scale is rounded to the nearest bf16 (rounding it up instead, so that
    nothing clips, measured worse on SmolLM2: logits cosine 0.9985 vs 0.9990)."""
    w = w.float()
    scale = _bf16((w.abs().amax(dim=1) / 127).clamp(min=1e-12))
    q = torch.round(w / scale[:, None]).clamp(-127, 127)
    return q.to(torch.int8), scale.to(QUANT_DTYPE)


def quantize_int4(
    w: torch.Tensor, group: int, refinements: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (nibbles uint8 (N, K) in 0..15, scale_zero bf16 (K/g, N, 2)).

    Min-max grid first, then `refinements` rounds of least squares: with the
    integers fixed, the scale and zero that best fit the group, rounded to bf16,
    then the integers again. Measured: 8-12% lower error than min-max on Gaussian
    weights, and on weights that came from a 4-bit GGUF grid (the embedded
    SmolLM2) it finds that grid again (logits cosine 0.9999 vs 0.9990 for min-max).
    """
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    # torch dequantizes (q - 8) * scale + zero: the zero is the grid's midpoint.
    scale = _bf16(((hi - lo) / 15).clamp(min=1e-12))
    zero = _bf16(lo + 8 * scale)

    def integers() -> torch.Tensor:
        return torch.round((wg - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)

    q = integers()
    for _ in range(refinements):
        a = q - 8
        a_mean, w_mean = a.mean(-1), wg.mean(-1)
        da = a - a_mean[..., None]
        var = (da * da).sum(-1)
        fit = (da * (wg - w_mean[..., None])).sum(-1) / var.clamp(min=1e-30)
        scale = _bf16(torch.where(var > 0, fit, scale).clamp(min=1e-12))
        zero = _bf16(w_mean - a_mean * scale)
        q = integers()
    scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(QUANT_DTYPE).contiguous()
    return q.to(torch.uint8).reshape(n, k), scale_zero


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 (what the kernel will use), kept as float32 for the arithmetic."""
    return x.to(QUANT_DTYPE).float()


def int4_fits(shape: tuple[int, int], group: int) -> bool:
    n, k = shape
    return n % ROW_MULTIPLE == 0 and k % group == 0


def quantize_weight(
    name: str, w: torch.Tensor | Int4Rows, spec: QuantSpec
) -> dict[str, torch.Tensor]:
    """The tensors that store weight `name` under `spec` (see tpi.quant.formats for the names).

    4-bit integers kept from a GGUF file go into an int4 split of their group size
    as they are; anything else is quantized from floats."""
    if isinstance(w, Int4Rows):
        if spec.mode == "int4" and w.group == spec.group_size and int4_fits(w.shape, w.group):
            q, sz = w.to_tinygemm()
            return {name + INT4_SUFFIX: pack(q, spec.packing), name + INT4_SCALE_ZERO: sz}
        w = w.dequantize()
    if spec.mode == "none":
        return {name: w}
    if spec.mode == "bf16":
        return {name: w.to(torch.bfloat16).contiguous()}
    if spec.mode == "int4" and int4_fits(tuple(w.shape), spec.group_size):
        q, sz = quantize_int4(w, spec.group_size)
        return {name + INT4_SUFFIX: pack(q, spec.packing), name + INT4_SCALE_ZERO: sz}
    if not int8_fits(tuple(w.shape)):
        return {name: w.to(torch.bfloat16).contiguous()}
    q, scale = quantize_int8(w)
    return {name + INT8_SUFFIX: q, name + INT8_SCALE: scale}


def quantize_tensors(
    tensors: dict[str, torch.Tensor], names: tuple[str, ...], spec: QuantSpec
) -> dict[str, torch.Tensor]:
    """`tensors` with the matmul weights in `names` replaced by their stored form."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        out.update(quantize_weight(key, t, spec) if weight_base(key) in names else {key: t})
    return out


def quantize_embedding(name: str, w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """A vocabulary table (embedding or LM head): int8 rows in the int modes."""
    if spec.mode in ("int8", "int4"):
        return quantize_weight(name, w, QuantSpec("int8"))
    return quantize_weight(name, w, spec)
