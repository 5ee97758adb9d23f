"""The decode loop: prefill the prompt, then sample and feed one token at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
    stop_reason: str = ""  # "eos", "length", "cancelled"

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


def generate_tokens(
    engine: Engine,
    prompt: Sequence[int],
    params: SamplingParams,
    stop_ids: frozenset[int] | set[int] = frozenset(),
    stats: GenerationStats | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[int]:
    """Yield generated token ids (stop tokens excluded) as they are produced.

    Cancellation is honoured between tokens only, so a forward pass (and in a
    cluster, its allreduces) is never abandoned half-way.
    """
    check_prompt(engine, prompt)
    stats = stats if stats is not None else GenerationStats()
    sampler = Sampler(params)
    budget = min(params.max_new_tokens, engine.max_positions - len(prompt))
    stats.prompt_tokens = len(prompt)
    t0 = time.perf_counter()
    token = engine.prefill_token(prompt, sampler)
    stats.reused_tokens = engine.last_reused
    stats.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    stats.stop_reason = "length"
    for i in range(budget):
        if token in stop_ids:
            stats.stop_reason = "eos"
            break
        stats.new_tokens += 1
        yield token
        if i == budget - 1:
            break
        if cancel is not None and cancel.is_set():
            stats.stop_reason = "cancelled"
            break
        token = engine.forward_token([token], len(prompt) + i, sampler)
        stats.decode_steps += 1
        stats.decode_seconds = time.perf_counter() - t1
