"""What a placement would cost: decode ms/token, time to first token, and peak
memory per node, from measured node profiles. Pure arithmetic, checked by hand in
tests/test_planning_cost_model.py and against measurements in
benchmarks/planner.py.

One decode token through a stage of N tensor-parallel ranks (the star
allreduce, tpi.comm.star_master) is 2 phases per layer. In phase p the master
starts the next phase when every partial is in: rank r's partial arrives
c[r,p] + link[r] after the previous sum (or the STEP) left, where c is the
rank's measured slice time and link[r] = round trip + the bytes of one partial
and one sum over the link's bandwidth (0 for the master itself). So

    phase(p) = max_r (c[r,p] + link[r]) + MASTER_MESSAGE_S * (N - 1)
    sync     = L * (phase(attention) + phase(MLP)) + head + TOKEN_OVERHEAD_S

where head is the master's final norm, LM head and token choice. Slice times
are measured at a node's short-run speed; a node that cannot keep it (a cgroup
CPU quota such as an emulated 0.25-core device, thermal throttling, a busy
machine: its profile's `sustained` share s) runs at that speed while it has CPU
left and waits when it has not, so a token also takes at least each rank's CPU
seconds over its sustained share:

    token = max(sync, max_r work[r] / s[r], disk)

(work[r] = its phases over all layers, plus the head on the master.) Idle time
waiting for sums costs a quota nothing, which is why the bound is a max and not
a sum. A rank that streams its layers (window < L) reads all L layer files per
token: with a window of 2 or more the reads overlap everything else (disk = L *
one layer file over the disk's cold read speed); with a window of 1 nothing
overlaps and the read adds to its phases. The first token (TTFT) is the same
with prefill-sized phases: the slices' measured time for PREFILL_ROWS rows
scaled to the prompt, and links carrying prompt-length partials.

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
from tpi.planning.footprint import Format, MemoryNeed, head_bytes, layer_bytes, memory_at
from tpi.planning.profile import LinkFacts

# The master's own work per allreduce and worker: taking a partial off the
# socket, adding it, sending the sum (on the 2-core VM, 3 ranks: ~0.3 ms per
# allreduce beyond the ping, tpi bench's allreduce_ms).
MASTER_MESSAGE_S = 80e-6
# A worker's CPU per allreduce (a sum in, a partial out) where the link was not
# measured: ZeroMQ's I/O thread and Python, ~0.2 ms on the 2-core VM.
WORKER_MESSAGE_S = 200e-6
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
    # The rank's process before weights, as it will measure it at load
    # (tpi.runtime.memory_model.expected_baseline of its profile).
    baseline_bytes: int = 0
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
    # The context was asked for (--max-context): a rank never shrinks it to fit.
    context_fixed: bool = False


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
    """The memory rank `rp` plans at its window within the node's capacity (the
    runtime's own plan, tpi.runtime.memory_model, over footprint's sizes)."""
    return memory_at(
        cfg,
        rp.rank_slice,
        wl.fmt,
        window=rp.window,
        context=wl.context,
        baseline_bytes=node.baseline_bytes,
        head=head_bytes(cfg, wl.fmt) if is_master else 0,
        capacity=node.capacity,
        fit_context_to_capacity=not wl.context_fixed,
    )


@dataclass(frozen=True)
class _Times:
    """Per rank (in stage order): seconds per layer of each phase, per token."""

    att: list[float]  # decode attention
    mlp: list[float]
    att_pre: list[float]  # the prompt's
    mlp_pre: list[float]
    link: list[float]  # a partial up and its sum down (0 for the master)
    link_pre: list[float]
    read: list[float]  # one layer file from disk (0: all layers resident)
    speed: list[float]  # the share of its short-run speed it sustains


def _times(cfg: ModelConfig, nodes: list[NodeSpeed], ranks, wl: Workload) -> _Times:
    L = cfg.num_layers
    row_bytes = cfg.hidden_size * wl.wire_bytes
    rows = wl.prompt_tokens / PREFILL_ROWS
    t = _Times([], [], [], [], [], [], [], [])
    for i, rp in enumerate(ranks):
        node = nodes[rp.node]
        rs = rp.rank_slice
        cur = node.curves(rp.window >= L)
        q = rs.n_q
        extra = max(0, wl.position - SHORT_POS)
        t.att.append(cur.attention(q) + cur.attention_per_position(q) * extra)
        t.mlp.append(cur.mlp(rs.n_mlp))
        t.att_pre.append(cur.attention_prefill(q) * rows)
        t.mlp_pre.append(cur.mlp_prefill(rs.n_mlp) * rows)
        t.link.append(0.0 if i == 0 else _link_s(node.link, row_bytes))
        t.link_pre.append(0.0 if i == 0 else _link_s(node.link, row_bytes * wl.prompt_tokens))
        t.speed.append(max(node.sustained, 1e-3))
        if rp.window >= L:
            t.read.append(0.0)
        else:
            if not node.disk_bytes_per_s:
                raise PlacementError(f"{node.name}: streams layers but its disk speed is unknown")
            t.read.append(layer_bytes(cfg, rs, wl.fmt).disk / node.disk_bytes_per_s)
    return t


def _messages(nodes: list[NodeSpeed], ranks) -> tuple[float, list[float]]:
    """(the master's CPU per phase for the workers' messages, each rank's CPU per
    message exchange): as measured with the link, the constants where not."""
    master_msg = [nodes[rp.node].link.master_cpu_s for rp in ranks[1:]]
    per_worker = (
        sum(master_msg) / len(master_msg)
        if master_msg and None not in master_msg
        else MASTER_MESSAGE_S
    )
    overhead = per_worker * (len(ranks) - 1)
    msg = [overhead] + [
        nodes[rp.node].link.worker_cpu_s
        if nodes[rp.node].link.worker_cpu_s is not None
        else WORKER_MESSAGE_S
        for rp in ranks[1:]
    ]
    return overhead, msg


@dataclass(frozen=True)
class _Token:
    """One token's (or prompt's) phases over every rank."""

    L: int
    head: float  # the master's head, embedding and per-token overhead
    overhead: float  # the master's message CPU per phase
    msg: list[float]
    in_line: list[float]  # reads that add to a phase (a window of 1)
    speed: list[float]

    def time(
        self, att: list[float], mlp: list[float], links: list[float]
    ) -> tuple[float, float, list[float]]:
        """(time at full speed, the slowest CPU's bound, each rank's CPU seconds)."""
        n, L, in_line = len(att), self.L, self.in_line
        sync = (
            L
            * (
                max(att[i] + in_line[i] + links[i] for i in range(n))
                + max(mlp[i] + links[i] for i in range(n))
                + 2 * self.overhead
            )
            + self.head
        )
        work = [
            L * (att[i] + mlp[i] + 2 * self.msg[i]) + (self.head if i == 0 else 0.0)
            for i in range(n)
        ]
        cpu = max(work[i] / self.speed[i] + L * in_line[i] for i in range(n))
        return sync, cpu, work


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
    t = _times(cfg, nodes, ranks, wl)
    serial = {i for i, rp in enumerate(ranks) if rp.window == 1}
    # Window 1: the next layer is read only once this one is released, in line.
    in_line = [t.read[i] if i in serial else 0.0 for i in range(n)]
    overhead, msg = _messages(nodes, ranks)
    master = nodes[ranks[0].node]
    head = master.head_s + master.embed_s + TOKEN_OVERHEAD_S
    token = _Token(L, head, overhead, msg, in_line, t.speed)
    disk_bound = max(
        (L * t.read[i] for i in range(n) if t.read[i] and i not in serial), default=0.0
    )
    sync, cpu, work = token.time(t.att, t.mlp, t.link)
    total = max(sync, cpu, disk_bound)
    sync_pre, cpu_pre, _ = token.time(t.att_pre, t.mlp_pre, t.link_pre)
    ttft = max(sync_pre, cpu_pre, disk_bound)
    costs = []
    for i, rp in enumerate(ranks):
        disk = L * in_line[i] if i in serial else max(0.0, L * t.read[i] - max(sync, cpu))
        # Its CPU seconds at its sustained pace, where that is what it spends.
        compute = min(max(work[i], work[i] / t.speed[i]), total - disk)
        costs.append(_rank_cost(cfg, nodes[rp.node], rp, wl, i, compute, total, disk))
    why = _bottleneck(costs, t, work, in_line, L, disk_bound >= max(sync, cpu), cpu > sync)
    return Prediction(1000 * total, 1000 * ttft, tuple(costs), why)


def _rank_cost(
    cfg: ModelConfig,
    node: NodeSpeed,
    rp: RankPlacement,
    wl: Workload,
    i: int,
    compute: float,
    total: float,
    disk: float,
) -> RankCost:
    return RankCost(
        rank=i,
        node=node.name,
        q_heads=rp.rank_slice.n_q,
        kv_heads=rp.rank_slice.n_kv,
        mlp_columns=rp.rank_slice.n_mlp,
        window=rp.window,
        compute_ms=1000 * compute,
        allreduce_ms=1000 * max(0.0, total - compute - disk),
        disk_ms=1000 * disk,
        memory_bytes=memory_of(cfg, node, rp, wl, i == 0).total,
        capacity_bytes=node.capacity,
        capacity_source=node.capacity_source,
    )


def _bottleneck(
    costs: list[RankCost],
    t: _Times,
    work: list[float],
    in_line: list[float],
    L: int,
    disk_bound: bool,
    cpu_bound: bool,
) -> str:
    """What sets the pace, in words."""
    n = len(costs)
    if disk_bound:
        worst = max(costs, key=lambda c: c.disk_ms)
        return f"disk reads of rank {worst.rank} ({worst.node})"
    if cpu_bound:
        i = max(range(n), key=lambda k: work[k] / t.speed[k])
        return (
            f"the CPU of rank {i} ({costs[i].node}), which keeps "
            f"{100 * t.speed[i]:.0f}% of its short-run speed"
        )
    i = max(range(n), key=lambda k: L * (t.att[k] + t.mlp[k] + in_line[k] + 2 * t.link[k]))
    if 2 * t.link[i] > t.att[i] + t.mlp[i]:
        return f"the link to rank {i} ({costs[i].node}): {1000 * t.link[i]:.2f} ms per allreduce"
    return f"compute of rank {i} ({costs[i].node})"
