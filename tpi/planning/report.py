"""Profiles and plans as text a person reads (`tpi probe`, `tpi plan`, the start
of a planned run)."""

from __future__ import annotations

from tpi.planning.profile import NodeProfile
from tpi.planning.solver import Candidate, Plan
from tpi.runtime.memory_budget import format_size


def describe_profile(p: NodeProfile) -> str:
    d = p.device
    quota = f"{d.cpu_limit:g} cores" if d.cpu_limit is not None else "none"
    lines = [
        f"{p.name}: {d.host}, {d.cpu}, {d.cores} core(s), {d.threads} torch thread(s), CPU quota {quota}",
        f"  sustained speed: {100 * d.sustained:.0f}% of its short-run speed over seconds",
        f"  memory: {format_size(d.memory_total)} total, {format_size(d.memory_available)} available, "
        f"cgroup limit {format_size(d.memory_limit) if d.memory_limit else 'none'}, "
        f"budget {format_size(d.budget_bytes) if d.budget_bytes else 'none'}, "
        f"this process {format_size(d.rss_bytes)}; plans in {format_size(d.capacity[0])} ({d.capacity[1]})",
    ]
    if d.disk_read_bytes_per_s:
        lines.append(
            f"  disk: {d.disk_read_bytes_per_s / 1e9:.2f} GB/s cold reads under {d.disk_path}"
        )
    if p.link.rtt_s:
        bw = f"{p.link.bytes_per_s * 8 / 1e6:.0f} Mbit/s" if p.link.bytes_per_s else "not limited"
        lines.append(f"  link from the master: round trip {1000 * p.link.rtt_s:.2f} ms, {bw}")
    lines.append(f"  measured {d.measured_at} ({d.probe_seconds:.1f} s)")
    for key, sp in sorted(p.slices.items()):
        lines.append(f"  layer slices {key} (per layer):")
        lines.append(
            "    q heads  KV heads  MLP cols   attention ms  +us/position   MLP ms   prefill ms (128 rows)"
        )
        for pt in sorted(sp.points, key=lambda x: (x["q"], x["mlp"])):
            lines.append(
                f"    {pt['q']:7d}  {pt['kv']:8d}  {pt['mlp']:8d}   {1000 * pt['attention_s']:12.3f}"
                f"  {1e6 * pt['attention_per_position_s']:13.3f}  {1000 * pt['mlp_s']:7.3f}"
                f"   {1000 * (pt['attention_prefill_s'] + pt['mlp_prefill_s']):10.2f}"
            )
        if sp.head:
            lines.append(
                f"    LM head ({sp.head['rows']} rows) + token choice: {1000 * sp.head['decode_s']:.2f} ms"
            )
    return "\n".join(lines)


def _memory(c: Candidate) -> str:
    if c.prediction is None:
        return ""
    parts = []
    for r in c.prediction.ranks:
        cap = format_size(r.capacity_bytes) if r.capacity_bytes else "?"
        win = "" if r.window >= _layers(c) else f", window {r.window}"
        parts.append(f"{r.node} {format_size(r.memory_bytes)}/{cap}{win}")
    return "; ".join(parts)


def _layers(c: Candidate) -> int:
    st = c.placement.stages[0] if c.placement else None
    return st.layers[1] if st else 0


def describe_plan(plan: Plan) -> str:
    rows = []
    for c in plan.candidates:
        mark = (
            "*" if (c.node_names, c.shares) == (plan.chosen.node_names, plan.chosen.shares) else " "
        )
        if c.prediction is None:
            rows.append(
                f"{mark} {c.label:34s} {len(c.node_names):5d}  {'-':12s}  does not fit: {c.infeasible}"
            )
            continue
        rows.append(
            f"{mark} {c.label:34s} {len(c.node_names):5d}  {':'.join(map(str, c.shares)):12s} "
            f"{c.prediction.ms_per_token:9.1f} {c.prediction.ttft_ms:9.1f}   {_memory(c)}"
        )
    head = f"  {'placement':34s} {'nodes':>5s}  {'shares':12s} {'ms/token':>9s} {'TTFT ms':>9s}   memory per node (planned/limit)"
    chosen = plan.chosen
    pred = chosen.prediction
    lines = [head, *rows, ""]
    lines.append(
        f"chosen: {', '.join(chosen.node_names)} with shares {':'.join(map(str, chosen.shares))} "
        f"({plan.method} search of {plan.evaluated} placements; KV cache planned for {plan.context} tokens)"
    )
    for r in pred.ranks:
        win = (
            "all layers resident"
            if r.window >= _layers(chosen)
            else f"window {r.window} of {_layers(chosen)} layers"
        )
        lines.append(
            f"  rank {r.rank} {r.node}: {r.q_heads} query heads, {r.kv_heads} KV heads, "
            f"{r.mlp_columns} MLP columns, {win}; per token: compute {r.compute_ms:.1f} ms, "
            f"waiting on sums {r.allreduce_ms:.1f} ms, disk {r.disk_ms:.1f} ms"
        )
    lines.append("why:")
    lines += [f"  - {r}" for r in plan.reasons]
    return "\n".join(lines)


def summary(plan: Plan) -> str:
    """One line for the start of a planned run."""
    c = plan.chosen
    return (
        f"plan: {', '.join(c.node_names)}, shares {':'.join(map(str, c.shares))}, "
        f"windows {':'.join(map(str, plan.windows))}; predicted {c.prediction.ms_per_token:.1f} ms/token, "
        f"TTFT {c.prediction.ttft_ms:.0f} ms ({plan.reasons[0].split('; ')[-1]})"
    )


def plan_summary(plan: Plan) -> dict:
    """The chosen placement, its prediction and the reasons (for /health): the
    other candidates are left to `tpi plan`."""
    c = plan.chosen
    return {
        "nodes": list(c.node_names),
        "node_indices": list(plan.node_indices),  # 0 = the master, i = the i-th worker given
        "shares": list(c.shares),
        "windows": list(plan.windows),
        "method": plan.method,
        "predicted": c.prediction.to_dict(),
        "reasons": list(plan.reasons),
    }
