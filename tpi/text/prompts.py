"""The one way a conversation becomes prompt token ids."""

from __future__ import annotations

from collections.abc import Sequence

from tpi.text.tokenizer import TextTokenizer


def with_system(system: str | None, turns: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """`turns` behind a system message, if there is one."""
    return ([{"role": "system", "content": system}] if system else []) + list(turns)


def conversation_ids(tok: TextTokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Ids of `messages` followed by the opening of the assistant's answer: the
    model's chat template, or, for a model without one, a plain transcript
    (the best a base model can do)."""
    if tok.chat_template is None:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tok.encode(text)
    return tok.encode_chat(messages)
