"""Convert a Llama-family (Llama, Qwen2, Qwen3, Qwen3-MoE) GGUF file to a Hugging
Face checkpoint directory.

Weights are dequantized one tensor at a time and streamed to (sharded)
safetensors, so memory stays bounded by one shard. With `keep_quant`, Q4_0 and
Q4_1 matmul weights are stored as their 4-bit integers and scales instead
(tpi.quant.int4_rows): about a seventh of the fp32 bytes, read back as
bit-identical floats, and passed as they are into int4 splits (groups of 32).
Q8_0 blocks do not map onto tpi's per-channel int8 (one scale per row, not per
32 weights), so they are widened like every other type. llama.cpp stores the rows of
attn_q / attn_k in an interleaved rotary order; they are permuted back to the
Hugging Face "rotate_half" layout the engine (and transformers) expect.
Output is written to a temporary sibling directory and renamed at the end, so
an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpi.dtypes import DTYPES
from tpi.errors import ModelError, UnsupportedModelError
from tpi.quant.int4_rows import Int4Rows, from_gguf_blocks
from tpi.sources.gguf_tokenizer import build_tokenizer
from tpi.storage.atomic import atomic_directory
from tpi.storage.sharded_writer import DEFAULT_SHARD_BYTES, ShardedWriter

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
# Families tpi runs from Hugging Face checkpoints whose GGUF files it does not
# convert: their SentencePiece vocabularies are not rebuilt exactly from GGUF by
# the tokenizers library (byte fallback, normalizer and merges scores differ).
SENTENCEPIECE_ARCHITECTURES = {"gemma", "gemma2", "gemma3", "phi3"}
# llama.cpp stacks a layer's experts into one 3-D tensor per projection.
_EXPERT_NAMES = {
    "ffn_gate_exps.weight": "mlp.experts.{e}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{e}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{e}.down_proj.weight",
}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved rotary row order (weights and biases)."""
    rows = w.shape[0]
    cols = w.shape[1] if w.ndim == 2 else 1
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(w.shape)


class _Meta:
    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.arch = self.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch_get(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{key}", default)


def _open(path: Path) -> _Meta:
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    try:
        meta = _Meta(GGUFReader(str(path)))
    except Exception as e:  # GGUFReader raises ValueError/struct errors on junk
        raise ModelError(f"{path} is not a readable GGUF file: {e}") from None
    if meta.arch in SENTENCEPIECE_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {meta.arch!r} is not converted: its SentencePiece vocabulary "
            "is not rebuilt exactly from GGUF; use the model's Hugging Face checkpoint"
        )
    if meta.arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {meta.arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return meta


def _llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover Llama 3.x rope scaling parameters from llama.cpp's rope_freqs tensor."""
    from tpi.model.config import RopeConfig
    from tpi.model.rope import inverse_frequencies

    base = inverse_frequencies(RopeConfig(theta=theta), head_dim)
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        for original in (8192, 4096, 16384, 2048):
            rope = RopeConfig(
                theta=theta,
                rope_type="llama3",
                factor=factor,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=original,
            )
            # llama.cpp divides each frequency by its factor.
            implied = (base / inverse_frequencies(rope, head_dim)).numpy()
            if np.allclose(implied, factors, rtol=1e-3):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": original,
                }
    raise UnsupportedModelError(
        "GGUF rope_freqs do not match any Llama 3 rope scaling this converter knows"
    )


def _hf_config(
    meta: _Meta, tensor_names: set[str], rope_factors: np.ndarray | None
) -> dict[str, Any]:
    arch_class, model_type = ARCHITECTURES[meta.arch]
    hidden = int(meta.arch_get("embedding_length"))
    heads = int(meta.arch_get("attention.head_count"))
    head_dim = int(meta.arch_get("attention.key_length", hidden // heads))
    rot = int(meta.arch_get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise UnsupportedModelError(
            f"partial rotary embeddings ({rot} of {head_dim} dims) are not supported"
        )
    theta = float(meta.arch_get("rope.freq_base", 10000.0))
    tokens = meta.get("tokenizer.ggml.tokens")
    cfg: dict[str, Any] = {
        "architectures": [arch_class],
        "model_type": model_type,
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": int(meta.arch_get("feed_forward_length", 0)),
        "num_hidden_layers": int(meta.arch_get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.arch_get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.arch_get("context_length", 2048)),
        "rms_norm_eps": float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        if "blk.0.ffn_gate_exps.weight" in tensor_names:
            raise UnsupportedModelError(
                "GGUF mixture of experts of architecture 'llama' (Mixtral) is not converted: "
                "its SentencePiece vocabulary is not rebuilt exactly; use its Hugging Face "
                "checkpoint"
            )
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        cfg["mlp_bias"] = False
    if model_type == "qwen3_moe":
        experts = int(meta.arch_get("expert_count"))
        cfg.update(
            num_experts=experts,
            num_experts_per_tok=int(meta.arch_get("expert_used_count")),
            moe_intermediate_size=int(meta.arch_get("expert_feed_forward_length")),
            # Without the key, as llama.cpp runs Qwen3-MoE: top-k weights renormalised.
            norm_topk_prob=bool(meta.arch_get("expert_weights_norm", True)),
            decoder_sparse_step=1,
            # Layers with a plain MLP (no router) among the MoE ones.
            mlp_only_layers=[
                i
                for i in range(cfg["num_hidden_layers"])
                if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names
            ],
        )
        cfg["intermediate_size"] = int(
            meta.arch_get("feed_forward_length", cfg["moe_intermediate_size"])
        )
    scaling = meta.arch_get("rope.scaling.type")
    if rope_factors is not None:
        cfg["rope_scaling"] = _llama3_rope_from_factors(rope_factors, theta, head_dim)
    elif scaling == "linear":
        cfg["rope_scaling"] = {
            "rope_type": "linear",
            "factor": float(meta.arch_get("rope.scaling.factor")),
        }
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {scaling!r} is not supported")
    return cfg


def _tokenizer_files(
    meta: _Meta, cfg: dict[str, Any]
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    tok_meta = {
        "model": meta.get("tokenizer.ggml.model"),
        "pre": meta.get("tokenizer.ggml.pre"),
        "tokens": meta.get("tokenizer.ggml.tokens"),
        "token_type": meta.get("tokenizer.ggml.token_type"),
        "merges": meta.get("tokenizer.ggml.merges"),
    }
    tokenizer = build_tokenizer(tok_meta)
    tokens = tok_meta["tokens"]

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "model_max_length": cfg["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    eos = [
        i
        for i in (meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"))
        if i is not None
    ]
    gen_config = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": sorted(set(eos)) if len(set(eos)) > 1 else (eos[0] if eos else None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    return tokenizer, tok_config, gen_config


def _kept_int4(t: Any, hf_name: str, n_head: int, n_kv: int, permute: bool) -> Int4Rows | None:
    """A Q4_0/Q4_1 matmul weight as integers (rotary rows put back in HF order), else None."""
    kind = t.tensor_type.name
    if kind not in ("Q4_0", "Q4_1") or not hf_name.endswith("_proj.weight"):
        return None
    cols, rows = (int(x) for x in t.shape)
    w = from_gguf_blocks(np.asarray(t.data), rows, cols, kind)
    heads = n_head if t.name.endswith("attn_q.weight") else n_kv
    if permute and t.name.endswith(("attn_q.weight", "attn_k.weight")):
        w = Int4Rows(
            *(
                torch.from_numpy(np.ascontiguousarray(unpermute_rotary(x.numpy(), heads)))
                for x in (w.q, w.scale, w.minimum)
            )
        )
    return w


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    dtype: str = "fp32",
    progress: Callable[[int, int, str], None] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    keep_quant: bool = False,
) -> Path:
    """Convert `gguf_path` into a Hugging Face checkpoint at `out_dir`.

    `progress(done, total, tensor_name)` is called after each tensor.
    """
    from gguf import quants

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ModelError(f"output directory {out_dir} is not empty (use --force to replace it)")
    meta = _open(gguf_path)
    tensors = list(meta.reader.tensors)
    names = {t.name for t in tensors}
    rope_factors = None
    for t in tensors:
        if t.name == "rope_freqs.weight":
            rope_factors = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    cfg = _hf_config(meta, names, rope_factors)
    tokenizer, tok_config, gen_config = _tokenizer_files(meta, cfg)
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    permute = meta.arch == "llama"
    torch_dtype = DTYPES[dtype]
    cfg["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]

    with atomic_directory(out_dir) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        for i, t in enumerate(tensors):
            hf_name = hf_tensor_name(t.name)
            parts = t.name.split(".", 2)
            if hf_name is None and len(parts) == 3 and parts[2] in _EXPERT_NAMES:
                # One (experts, rows, cols) tensor: one matrix per expert, as HF stores them.
                w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                for e in range(w.shape[0]):
                    name = f"model.layers.{int(parts[1])}." + _EXPERT_NAMES[parts[2]].format(e=e)
                    writer.add(name, torch.from_numpy(w[e].copy()).to(torch_dtype))
                del w
                if progress:
                    progress(i + 1, len(tensors), t.name)
                continue
            if hf_name is None:
                if t.name != "rope_freqs.weight":
                    raise UnsupportedModelError(f"unexpected GGUF tensor {t.name!r}")
                continue
            kept = _kept_int4(t, hf_name, n_head, n_kv, permute) if keep_quant else None
            if kept is not None:
                for name, tensor in kept.stored(hf_name).items():
                    writer.add(name, tensor)
                if progress:
                    progress(i + 1, len(tensors), t.name)
                continue
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            if permute and t.name.endswith(("attn_q.weight", "attn_q.bias")):
                w = unpermute_rotary(w, n_head)
            elif permute and t.name.endswith(("attn_k.weight", "attn_k.bias")):
                w = unpermute_rotary(w, n_kv)
            if not w.flags.writeable:  # F32 tensors are views of the read-only file map
                w = w.copy()
            writer.add(hf_name, torch.from_numpy(np.ascontiguousarray(w)).to(torch_dtype))
            del w
            if progress:
                progress(i + 1, len(tensors), t.name)
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600; a shared model volume needs readers
    return out_dir
