"""Rebuild a Hugging Face tokenizer.json from a GGUF vocabulary.

Only byte-level BPE vocabularies (GGUF tokenizer model "gpt2": SmolLM, Llama 3,
Qwen2, ...) are supported; the pre-tokenizer split follows the `pre` name the
way llama.cpp and transformers do. SentencePiece vocabularies (Llama 2 GGUFs)
are refused with a clear message.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from tpi.errors import UnsupportedModelError

# Public pre-tokenizer regexes of the model families (from their tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """`meta` holds the GGUF tokenizer.ggml.* fields (tokens, token_type, merges, model, pre)."""
    model = meta.get("model")
    if model != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2'); "
            "convert from the Hugging Face checkpoint instead"
        )
    tokens: list[str] = list(meta["tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("merges", [])]
    if not merges:
        raise UnsupportedModelError("GGUF vocabulary has no BPE merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("pre") or "")
    if split:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(meta.get("token_type") or [])
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == TOKEN_TYPE_USER_DEFINED
    ]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)
    return tk
