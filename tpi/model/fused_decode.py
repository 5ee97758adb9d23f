"""A decode step's half-layers as single native calls (tpi.kernels.decode_layer).

For one new token of one sequence in float32 (a chat's decode step), the attention
half (norm, QKV, rotary + cache write + attention, output projection) and the MLP
half (norm, gate/up, silu * up, down) each run as one call of the same kernels the
op-by-op path of tpi.model.layers uses. Measured on SmolLM2 (2 threads), the ops
between the kernels cost ~80 us a layer from Python.

Anything else returns None and takes the op-by-op path: batches and prefills,
bfloat16 compute, per-head q/k norms, soft-capped scores, KV heads split across
ranks, a window that masks, Gemma's (1 + w) norms, gelu, experts, and weights no
native kernel reads (float32 held transposed, as they are for torch alone; bf16;
int4 packed for another CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tpi.kernels import decode_layer, int4_matmul, small_matmul
from tpi.model.config import ModelConfig
from tpi.model.linear import int4_packed_for_the_kernel
from tpi.quant.formats import FloatT, Int4Weight, Int8Weight, Weight

if TYPE_CHECKING:
    from tpi.model.layers import AttentionLayout, StepContext
    from tpi.model.weights import LayerWeights


def _mat(w: Weight | None, bias: torch.Tensor | None) -> decode_layer.Mat | None:
    """The native description of one product's weight, or None if no kernel reads it."""
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    if isinstance(w, FloatT):
        rows = w.blocks.view(-1, w.blocks.shape[-1]) if w.by_rows else None
        if rows is None or rows.dtype != torch.float32 or not rows.is_contiguous():
            return None
        kind, ptrs, group = decode_layer.F32, (rows.data_ptr(), None), 0
    elif isinstance(w, torch.Tensor):
        if w.dim() != 2 or w.dtype != torch.float32 or not w.is_contiguous():
            return None
        kind, ptrs, group = decode_layer.F32, (w.data_ptr(), None), 0
    elif isinstance(w, Int8Weight):
        if not (w.q.is_contiguous() and w.scale.is_contiguous()):
            return None
        kind, ptrs, group = decode_layer.INT8, (w.q.data_ptr(), w.scale.data_ptr()), 0
    elif isinstance(w, Int4Weight):
        n, k = w.shape
        if (
            not (int4_matmul.available() and int4_packed_for_the_kernel())
            or n % int4_matmul.BLOCK_ROWS
            or k % int4_matmul.K_MULTIPLE
            or w.group_size % 2
            or not (w.packed.is_contiguous() and w.scale_zero.is_contiguous())
        ):
            return None
        kind, group = decode_layer.INT4, w.group_size
        ptrs = (w.packed.data_ptr(), w.scale_zero.data_ptr())
    else:
        return None
    n, k = w.shape
    if k % small_matmul.K_MULTIPLE:
        return None
    bias_ptr = bias.data_ptr() if bias is not None else None
    return decode_layer.Mat(kind, ptrs[0], ptrs[1], bias_ptr, n, k, group)


class _Mats:
    """A layer's four products described once (the layer's tensors outlive it: it is
    kept on the LayerWeights object it describes)."""

    def __init__(self, w: LayerWeights) -> None:
        self.qkv = _mat(w.qkv, w.qkv_bias)
        self.o = _mat(w.o, w.o_bias)
        mlp = w.router is None and w.gate_up is not None
        self.gate_up = _mat(w.gate_up, w.gate_up_bias) if mlp else None
        self.down = _mat(w.down, w.down_bias) if mlp else None


def _mats(w: LayerWeights) -> _Mats:
    mats = w.__dict__.get("_fused_mats")
    if mats is None:
        mats = w.__dict__["_fused_mats"] = _Mats(w)
    return mats


def _one_token(h: torch.Tensor, norm: torch.Tensor, cfg: ModelConfig) -> bool:
    return (
        h.dtype == torch.float32
        and h.shape[0] == 1
        and not cfg.norm_offset
        and norm.dtype == torch.float32
        and decode_layer.library() is not None
    )


def attention(
    h: torch.Tensor,
    w: LayerWeights,
    layout: AttentionLayout,
    layer: int,
    step: StepContext,
    cfg: ModelConfig,
    window: int | None,
) -> torch.Tensor | None:
    """`attention_partial` of one token in one call, or None (not served)."""
    if (
        not _one_token(h, w.attn_norm, cfg)
        or len(step.seqs) != 1
        or w.q_norm is not None
        or layout.segments is not None
        or layout.softcap is not None
    ):
        return None
    seq = step.seqs[0]
    if seq.length != 1 or (window is not None and seq.pos + 1 > window):
        return None
    mats = _mats(w)
    if mats.qkv is None or mats.o is None:
        return None
    cos, sin = step.local if window is not None and step.local is not None else (step.cos, step.sin)
    keys, values = seq.cache.buffers(layer, seq.pos + 1)
    return decode_layer.attention_half(
        h,
        w.attn_norm,
        cfg.rms_norm_eps,
        mats.qkv,
        mats.o,
        cos[0],
        sin[0],
        keys,
        values,
        seq.pos,
        layout.n_q,
        layout.query_scale,
    )


def mlp(h: torch.Tensor, w: LayerWeights, cfg: ModelConfig) -> torch.Tensor | None:
    """`mlp_partial` of one token in one call, or None (not served)."""
    if not _one_token(h, w.mlp_norm, cfg) or cfg.hidden_act != "silu":
        return None
    mats = _mats(w)
    if mats.gate_up is None or mats.down is None:
        return None
    return decode_layer.mlp_half(h, w.mlp_norm, cfg.rms_norm_eps, mats.gate_up, mats.down)
