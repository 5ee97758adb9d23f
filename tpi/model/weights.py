"""Weights of one rank's slice of a layer, and of the master-only head.

A slice is a flat dict of named tensors (the unit written to and read from a
per-layer safetensors file) wrapped in a typed view for the math. q/k/v and
gate/up are stored fused so a token costs one matmul for each pair, and the
fusion is done once at split/load time, not per token. Checkpoints that store
them fused already (Phi-3) are cut by row ranges of the fused matrix.

Experts of a mixture of experts are named EXPERT_PREFIX + number + "." + name
(expert0007.gate_up), so one expert's tensors sit together in a file and can be
read alone (tpi.storage.expert_file).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tpi.model.config import ModelConfig
from tpi.model.moe import ExpertSource, ExpertWeights, ResidentExperts
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
Q_NORM = "q_norm"
K_NORM = "k_norm"
POST_ATTN_NORM = "post_attn_norm"  # Gemma: on the attention output, after the allreduce
POST_MLP_NORM = "post_mlp_norm"
ROUTER = "router"
EXPERT_PREFIX = "expert"
_EXPERT_NAME = re.compile(rf"{EXPERT_PREFIX}(\d+)\.(.+)")

EMBED = "embed"
FINAL_NORM = "final_norm"
LM_HEAD = "lm_head"


def hf_layer_name(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}"


def expert_name(expert: int, name: str) -> str:
    return f"{EXPERT_PREFIX}{expert:04d}.{name}"


def split_expert_name(name: str) -> tuple[int, str] | None:
    """(expert, tensor name) of an expert's tensor name; None for other tensors."""
    m = _EXPERT_NAME.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


def experts_from_tensors(t: dict[str, torch.Tensor]) -> dict[int, ExpertWeights]:
    """The experts among a layer's tensors, by number."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in t.items():
        parsed = split_expert_name(name)
        if parsed is not None:
            groups.setdefault(parsed[0], {})[parsed[1]] = tensor
    return {
        e: ExpertWeights(weight_from_tensors(g, GATE_UP), weight_from_tensors(g, DOWN))
        for e, g in sorted(groups.items())
    }


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    # Matmul weights are float tensors or quantized (tpi.quant.formats).
    qkv: Weight  # ((n_q + 2 n_kv) * head_dim, hidden)
    qkv_bias: torch.Tensor | None
    o: Weight  # (hidden, n_q * head_dim)
    o_bias: torch.Tensor | None
    gate_up: Weight | None  # (2 * n_mlp, hidden); None in a mixture-of-experts layer
    gate_up_bias: torch.Tensor | None
    down: Weight | None  # (hidden, n_mlp)
    down_bias: torch.Tensor | None
    q_norm: torch.Tensor | None = None  # (head_dim,): Qwen3, Gemma 3
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # Gemma 2/3
    post_mlp_norm: torch.Tensor | None = None
    router: torch.Tensor | None = None  # (experts, hidden), on every rank
    experts: ExpertSource | None = None

    @classmethod
    def from_tensors(
        cls, t: dict[str, torch.Tensor], experts: ExpertSource | None = None
    ) -> LayerWeights:
        """The layer's weights from its tensors; its experts are among them (all held
        in memory) or come from `experts` (streamed)."""

        def weight(name: str) -> Weight:
            w = weight_from_tensors(t, name)
            if w is None:
                raise KeyError(name)
            return w

        router = t.get(ROUTER)
        if router is not None and experts is None:
            experts = ResidentExperts(experts_from_tensors(t))
        return cls(
            attn_norm=t[ATTN_NORM],
            mlp_norm=t[MLP_NORM],
            qkv=weight(QKV),
            qkv_bias=t.get(QKV_BIAS),
            o=weight(O_PROJ),
            o_bias=t.get(O_BIAS),
            gate_up=None if router is not None else weight(GATE_UP),
            gate_up_bias=t.get(GATE_UP_BIAS),
            down=None if router is not None else weight(DOWN),
            down_bias=t.get(DOWN_BIAS),
            q_norm=t.get(Q_NORM),
            k_norm=t.get(K_NORM),
            post_attn_norm=t.get(POST_ATTN_NORM),
            post_mlp_norm=t.get(POST_MLP_NORM),
            router=router,
            experts=experts if router is not None else None,
        )

    def nbytes(self) -> int:
        n = sum(weight_nbytes(x) for k, x in vars(self).items() if k != "experts")
        return n + (self.experts.nbytes() if self.experts is not None else 0)


@dataclass
class HeadWeights:
    """Embedding, final norm and LM head: the master's extra tensors."""

    embed: Weight  # (rows, hidden); float or int8 rows
    final_norm: torch.Tensor
    lm_head: Weight  # (rows, hidden); the same object as embed when tied and stored once
    start: int = 0  # first vocabulary row held (a vocabulary-parallel rank holds a range)
    # The model's head arithmetic (tpi.model.config): Gemma scales the embeddings,
    # applies its final norm as (1 + w) and may soft-cap the logits.
    embed_scale: float | None = None
    norm_offset: float = 0.0
    softcap: float | None = None

    @property
    def rows(self) -> int:
        return weight_rows(self.embed)

    def nbytes(self) -> int:
        n = weight_nbytes(self.embed) + weight_nbytes(self.final_norm)
        if self.lm_head is not self.embed:
            n += weight_nbytes(self.lm_head)
        return n


@dataclass(frozen=True)
class HfNames:
    """Where a family keeps each tensor of a layer in its checkpoint (under
    model.layers.N.)."""

    mlp_norm: str = "post_attention_layernorm.weight"
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    qkv_fused: str | None = None  # one matrix with q, k and v rows (Phi-3)
    gate_up_fused: str | None = None  # one matrix with gate and up rows (Phi-3)
    router: str | None = None
    # Expert e's gate, up and down matrices ("{e}" replaced).
    expert: tuple[str, str, str] | None = None


_GEMMA = HfNames(
    mlp_norm="pre_feedforward_layernorm.weight",
    post_attn_norm="post_attention_layernorm.weight",
    post_mlp_norm="post_feedforward_layernorm.weight",
)
HF_NAMES = {
    "phi3": HfNames(qkv_fused="self_attn.qkv_proj.weight", gate_up_fused="mlp.gate_up_proj.weight"),
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "mixtral": HfNames(
        router="block_sparse_moe.gate.weight",
        expert=tuple(f"block_sparse_moe.experts.{{e}}.{w}.weight" for w in ("w1", "w3", "w2")),
    ),
    "qwen3_moe": HfNames(
        router="mlp.gate.weight",
        expert=tuple(f"mlp.experts.{{e}}.{w}_proj.weight" for w in ("gate", "up", "down")),
    ),
}


def hf_names(cfg: ModelConfig) -> HfNames:
    return HF_NAMES.get(cfg.model_type, HfNames())


def slice_layer(
    get: Callable[[str], torch.Tensor], cfg: ModelConfig, layer: int, rs: RankSlice
) -> dict[str, torch.Tensor]:
    """Cut rank `rs`'s slice of HF layer `layer` out of a checkpoint.

    `get(name)` returns a full HF tensor (or kept 4-bit integers, tpi.quant.int4_rows,
    which slice alike); only one projection is held at a time beyond the slices
    being built. Row-sharded biases (o_proj, down_proj) belong
    to rank 0 only, so the allreduce adds them exactly once. Norms and the router
    are whole on every rank.
    """
    names = hf_names(cfg)
    out = _slice_norms(get, cfg, names, layer)
    out.update(_slice_attention(get, cfg, names, layer, rs))
    if cfg.layer_is_moe(layer):
        out.update(_slice_experts(get, names, layer, rs))
    else:
        out.update(_slice_mlp(get, cfg, names, layer, rs))
    return out


def _rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return t[a:b].contiguous()


def _slice_norms(
    get: Callable[[str], torch.Tensor], cfg: ModelConfig, names: HfNames, layer: int
) -> dict[str, torch.Tensor]:
    """The layer's norms, whole."""
    name = functools.partial(hf_layer_name, layer)
    out: dict[str, torch.Tensor] = {
        ATTN_NORM: get(name("input_layernorm.weight")).contiguous(),
        MLP_NORM: get(name(names.mlp_norm)).contiguous(),
    }
    for key, hf in ((POST_ATTN_NORM, names.post_attn_norm), (POST_MLP_NORM, names.post_mlp_norm)):
        if hf is not None:
            out[key] = get(name(hf)).contiguous()
    if cfg.qk_norm:
        out[Q_NORM] = get(name("self_attn.q_norm.weight")).contiguous()
        out[K_NORM] = get(name("self_attn.k_norm.weight")).contiguous()
    return out


def _slice_attention(
    get: Callable[[str], torch.Tensor], cfg: ModelConfig, names: HfNames, layer: int, rs: RankSlice
) -> dict[str, torch.Tensor]:
    """The rows of the rank's q heads and KV heads (fused into one matrix), and the
    matching columns of o_proj."""
    name = functools.partial(hf_layer_name, layer)
    hd = cfg.head_dim
    q0, q1 = rs.q_heads
    k0, k1 = rs.kv_heads
    out: dict[str, torch.Tensor] = {}
    if names.qkv_fused is not None:
        fused = get(name(names.qkv_fused))
        k_at, v_at = cfg.num_heads * hd, (cfg.num_heads + cfg.num_kv_heads) * hd
        q = _rows(fused, q0 * hd, q1 * hd)
        k = _rows(fused, k_at + k0 * hd, k_at + k1 * hd)
        v = _rows(fused, v_at + k0 * hd, v_at + k1 * hd)
        del fused
    else:
        q = _rows(get(name("self_attn.q_proj.weight")), q0 * hd, q1 * hd)
        k = _rows(get(name("self_attn.k_proj.weight")), k0 * hd, k1 * hd)
        v = _rows(get(name("self_attn.v_proj.weight")), k0 * hd, k1 * hd)
    out[QKV] = cat_rows([q, k, v])
    del q, k, v
    if cfg.attention_bias:
        out[QKV_BIAS] = torch.cat(
            [
                _rows(get(name("self_attn.q_proj.bias")), q0 * hd, q1 * hd),
                _rows(get(name("self_attn.k_proj.bias")), k0 * hd, k1 * hd),
                _rows(get(name("self_attn.v_proj.bias")), k0 * hd, k1 * hd),
            ],
            0,
        )
    out[O_PROJ] = get(name("self_attn.o_proj.weight"))[:, q0 * hd : q1 * hd].contiguous()
    if cfg.o_proj_bias and rs.rank == 0:
        out[O_BIAS] = get(name("self_attn.o_proj.bias")).contiguous()
    return out


def _slice_mlp(
    get: Callable[[str], torch.Tensor], cfg: ModelConfig, names: HfNames, layer: int, rs: RankSlice
) -> dict[str, torch.Tensor]:
    """The rows of the rank's MLP columns in gate and up (fused into one matrix), and
    the matching columns of down_proj."""
    name = functools.partial(hf_layer_name, layer)
    m0, m1 = rs.mlp
    out: dict[str, torch.Tensor] = {}
    if names.gate_up_fused is not None:
        fused = get(name(names.gate_up_fused))
        half = fused.shape[0] // 2
        gate, up = _rows(fused, m0, m1), _rows(fused, half + m0, half + m1)
        del fused
    else:
        gate = _rows(get(name("mlp.gate_proj.weight")), m0, m1)
        up = _rows(get(name("mlp.up_proj.weight")), m0, m1)
    out[GATE_UP] = cat_rows([gate, up])
    del gate, up
    if cfg.mlp_bias:
        out[GATE_UP_BIAS] = torch.cat(
            [
                _rows(get(name("mlp.gate_proj.bias")), m0, m1),
                _rows(get(name("mlp.up_proj.bias")), m0, m1),
            ],
            0,
        )
        if rs.rank == 0:
            out[DOWN_BIAS] = get(name("mlp.down_proj.bias")).contiguous()
    out[DOWN] = get(name("mlp.down_proj.weight"))[:, m0:m1].contiguous()
    return out


def _slice_experts(
    get: Callable[[str], torch.Tensor], names: HfNames, layer: int, rs: RankSlice
) -> dict[str, torch.Tensor]:
    """The router, and the columns [c0, c1) of each expert this rank holds."""
    assert names.router is not None and names.expert is not None and rs.experts is not None
    c0, c1 = rs.expert_cols
    out = {ROUTER: get(hf_layer_name(layer, names.router)).contiguous()}
    for e in range(*rs.experts):
        gate, up, down = (hf_layer_name(layer, n.format(e=e)) for n in names.expert)
        out[expert_name(e, GATE_UP)] = cat_rows(
            [get(gate)[c0:c1].contiguous(), get(up)[c0:c1].contiguous()]
        )
        out[expert_name(e, DOWN)] = get(down)[:, c0:c1].contiguous()
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


def head_from_tensors(
    t: dict[str, torch.Tensor], start: int = 0, cfg: ModelConfig | None = None
) -> HeadWeights:
    embed = weight_from_tensors(t, EMBED)
    lm_head = weight_from_tensors(t, LM_HEAD)
    return HeadWeights(
        embed=embed,
        final_norm=t[FINAL_NORM],
        lm_head=embed if lm_head is None else lm_head,
        start=start,
        embed_scale=cfg.embed_scale if cfg else None,
        norm_offset=cfg.norm_offset if cfg else 0.0,
        softcap=cfg.final_softcap if cfg else None,
    )
