"""A tiny random Llama checkpoint written without transformers (whose import alone
takes seconds), for unit tests that need a real model but not a reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.factories import make_tokenizer
from tpi.storage.tensor_file import write_safetensors

EOS_ID = 2  # "<|im_end|>" of tests.factories.SPECIALS: the tokenizer's eos_token


def write_tiny_llama(
    out: Path, *, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0
) -> Path:
    """Random weights in Hugging Face's layout, untied, with the EOS row of the LM head
    zero: greedy decoding never ends early, so a request gets every token it asks for."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out)
    inter, kv = 2 * hidden, heads // 2
    head_dim = hidden // heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return 0.3 * torch.randn(shape, generator=g)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    head = rand(vocab, hidden)
    head[EOS_ID] = 0.0
    tensors |= {"model.norm.weight": torch.ones(hidden), "lm_head.weight": head}
    write_safetensors(out / "model.safetensors", tensors)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out
