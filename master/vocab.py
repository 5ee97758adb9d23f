"""Where rank 0's embedding and LM head live when it holds them whole.

WholeVocab: the master holds the whole embedding and LM head (a single node,
or a cluster whose workers receive the embedded hidden states each step). A
vocabulary-parallel split spreads them over the ranks instead
(tpi.runtime.vocab_parallel.SpreadVocab); the engine uses either alike.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tpi.model.batch import BatchPlan
from tpi.model.config import ModelConfig
from tpi.model.layers import embed, logits
from tpi.model.vocab_head import HeadRequest, choose_local
from tpi.model.weights import HeadWeights


class StepListener(Protocol):
    """Told about each forward pass before rank 0 runs it (a cluster ships h)."""

    def hidden(self, h: torch.Tensor, plan: BatchPlan, pieces: int = 1) -> None: ...


class WholeVocab:
    def __init__(
        self, cfg: ModelConfig, head: HeadWeights, dtype: torch.dtype, listener: StepListener | None
    ) -> None:
        self.cfg = cfg
        self.head = head
        self.dtype = dtype
        self.listener = listener

    def start(self, ids: list[int], plan: BatchPlan, pieces: int, want: dict) -> torch.Tensor:
        h = embed(torch.tensor(ids, dtype=torch.long), self.head, self.dtype)
        if self.listener is not None:
            self.listener.hidden(h, plan, pieces)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return logits(h, self.head, self.cfg.rms_norm_eps)

    def choose_rows(self, h: torch.Tensor, reqs: list[HeadRequest], rows: list[int]) -> list[int]:
        """The next token of each row of `h` (final states), each by its own request."""
        out = self.logits(h)
        return [choose_local(out[i], req) for i, req in enumerate(reqs)]
