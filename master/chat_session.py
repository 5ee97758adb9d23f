"""A multi-turn conversation: history, prompt rendering, context trimming."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tpi.errors import PromptError
from tpi.master.engine import Engine
from tpi.master.generation import GenerationStats, generate_tokens
from tpi.master.sampling import SamplingParams
from tpi.text.prompts import conversation_ids, with_system
from tpi.text.tokenizer import StreamDecoder, TextTokenizer


@dataclass
class ChatSession:
    engine: Engine
    tokenizer: TextTokenizer
    params: SamplingParams
    system_prompt: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    dropped_turns: int = 0  # turns forgotten so the conversation fits the context
    failed_message: str | None = None  # the last message whose answer failed
    # tpi.master.elastic: the engine over the surviving ranks when one is lost
    # mid-answer (None: the answer fails, /retry reconnects).
    recover: Callable[[Exception], Engine] | None = None

    def _recovered(self, e: Exception) -> Engine:
        self.engine = self.recover(e)
        return self.engine

    def reset(self) -> None:
        self.history.clear()
        self.engine.reset()

    def _prompt_ids(self, turns: list[dict[str, str]]) -> list[int]:
        return conversation_ids(self.tokenizer, with_system(self.system_prompt, turns))

    def _fit(self, turns: list[dict[str, str]]) -> list[int]:
        """Prompt ids, forgetting the oldest exchanges until an answer still fits."""
        limit = self.engine.max_positions - min(
            self.params.max_new_tokens, self.engine.max_positions // 2
        )
        ids = self._prompt_ids(turns)
        while len(ids) > limit and len(turns) > 1:
            turns[:] = turns[2:] if len(turns) > 2 else turns[1:]
            self.dropped_turns += 1
            ids = self._prompt_ids(turns)
        if len(ids) > limit:
            raise PromptError(
                f"the message needs {len(ids)} tokens but the context window leaves room for {limit}"
            )
        return ids

    def ask(
        self, text: str, stats: GenerationStats, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Stream the answer to `text` as printable pieces; history is updated at the end."""
        if not text.strip():
            raise PromptError("the message is empty")
        turns = self.history + [{"role": "user", "content": text}]
        ids = self._fit(turns)
        decoder = StreamDecoder(self.tokenizer)
        answer: list[str] = []
        self.failed_message = None
        try:
            recover = self._recovered if self.recover is not None else None
            for token in generate_tokens(
                self.engine, ids, self.params, self.tokenizer.eos_ids, stats, cancel, recover
            ):
                piece = decoder.push(token)
                if piece:
                    answer.append(piece)
                    yield piece
            tail = decoder.flush()
            if tail:
                answer.append(tail)
                yield tail
        except Exception:
            # A failed answer (e.g. a worker died) is not part of the conversation;
            # the message is kept so it can be asked again (/retry).
            self.failed_message = text
            raise
        # Even a cancelled answer is part of the conversation the user saw.
        self.history = turns + [{"role": "assistant", "content": "".join(answer)}]
