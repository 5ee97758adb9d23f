"""One forward pass on the master, for each kind of parallelism.

The engine (tpi.master.engine) asks a `Forward` for the final hidden states of
a pass: token ids, the BatchStep saying which sequence and position each row
is, how many pieces to overlap, and what the head will want of the result.
Three implementations, one per way the model is laid out:

- `LocalForward`: the master alone (a single machine) embeds and runs every layer;
- `TensorParallelForward`: every worker holds a slice of every layer; the forward
  starts the step on them (STEP with the embedded hidden states, or with a
  vocabulary-parallel split STEP_TOKENS with the ids and the want) and runs rank
  0's slice, whose allreduces join the workers' partials;
- `PipelineForward` (tpi.master.pipeline): stage 0 as above, then every later
  stage's group in turn, as micro-batches where that pays (GPipe).

The forward that needs workers is the one that starts the step on them; the
vocabulary only embeds and chooses.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tpi.master.topology import Topology
from tpi.master.vocab import Vocab
from tpi.model.batch import BatchStep
from tpi.model.decoder import Decoder
from tpi.model.want import Want


class Forward(Protocol):
    @property
    def decoder(self) -> Decoder:
        """Rank 0's own slice of the layers (its KV caches, dtype and context)."""
        ...

    def run(self, ids: list[int], batch: BatchStep, pieces: int, want: Want) -> torch.Tensor:
        """Final hidden states (tokens, hidden) of the pass's rows."""
        ...

    def waiting_seconds(self) -> float:
        """Time spent so far waiting for the network and the disk (not computing)."""
        ...


def local_waiting_seconds(decoder: Decoder) -> float:
    """What rank 0's own decoder has waited for: its allreduces and its disk."""
    total = 0.0
    for source in (decoder.collective, decoder.layers):
        # A world of one has no allreduce counters; resident layers wait for no disk.
        stats = getattr(source, "stats", None)
        total += getattr(stats, "seconds", 0.0) + getattr(stats, "blocked_seconds", 0.0)
    return total


class LocalForward:
    """The master alone: embed, then every layer here."""

    def __init__(self, vocab: Vocab, decoder: Decoder) -> None:
        self.vocab = vocab
        self.decoder = decoder

    def start(self, ids: list[int], batch: BatchStep, pieces: int, want: Want) -> torch.Tensor:
        """Rank 0's hidden states entering layer 0."""
        return self.vocab.embed(ids)

    def run(self, ids: list[int], batch: BatchStep, pieces: int, want: Want) -> torch.Tensor:
        return self.decoder.run(self.start(ids, batch, pieces, want), batch, pieces)

    def waiting_seconds(self) -> float:
        return local_waiting_seconds(self.decoder)


class TensorParallelForward(LocalForward):
    """Stage 0's group (every worker, without a pipeline) runs each layer's slices
    together: the step starts on the workers, then rank 0 runs its own slice."""

    def __init__(self, vocab: Vocab, decoder: Decoder, topology: Topology) -> None:
        super().__init__(vocab, decoder)
        self.topology = topology

    def start(self, ids: list[int], batch: BatchStep, pieces: int, want: Want) -> torch.Tensor:
        """Start the step on the workers; returns rank 0's hidden states entering
        layer 0. This numbers the step (the shared clock) even when no worker is
        in stage 0: later stages and every allreduce go by that number."""
        top = self.topology
        if top.vocab_parallel:
            # Every rank embeds its share of the ids; the sum is the embedding.
            top.world.broadcast.tokens(ids, batch, pieces, want.to_wire())
            return self.vocab.embed(ids)
        h = self.vocab.embed(ids)
        top.first.broadcast.hidden(h, batch, pieces)
        return h
