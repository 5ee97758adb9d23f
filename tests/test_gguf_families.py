"""GGUF conversion of the newer families: Qwen3 and Qwen3-MoE (byte-level BPE, as
llama.cpp writes them: q/k norms, stacked experts) convert exactly; the families
whose SentencePiece vocabulary GGUF cannot give back exactly are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.stepping import step_logits
from tpi.errors import UnsupportedModelError
from tpi.master.engine import load_engine
from tpi.model.config import load_config
from tpi.sources.gguf_convert import convert_gguf
from tpi.storage.checkpoint import Checkpoint
from tpi.text.tokenizer import TextTokenizer

LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def write_gguf(hf_dir, path, arch: str) -> None:
    """A GGUF file of `hf_dir` as llama.cpp's converter writes Qwen3 / Qwen3-MoE: no
    rotary permutation (only llama's rows are permuted), experts stacked."""
    import gguf
    from tokenizers import Tokenizer

    cfg = json.loads((hf_dir / "config.json").read_text())
    ckpt = Checkpoint(hf_dir)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
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
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    stacked: dict[str, list] = {}
    for name in sorted(ckpt.names()):
        t = ckpt.get(name, torch.float32).numpy()
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers.") :].split(".", 1)
            if rest.startswith("mlp.experts."):
                e, proj, _ = rest[len("mlp.experts.") :].split(".")
                stacked.setdefault(f"blk.{i}.{EXPERTS[proj]}.weight", []).append((int(e), t))
                continue
            w.add_tensor(f"blk.{i}.{LAYER[rest]}", np.ascontiguousarray(t))
        else:
            names = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }
            w.add_tensor(names[name], np.ascontiguousarray(t))
    for gname, items in stacked.items():
        w.add_tensor(gname, np.ascontiguousarray(np.stack([t for _, t in sorted(items)])))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    ("fixture", "arch"), [("qwen3_dir", "qwen3"), ("qwen3_moe_dir", "qwen3moe")]
)
def test_qwen3_and_qwen3_moe_gguf_convert_exactly(fixture, arch, request, tmp_path):
    hf = request.getfixturevalue(fixture)
    path = tmp_path / "m.gguf"
    write_gguf(hf, path, arch)
    out = convert_gguf(path, tmp_path / "conv")
    a, b = Checkpoint(hf), Checkpoint(out)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.get(name, torch.float32), b.get(name)), name
    ours, theirs = load_config(out), load_config(hf)
    for field in ("num_experts", "experts_per_token", "moe_intermediate_size", "norm_topk_prob",
                  "moe_layers", "qk_norm", "head_dim", "num_kv_heads", "tie_word_embeddings"):  # fmt: skip
        assert getattr(ours, field) == getattr(theirs, field), field
    for s in ("Hello world", "naïve café 日本語 🙂", "<|im_start|>user\nhi"):
        assert TextTokenizer(out).encode(s) == TextTokenizer(hf).encode(s)
    prompt, follow = list(range(5, 25)), list(range(40, 48))
    want = step_logits(load_engine(hf), prompt, follow)
    assert torch.equal(step_logits(load_engine(out), prompt, follow), want)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "phi3"])
def test_sentencepiece_families_are_refused_in_one_line(arch, tmp_path):
    import gguf

    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        UnsupportedModelError, match=rf"GGUF architecture '{arch}' is not converted"
    ):
        convert_gguf(path, tmp_path / "o")
    assert not (tmp_path / "o").exists()
