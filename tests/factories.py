"""Small random models saved in Hugging Face layout, built inside the tests.

Every parameter is randomized (biases and norm weights included: transformers
initialises biases to zero, which would leave the bias code untested).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? "
    "Paris is the capital of France. Tensor parallelism splits every layer across devices. "
    "Hello world! Numbers like 12345 and 3.14159 appear too. naïve café 日本語 🙂 "
) * 20

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(out: Path, vocab_size: int = 320) -> int:
    """Train a tiny byte-level BPE tokenizer into `out`; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TRAINING_TEXT], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            }
        )
    )
    return tok.get_vocab_size()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def make_model(
    out: Path,
    kind: str = "llama",
    *,
    hidden: int = 64,
    heads: int = 8,
    kv_heads: int = 2,
    layers: int = 3,
    intermediate: int = 160,
    vocab: int | None = None,
    tied: bool | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    with_tokenizer: bool = True,
    **extra,
) -> Path:
    """Save a random `kind` model to `out`: "llama", "qwen2", "mistral", "llama3", or
    one of FAMILY_KINDS (Qwen3, Phi-3 with LongRoPE, Gemma 2/3, Mixtral, Qwen3-MoE)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if vocab is None:
        vocab = make_tokenizer(out) if with_tokenizer else 320
    elif with_tokenizer:
        make_tokenizer(out, vocab)
    common = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=True if tied is None else tied, **extra)
    elif kind == "mistral":
        cfg = MistralConfig(**common, tie_word_embeddings=bool(tied), **extra)
    elif kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        cfg = LlamaConfig(
            **common,
            rope_scaling=rope,
            rope_theta=500000.0,
            tie_word_embeddings=bool(tied),
            **extra,
        )
    elif kind == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=bool(tied), **extra)
    elif kind in FAMILY_KINDS:
        cfg = _family_config(kind, common, tied, extra)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    _randomize(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


FAMILY_KINDS = ("qwen3", "phi3", "phi4mini", "gemma2", "gemma3", "mixtral", "qwen3_moe")


def _family_config(kind: str, common: dict, tied: bool | None, extra: dict):
    """Configs of the families after Llama, small, with every switch that family
    has turned on where a default would leave it untested: LongRoPE crossing its
    original context within the test's 36 positions, Gemma windows shorter than
    the prompt and soft-caps that bite, a dense layer among Qwen3-MoE's experts."""
    import transformers as tf

    heads, hidden = common["num_attention_heads"], common["hidden_size"]
    head_dim = hidden // heads
    if kind == "qwen3":
        return tf.Qwen3Config(
            **common, head_dim=head_dim, tie_word_embeddings=True if tied is None else tied, **extra
        )
    if kind in ("phi3", "phi4mini"):
        partial = 0.75 if kind == "phi4mini" else 1.0
        half = int(head_dim * partial) // 2
        rope = {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.5 + 0.5 * i for i in range(half)],
            "partial_rotary_factor": partial,
        }
        cfg = tf.Phi3Config(
            **{**common, "eos_token_id": 2},
            original_max_position_embeddings=24,
            rope_scaling=rope,
            partial_rotary_factor=partial,
            pad_token_id=0,
            tie_word_embeddings=bool(tied),
            **extra,
        )
        return cfg
    if kind == "gemma2":
        return tf.Gemma2Config(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=24,
            sliding_window=6,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=2.0,
            tie_word_embeddings=True if tied is None else tied,
            **extra,
        )
    if kind == "gemma3":
        layers = common["num_hidden_layers"]
        return tf.Gemma3TextConfig(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=24,
            sliding_window=6,
            layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(layers)],
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            tie_word_embeddings=True if tied is None else tied,
            **extra,
        )
    if kind == "mixtral":
        return tf.MixtralConfig(
            **common,
            num_local_experts=extra.pop("experts", 6),
            num_experts_per_tok=extra.pop("top_k", 2),
            tie_word_embeddings=bool(tied),
            **extra,
        )
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            head_dim=head_dim,
            num_experts=extra.pop("experts", 8),
            num_experts_per_tok=extra.pop("top_k", 3),
            moe_intermediate_size=extra.pop("moe_intermediate", 32),
            norm_topk_prob=extra.pop("norm_topk_prob", False),
            mlp_only_layers=extra.pop("mlp_only_layers", [1]),
            tie_word_embeddings=bool(tied),
            **extra,
        )
    raise ValueError(kind)


def load_reference(model_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
