"""One generation as the batcher runs it: its request (prompt, sampling, stop
tokens, what to do with each token), its progress in the batch, and its stats."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tpi.errors import PromptError
from tpi.master.engine import Engine
from tpi.master.sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV cache was kept from before
    new_tokens: int = 0
    decode_steps: int = 0  # forward passes after the prefill
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "eos", "length", "stop" (a stop string), "cancelled", "error"

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def check_prompt(engine: Engine, prompt: Sequence[int]) -> None:
    if not prompt:
        raise PromptError("the prompt is empty")
    if len(prompt) >= engine.max_positions:
        raise PromptError(
            f"the prompt has {len(prompt)} tokens but the model's context window is "
            f"{engine.max_positions}; shorten it"
        )


@dataclass
class BatchSequence:
    """One generation in the batch."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()
    on_token: Callable[[int], bool] | None = None  # False: stop here (a stop string)
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats = field(default_factory=GenerationStats)
    tokens: list[int] = field(default_factory=list)  # generated (stop tokens excluded)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    # Set by the batcher:
    slot: int = -1
    fed: int = 0  # tokens of `feed` in the cache so far
    # After a recovery: prompt + tokens so far but the last, to put back into the
    # KV cache of the new cluster before decoding goes on (None otherwise).
    replay: list[int] | None = None
    budget: int = 0
    next_token: int | None = None
    sampler: Sampler | None = None
    kv_bytes: int = 0
    t_start: float = 0.0
    t_decode: float = 0.0

    @property
    def feed(self) -> list[int]:
        """What must be in the cache before this sequence decodes."""
        return self.replay if self.replay is not None else self.prompt

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.feed)
