"""One answer: the batcher (tpi.master.batching) running a batch of one, its
tokens yielded as they come."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

from tpi.comm.links import ClusterError
from tpi.master.batching import Batcher
from tpi.master.engine import Engine
from tpi.master.sampling import SamplingParams
from tpi.master.sequence import BatchSequence, GenerationStats


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

    Slot 0 of `engine` keeps its cache between calls, so a prompt that starts
    with the last one (a chat's next turn) runs only its new tokens. Cancellation
    is honoured between tokens only, so a forward pass (and in a cluster, its
    allreduces) is never abandoned half-way, nor a prompt. With `recover`
    (tpi.master.elastic) the loss of a rank is a pause, not an error.
    """
    seq = BatchSequence(
        list(prompt),
        params,
        frozenset(stop_ids),
        stats=stats if stats is not None else GenerationStats(),
    )
    # The prompt runs whole (cut only by the engine's max_pass_tokens), as it
    # would alone: chunks would change its rounding and cost time.
    batcher = Batcher(engine, max_batch=1, prefill_chunk=0, recover=recover)
    batcher.submit(seq)
    tokens = seq.tokens
    sent = 0
    while not seq.done.is_set():
        batcher.step()
        if len(tokens) > sent:  # one at most: a batch of one chooses a token a pass
            sent += 1
            yield tokens[-1]
            if cancel is not None and cancel.is_set():
                seq.cancel.set()  # the next step ends it without a pass
