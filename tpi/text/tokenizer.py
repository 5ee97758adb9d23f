"""Text <-> token ids for a model directory (tokenizer.json via `tokenizers`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from tpi.errors import ModelError
from tpi.text.chat_template import ChatTemplate

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as a string or an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _chat_template_source(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    tpl = tok_config.get("chat_template")
    if isinstance(tpl, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) else None


class TextTokenizer:
    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"no tokenizer.json in {model_dir}")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ModelError(f"cannot load {path}: {e}") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        self.special_tokens = {
            k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None
        }
        source = _chat_template_source(model_dir, config)
        self.chat_template = ChatTemplate(source, self.special_tokens) if source else None
        self.eos_ids = self._eos_ids(model_dir)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry in characters (a byte-level entry spells one
        character per byte): no token covers more of a text than this."""
        return max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)

    def _eos_ids(self, model_dir: Path) -> frozenset[int]:
        """Every id that ends an answer: generation_config, config and tokenizer eos."""
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            value = _read_json(model_dir / name).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
        eos = self.special_tokens.get("eos_token")
        if eos is not None and (tid := self._tok.token_to_id(eos)) is not None:
            ids.add(tid)
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def render_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        if self.chat_template is None:
            raise ModelError("this model has no chat template (use raw prompts instead)")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        # The template already writes BOS and role markers as text.
        return self.encode(
            self.render_chat(messages, add_generation_prompt), add_special_tokens=False
        )


class StreamDecoder:
    """Turns a growing list of token ids into text pieces safe to print.

    Decoding token by token breaks multi-byte characters and word-initial
    spaces; this decodes a short window of recent tokens and emits only text
    that is complete (no trailing U+FFFD), as text-generation-inference does.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix_text = self.tok.decode(self.ids[self._prefix : self._read], self.skip)
        new_text = self.tok.decode(self.ids[self._prefix :], self.skip)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            piece = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""
