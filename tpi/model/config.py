"""Model configuration read from a Hugging Face config.json.

Only what the model math needs is kept, validated up front so a bad or
unsupported checkpoint fails with a message naming the problem, not deep in a
matmul.

Families differ in a few switches, all read here into one ModelConfig, so the
math (tpi.model.layers) asks the config, never the family's name:

- Qwen3 and Gemma 3 normalise each query and key head (`qk_norm`);
- Gemma 2/3 apply norms as (1 + w) (`norm_offset`), add a norm after attention
  and after the MLP (`sandwich_norms`), scale the embeddings by sqrt(hidden),
  use gelu-tanh, a query scale of their own, soft-cap scores or logits (Gemma 2),
  and alternate local (sliding-window) and global layers, Gemma 3 with a rotary
  base of its own for the local ones (`rope_local`);
- Phi-3 stores q/k/v and gate/up fused (a question of weight names, see
  tpi.model.weights) and uses LongRoPE;
- Mixtral and Qwen3-MoE replace the MLP by `num_experts` experts of which a
  router picks `experts_per_token` per token (`moe_layers`: which layers).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tpi.errors import ModelError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
SUPPORTED_MODEL_TYPES = set(SUPPORTED_ARCHITECTURES.values())
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "longrope"}
GEMMA_TYPES = {"gemma2", "gemma3_text"}
QWEN_WINDOW_TYPES = {"qwen2", "qwen3", "qwen3_moe"}  # window from max_window_layers on
MOE_TYPES = {"mixtral", "qwen3_moe"}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # LongRoPE (Phi-3): per-frequency divisors below and above the original context,
    # and the factor cos/sin are scaled by.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    partial_rotary: float = 1.0  # share of head_dim that is rotated (Phi-4-mini: 0.75)

    def to_dict(self) -> dict[str, Any]:
        return _without_new_defaults(self, asdict(self), _ROPE_NEW)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeConfig:
        d = dict(d)
        for k in ("short_factor", "long_factor"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2, some Llama)
    o_proj_bias: bool
    mlp_bias: bool
    # Per layer: attention window in tokens, or None for full attention.
    sliding_windows: tuple[int | None, ...] = field(default=())
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # --- switches of the families after Llama (defaults: Llama's behaviour) ---
    hidden_act: str = "silu"  # or "gelu_tanh" (Gemma)
    qk_norm: bool = False  # RMSNorm over each query and key head before rotary
    norm_offset: float = 0.0  # norms multiply by (offset + w): Gemma stores w - 1
    sandwich_norms: bool = False  # a norm on the attention and the MLP output too
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(hidden))
    attn_scale: float | None = None  # query scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    rope_local: RopeConfig | None = None  # rotary of sliding-window layers, if its own
    num_experts: int = 0  # > 0: a mixture of experts
    experts_per_token: int = 0
    moe_intermediate_size: int = 0  # columns of one expert
    norm_topk_prob: bool = True  # the picked experts' weights renormalised to sum 1
    moe_layers: tuple[bool, ...] = ()  # per layer: experts (True) or a dense MLP

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def query_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and self.moe_layers[layer]

    def layers_view(self, first: int, end: int) -> ModelConfig:
        """The model as a pipeline stage holding layers [first, end) sees it: those
        layers, renumbered from 0, with their per-layer settings (windows, experts)."""
        if not 0 <= first < end <= self.num_layers:
            raise ModelError(
                f"layers [{first}, {end}) are not within the model's {self.num_layers}"
            )
        return replace(
            self,
            num_layers=end - first,
            sliding_windows=self.sliding_windows[first:end],
            moe_layers=self.moe_layers[first:end] if self.moe_layers else (),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rope"] = self.rope.to_dict()
        if self.rope_local is not None:
            d["rope_local"] = self.rope_local.to_dict()
        # Fields added after a split format was fixed are written only when they
        # differ from their default, so a Llama split keeps its manifest (and hash).
        return _without_new_defaults(self, d, _CONFIG_NEW)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope"] = RopeConfig.from_dict(d["rope"])
        if d.get("rope_local") is not None:
            d["rope_local"] = RopeConfig.from_dict(d["rope_local"])
        d["sliding_windows"] = tuple(d.get("sliding_windows", ()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        return cls(**d)


_ROPE_NEW = ("short_factor", "long_factor", "attention_factor", "partial_rotary")
_CONFIG_NEW = (
    "hidden_act",
    "qk_norm",
    "norm_offset",
    "sandwich_norms",
    "embed_scale",
    "attn_scale",
    "attn_softcap",
    "final_softcap",
    "rope_local",
    "num_experts",
    "experts_per_token",
    "moe_intermediate_size",
    "norm_topk_prob",
    "moe_layers",
)


def _without_new_defaults(obj: Any, d: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    defaults = {f.name: f.default for f in fields(obj)}
    for name in names:
        if getattr(obj, name) == defaults[name]:
            d.pop(name, None)
    return d


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_params(raw: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """The rotary parameters of config.json, whichever way it writes them:
    transformers >= 5 writes "rope_parameters" (theta inside, keyed by layer type for
    Gemma 3); older configs write "rope_theta" plus an optional "rope_scaling"."""
    params = raw.get("rope_parameters") or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return dict(params[layer_type])
    if layer_type == "sliding_attention":  # Gemma 3 before transformers 5
        return {"rope_theta": raw.get("rope_local_base_freq", 10000.0)}
    if layer_type is not None and any(isinstance(v, dict) for v in params.values()):
        params = {}
    scaling = raw.get("rope_scaling") or {}
    return {**scaling, **params}


def _rope_config(raw: dict[str, Any], params: dict[str, Any], head_dim: int) -> RopeConfig:
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type in ("su",) or (rope_type == "yarn" and raw.get("model_type") == "phi3"):
        rope_type = "longrope"  # Phi-3's older names for it (as transformers reads them)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))})"
        )
    original = int(
        params.get(
            "original_max_position_embeddings",
            raw.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192)),
        )
    )
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    rot = int(head_dim * partial)
    if rot % 2 or rot <= 0:
        raise UnsupportedModelError(f"partial_rotary_factor {partial} gives an odd rotary width")
    short = tuple(float(x) for x in params.get("short_factor") or ())
    long = tuple(float(x) for x in params.get("long_factor") or ())
    attention_factor = 1.0
    factor = float(params.get("factor", 1.0) or 1.0)
    if rope_type == "longrope":
        if len(short) != rot // 2 or len(long) != rot // 2:
            raise ModelError(f"longrope short_factor/long_factor must hold {rot // 2} values each")
        # As transformers: without "factor", the ratio of the two context lengths.
        if "factor" not in params:
            factor = int(raw.get("max_position_embeddings", original)) / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        short_factor=short,
        long_factor=long,
        attention_factor=float(attention_factor),
        partial_rotary=partial,
    )


def _layer_types(raw: dict[str, Any], model_type: str, num_layers: int) -> list[str] | None:
    """Gemma's local/global pattern when config.json predates "layer_types"."""
    if raw.get("layer_types"):
        return list(raw["layer_types"])
    if model_type == "gemma2":  # local, global, local, ...
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if model_type == "gemma3_text":  # five local layers, then a global one
        every = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern") or 6)
        return [
            "sliding_attention" if (i + 1) % every else "full_attention" for i in range(num_layers)
        ]
    return None


def _sliding_windows(
    raw: dict[str, Any], model_type: str, num_layers: int
) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    layer_types = _layer_types(raw, model_type, num_layers)
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type in QWEN_WINDOW_TYPES:
        if not raw.get("use_sliding_window") or not window:
            return (None,) * num_layers
        # Qwen2 applies the window only from layer max_window_layers onwards.
        first = int(raw.get("max_window_layers", 0))
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window or None,) * num_layers


def _moe_fields(raw: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    if model_type not in MOE_TYPES:
        return {}
    experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    top = int(raw.get("num_experts_per_tok") or 0)
    if experts < 1 or not 1 <= top <= experts:
        raise ModelError(f"config.json: {top} experts per token of {experts} experts")
    if model_type == "mixtral":
        return dict(
            num_experts=experts,
            experts_per_token=top,
            moe_intermediate_size=int(raw["intermediate_size"]),
            norm_topk_prob=True,
            moe_layers=(True,) * num_layers,
        )
    dense = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step") or 1)
    return dict(
        num_experts=experts,
        experts_per_token=top,
        moe_intermediate_size=int(raw["moe_intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
    )


def _family_fields(raw: dict[str, Any], model_type: str, hidden: int) -> dict[str, Any]:
    if model_type in ("qwen3", "qwen3_moe"):
        return dict(qk_norm=True)
    if model_type not in GEMMA_TYPES:
        return {}
    if raw.get("use_bidirectional_attention"):
        raise UnsupportedModelError("bidirectional attention (an embedding model) is not supported")
    return dict(
        norm_offset=1.0,
        sandwich_norms=True,
        qk_norm=model_type == "gemma3_text",
        embed_scale=hidden**0.5,
        attn_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5,
        # Gemma 3 has the field but transformers does not apply it to the scores.
        attn_softcap=raw.get("attn_logit_softcapping") if model_type == "gemma2" else None,
        final_softcap=raw.get("final_logit_softcapping"),
    )


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Validate a config.json dict and keep what the engine needs."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if archs and not known:
        raise UnsupportedModelError(
            f"unsupported architecture {', '.join(archs)} "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    if known:
        model_type = SUPPORTED_ARCHITECTURES[known[0]]
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    raw = {**raw, "model_type": model_type}
    if model_type in GEMMA_TYPES:  # transformers reads Gemma's "hidden_activation" only
        act = raw.get("hidden_activation") or "gelu_pytorch_tanh"
    else:
        act = raw.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"activation {act!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))})"
        )
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        num_layers = int(raw["num_hidden_layers"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        bias = bool(raw.get("attention_bias", model_type == "qwen2"))
        rope = _rope_config(
            raw,
            _rope_params(raw, "full_attention" if model_type == "gemma3_text" else None),
            head_dim,
        )
        rope_local = None
        if model_type == "gemma3_text":
            rope_local = _rope_config(raw, _rope_params(raw, "sliding_attention"), head_dim)
        cfg = ModelConfig(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", model_type in GEMMA_TYPES)),
            attention_bias=bias,
            o_proj_bias=bias and model_type != "qwen2",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_windows=_sliding_windows(raw, model_type, num_layers),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_ids(raw.get("eos_token_id")),
            hidden_act=ACTIVATIONS[act],
            rope_local=rope_local,
            **_family_fields(raw, model_type, hidden),
            **_moe_fields(raw, model_type, num_layers),
        )
    except KeyError as e:
        raise ModelError(f"config.json lacks required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"config.json has a malformed field: {e}") from None
    if cfg.num_heads % cfg.num_kv_heads:
        raise ModelError(
            f"num_attention_heads ({cfg.num_heads}) is not a multiple of "
            f"num_key_value_heads ({cfg.num_kv_heads})"
        )
    if len(cfg.sliding_windows) != cfg.num_layers:
        raise ModelError("config.json layer_types does not match num_hidden_layers")
    return cfg


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise ModelError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise ModelError(f"no config.json in {model_dir} (is this a Hugging Face model directory?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path} is not a JSON object")
    return parse_config(raw)
