"""Weights of one rank's slice of a layer, and of the master-only head.

A slice is a flat dict of named tensors (the unit written to and read from a
per-layer safetensors file) wrapped in a typed view for the math. q/k/v and
gate/up are stored fused so a token costs one matmul for each pair, and the
fusion is done once at split/load time, not per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tpi.model.config import ModelConfig
from tpi.model.partition import RankSlice
from tpi.quant.formats import Weight, weight_from_tensors, weight_nbytes, weight_rows
from tpi.quant.int4_rows import cat_rows

# Canonical tensor names inside a per-layer slice file.
ATTN_NORM = "attn_norm"
MLP_NORM = "mlp_norm"
QKV = "qkv"
QKV_BIAS = "qkv_bias"
O_PROJ = "o"
O_BIAS = "o_bias"
GATE_UP = "gate_up"
GATE_UP_BIAS = "gate_up_bias"
DOWN = "down"
DOWN_BIAS = "down_bias"

EMBED = "embed"
FINAL_NORM = "final_norm"
LM_HEAD = "lm_head"


def hf_layer_name(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}"


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    # Matmul weights are float tensors or quantized (tpi.quant.formats).
    qkv: Weight  # ((n_q + 2 n_kv) * head_dim, hidden)
    qkv_bias: torch.Tensor | None
    o: Weight  # (hidden, n_q * head_dim)
    o_bias: torch.Tensor | None
    gate_up: Weight  # (2 * n_mlp, hidden)
    gate_up_bias: torch.Tensor | None
    down: Weight  # (hidden, n_mlp)
    down_bias: torch.Tensor | None

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> LayerWeights:
        def weight(name: str) -> Weight:
            w = weight_from_tensors(t, name)
            if w is None:
                raise KeyError(name)
            return w

        return cls(
            attn_norm=t[ATTN_NORM],
            mlp_norm=t[MLP_NORM],
            qkv=weight(QKV),
            qkv_bias=t.get(QKV_BIAS),
            o=weight(O_PROJ),
            o_bias=t.get(O_BIAS),
            gate_up=weight(GATE_UP),
            gate_up_bias=t.get(GATE_UP_BIAS),
            down=weight(DOWN),
            down_bias=t.get(DOWN_BIAS),
        )

    def nbytes(self) -> int:
        return sum(weight_nbytes(x) for x in vars(self).values())


@dataclass
class HeadWeights:
    """Embedding, final norm and LM head: the master's extra tensors."""

    embed: Weight  # (rows, hidden); float or int8 rows
    final_norm: torch.Tensor
    lm_head: Weight  # (rows, hidden); the same object as embed when tied and stored once
    start: int = 0  # first vocabulary row held (a vocabulary-parallel rank holds a range)

    @property
    def rows(self) -> int:
        return weight_rows(self.embed)

    def nbytes(self) -> int:
        n = weight_nbytes(self.embed) + weight_nbytes(self.final_norm)
        if self.lm_head is not self.embed:
            n += weight_nbytes(self.lm_head)
        return n


def slice_layer(
    get: Callable[[str], torch.Tensor], cfg: ModelConfig, layer: int, rs: RankSlice
) -> dict[str, torch.Tensor]:
    """Cut rank `rs`'s slice of HF layer `layer` out of a checkpoint.

    `get(name)` returns a full HF tensor (or kept 4-bit integers, tpi.quant.int4_rows,
    which slice alike); only one projection is held at a time beyond the slices
    being built. Row-sharded biases (o_proj, down_proj) belong
    to rank 0 only, so the allreduce adds them exactly once.
    """
    hd = cfg.head_dim
    q0, q1 = rs.q_heads
    k0, k1 = rs.kv_heads
    m0, m1 = rs.mlp

    def name(s: str) -> str:
        return hf_layer_name(layer, s)

    def rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return t[a:b].contiguous()

    out: dict[str, torch.Tensor] = {
        ATTN_NORM: get(name("input_layernorm.weight")).contiguous(),
        MLP_NORM: get(name("post_attention_layernorm.weight")).contiguous(),
    }
    q = rows(get(name("self_attn.q_proj.weight")), q0 * hd, q1 * hd)
    k = rows(get(name("self_attn.k_proj.weight")), k0 * hd, k1 * hd)
    v = rows(get(name("self_attn.v_proj.weight")), k0 * hd, k1 * hd)
    out[QKV] = cat_rows([q, k, v])
    del q, k, v
    if cfg.attention_bias:
        out[QKV_BIAS] = torch.cat(
            [
                rows(get(name("self_attn.q_proj.bias")), q0 * hd, q1 * hd),
                rows(get(name("self_attn.k_proj.bias")), k0 * hd, k1 * hd),
                rows(get(name("self_attn.v_proj.bias")), k0 * hd, k1 * hd),
            ],
            0,
        )
    out[O_PROJ] = get(name("self_attn.o_proj.weight"))[:, q0 * hd : q1 * hd].contiguous()
    if cfg.o_proj_bias and rs.rank == 0:
        out[O_BIAS] = get(name("self_attn.o_proj.bias")).contiguous()
    gate = rows(get(name("mlp.gate_proj.weight")), m0, m1)
    up = rows(get(name("mlp.up_proj.weight")), m0, m1)
    out[GATE_UP] = cat_rows([gate, up])
    del gate, up
    if cfg.mlp_bias:
        out[GATE_UP_BIAS] = torch.cat(
            [
                rows(get(name("mlp.gate_proj.bias")), m0, m1),
                rows(get(name("mlp.up_proj.bias")), m0, m1),
            ],
            0,
        )
        if rs.rank == 0:
            out[DOWN_BIAS] = get(name("mlp.down_proj.bias")).contiguous()
    out[DOWN] = get(name("mlp.down_proj.weight"))[:, m0:m1].contiguous()
    return out


def head_tensors(get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The master's embedding / final norm / LM head tensors."""
    out = {
        EMBED: get("model.embed_tokens.weight"),
        FINAL_NORM: get("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        out[LM_HEAD] = get("lm_head.weight")
    return out


def slice_head(t: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """Vocabulary rows [start, end) of the embedding and LM head (final norm whole)."""
    return {k: v if k == FINAL_NORM else v[start:end].contiguous() for k, v in t.items()}


def head_from_tensors(t: dict[str, torch.Tensor], start: int = 0) -> HeadWeights:
    embed = weight_from_tensors(t, EMBED)
    lm_head = weight_from_tensors(t, LM_HEAD)
    return HeadWeights(
        embed=embed,
        final_norm=t[FINAL_NORM],
        lm_head=embed if lm_head is None else lm_head,
        start=start,
    )
