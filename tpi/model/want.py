"""What a forward pass asks of the LM head once its rows are through the layers.

The engine says it once, as a value; the master's head acts on it, and a
vocabulary-parallel split sends it with the step (STEP_TOKENS) so that every
rank computes its share of the same thing:

- nothing (a prompt chunk before its last, a replay into the KV cache);
- logits of some rows (tests, scoring, perplexity), or of every row;
- a chosen token for some rows, each with its own HeadRequest (generation).

Rows are rows of the pass (0 .. tokens - 1), never positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from tpi.model.vocab_head import HeadRequest


class WantMode(str, Enum):
    NONE = "none"
    LOGITS = "logits"
    CHOOSE = "choose"


@dataclass(frozen=True)
class Want:
    mode: WantMode
    # LOGITS: the rows whose logits are wanted (None: every row of the pass).
    rows: tuple[int, ...] | None = None
    # CHOOSE: (row, how to choose its next token), one per sequence that samples.
    requests: tuple[tuple[int, HeadRequest], ...] = ()

    @classmethod
    def nothing(cls) -> Want:
        return cls(WantMode.NONE)

    @classmethod
    def logits(cls, rows: Sequence[int] | None = None) -> Want:
        return cls(WantMode.LOGITS, None if rows is None else tuple(rows))

    @classmethod
    def choose(cls, rows: Sequence[int], requests: Sequence[HeadRequest]) -> Want:
        return cls(WantMode.CHOOSE, requests=tuple(zip(rows, requests, strict=True)))

    @property
    def anything(self) -> bool:
        return self.mode != WantMode.NONE

    @property
    def chosen_rows(self) -> list[int]:
        return [row for row, _ in self.requests]

    def to_wire(self) -> dict:
        """The JSON form a STEP_TOKENS carries (tpi.comm.wire's schema: a dict)."""
        if self.mode == WantMode.LOGITS:
            return {"mode": "logits", "rows": None if self.rows is None else list(self.rows)}
        if self.mode == WantMode.CHOOSE:
            return {
                "mode": "choose",
                "requests": [{"row": row, **req.to_dict()} for row, req in self.requests],
            }
        return {"mode": "none"}

    @classmethod
    def from_wire(cls, body: object, tokens: int) -> Want:
        """A received want, checked against a pass of `tokens` rows (ValueError if
        it is not one a master sends)."""
        if not isinstance(body, dict):
            raise ValueError("head request is not an object")
        mode = body.get("mode")
        if mode == "none":
            return cls.nothing()
        if mode == "logits":
            rows = body.get("rows")
            if rows is None:
                return cls.logits()
            if not isinstance(rows, list) or not rows:
                raise ValueError("head request for rows the step does not have")
            return cls.logits(_rows(rows, tokens))
        if mode == "choose":
            asked = body.get("requests")
            if not isinstance(asked, list) or not asked:
                raise ValueError("head request for rows the step does not have")
            try:
                rows = _rows([r["row"] for r in asked], tokens)
                return cls.choose(rows, [HeadRequest.from_dict(r) for r in asked])
            except (KeyError, TypeError) as e:
                raise ValueError(f"bad head request: {e}") from None
        raise ValueError(f"unknown head request mode {mode!r}")


def _rows(rows: list, tokens: int) -> list[int]:
    if any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < tokens for r in rows):
        raise ValueError("head request for rows the step does not have")
    return rows
