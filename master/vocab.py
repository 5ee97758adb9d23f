"""Rank 0's embedding and LM head when it holds them whole.

WholeVocab: the master holds the whole embedding and LM head (a single node,
or a cluster whose workers receive the embedded hidden states each step). A
vocabulary-parallel split spreads them over the ranks instead
(tpi.runtime.vocab_parallel.SpreadVocab). Either only embeds and chooses: the
forward pass (tpi.master.forward) is what starts a step on the workers.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tpi.model.config import ModelConfig
from tpi.model.layers import embed, logits
from tpi.model.vocab_head import HeadRequest, choose_local
from tpi.model.weights import HeadWeights


class Vocab(Protocol):
    """What the engine and the forward pass ask of rank 0's head."""

    def embed(self, ids: list[int]) -> torch.Tensor: ...

    def logits(self, h: torch.Tensor) -> torch.Tensor: ...

    def choose_rows(
        self, h: torch.Tensor, reqs: list[HeadRequest], rows: list[int]
    ) -> list[int]: ...


class WholeVocab:
    def __init__(self, cfg: ModelConfig, head: HeadWeights, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.head = head
        self.dtype = dtype

    def embed(self, ids: list[int]) -> torch.Tensor:
        return embed(torch.tensor(ids, dtype=torch.long), self.head, self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return logits(h, self.head, self.cfg.rms_norm_eps)

    def choose_rows(self, h: torch.Tensor, reqs: list[HeadRequest], rows: list[int]) -> list[int]:
        """The next token of each row of `h` (final states), each by its own request."""
        out = self.logits(h)
        return [choose_local(out[i], req) for i, req in enumerate(reqs)]
