"""The decode loop: prefill the prompt, then sample and feed one token at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from tpi.comm.links import ClusterError
from tpi.errors import PromptError
from tpi.master.engine import Engine
from tpi.master.sampling import Sampler, SamplingParams

T = TypeVar("T")
MAX_RECOVERIES = 8  # per generation: each costs a re-plan, a push maybe, and a replay


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


class Resumable:
    """Runs engine calls of one generation; when a rank is lost, `recover(error)`
    (tpi.master.elastic) gives an engine over the survivors, the sampler is rewound
    to before the failed draw and the KV cache replayed, and the call runs again."""

    def __init__(
        self,
        engine: Engine,
        sampler: Sampler,
        recover: Callable[[ClusterError], Engine] | None,
    ) -> None:
        self.engine = engine
        self.sampler = sampler
        self.recover = recover

    def call(self, fn: Callable[[Engine], T], replay: Callable[[Engine], None]) -> T:
        pending_replay = False
        for _ in range(MAX_RECOVERIES + 1):
            state = self.sampler.checkpoint()
            try:
                if pending_replay:
                    replay(self.engine)
                return fn(self.engine)
            except ClusterError as e:
                if self.recover is None:
                    raise
                self.sampler.rewind(state)
                self.engine = self.recover(e)  # raises when it cannot continue
                pending_replay = True
        raise ClusterError(f"gave up after {MAX_RECOVERIES} recoveries in one generation")


def generate_tokens(
    engine: Engine,
    prompt: Sequence[int],
    params: SamplingParams,
    stop_ids: frozenset[int] | set[int] = frozenset(),
    stats: GenerationStats | None = None,
    cancel: threading.Event | None = None,
    recover: Callable[[ClusterError], Engine] | None = None,
) -> Iterator[int]:
    """Yield generated token ids (stop tokens excluded) as they are produced.

    Cancellation is honoured between tokens only, so a forward pass (and in a
    cluster, its allreduces) is never abandoned half-way. With `recover`, the
    loss of a rank is a pause, not an error (see Resumable).
    """
    check_prompt(engine, prompt)
    stats = stats if stats is not None else GenerationStats()
    sampler = Sampler(params)
    run = Resumable(engine, sampler, recover)
    budget = min(params.max_new_tokens, engine.max_positions - len(prompt))
    stats.prompt_tokens = len(prompt)
    t0 = time.perf_counter()
    token = run.call(lambda e: e.prefill_token(prompt, sampler), lambda e: None)
    stats.reused_tokens = run.engine.last_reused
    out = [token]
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
        pos = len(prompt) + i
        token = run.call(
            lambda e, t=token, p=pos: e.forward_token([t], p, sampler),
            lambda e: e.feed([*prompt, *out[:-1]]),
        )
        out.append(token)
        stats.decode_steps += 1
        stats.decode_seconds = time.perf_counter() - t1
