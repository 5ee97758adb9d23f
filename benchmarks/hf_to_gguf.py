"""Write a Hugging Face Llama checkpoint as a GGUF file llama.cpp runs (benchmarks only).

The inverse of tpi.sources.gguf_convert for the tensors a Llama has: GGUF tensor
names, the Q/K rotary row order llama.cpp expects, llama metadata from config.json,
and a byte-level BPE vocabulary. llama.cpp refuses a file without a vocabulary,
but llama-bench never tokenizes text, so a synthetic model borrows the first N
tokens (and the merges among them) of another GGUF's vocabulary, SmolLM2's.

Tensors are read and written one at a time (header first, then each tensor's
bytes), so a 7B checkpoint never has to fit in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Hugging Face name inside a layer -> GGUF name inside blk.N (llama.cpp's names).
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
FLOAT_TYPES = {"f16": np.float16, "f32": np.float32}


@dataclass
class Vocab:
    """The tokenizer.ggml.* fields of a byte-level BPE ("gpt2") GGUF vocabulary."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str | None
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None


def truncate_vocab(vocab: Vocab, size: int) -> Vocab:
    """The first `size` tokens and only the merges that stay inside them.

    A merge "a b" is kept when a, b and "ab" are all kept tokens, so every kept
    token is still reachable and no merge names a token that is gone."""
    if size > len(vocab.tokens):
        raise ValueError(f"vocabulary has {len(vocab.tokens)} tokens, {size} asked for")
    tokens = vocab.tokens[:size]
    kept = set(tokens)
    merges = []
    for m in vocab.merges:
        left, right = m.split(" ", 1)
        if left in kept and right in kept and left + right in kept:
            merges.append(m)

    def inside(i: int | None) -> int | None:
        return i if i is not None and i < size else None

    return Vocab(
        tokens,
        vocab.types[:size],
        merges,
        vocab.pre,
        inside(vocab.bos),
        inside(vocab.eos),
        inside(vocab.unk),
        inside(vocab.pad),
    )


def vocab_from_gguf(path: Path, size: int | None = None) -> Vocab:
    """The vocabulary of a "gpt2"-tokenizer GGUF file, optionally cut to `size` tokens."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def get(key: str):
        f = fields.get(f"tokenizer.ggml.{key}")
        return None if f is None else f.contents()

    if get("model") != "gpt2":
        raise ValueError(f"{path}: vocabulary model {get('model')!r}, expected 'gpt2'")
    vocab = Vocab(
        list(get("tokens")),
        [int(t) for t in get("token_type")],
        list(get("merges")),
        get("pre"),
        get("bos_token_id"),
        get("eos_token_id"),
        get("unknown_token_id"),
        get("padding_token_id"),
    )
    return vocab if size is None else truncate_vocab(vocab, size)


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face "rotate_half" rows -> llama.cpp's interleaved rotary rows.

    The inverse of tpi.sources.gguf_convert.unpermute_rotary (weights and biases)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str | None:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_NAMES:
        return f"blk.{int(parts[2])}.{LAYER_NAMES[parts[3]]}"
    return None


def _tensor_files(hf_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir}")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                where[k] = f
    return where


def _ordered(names: Sequence[str], layers: int) -> list[str]:
    """llama.cpp's converter order: embedding, layer by layer, then the head."""
    order = ["model.embed_tokens.weight"]
    for i in range(layers):
        order += [f"model.layers.{i}.{k}" for k in LAYER_NAMES]
    order += ["model.norm.weight", "lm_head.weight"]
    have = set(names)
    return [n for n in order if n in have]


def write_gguf(hf_dir: Path, out: Path, vocab: Vocab, dtype: str = "f16") -> Path:
    """Write the Llama checkpoint in `hf_dir` to `out` (matmul weights in `dtype`,
    norms and biases in f32, as llama.cpp requires). Written to a temporary file and
    renamed at the end, so an interrupted write never looks like a finished one."""
    import gguf
    from safetensors import safe_open

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"only Llama checkpoints are written (got {cfg.get('model_type')!r})")
    if cfg.get("rope_scaling"):
        raise ValueError("rope scaling is not written by this benchmark helper")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    layers = cfg["num_hidden_layers"]
    if len(vocab.tokens) != cfg["vocab_size"]:
        raise ValueError(f"vocabulary has {len(vocab.tokens)} tokens, model {cfg['vocab_size']}")
    np_dtype = FLOAT_TYPES[dtype]
    where = _tensor_files(hf_dir)
    names = _ordered(list(where), layers)
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in names:
        names.remove("lm_head.weight")  # llama.cpp reuses token_embd when output is absent
    unknown = [n for n in where if gguf_name(n) is None and "rotary_emb" not in n]
    if unknown:
        raise ValueError(f"tensors this writer does not map: {unknown[:5]}")

    def stored(name: str, shape: Sequence[int]) -> type:
        # llama.cpp computes norms and biases in f32 and refuses f16 ones.
        return np_dtype if len(shape) == 2 else np.float32

    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(hf_dir.name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    if vocab.pre:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for key, value in (
        ("bos_token_id", vocab.bos),
        ("eos_token_id", vocab.eos),
        ("unknown_token_id", vocab.unk),
        ("padding_token_id", vocab.pad),
    ):
        if value is not None:
            w.add_uint32(f"tokenizer.ggml.{key}", value)
    w.add_add_bos_token(False)

    shapes: dict[str, tuple[int, ...]] = {}
    for n in names:
        with safe_open(str(where[n]), framework="pt") as st:
            shapes[n] = tuple(st.get_slice(n).get_shape())
        dt = stored(n, shapes[n])
        nbytes = int(np.prod(shapes[n])) * np.dtype(dt).itemsize
        w.add_tensor_info(gguf_name(n), shapes[n], np.dtype(dt), nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for n in names:
        with safe_open(str(where[n]), framework="pt") as st:
            t = st.get_tensor(n)
        if n.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_rotary(t, heads)
        elif n.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_rotary(t, kv_heads)
        as_torch = torch.float16 if stored(n, shapes[n]) is np.float16 else torch.float32
        w.write_tensor_data(np.ascontiguousarray(t.to(as_torch).numpy()))
        del t
    w.close()
    os.replace(tmp, out)
    return out
