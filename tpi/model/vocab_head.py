"""Choosing the next token from logits that may be spread over ranks by vocabulary rows.

Each rank holds the LM-head rows of its vocabulary range and computes those
logits only; what crosses the wire is a handful of candidates per rank, never a
vocabulary-sized vector. The same code chooses from one full logits vector (a
single node, or a head kept whole on the master) as one "part", so a seed gives
the same tokens whatever the number of ranks.

Sampling uses the Gumbel-max trick: adding independent Gumbel noise to the
scaled logits and taking the argmax draws exactly from softmax(logits / T). The
noise of a token comes from a seed the master draws, generated for the whole
vocabulary on every rank and sliced, so it does not depend on the split.

- greedy: each rank sends (max, argmax); the master keeps the largest (lowest
  index on ties, as torch.argmax does).
- temperature only: each rank sends its best perturbed logit.
- top-k: each rank sends its top k; the global top k is among them.
- top-p: each rank sends its top candidates and its log-sum-exp; the nucleus is
  read off the merged list if that list is certainly complete down to the
  cut-off, else the master asks for more candidates (a second round: rare with a
  trained model's peaked distributions; with a nearly flat one the nucleus is
  most of the vocabulary, and a rank answers with its float32 logits slice once
  that is smaller than the candidates would be).
Rows on the wire are float64 [value, perturbed value, global index]; row 0
carries [log-sum-exp, best perturbed value, its index].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

FIRST_COUNT = 64  # candidates per rank in the first top-p round
GREEDY = "greedy"
SAMPLE = "sample"


@dataclass(frozen=True)
class HeadRequest:
    """How to choose one token; sent to every rank with the step."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    noise_seed: int = 0  # Gumbel noise of this token
    count: int = FIRST_COUNT  # candidates per rank (top-p, grows on demand)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "noise_seed": self.noise_seed,
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, d: dict) -> HeadRequest:
        req = cls(
            temperature=float(d["temperature"]),
            top_k=int(d["top_k"]),
            top_p=float(d["top_p"]),
            noise_seed=int(d["noise_seed"]),
            count=int(d["count"]),
        )
        if not (
            req.temperature >= 0
            and req.top_k >= 0
            and 0 < req.top_p <= 1
            and req.count >= 1
            and 0 <= req.noise_seed < 2**63
        ):
            raise ValueError(f"bad head request {d}")
        return req


def gumbel_noise(seed: int, vocab: int, start: int, end: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of vocabulary rows [start, end) for this token's seed."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(vocab, generator=g, dtype=torch.float64)[start:end]
    u = u.clamp(min=torch.finfo(torch.float64).tiny)
    return -torch.log(-torch.log(u))


def _uses_top_k(req: HeadRequest, vocab: int) -> bool:
    return 0 < req.top_k < vocab


def candidates(logits: torch.Tensor, start: int, vocab: int, req: HeadRequest) -> torch.Tensor:
    """This part's candidates for `req`: float64 rows (see the module docstring).

    `logits` holds vocabulary rows [start, start + len) of one position."""
    values = logits.double()
    if req.greedy:
        best = int(torch.argmax(values))
        return torch.tensor([[float(values[best]), 0.0, float(start + best)]], dtype=torch.float64)
    values = values / req.temperature
    noisy = values + gumbel_noise(req.noise_seed, vocab, start, start + values.numel())
    best = int(torch.argmax(noisy))
    head = [float(torch.logsumexp(values, 0)), float(noisy[best]), float(start + best)]
    filtered = _uses_top_k(req, vocab) or req.top_p < 1
    if not filtered:
        return torch.tensor([head], dtype=torch.float64)
    count = min(values.numel(), req.top_k if _uses_top_k(req, vocab) else req.count)
    # Stable sort: equal values keep index order, as a global sort would.
    order = torch.sort(values, descending=True, stable=True).indices[:count]
    rows = torch.stack([values[order], noisy[order], (order + start).double()], dim=1)
    return torch.cat([torch.tensor([head], dtype=torch.float64), rows])


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(value, index): larger value wins, then the lower index."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def _filtered(req: HeadRequest, vocab: int) -> bool:
    return _uses_top_k(req, vocab) or req.top_p < 1


def choose(parts: list[torch.Tensor], sizes: list[int], vocab: int, req: HeadRequest) -> int | None:
    """The token `req` picks from every part's candidates; None if top-p needs more of them.

    `sizes[i]` is how many vocabulary rows part i holds (to know when it sent them all)."""
    if req.greedy or not _filtered(req, vocab):
        col = 0 if req.greedy else 1
        best = None
        for p in parts:
            cand = (float(p[0, col]), float(p[0, 2]))
            if best is None or _better(cand, best):
                best = cand
        return int(best[1])
    nucleus = _nucleus(parts, sizes, vocab, req)
    if nucleus is None:
        return None
    best = nucleus[nucleus[:, 1] == nucleus[:, 1].max()]
    return int(best[:, 2].min())


def _nucleus(
    parts: list[torch.Tensor], sizes: list[int], vocab: int, req: HeadRequest
) -> torch.Tensor | None:
    """The candidate rows top-k and top-p keep, most likely first; None if top-p
    cannot tell yet (some part may hold more of the nucleus)."""
    rows = torch.cat([p[1:] for p in parts])
    if len(parts) > 1:  # one part comes sorted already (see candidates)
        # Global order: value descending, index ascending on ties (stable sorts).
        rows = rows[torch.argsort(rows[:, 2], stable=True)]
        rows = rows[torch.sort(rows[:, 0], descending=True, stable=True).indices]
    if _uses_top_k(req, vocab):
        rows = rows[: req.top_k]  # every part sent its whole top k: this is exact
        log_z = torch.logsumexp(rows[:, 0], 0)
        complete, safe = True, rows.shape[0]
    else:
        log_z = torch.logsumexp(torch.stack([p[0, 0] for p in parts]), 0)
        partial = [p for p, n in zip(parts, sizes, strict=True) if p.shape[0] - 1 < n]
        complete = not partial
        # A part that did not send all its rows may hold more, none above its last
        # value sent: the merged order is exact only above the largest such value.
        bound = max((float(p[-1, 0]) for p in partial), default=-math.inf)
        safe = int((rows[:, 0] > bound).sum())
    # The nucleus ends at the first row whose predecessors already hold top_p.
    mass = torch.cumsum(torch.exp(rows[:safe, 0] - log_z), 0)
    before = torch.cat([mass.new_zeros(1), mass])  # mass before row i, i = 0..safe
    reached = torch.nonzero(before >= req.top_p)
    if reached.numel():
        cut = int(reached[0])
    elif complete:
        cut = rows.shape[0]
    else:
        return None
    return rows[: max(cut, 1)]  # the most likely token always stays


def distribution(logits: torch.Tensor, req: HeadRequest) -> torch.Tensor:
    """The probabilities `choose_local` draws the next token from (for tests and
    for reading): softmax of the scaled logits over what top-k and top-p keep."""
    vocab = logits.numel()
    if req.greedy:
        return torch.nn.functional.one_hot(torch.argmax(logits), vocab).double()
    whole = replace(req, count=vocab)
    part = candidates(logits, 0, vocab, whole)
    if not _filtered(req, vocab):
        return torch.softmax(logits.double() / req.temperature, 0)
    rows = _nucleus([part], [vocab], vocab, whole)
    out = torch.zeros(vocab, dtype=torch.float64)
    out[rows[:, 2].long()] = torch.softmax(rows[:, 0], 0)
    return out


def slice_is_smaller(count: int, rows: int) -> bool:
    """A candidate row is three float64s (24 bytes), a logit one float32 (4): past a
    sixth of a part's rows, its logits slice is the smaller answer. The master then
    draws the candidates itself (the noise is a function of the seed)."""
    return count * 6 >= rows


def more(req: HeadRequest) -> HeadRequest:
    """The request for the next top-p round: four times the candidates."""
    return replace(req, count=req.count * 4)


def choose_local(logits: torch.Tensor, req: HeadRequest) -> int:
    """Choose from one full logits vector (a single part, never on the wire: all its
    rows are offered at once, so top-p needs no second round)."""
    vocab = logits.numel()
    whole = replace(req, count=vocab)
    token = choose([candidates(logits, 0, vocab, whole)], [vocab], vocab, whole)
    assert token is not None  # a complete part always decides
    return token
