"""The model math, in one place, for any rank's slice of a layer.

Every node (single machine, master, worker) runs these functions on its own
slice of heads and MLP columns. The attention and MLP blocks return *partial*
outputs; the caller's `allreduce` turns them into the full sum (the identity on
a single node), so the residual stream is identical on every rank.

What differs between families is read from the ModelConfig (tpi.model.config):
per-head q/k norms, norms applied as (1 + w), a norm on each block's output
(applied to the *sum*, after the allreduce: `residual_add`), gelu-tanh, the
query scale, soft-capped scores and logits, scaled embeddings, and experts
(tpi.model.moe) in place of the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tpi.kernels import decode_ops
from tpi.model import fused_decode
from tpi.model.config import ModelConfig
from tpi.model.kv_cache import KVCache
from tpi.model.linear import embedding_rows, gate_and_up, linear
from tpi.model.moe import moe_block
from tpi.model.partition import RankSlice
from tpi.model.rope import apply_rotary
from tpi.model.weights import HeadWeights, LayerWeights

PHASE_ATTENTION = 0
PHASE_MLP = 1


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> torch.Tensor:
    """RMSNorm over the last dimension, times `weight` (times offset + weight with an
    offset: Gemma's (1 + w), computed in float32 as transformers does)."""
    if offset:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (xf * (offset + weight.float())).to(x.dtype)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # One native call (tpi.kernels.decode_ops), else torch's fused kernel (one op
        # instead of seven, bit-identical in fp32 to them; 10-30 us on a decode row).
        out = decode_ops.rms_norm(x, weight, eps)
        return out if out is not None else F.rms_norm(x, weight.shape, weight, eps)
    # Normalise in float32 whatever the compute dtype, as the reference does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@dataclass(frozen=True)
class AttentionLayout:
    """How this rank's query heads map onto its KV heads, and the model's
    attention arithmetic on them."""

    n_q: int
    n_kv: int
    head_dim: int
    # None when every local KV head serves the same number of query heads
    # (one batched kernel); otherwise (kv, q_start, q_end) runs.
    segments: tuple[tuple[int, int, int], ...] | None
    scale: float = 0.0  # query scale (0: head_dim ** -0.5)
    softcap: float | None = None  # scores soft-capped (Gemma 2)
    norm_eps: float = 1e-6  # of the per-head q/k norms
    norm_offset: float = 0.0

    @classmethod
    def for_model(cls, rs: RankSlice, cfg: ModelConfig) -> AttentionLayout:
        return cls.for_slice(
            rs,
            cfg.group_size,
            cfg.head_dim,
            scale=cfg.query_scale,
            softcap=cfg.attn_softcap,
            norm_eps=cfg.rms_norm_eps,
            norm_offset=cfg.norm_offset,
        )

    @classmethod
    def for_slice(
        cls, rs: RankSlice, group_size: int, head_dim: int, **arithmetic: float | None
    ) -> AttentionLayout:
        kv_of_q = rs.kv_of_local_q(group_size)
        uniform = rs.n_q % rs.n_kv == 0 and kv_of_q == [
            i // (rs.n_q // rs.n_kv) for i in range(rs.n_q)
        ]
        segments = None
        if not uniform:
            runs: list[tuple[int, int, int]] = []
            for i, kv in enumerate(kv_of_q):
                if runs and runs[-1][0] == kv:
                    runs[-1] = (kv, runs[-1][1], i + 1)
                else:
                    runs.append((kv, i, i + 1))
            segments = tuple(runs)
        return cls(n_q=rs.n_q, n_kv=rs.n_kv, head_dim=head_dim, segments=segments, **arithmetic)

    @property
    def query_scale(self) -> float:
        return self.scale or self.head_dim**-0.5


@dataclass
class SequenceStep:
    """One sequence's rows in a pass: positions [pos, pos + length) of its KV cache."""

    pos: int
    length: int
    cache: KVCache
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor | None:
        """Boolean (T, S) mask, True = may attend; None when nothing is masked."""
        if window not in self._masks:
            self._masks[window] = _build_mask(self.pos, self.length, window)
        return self._masks[window]


@dataclass
class StepContext:
    """What every layer of one pass (or one piece of it) shares: its sequences in
    row order and the rotary rows of every row."""

    seqs: list[SequenceStep]
    cos: torch.Tensor
    sin: torch.Tensor
    dtype: torch.dtype
    # Rotary rows of the sliding-window layers, where they have their own (Gemma 3).
    local: tuple[torch.Tensor, torch.Tensor] | None = None


def _build_mask(pos: int, length: int, window: int | None) -> torch.Tensor | None:
    total = pos + length
    if length == 1 and (window is None or total <= window):
        return None
    q_pos = torch.arange(pos, total).unsqueeze(1)
    k_pos = torch.arange(total).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def _grouped_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q (G*r, T, hd) against k/v (G, S, hd): r query heads share each KV head."""
    groups, t, hd = k.shape[0], q.shape[1], q.shape[2]
    r = q.shape[0] // groups
    # Fold the r heads of a group into the query-length axis: no copy of K/V.
    qg = q.reshape(groups, r * t, hd)
    if softcap is not None:
        # Soft-capped scores (Gemma 2): no fused kernel takes them, so the plain way.
        scores = torch.bmm(qg, k.transpose(1, 2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            m = mask.repeat(r, 1) if r > 1 else mask
            scores = scores.masked_fill(~m, float("-inf"))
        probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
        return torch.bmm(probs, v).reshape(groups * r, t, hd)
    if t == 1 and mask is None:
        # One new token (a decode step): three ops, where SDPA's generic path
        # takes a dozen (measured 27 vs 49 us per layer for SmolLM2's shapes).
        empty = _EMPTY.get(qg.dtype) or _EMPTY.setdefault(qg.dtype, qg.new_empty(()))
        scores = torch.baddbmm(empty, qg, k.transpose(1, 2), beta=0.0, alpha=scale)
        probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
        return torch.bmm(probs, v).reshape(groups * r, t, hd)
    m = mask.repeat(r, 1) if mask is not None and r > 1 else mask
    out = F.scaled_dot_product_attention(
        qg[None], k[None], v[None], attn_mask=m, scale=scale
    )  # 4-D: torch's fused CPU kernel, not the generic one
    return out[0].reshape(groups * r, t, hd)


_EMPTY: dict[torch.dtype, torch.Tensor] = {}  # baddbmm's input, ignored with beta=0


# When a pass's causal attention goes to the native rows (decode_ops.attend_rows):
# they read each key and value once for a KV head's query heads, where torch's fused
# kernel spends more on its blocking and the mask than on small arithmetic. Measured
# (2 threads, rows vs SDPA): SmolLM2's 9/3 heads 0.35 vs 0.49 ms at 128 positions,
# 69 vs 106 at 2048; 32/8 heads of 128: 1.4 vs 2.2 ms at 128, 354 vs 459 at 2048; but
# without grouping (32/32) 2.6 vs 2.9 at 128 and 39 vs 32 at 512.
ROWS_MIN_GROUP = 3  # query heads per KV head from which the rows win at any length
ROWS_MAX_POSITIONS = 128  # below, they win at any grouping


def _rows_natively(layout: AttentionLayout, end: int, window: int | None) -> bool:
    """Whether a sequence's rows ending at position `end` take the native causal
    attention: nothing but the causal mask, and the sizes where it is faster."""
    return (
        layout.segments is None
        and layout.softcap is None
        and (window is None or end <= window)
        and (layout.n_q >= ROWS_MIN_GROUP * layout.n_kv or end <= ROWS_MAX_POSITIONS)
    )


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq: SequenceStep,
    layout: AttentionLayout,
    layer: int,
    window: int | None,
) -> torch.Tensor:
    """One sequence's attention: q, k, v (heads, T, hd) -> (T, heads * hd)."""
    keys, values = seq.cache.update(layer, seq.pos, k, v)
    scale, cap = layout.query_scale, layout.softcap
    end = seq.pos + seq.length
    if _rows_natively(layout, end, window):
        out = decode_ops.attend_rows(
            q.transpose(0, 1), *seq.cache.buffers(layer, end), seq.pos, scale
        )
        if out is not None:
            return out
    mask = seq.mask(window)
    if layout.segments is None:
        out = _grouped_sdpa(q, keys, values, mask, scale, cap)
    else:
        out = torch.cat(
            [
                _grouped_sdpa(q[a:b], keys[kv : kv + 1], values[kv : kv + 1], mask, scale, cap)
                for kv, a, b in layout.segments
            ],
            dim=0,
        )
    return out.transpose(0, 1).reshape(seq.length, layout.n_q * layout.head_dim)


def attention_block(
    x: torch.Tensor,
    w: LayerWeights,
    layout: AttentionLayout,
    layer: int,
    step: StepContext,
    window: int | None,
) -> torch.Tensor:
    """Partial attention output (T, hidden) of this rank's heads. The projections
    run on every row of the pass at once (weights read once for a whole batch);
    attention runs per sequence, each against its own cache."""
    t, hd = x.shape[0], layout.head_dim
    nq, nkv = layout.n_q, layout.n_kv
    qkv = linear(x, w.qkv, w.qkv_bias).view(t, nq + 2 * nkv, hd)
    qk = qkv[:, : nq + nkv]
    if w.q_norm is not None:  # each head normalised before rotary (Qwen3, Gemma 3)
        eps, off = layout.norm_eps, layout.norm_offset
        qk = torch.cat(
            [rms_norm(qk[:, :nq], w.q_norm, eps, off), rms_norm(qk[:, nq:], w.k_norm, eps, off)],
            dim=1,
        )
    cos, sin = step.local if window is not None and step.local is not None else (step.cos, step.sin)
    if w.q_norm is None:
        out = _attend_each_token(qkv, cos, sin, layout, layer, step, window)
        if out is not None:
            return linear(out, w.o, w.o_bias)
    qk = apply_rotary(qk, cos, sin)  # queries and keys at once
    outs, row = [], 0
    for seq in step.seqs:
        rows = slice(row, row + seq.length)
        row += seq.length
        q = qk[rows, :nq].transpose(0, 1)  # (heads, T, hd)
        k = qk[rows, nq:].transpose(0, 1)
        v = qkv[rows, nq + nkv :].transpose(0, 1)
        outs.append(_attend(q, k, v, seq, layout, layer, window))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return linear(out, w.o, w.o_bias)


def _attend_each_token(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: AttentionLayout,
    layer: int,
    step: StepContext,
    window: int | None,
) -> torch.Tensor | None:
    """A decode step's attention (one new token per sequence, nothing masked), each
    token one native call: rotary, cache write and attention (tpi.kernels.decode_ops;
    torch takes ~15 small ops for it). None where that does not apply: the caller
    takes the general path."""
    if (
        layout.segments is not None
        or layout.softcap is not None
        or qkv.dtype != torch.float32
        or any(s.length != 1 or (window is not None and s.pos + 1 > window) for s in step.seqs)
    ):
        return None
    t, hd = qkv.shape[0], layout.head_dim
    qkv = qkv.reshape(t, -1)
    out = torch.empty(t, layout.n_q * hd, dtype=torch.float32)
    for i, seq in enumerate(step.seqs):
        keys, values = seq.cache.buffers(layer, seq.pos + 1)
        if not decode_ops.attend_one(
            qkv[i], cos[i], sin[i], keys, values, seq.pos, layout.n_q, layout.query_scale, out[i]
        ):
            return None  # the general path redoes every token (the same cache entries)
    return out


def activation(gate: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    return F.silu(gate)


def mlp_block(x: torch.Tensor, w: LayerWeights, act: str = "silu") -> torch.Tensor:
    """Partial gated-MLP output (T, hidden) of this rank's MLP columns."""
    gate, up = gate_and_up(x, w.gate_up, w.gate_up_bias)
    both = decode_ops.silu_mul(gate, up) if act == "silu" else None
    if both is None:
        both = activation(gate, act) * up
    return linear(both, w.down, w.down_bias)


def attention_partial(
    h: torch.Tensor,
    w: LayerWeights,
    layout: AttentionLayout,
    layer: int,
    step: StepContext,
    cfg: ModelConfig,
    window: int | None,
) -> torch.Tensor:
    """First half of a decoder layer: this rank's attention output, to be allreduced
    and added to the residual h (by `residual_add`)."""
    fused = fused_decode.attention(h, w, layout, layer, step, cfg, window)
    if fused is not None:  # a float32 decode token: the half in one native call
        return fused
    x = rms_norm(h, w.attn_norm, cfg.rms_norm_eps, cfg.norm_offset)
    return attention_block(x, w, layout, layer, step, window)


def mlp_partial(h: torch.Tensor, w: LayerWeights, cfg: ModelConfig) -> torch.Tensor:
    """Second half: this rank's MLP (or experts') output, to be allreduced and added to h."""
    fused = fused_decode.mlp(h, w, cfg)
    if fused is not None:
        return fused
    x = rms_norm(h, w.mlp_norm, cfg.rms_norm_eps, cfg.norm_offset)
    if w.router is not None:
        return moe_block(x, w.router, w.experts, cfg.experts_per_token, cfg.norm_topk_prob)
    return mlp_block(x, w, cfg.hidden_act)


def residual_add(
    h: torch.Tensor, total: torch.Tensor, post_norm: torch.Tensor | None, cfg: ModelConfig
) -> torch.Tensor:
    """h plus a block's summed output, normalised first where the model has a norm
    there (Gemma's post-attention and post-MLP norms: they need the whole sum, so
    they run after the allreduce, on every rank alike)."""
    if post_norm is None:
        return h + total
    return h + rms_norm(total, post_norm, cfg.rms_norm_eps, cfg.norm_offset)


def embed(ids: torch.Tensor, head: HeadWeights, dtype: torch.dtype) -> torch.Tensor:
    """Embeddings of `ids`; rows outside this head's vocabulary range are zero (the
    vocabulary-parallel embedding: an allreduce then adds every rank's rows)."""
    local = ids - head.start
    inside = (local >= 0) & (local < head.rows)
    if bool(inside.all()):
        rows = embedding_rows(local, head.embed, dtype)
    else:
        rows = embedding_rows(local.clamp(0, head.rows - 1), head.embed, dtype)
        rows = rows.masked_fill(~inside[:, None], 0)
    if head.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the dtype as transformers
        rows = rows * torch.tensor(head.embed_scale, dtype=rows.dtype)
    return rows


def logits(h: torch.Tensor, head: HeadWeights, eps: float) -> torch.Tensor:
    """Float32 logits (T, vocab) from final hidden states (soft-capped where the
    model says: elementwise, so each vocabulary-parallel rank caps its own rows)."""
    out = linear(rms_norm(h, head.final_norm, eps, head.norm_offset), head.lm_head).float()
    if head.softcap is not None:
        out = torch.tanh(out / head.softcap) * head.softcap
    return out
