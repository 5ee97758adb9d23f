"""Shares for many ranks of a big model: a mixed-integer program solved by HiGHS
(highspy), for when the splits are too many to try one by one.

Unknowns per rank i: x_i MLP blocks (integer, >= 1, summing to B) and y_i (1:
all layers resident, 0: a sliding window). Each phase's time and each memory
need is linearized in x_i between a one-block and an all-blocks slice (heads
follow the blocks in proportion):

    minimize T
    T   >= L * (t_att + t_mlp)
    t_p >= c_ip(x_i) + link_i                          every rank, both phases
    T   >= work_i(x_i) / sustained_i                    every rank's CPU
    T   >= L * disk_i(x_i) / bw_i - M * y_i             a streamed rank's reads
    mem_resident_i(x_i) <= cap_i + M * (1 - y_i)        all layers held...
    mem_window2_i(x_i)  <= cap_i                        ...or at least two

The solution seeds an exact local search (tpi.planning.solver), which removes
the linearization's error.
"""

from __future__ import annotations

from tpi.model.config import ModelConfig
from tpi.model.partition import RankSlice
from tpi.planning.cost_model import (
    MASTER_MESSAGE_S,
    SHORT_POS,
    TOKEN_OVERHEAD_S,
    NodeSpeed,
    Workload,
    _link_s,
)
from tpi.planning.footprint import head_bytes, layer_bytes, memory_at

TIME_LIMIT_S = 10.0


def _slice(cfg: ModelConfig, blocks: int, total: int) -> RankSlice:
    unit = cfg.intermediate_size // total
    q = max(1, round(cfg.num_heads * blocks / total))
    kv = max(1, round(cfg.num_kv_heads * blocks / total))
    return RankSlice(rank=1, q_heads=(0, q), kv_heads=(0, kv), mlp=(0, blocks * unit))


def _line(f, total: int) -> tuple[float, float]:
    """(a, b) with f(x) ~ a + b x, through x = 1 and x = total."""
    if total == 1:
        return 0.0, f(1)
    lo, hi = f(1), f(total)
    b = (hi - lo) / (total - 1)
    return lo - b, b


def _coefficients(
    cfg: ModelConfig, node: NodeSpeed, wl: Workload, blocks: int, master: bool
) -> dict:
    """The node's times and memory, each as a + b * blocks."""
    L = cfg.num_layers
    s = max(node.sustained, 1e-3)
    cur = node.resident
    row_bytes = cfg.hidden_size * wl.wire_bytes

    def att(x: int) -> float:
        rs = _slice(cfg, x, blocks)
        per_pos = cur.attention_per_position(rs.n_q) * max(0, wl.position - SHORT_POS)
        return cur.attention(rs.n_q) + per_pos

    def mlp(x: int) -> float:
        return cur.mlp(_slice(cfg, x, blocks).n_mlp)

    def mem(x: int, window: int) -> float:
        return memory_at(
            cfg,
            _slice(cfg, x, blocks),
            wl.fmt,
            window=window,
            context=wl.context,
            baseline_bytes=node.baseline_bytes,
            head=head_bytes(cfg, wl.fmt) if master else 0,
            capacity=None,
            fit_context_to_capacity=False,
        ).total

    def disk(x: int) -> float:
        if not node.disk_bytes_per_s:
            return 0.0
        return L * layer_bytes(cfg, _slice(cfg, x, blocks), wl.fmt).disk / node.disk_bytes_per_s

    link = 0.0 if master else _link_s(node.link, row_bytes)
    a_att, b_att = _line(att, blocks)
    a_mlp, b_mlp = _line(mlp, blocks)
    head = node.head_s + node.embed_s + TOKEN_OVERHEAD_S if master else 0.0
    return {
        "att": (a_att + link, b_att),
        "mlp": (a_mlp + link, b_mlp),
        # Its CPU seconds per token over its sustained share (cost_model.predict).
        "cpu": ((L * (a_att + a_mlp) + head) / s, L * (b_att + b_mlp) / s),
        "res": _line(lambda x: mem(x, L), blocks),
        "win": _line(lambda x: mem(x, 2), blocks),
        "disk": _line(disk, blocks),
        "cap": node.capacity,
        "bw": node.disk_bytes_per_s,
        "worst": max(disk(blocks), (L * (att(blocks) + mlp(blocks)) + head) / s + 2 * L * link),
    }


def solve_shares(
    cfg: ModelConfig, nodes: list[NodeSpeed], wl: Workload, blocks: int
) -> tuple[int, ...] | None:
    """Block counts per rank (nodes[0] is the master), or None if HiGHS finds none."""
    import highspy

    from tpi.planning.solver import quiet_fd_stdout

    L = cfg.num_layers
    with quiet_fd_stdout():
        h = highspy.Highs()
    h.silent()
    h.setOptionValue("time_limit", TIME_LIMIT_S)
    h.setOptionValue("mip_rel_gap", 1e-3)
    inf = highspy.kHighsInf
    big_t = 0.0
    n = len(nodes)
    coef = []
    for i, node in enumerate(nodes):
        c = _coefficients(cfg, node, wl, blocks, i == 0)
        coef.append(c)
        big_t = max(big_t, c["worst"])
    big_t = 2 * big_t + 1.0
    T = h.addVariable(lb=0, ub=inf)
    t_att = h.addVariable(lb=0, ub=inf)
    t_mlp = h.addVariable(lb=0, ub=inf)
    x = [h.addVariable(lb=1, ub=blocks, type=highspy.HighsVarType.kInteger) for _ in range(n)]
    y = [h.addVariable(lb=0, ub=1, type=highspy.HighsVarType.kInteger) for _ in range(n)]
    h.addConstr(sum(x) == blocks)
    master = nodes[0]
    fixed = master.head_s + master.embed_s + TOKEN_OVERHEAD_S + 2 * L * MASTER_MESSAGE_S * (n - 1)
    h.addConstr(T - L * t_att - L * t_mlp >= fixed)
    for i, c in enumerate(coef):
        h.addConstr(t_att - c["att"][1] * x[i] >= c["att"][0])
        h.addConstr(t_mlp - c["mlp"][1] * x[i] >= c["mlp"][0])
        h.addConstr(T - c["cpu"][1] * x[i] >= c["cpu"][0])
        if c["bw"]:
            h.addConstr(T - c["disk"][1] * x[i] + big_t * y[i] >= c["disk"][0])
        else:
            h.addConstr(y[i] >= 1)  # no known disk speed: only resident plans
        if c["cap"] is not None:
            gb = 1e-9  # bytes in GB keep the coefficients near 1
            big_m = (c["res"][0] + c["res"][1] * blocks) * gb + 1
            h.addConstr(
                c["res"][1] * gb * x[i] + big_m * y[i] <= (c["cap"] - c["res"][0]) * gb + big_m
            )
            h.addConstr(c["win"][1] * gb * x[i] <= (c["cap"] - c["win"][0]) * gb)
    h.minimize(T)
    status = h.getModelStatus()
    if status not in (highspy.HighsModelStatus.kOptimal, highspy.HighsModelStatus.kTimeLimit):
        return None
    try:
        values = [round(v) for v in h.vals(x)]
    except Exception:
        return None
    if sum(values) != blocks or min(values) < 1:
        return None
    return tuple(values)
