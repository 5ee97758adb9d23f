"""Choose a placement: which nodes take part, each rank's share of the heads and
MLP columns, and each rank's window, for the lowest predicted ms/token within
every node's memory.

Shares are searched as MLP column blocks per rank (the split's own unit,
tpi.model.partition): shares = block counts, so every candidate is a partition
the split makes exactly, and attention heads follow in proportion. Every subset
of the workers is tried (the master always takes part: it holds the text and the
head), so a device whose link or speed would slow the cluster is left out. Per
subset:

- exact search over every split of the blocks into positive counts, when there
  are at most EXACT_LIMIT of them (any home cluster of a small model);
- otherwise a mixed-integer program (HiGHS, through highspy) over block counts,
  with the phase times and memory linearized in them, then a local search of
  single-block moves under the exact cost model, which also removes the
  linearization's error.

Each rank's window is what the runtime would pick in its memory (all layers when
they fit). A node that cannot hold even one layer of its smallest slice is left
out and says why; when no subset fits, the error names the node that does not.
Ties (predictions within TIE_SHARE of each other) go to fewer nodes, then to the
most even shares, then to the lowest shares of earlier ranks.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass, field

from tpi.errors import TpiError
from tpi.model.config import ModelConfig
from tpi.model.partition import PartitionError, mlp_blocks, plan_partition
from tpi.planning.cost_model import (
    NodeSpeed,
    Placement,
    PlacementError,
    Prediction,
    RankPlacement,
    Stage,
    Workload,
    predict,
)
from tpi.planning.footprint import head_bytes, plan_memory
from tpi.runtime.memory_budget import format_size

EXACT_LIMIT = 20_000  # candidate splits per subset searched one by one
SUBSET_LIMIT = 10  # workers beyond this: drop them greedily instead of trying every subset
TIE_SHARE = 0.005  # predictions this close are a tie


class NoPlacement(TpiError):
    """No placement fits in the nodes' memory."""


@dataclass(frozen=True)
class Candidate:
    """A placement the solver considered (the best one of its set of nodes)."""

    label: str
    node_names: tuple[str, ...]  # in rank order
    shares: tuple[int, ...]
    placement: Placement | None
    prediction: Prediction | None
    infeasible: str | None = None

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "nodes": list(self.node_names),
            "shares": list(self.shares),
            "prediction": self.prediction.to_dict() if self.prediction else None,
            "infeasible": self.infeasible,
        }


@dataclass(frozen=True)
class Plan:
    chosen: Candidate
    node_indices: tuple[int, ...]  # which nodes take part, in rank order (0 = master)
    candidates: tuple[Candidate, ...]  # the best of every set of nodes, and even shares
    reasons: tuple[str, ...]
    method: str  # "exact" or "milp"
    context: int  # tokens of KV cache planned on every rank
    evaluated: int = 0

    @property
    def placement(self) -> Placement:
        assert self.chosen.placement is not None
        return self.chosen.placement

    @property
    def windows(self) -> tuple[int, ...]:
        return tuple(r.window for r in self.placement.ranks)

    def to_dict(self) -> dict:
        return {
            "chosen": self.chosen.to_dict(),
            "nodes": list(self.chosen.node_names),
            "shares": list(self.chosen.shares),
            "windows": list(self.windows),
            "reasons": list(self.reasons),
            "method": self.method,
            "context": self.context,
            "evaluated": self.evaluated,
            "candidates": [c.to_dict() for c in self.candidates],
        }


@dataclass
class _Search:
    cfg: ModelConfig
    nodes: list[NodeSpeed]
    wl: Workload
    evaluated: int = 0
    infeasible: dict[int, str] = field(default_factory=dict)  # node -> why it never fits

    def placement(self, subset: tuple[int, ...], shares: tuple[int, ...]) -> Placement | str:
        """The placement of these shares over these nodes, or why it does not fit."""
        try:
            part = plan_partition(self.cfg, list(shares))
        except PartitionError as e:
            return str(e)
        ranks = []
        for i, (node_i, rs) in enumerate(zip(subset, part.slices, strict=True)):
            node = self.nodes[node_i]
            head = head_bytes(self.cfg, self.wl.fmt) if i == 0 else 0
            memory = functools.partial(
                plan_memory,
                self.cfg,
                rs,
                self.wl.fmt,
                baseline_bytes=node.baseline_bytes,
                head=head,
                capacity_source=node.capacity_source,
            )
            fit = not self.wl.context_fixed
            need = memory(
                context=self.wl.context, capacity=node.capacity, fit_context_to_capacity=fit
            )
            if need is None:
                small = memory(context=self.wl.context, capacity=None, fit_context_to_capacity=fit)
                one = small.total - (small.window - 1) * small.layer.memory
                return (
                    f"rank {i} ({node.name}) does not fit: needs {format_size(one)} for "
                    f"{'its head and ' if i == 0 else ''}one layer of a {rs.n_mlp}-column slice, "
                    f"has {format_size(node.capacity or 0)} ({node.capacity_source})"
                )
            if need.window < self.cfg.num_layers and not node.disk_bytes_per_s:
                full = memory(context=need.context, capacity=None, fit_context_to_capacity=False)
                return (
                    f"rank {i} ({node.name}) does not fit: all {self.cfg.num_layers} layers of "
                    f"its slice need {format_size(full.total)}, it has "
                    f"{format_size(node.capacity or 0)} ({node.capacity_source}), and with no "
                    "measured disk speed its streaming cannot be predicted"
                )
            ranks.append(RankPlacement(node_i, rs, need.window))
        return Placement((Stage((0, self.cfg.num_layers), tuple(ranks)),), tuple(shares))

    def evaluate(self, subset: tuple[int, ...], shares: tuple[int, ...]):
        self.evaluated += 1
        pl = self.placement(subset, shares)
        if isinstance(pl, str):
            return None, pl
        try:
            return (pl, predict(self.cfg, self.nodes, pl, self.wl)), None
        except PlacementError as e:
            return None, str(e)


def placement_for(
    cfg: ModelConfig,
    nodes: list[NodeSpeed],
    wl: Workload,
    subset: tuple[int, ...],
    shares: tuple[int, ...],
) -> Placement | str:
    """The placement of `shares` over the nodes `subset` (windows as the runtime
    would choose them), or why it does not fit: for predicting a given split."""
    return _Search(cfg, nodes, wl).placement(subset, shares)


def _compositions(total: int, parts: int):
    """Every way to write `total` as `parts` positive integers, in lexicographic order."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def _spread(shares: tuple[int, ...]) -> float:
    return max(shares) / min(shares)


def _better(a: tuple[float, tuple[int, ...]], b: tuple[float, tuple[int, ...]] | None) -> bool:
    """Is (ms, shares) a better choice than b? Ties go to the more even split."""
    if b is None:
        return True
    if a[0] < b[0] * (1 - TIE_SHARE):
        return True
    if a[0] > b[0] * (1 + TIE_SHARE):
        return False
    return (_spread(a[1]), a[1]) < (_spread(b[1]), b[1])


def _even(total: int, parts: int) -> tuple[int, ...]:
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def _best_exact(search: _Search, subset: tuple[int, ...]):
    n = len(subset)
    blocks = mlp_blocks(search.cfg, n)
    best, best_key, why = None, None, None
    for shares in _compositions(blocks, n):
        got, err = search.evaluate(subset, shares)
        if got is None:
            why = why or err
            continue
        key = (got[1].ms_per_token, shares)
        if _better(key, best_key):
            best, best_key = (shares, *got), key
    return best, why


def _count(blocks: int, parts: int) -> int:
    return math.comb(blocks - 1, parts - 1) if blocks >= parts else 0


def _polish(search: _Search, subset: tuple[int, ...], shares: tuple[int, ...], start):
    """Single-block moves between ranks while they lower the exact prediction."""
    best = (shares, *start)
    improved = True
    while improved:
        improved = False
        for i, j in itertools.permutations(range(len(shares)), 2):
            s = list(best[0])
            if s[i] <= 1:
                continue
            s[i] -= 1
            s[j] += 1
            got, _ = search.evaluate(subset, tuple(s))
            if got is not None and got[1].ms_per_token < best[2].ms_per_token * (1 - 1e-9):
                best = (tuple(s), *got)
                improved = True
    return best


def _best(search: _Search, subset: tuple[int, ...]):
    n = len(subset)
    blocks = mlp_blocks(search.cfg, n)
    if blocks < n:
        return None, f"{search.cfg.intermediate_size} MLP columns cannot be split {n} ways", "exact"
    if _count(blocks, n) <= EXACT_LIMIT:
        best, why = _best_exact(search, subset)
        return best, why, "exact"
    from tpi.planning.milp import solve_shares

    seeds = [_even(blocks, n)]
    milp = solve_shares(search.cfg, [search.nodes[i] for i in subset], search.wl, blocks)
    if milp is not None:
        seeds.insert(0, milp)
    best, why = None, None
    for seed in seeds:
        got, err = search.evaluate(subset, seed)
        if got is None:
            why = why or err
            continue
        cand = _polish(search, subset, seed, got)
        if best is None or _better(
            (cand[2].ms_per_token, cand[0]), (best[2].ms_per_token, best[0])
        ):
            best = cand
    return best, why, "milp"


def _subsets(workers: int):
    """Worker subsets (indices 1..workers), largest first."""
    idx = list(range(1, workers + 1))
    for k in range(workers, -1, -1):
        yield from itertools.combinations(idx, k)


def _names(nodes: list[NodeSpeed], subset: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(nodes[i].name for i in subset)


def solve(cfg: ModelConfig, nodes: list[NodeSpeed], wl: Workload) -> Plan:
    """The best placement over `nodes` (nodes[0] is the master) for workload `wl`."""
    search = _Search(cfg, nodes, wl)
    workers = len(nodes) - 1
    per_subset: dict[tuple[int, ...], Candidate] = {}
    method = "exact"
    if workers <= SUBSET_LIMIT:
        subsets = list(_subsets(workers))
    else:
        subsets = _greedy_subsets(search, workers)
    for rest in subsets:
        subset = (0, *rest)
        best, why, how = _best(search, subset)
        if how == "milp":
            method = "milp"
        label = (
            "all nodes"
            if len(rest) == workers
            else (
                "master alone"
                if not rest
                else "without "
                + ", ".join(f"{nodes[i].name}" for i in range(1, workers + 1) if i not in rest)
            )
        )
        if best is None:
            per_subset[subset] = Candidate(label, _names(nodes, subset), (), None, None, why)
        else:
            shares, pl, pred = best
            per_subset[subset] = Candidate(label, _names(nodes, subset), shares, pl, pred)
    feasible = [c for c in per_subset.values() if c.prediction is not None]
    if not feasible:
        raise NoPlacement(_why_nothing_fits(search, per_subset))
    chosen_key = None
    chosen = None
    for subset, c in per_subset.items():
        if c.prediction is None:
            continue
        key = (c.prediction.ms_per_token, len(subset), _spread(c.shares), c.shares)
        if chosen_key is None or _beats(key, chosen_key):
            chosen, chosen_key = (subset, c), key
    subset, best = chosen
    all_nodes = tuple(range(workers + 1))
    even = _even_candidate(search, all_nodes)
    candidates = sorted(
        per_subset.values(),
        key=lambda c: c.prediction.ms_per_token if c.prediction else math.inf,
    )
    if even is not None:
        candidates.append(even)
    reasons = _reasons(nodes, subset, best, per_subset, even)
    return Plan(
        chosen=Candidate(
            "chosen: " + best.label, best.node_names, best.shares, best.placement, best.prediction
        ),
        node_indices=subset,
        candidates=tuple(candidates),
        reasons=tuple(reasons),
        method=method,
        context=min(_contexts(search, best)),
        evaluated=search.evaluated,
    )


def _beats(a, b) -> bool:
    if a[0] < b[0] * (1 - TIE_SHARE):
        return True
    if a[0] > b[0] * (1 + TIE_SHARE):
        return False
    return a[1:] < b[1:]


def _contexts(search: _Search, c: Candidate) -> list[int]:
    out = []
    for i, rp in enumerate(c.placement.ranks):
        node = search.nodes[rp.node]
        need = plan_memory(
            search.cfg,
            rp.rank_slice,
            search.wl.fmt,
            context=search.wl.context,
            baseline_bytes=node.baseline_bytes,
            head=head_bytes(search.cfg, search.wl.fmt) if i == 0 else 0,
            capacity=node.capacity,
            fit_context_to_capacity=not search.wl.context_fixed,
        )
        out.append(need.context if need else search.wl.context)
    return out


def _even_candidate(search: _Search, subset: tuple[int, ...]) -> Candidate | None:
    """Today's default, for comparison: even shares over every node."""
    n = len(subset)
    shares = (1,) * n
    got, why = search.evaluate(subset, shares)
    label = "even shares, all nodes"
    if got is None:
        return Candidate(label, _names(search.nodes, subset), shares, None, None, why)
    return Candidate(label, _names(search.nodes, subset), shares, got[0], got[1])


def _greedy_subsets(search: _Search, workers: int) -> list[tuple[int, ...]]:
    """Many workers: start from all, drop the one whose absence helps most, repeat."""
    current = tuple(range(1, workers + 1))
    seen = [current]
    best, _, _ = _best(search, (0, *current))
    best_ms = best[2].ms_per_token if best else math.inf
    while current:
        trials = []
        for w in current:
            rest = tuple(x for x in current if x != w)
            got, _, _ = _best(search, (0, *rest))
            trials.append((got[2].ms_per_token if got else math.inf, rest))
        ms, rest = min(trials)
        seen.append(rest)
        if ms >= best_ms:
            break
        best_ms, current = ms, rest
    return seen


def _slices(c: Candidate) -> tuple:
    """What a candidate's split gives each rank (shares may be written differently)."""
    return tuple((r.node, r.rank_slice) for r in c.placement.ranks) if c.placement else ()


def _reasons(nodes, subset, best: Candidate, per_subset, even: Candidate | None) -> list[str]:
    out = [
        f"predicted {best.prediction.ms_per_token:.1f} ms/token with {len(subset)} node(s), "
        f"shares {':'.join(map(str, best.shares))}; pace set by {best.prediction.bottleneck}"
    ]
    if even is not None and even.prediction is None:
        out.append(f"even shares over all nodes do not fit: {even.infeasible}")
    elif even is not None and _slices(even) != _slices(best):
        out.append(
            f"even shares over all nodes: {even.prediction.ms_per_token:.1f} ms/token "
            f"({even.prediction.ms_per_token / best.prediction.ms_per_token:.2f}x the chosen)"
        )
    for i in range(1, len(nodes)):
        if i in subset:
            continue
        with_it = tuple(sorted((*subset, i)))
        c = per_subset.get(with_it)
        if c is None or c.prediction is None:
            why = c.infeasible if c is not None else "not tried"
            out.append(f"{nodes[i].name} left out: {why}")
        else:
            with_ms, without_ms = c.prediction.ms_per_token, best.prediction.ms_per_token
            verdict = (
                "slower than without it"
                if with_ms >= without_ms
                else f"within {100 * TIE_SHARE:g}% of without it, not worth another node"
            )
            out.append(
                f"{nodes[i].name} left out: with it the best is {with_ms:.1f} ms/token, {verdict}"
            )
    return out


def _why_nothing_fits(search: _Search, per_subset) -> str:
    reasons = {c.infeasible for c in per_subset.values() if c.infeasible}
    master_alone = per_subset.get((0,))
    if master_alone is not None and master_alone.infeasible and "rank 0" in master_alone.infeasible:
        # The master holds the head whatever happens: name it first.
        full = per_subset.get(tuple(range(len(search.nodes))))
        if full is not None and full.infeasible and "rank 0" in full.infeasible:
            return "no placement fits in memory: " + full.infeasible
    return "no placement fits in memory: " + "; ".join(sorted(reasons))


def quiet_fd_stdout():
    """HiGHS prints a banner on stdout from C++ when first used; keep it off ours."""
    import contextlib
    import sys

    @contextlib.contextmanager
    def _cm():
        sys.stdout.flush()
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)

    return _cm()
