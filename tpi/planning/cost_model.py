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
from tpi.planning.footprint import Format, MemoryNeed, head_bytes, layer_bytes, plan_memory
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
    c_att, c_mlp, p_att, p_mlp, link, link_pre, read, speed = [], [], [], [], [], [], [], []
    for i, rp in enumerate(ranks):
        node = nodes[rp.node]
        rs = rp.rank_slice
        cur = node.curves(rp.window >= L)
        q = rs.n_q
        extra = max(0, wl.position - SHORT_POS)
        c_att.append(cur.attention(q) + cur.attention_per_position(q) * extra)
        c_mlp.append(cur.mlp(rs.n_mlp))
        p_att.append(cur.attention_prefill(q) * rows)
        p_mlp.append(cur.mlp_prefill(rs.n_mlp) * rows)
        link.append(0.0 if i == 0 else _link_s(node.link, row_bytes))
        link_pre.append(0.0 if i == 0 else _link_s(node.link, row_bytes * wl.prompt_tokens))
        speed.append(max(node.sustained, 1e-3))
        if rp.window >= L:
            read.append(0.0)
        else:
            if not node.disk_bytes_per_s:
                raise PlacementError(f"{node.name}: streams layers but its disk speed is unknown")
            read.append(layer_bytes(cfg, rs, wl.fmt).disk / node.disk_bytes_per_s)
    serial = {i for i, rp in enumerate(ranks) if rp.window == 1}
    # Window 1: the next layer is read only once this one is released, in line.
    in_line = [read[i] if i in serial else 0.0 for i in range(n)]
    # What a message exchange costs the master's CPU, per worker and phase, and each
    # worker's (both measured with the link; the constants where they were not).
    master_msg = [nodes[rp.node].link.master_cpu_s for rp in ranks[1:]]
    per_worker = (
        sum(master_msg) / len(master_msg)
        if master_msg and None not in master_msg
        else MASTER_MESSAGE_S
    )
    overhead = per_worker * (n - 1)
    msg = [0.0] + [
        nodes[rp.node].link.worker_cpu_s
        if nodes[rp.node].link.worker_cpu_s is not None
        else WORKER_MESSAGE_S
        for rp in ranks[1:]
    ]
    msg[0] = overhead
    master = nodes[ranks[0].node]
    head = master.head_s + master.embed_s + TOKEN_OVERHEAD_S

    def token(
        att: list[float], mlp: list[float], links: list[float]
    ) -> tuple[float, float, list[float]]:
        """(time at full speed, the slowest CPU's bound, each rank's CPU seconds)."""
        sync = (
            L
            * (
                max(att[i] + in_line[i] + links[i] for i in range(n))
                + max(mlp[i] + links[i] for i in range(n))
                + 2 * overhead
            )
            + head
        )
        work = [L * (att[i] + mlp[i] + 2 * msg[i]) + (head if i == 0 else 0.0) for i in range(n)]
        cpu = max(work[i] / speed[i] + L * in_line[i] for i in range(n))
        return sync, cpu, work

    disk_bound = max((L * read[i] for i in range(n) if read[i] and i not in serial), default=0.0)
    sync, cpu, work = token(c_att, c_mlp, link)
    total = max(sync, cpu, disk_bound)
    sync_pre, cpu_pre, _ = token(p_att, p_mlp, link_pre)
    ttft = max(sync_pre, cpu_pre, disk_bound)

    costs = []
    for i, rp in enumerate(ranks):
        node = nodes[rp.node]
        disk = L * in_line[i] if i in serial else max(0.0, L * read[i] - max(sync, cpu))
        # Its CPU seconds at its sustained pace, where that is what it spends.
        compute = min(max(work[i], work[i] / speed[i]), total - disk)
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
                allreduce_ms=1000 * max(0.0, total - compute - disk),
                disk_ms=1000 * disk,
                memory_bytes=mem.total,
                capacity_bytes=node.capacity,
                capacity_source=node.capacity_source,
            )
        )
    if disk_bound >= max(sync, cpu):
        worst = max(costs, key=lambda c: c.disk_ms)
        why = f"disk reads of rank {worst.rank} ({worst.node})"
    elif cpu > sync:
        i = max(range(n), key=lambda k: work[k] / speed[k])
        why = (
            f"the CPU of rank {i} ({costs[i].node}), which keeps "
            f"{100 * speed[i]:.0f}% of its short-run speed"
        )
    else:
        i = max(range(n), key=lambda k: L * (c_att[k] + c_mlp[k] + in_line[k] + 2 * link[k]))
        if 2 * link[i] > c_att[i] + c_mlp[i]:
            why = f"the link to rank {i} ({costs[i].node}): {1000 * link[i]:.2f} ms per allreduce"
        else:
            why = f"compute of rank {i} ({costs[i].node})"
    return Prediction(1000 * total, 1000 * ttft, tuple(costs), why)
