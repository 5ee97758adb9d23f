"""What a placement would cost: decode ms/token, time to first token, and peak
memory per node, from measured node profiles. Pure arithmetic, checked by hand in
tests/test_planning_cost_model.py and against measurements in
benchmarks/planner.py.

One decode token through a stage of N tensor-parallel ranks (the star
allreduce, tpi.comm.star_master) is 2 phases per layer. In phase p the master
starts the next phase when every partial is in: rank r's partial arrives
c[r,p] + link[r] after the previous sum (or the STEP) left, where c is the
rank's compute for that phase (its measured slice time divided by its sustained
speed) and link[r] = round trip + the bytes of one partial and one sum over the
link's bandwidth (0 for the master itself). So

    phase(p) = max_r (c[r,p] + link[r]) + MASTER_MESSAGE_S * (N - 1)
    token    = L * (phase(attention) + phase(MLP)) + head + TOKEN_OVERHEAD_S

where head is the master's final norm, LM head and token choice. A rank that
streams its layers (window < L) reads all L layer files per token: with a window
of 2 or more the reads overlap everything else, so the layers take
max(L * phases, L * read) (read = one layer file over the disk's cold read
speed); with a window of 1 nothing overlaps and the read adds to its compute.
The first token (TTFT) is the same sum with prefill-sized phases: the slices'
measured time for PREFILL_ROWS rows scaled to the prompt, and links carrying
prompt-length partials.

A placement is a list of pipeline stages, each a tensor-parallel group over a
range of layers. Today there is one stage (all layers, master + workers); a
pipeline adds, per token, each stage's layers plus one hop of the hidden state
between consecutive stages (round trip / 2 + hidden bytes / bandwidth), and
for prefill the stages overlap by micro-batch. `predict` refuses more than one
stage until the runtime can run them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tpi.errors import TpiError
from tpi.model.config import ModelConfig
from tpi.model.partition import RankSlice
from tpi.planning.curves import Curve
from tpi.planning.footprint import Format, MemoryNeed, head_bytes, layer_bytes, plan_memory
from tpi.planning.profile import LinkFacts

# The master's own work per allreduce and worker: taking a partial off the
# socket, adding it, sending the sum (on the 2-core VM, 3 ranks: ~0.3 ms per
# allreduce beyond the ping, tpi bench's allreduce_ms).
MASTER_MESSAGE_S = 80e-6
# Per token outside the layers and head: the engine, sampling bookkeeping, the
# STEP broadcast (measured at world 1 on the 2-core VM: ms/token minus layers
# and head).
TOKEN_OVERHEAD_S = 0.6e-3
SHORT_POS = 16  # tpi.planning.slice_probe.SHORT_POS: where attention_s was measured
PREFILL_ROWS = 128  # tpi.planning.slice_probe.PREFILL_ROWS


class PlacementError(TpiError):
    pass


@dataclass(frozen=True)
class PhaseCurves:
    """Seconds per layer as functions of a slice's query heads (attention) or MLP
    columns (MLP), as one node computes them in one weight layout."""

    attention: Curve
    attention_per_position: Curve
    mlp: Curve
    attention_prefill: Curve
    mlp_prefill: Curve


@dataclass(frozen=True)
class NodeSpeed:
    """What the cost model needs about one node, for one model in one format."""

    name: str
    resident: PhaseCurves  # float weights held transposed (all layers in memory)
    streamed: PhaseCurves | None = None  # as read from disk (a window); None: as resident
    head_s: float = 0.0  # final norm + LM head + choosing the token
    embed_s: float = 0.0
    sustained: float = 1.0
    disk_bytes_per_s: float | None = None
    capacity: int | None = None  # memory it may plan in (None: unlimited)
    capacity_source: str = "unlimited"
    baseline_bytes: int = 0  # the runtime before weights
    link: LinkFacts = field(default_factory=LinkFacts)

    def curves(self, resident: bool) -> PhaseCurves:
        return self.resident if resident or self.streamed is None else self.streamed


@dataclass(frozen=True)
class RankPlacement:
    node: int  # index into the nodes the placement is over
    rank_slice: RankSlice
    window: int  # layers held; the model's layer count = all resident


@dataclass(frozen=True)
class Stage:
    """A tensor-parallel group running layers [start, end); ranks[0] leads it
    (the master, in the first stage)."""

    layers: tuple[int, int]
    ranks: tuple[RankPlacement, ...]


@dataclass(frozen=True)
class Placement:
    stages: tuple[Stage, ...]
    shares: tuple[float, ...]  # what the split is made with (tpi.model.partition)

    @property
    def ranks(self) -> tuple[RankPlacement, ...]:
        return tuple(r for s in self.stages for r in s.ranks)


@dataclass(frozen=True)
class Workload:
    """What the prediction is for."""

    fmt: Format
    position: int = 80  # decode position (tokens already in the cache)
    prompt_tokens: int = 64  # for TTFT
    context: int = 4096  # tokens the KV cache is planned for
    wire_bytes: int = 4  # bytes per element of partial sums on the wire


@dataclass(frozen=True)
class RankCost:
    rank: int
    node: str
    q_heads: int
    kv_heads: int
    mlp_columns: int
    window: int
    compute_ms: float  # per token, its own compute
    allreduce_ms: float  # per token, waiting for sums (the others' compute, links)
    disk_ms: float  # per token, blocked on reading layers
    memory_bytes: int  # peak it would plan
    capacity_bytes: int | None
    capacity_source: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Prediction:
    ms_per_token: float
    ttft_ms: float
    ranks: tuple[RankCost, ...]
    bottleneck: str  # what sets the pace, in words

    def to_dict(self) -> dict:
        return {
            "ms_per_token": round(self.ms_per_token, 3),
            "ttft_ms": round(self.ttft_ms, 3),
            "bottleneck": self.bottleneck,
            "ranks": [r.to_dict() for r in self.ranks],
        }


def _link_s(link: LinkFacts, nbytes: float) -> float:
    """A partial up and its sum down."""
    return link.rtt_s + 2 * link.transfer_s(nbytes)


def memory_of(
    cfg: ModelConfig, node: NodeSpeed, rp: RankPlacement, wl: Workload, is_master: bool
) -> MemoryNeed:
    """The memory rank `rp` plans at its window (footprint's rules, the runtime's)."""
    head = head_bytes(cfg, wl.fmt) if is_master else 0
    need = plan_memory(
        cfg,
        rp.rank_slice,
        wl.fmt,
        context=wl.context,
        baseline_bytes=node.baseline_bytes,
        head=head,
        capacity=None,
        fit_context_to_capacity=False,
    )
    return MemoryNeed(
        rp.window,
        need.layer,
        need.kv_bytes,
        need.head_bytes,
        need.activation_bytes,
        need.baseline_bytes,
        need.context,
    )


def predict(
    cfg: ModelConfig, nodes: list[NodeSpeed], placement: Placement, wl: Workload
) -> Prediction:
    """Decode ms/token, TTFT and per-rank costs of `placement` over `nodes`."""
    if len(placement.stages) != 1:
        raise PlacementError("pipeline stages are not supported yet (one stage of all layers)")
    stage = placement.stages[0]
    if stage.layers != (0, cfg.num_layers):
        raise PlacementError("the one stage must run every layer")
    ranks = stage.ranks
    n, L = len(ranks), cfg.num_layers
    row_bytes = cfg.hidden_size * wl.wire_bytes
    rows = wl.prompt_tokens / PREFILL_ROWS
    c_att, c_mlp, p_att, p_mlp, link, link_pre, read = [], [], [], [], [], [], []
    for i, rp in enumerate(ranks):
        node = nodes[rp.node]
        rs, s = rp.rank_slice, max(node.sustained, 1e-3)
        cur = node.curves(rp.window >= L)
        q = rs.n_q
        c_att.append(
            (cur.attention(q) + cur.attention_per_position(q) * max(0, wl.position - SHORT_POS)) / s
        )
        c_mlp.append(cur.mlp(rs.n_mlp) / s)
        p_att.append(cur.attention_prefill(q) * rows / s)
        p_mlp.append(cur.mlp_prefill(rs.n_mlp) * rows / s)
        link.append(0.0 if i == 0 else _link_s(node.link, row_bytes))
        link_pre.append(0.0 if i == 0 else _link_s(node.link, row_bytes * wl.prompt_tokens))
        if rp.window >= L:
            read.append(0.0)
        else:
            if not node.disk_bytes_per_s:
                raise PlacementError(f"{node.name}: streams layers but its disk speed is unknown")
            read.append(layer_bytes(cfg, rs, wl.fmt).disk / node.disk_bytes_per_s)
    serial = set(i for i, rp in enumerate(ranks) if rp.window == 1)
    # Window 1: the next layer is read only once this one is released, in line.
    busy_att = [c_att[i] + (read[i] if i in serial else 0.0) for i in range(n)]
    busy_pre = [p_att[i] + (read[i] if i in serial else 0.0) for i in range(n)]
    overhead = MASTER_MESSAGE_S * (n - 1)
    t_att = max(busy_att[i] + link[i] for i in range(n)) + overhead
    t_mlp = max(c_mlp[i] + link[i] for i in range(n)) + overhead
    layers_s = L * (t_att + t_mlp)
    overlapped = [L * read[i] for i in range(n) if read[i] and i not in serial]
    disk_bound = max(overlapped, default=0.0)
    decode_layers = max(layers_s, disk_bound)
    master = nodes[ranks[0].node]
    head_s = (master.head_s + master.embed_s) / max(master.sustained, 1e-3) + TOKEN_OVERHEAD_S
    ms = 1000 * (decode_layers + head_s)

    pre_layers = L * (
        max(busy_pre[i] + link_pre[i] for i in range(n))
        + max(p_mlp[i] + link_pre[i] for i in range(n))
        + 2 * overhead
    )
    ttft_ms = 1000 * (max(pre_layers, disk_bound) + head_s)

    costs = []
    for i, rp in enumerate(ranks):
        node = nodes[rp.node]
        compute = L * (c_att[i] + c_mlp[i]) + (head_s if i == 0 else 0.0)
        disk = L * read[i] if i in serial else max(0.0, L * read[i] - layers_s)
        mem = memory_of(cfg, node, rp, wl, i == 0)
        costs.append(
            RankCost(
                rank=i,
                node=node.name,
                q_heads=rp.rank_slice.n_q,
                kv_heads=rp.rank_slice.n_kv,
                mlp_columns=rp.rank_slice.n_mlp,
                window=rp.window,
                compute_ms=1000 * compute,
                allreduce_ms=max(0.0, ms - 1000 * (compute + disk)),
                disk_ms=1000 * disk,
                memory_bytes=mem.total,
                capacity_bytes=node.capacity,
                capacity_source=node.capacity_source,
            )
        )
    per_layer = [c_att[i] + c_mlp[i] + (read[i] if i in serial else 0.0) for i in range(n)]
    bottleneck = _bottleneck(costs, per_layer, [2 * x for x in link], disk_bound > layers_s)
    return Prediction(ms, ttft_ms, tuple(costs), bottleneck)


def _bottleneck(costs: list[RankCost], compute: list[float], links: list[float], disk: bool) -> str:
    """What sets the pace: the disk of a streaming rank, else the rank whose compute
    plus link is the largest, and whichever of the two dominates it."""
    if disk:
        worst = max(costs, key=lambda c: c.disk_ms)
        return f"disk reads of rank {worst.rank} ({worst.node})"
    i = max(range(len(costs)), key=lambda k: compute[k] + links[k])
    c = costs[i]
    if links[i] > compute[i]:
        return f"the link to rank {i} ({c.node}): {1000 * links[i] / 2:.2f} ms per allreduce"
    return f"compute of rank {i} ({c.node})"
