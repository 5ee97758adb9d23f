"""Mixture of experts: the router and the experts' partial output, for any rank.

The router (a small hidden x experts matrix) is replicated on every rank, so
every rank knows which experts each token picked without a message. Each rank
holds part of the experts, either whole experts (expert parallelism) or the same
columns of every expert (tensor parallelism), as its RankSlice says; it runs the
picked experts it holds on the rows that picked them and returns a partial sum,
which the MLP's one allreduce completes exactly as for a dense MLP.

Where an expert's weights come from is an ExpertSource: all held in memory, or
(tpi.runtime.expert_stream) read from disk when a token picks it, so a streamed
mixture of experts reads only the experts it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from tpi.model.linear import linear
from tpi.quant.formats import Weight, weight_nbytes


@dataclass
class ExpertWeights:
    """One expert's slice on this rank: gate and up rows fused, then down."""

    gate_up: Weight  # (2 * cols, hidden)
    down: Weight  # (hidden, cols)

    def nbytes(self) -> int:
        return weight_nbytes(self.gate_up) + weight_nbytes(self.down)


class ExpertSource(Protocol):
    """The experts of one layer that this rank holds."""

    held: range  # expert indices this rank holds (a part of every one, or whole ones)

    def prepare(self, experts: list[int]) -> None:
        """A hint: these experts are about to be asked for, in this order."""

    def get(self, expert: int) -> ExpertWeights: ...

    def nbytes(self) -> int:
        """Bytes held in memory for this layer's experts (0 when streamed)."""


class ResidentExperts:
    """Experts all held in memory."""

    def __init__(self, experts: dict[int, ExpertWeights]) -> None:
        self.experts = experts
        self.held = range(min(experts), max(experts) + 1) if experts else range(0)

    def prepare(self, experts: list[int]) -> None:
        pass

    def get(self, expert: int) -> ExpertWeights:
        return self.experts[expert]

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.experts.values())


def route(
    x: torch.Tensor, router: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (T, k) float32, expert ids (T, k)) of each row, as transformers'
    Mixtral and Qwen3-MoE route: softmax in float32 over all experts, the top k,
    renormalised to sum 1 when the model says so."""
    probs = F.linear(x, router.to(x.dtype)).float().softmax(-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def moe_block(
    x: torch.Tensor, router: torch.Tensor, experts: ExpertSource, top_k: int, normalize: bool
) -> torch.Tensor:
    """Partial output (T, hidden) of the picked experts this rank holds."""
    weights, ids = route(x, router, top_k, normalize)
    out = torch.zeros_like(x)
    picked = [e for e in torch.unique(ids).tolist() if e in experts.held]
    experts.prepare(picked)
    for e in picked:
        rows, slot = torch.nonzero(ids == e, as_tuple=True)
        w = experts.get(e)
        xe = x[rows]
        gate, up = linear(xe, w.gate_up).chunk(2, dim=-1)
        y = linear(F.silu(gate) * up, w.down)
        out.index_add_(0, rows, (y * weights[rows, slot, None]).to(out.dtype))
    return out
