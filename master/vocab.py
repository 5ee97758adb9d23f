"""Where the master's embedding and LM head live, and how a token is chosen.

- WholeVocab: the master holds the whole embedding and LM head (a single node,
  or a cluster whose workers receive the embedded hidden states each step).
- SpreadVocab: every rank holds its vocabulary rows (a vocabulary-parallel
  split). Only token ids go out with a step; an allreduce assembles the
  embeddings; each rank computes its slice of the logits and the master
  chooses the token from a few candidates per rank (tpi.vocab_head), so no
  vocabulary-sized vector crosses the wire while generating.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch

from tpi.config import ModelConfig
from tpi.layers import embed, logits
from tpi.star_allreduce import EMBED_LAYER, PHASE_EMBED, StarMaster
from tpi.vocab_head import HeadRequest, candidates, choose, choose_local, more
from tpi.weights import HeadWeights


class StepListener(Protocol):
    """Told about each forward pass before rank 0 runs it (a cluster that ships h)."""

    def begin_step(self, h: torch.Tensor, pos: int, chunks: int = 1) -> None: ...


class WholeVocab:
    def __init__(
        self, cfg: ModelConfig, head: HeadWeights, dtype: torch.dtype, listener: StepListener | None
    ) -> None:
        self.cfg = cfg
        self.head = head
        self.dtype = dtype
        self.listener = listener

    def start(self, ids: list[int], pos: int, chunks: int, want: dict) -> torch.Tensor:
        h = embed(torch.tensor(ids, dtype=torch.long), self.head, self.dtype)
        if self.listener is not None:
            self.listener.begin_step(h, pos, chunks)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return logits(h, self.head, self.cfg.rms_norm_eps)

    def choose(self, h_last: torch.Tensor, req: HeadRequest) -> int:
        return choose_local(self.logits(h_last)[0], req)


class SpreadVocab:
    def __init__(
        self,
        cfg: ModelConfig,
        head: HeadWeights,
        dtype: torch.dtype,
        collective: StarMaster,
        sizes: list[int],
    ) -> None:
        self.cfg = cfg
        self.head = head  # rank 0's rows
        self.dtype = dtype
        self.collective = collective
        self.sizes = sizes  # vocabulary rows per rank
        self.starts = [sum(sizes[:r]) for r in range(len(sizes))]

    def start(self, ids: list[int], pos: int, chunks: int, want: dict) -> torch.Tensor:
        self.collective.begin_step_tokens(ids, pos, chunks, want)
        partial = embed(torch.tensor(ids, dtype=torch.long), self.head, self.dtype)
        return self.collective.allreduce(partial, EMBED_LAYER, PHASE_EMBED)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full logits: every rank's slice, gathered (tests and perplexity only)."""
        own = logits(h, self.head, self.cfg.rms_norm_eps)
        parts = self.collective.gather_head(0)
        return torch.cat([own, *(parts[r] for r in sorted(parts))], dim=-1)

    def choose(self, h_last: torch.Tensor, req: HeadRequest) -> int:
        row = logits(h_last, self.head, self.cfg.rms_norm_eps)[0]
        # Our own rows cost nothing to send: offer them all, once, so only remote
        # ranks can leave a top-p round undecided.
        whole = replace(req, count=self.sizes[0])
        own = candidates(row, self.head.start, self.cfg.vocab_size, whole)
        round_ = 0
        while True:
            got = self.collective.gather_head(round_)
            parts = [own]
            for r in sorted(got):
                if got[r].dtype == torch.float32:  # the rank sent its logits slice
                    whole = replace(req, count=self.sizes[r])
                    got[r] = candidates(got[r], self.starts[r], self.cfg.vocab_size, whole)
                parts.append(got[r])
            token = choose(parts, self.sizes, self.cfg.vocab_size, req)
            if token is not None:
                return token
            req = more(req)
            round_ += 1
            self.collective.request_more(round_, req.count)
