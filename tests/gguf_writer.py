"""GGUF files written from a Hugging Face directory the way llama.cpp's converter
writes them: the forward direction that tpi.sources.gguf_convert undoes, for the
GGUF tests' models. Llama's q/k rows are permuted into llama.cpp's rotary order
(Qwen3's are not), experts are stacked per layer, and layer matrices may be
quantized as llama-quantize would (Q8_0 everywhere, Q4_0/Q4_1 in the layers)."""

from __future__ import annotations

import json

import numpy as np
import torch

from benchmarks.hf_to_gguf import GLOBAL_NAMES, LAYER_NAMES, permute_rotary
from tpi.storage.checkpoint import Checkpoint

# Hugging Face name inside a layer -> GGUF name inside blk.N: Llama's, and the
# q/k norms and router of Qwen3 and Qwen3-MoE.
LAYER = {
    **LAYER_NAMES,
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def write_gguf(hf_dir, path, arch: str = "llama", quant: str = "F32") -> None:
    """`hf_dir` as a GGUF file of architecture `arch` ("llama", "qwen3", "qwen3moe")."""
    import gguf
    from tokenizers import Tokenizer

    cfg = json.loads((hf_dir / "config.json").read_text())
    ckpt = Checkpoint(hf_dir)
    llama = arch == "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    if llama:
        w.add_rope_freq_base(10000.0)
    else:  # Qwen3's heads are not hidden / heads wide
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "qwen3moe":
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_weights_norm(cfg["norm_topk_prob"])
    data = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in data["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default" if llama else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if llama:
        template = json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"]
        w.add_chat_template(template)
    stacked: dict[str, list] = {}
    for name in sorted(ckpt.names()):
        t = ckpt.get(name, torch.float32).numpy()
        in_layer = name.startswith("model.layers.")
        if not in_layer:
            gname = GLOBAL_NAMES[name]
        else:
            i, rest = name[len("model.layers.") :].split(".", 1)
            if rest.startswith("mlp.experts."):
                e, proj, _ = rest[len("mlp.experts.") :].split(".")
                stacked.setdefault(f"blk.{i}.{EXPERTS[proj]}.weight", []).append((int(e), t))
                continue
            gname = f"blk.{i}.{LAYER[rest]}"
            if llama and rest.startswith("self_attn.q_proj"):
                t = permute_rotary(t, cfg["num_attention_heads"])
            elif llama and rest.startswith("self_attn.k_proj"):
                t = permute_rotary(t, cfg["num_key_value_heads"])
        four_bit = quant in ("Q4_0", "Q4_1") and in_layer
        if t.ndim == 2 and (quant == "Q8_0" or four_bit):
            kind = getattr(gguf.GGMLQuantizationType, quant)
            w.add_tensor(gname, gguf.quants.quantize(t, kind), raw_dtype=kind)
        else:
            w.add_tensor(gname, np.ascontiguousarray(t))
    for gname, items in stacked.items():
        w.add_tensor(gname, np.ascontiguousarray(np.stack([t for _, t in sorted(items)])))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
