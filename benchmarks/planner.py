"""The planner against measurements: emulated heterogeneous clusters (`tpi cluster`
with per-rank CPU caps, memory caps and a slow link), predicted vs measured decode
ms/token for many placements, the auto plan vs even shares, and a cluster where
leaving the slowest device out is right.

For every scenario: `tpi cluster ... plan --json --refresh-profiles` measures every
node under its caps (profiles) and chooses; then each placement runs as `tpi
cluster ... bench` (the ranks it uses, with their caps), and its prediction comes
from the same profiles through tpi.planning.cost_model. `auto` runs with --plan
auto. Every timed step holds the machine lock (--lock), all ranks share this
machine's 2 cores, so the caps add up to at most 1.75 cores.

    python benchmarks/planner.py [--rounds 2] [--lock /tmp/tpi-machine.lock]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402

TPI = str(Path(sys.executable).parent / "tpi")
PROMPT, NEW = 64, 24
POSITION = PROMPT + NEW // 2  # the mean decode position of a bench run
CONTEXT = PROMPT + NEW + 8  # what tpi bench plans the KV cache for

# A rank: (CPU cap in cores, memory cap, one-way link latency to the master).
Rank = tuple[float, str, str | None]
SCENARIOS: dict[str, dict] = {
    "uneven": {
        "about": "1.0 / 0.5 / 0.25 core, 2 GB each, LAN",
        "ranks": [(1.0, "2GB", None), (0.5, "2GB", None), (0.25, "2GB", None)],
        # (label, ranks used, shares or "auto")
        "placements": [
            ("auto", (0, 1, 2), "auto"),
            ("even", (0, 1, 2), (1, 1, 1)),
            ("2:1:1", (0, 1, 2), (2, 1, 1)),
            ("1:2:4 (backwards)", (0, 1, 2), (1, 2, 4)),
            ("without the 0.25 core, even", (0, 1), (1, 1)),
            ("master alone", (0,), (1,)),
        ],
    },
    "even": {
        "about": "0.5 / 0.5 / 0.5 core, 2 GB each, LAN",
        "ranks": [(0.5, "2GB", None), (0.5, "2GB", None), (0.5, "2GB", None)],
        "placements": [("auto", (0, 1, 2), "auto"), ("even", (0, 1, 2), (1, 1, 1))],
    },
    "far": {
        "about": "1.0 / 0.5 / 0.25 core, the 0.25 core behind a 10 ms link",
        "ranks": [(1.0, "2GB", None), (0.5, "2GB", None), (0.25, "2GB", "10ms")],
        "placements": [
            ("auto", (0, 1, 2), "auto"),
            ("even, all three", (0, 1, 2), (1, 1, 1)),
            ("4:2:1, all three", (0, 1, 2), (4, 2, 1)),
        ],
    },
    "memory": {
        "about": "1.0 / 0.5 core, the 0.5 core with 400 MB: it streams its layers",
        "ranks": [(1.0, "2GB", None), (0.5, "400MB", None)],
        "placements": [("auto", (0, 1), "auto"), ("even", (0, 1), (1, 1))],
    },
}


@contextlib.contextmanager
def held(lock: str | None):
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cluster_flags(ranks: list[Rank], base: Path) -> list[str]:
    flags = ["cluster", "--workers", str(len(ranks) - 1), "--dir", str(base), "--threads", "1"]
    flags += ["--cpus", ",".join(f"{c:g}" for c, _, _ in ranks)]
    flags += ["--mem-limit", ",".join(m for _, m, _ in ranks)]
    if len(ranks) > 1 and any(lat for _, _, lat in ranks[1:]):
        flags += ["--link-latency", ",".join(lat or "0ms" for _, _, lat in ranks[1:])]
    return flags


def run_json(cmd: list[str], lock: str | None, out: Path | None = None) -> dict:
    with held(lock):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    text = out.read_text() if out else res.stdout
    return json.loads(text)


def predicted(plan_json: dict, model: str, subset: tuple[int, ...], shares: tuple[int, ...]):
    """The cost model's prediction of `shares` over the scenario's ranks `subset`."""
    from tpi.master.planner import PlanRequest, stored_dtype, workload
    from tpi.model.config import load_config
    from tpi.planning.cost_model import predict
    from tpi.planning.footprint import Format
    from tpi.planning.nodes import node_speed
    from tpi.planning.profile import NodeProfile
    from tpi.planning.slice_probe import Setting
    from tpi.planning.solver import placement_for
    from tpi.sources.model_registry import resolve_model

    model_dir = resolve_model(model, lambda _m: None, None)
    cfg = load_config(model_dir)
    fmt = Format("fp32", "none", 32, stored_dtype(model_dir))
    req = PlanRequest(model_dir, (), max_context=CONTEXT, prompt_tokens=PROMPT, position=POSITION)
    wl = workload(req, cfg, fmt)
    profiles = [NodeProfile.from_dict(p) for p in plan_json["profiles"]]
    nodes = [node_speed(cfg, p, Setting()) for p in profiles]
    pl = placement_for(cfg, nodes, wl, subset, shares)
    if isinstance(pl, str):
        return None, pl
    return predict(cfg, nodes, pl, wl), None


def measure(scenario: dict, subset, shares, model: str, base: Path, lock, rounds: int) -> dict:
    ranks = [scenario["ranks"][i] for i in subset]
    runs = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.json"
            cmd = [TPI, *cluster_flags(ranks, base)]
            cmd += ["bench", "--model", model, "--prompt-tokens", str(PROMPT)]
            cmd += ["--new-tokens", str(NEW), "--out", str(out)]
            if shares == "auto":
                cmd += ["--plan", "auto"]
            elif len(ranks) > 1:
                cmd += ["--plan", "even", "--shares", ",".join(map(str, shares))]
            runs.append(run_json(cmd, lock, out))
    ms = [r["decode_ms_per_token"] for r in runs]
    last = runs[-1]
    return {
        "runs_ms_per_token": ms,
        "ms_per_token": round(statistics.median(ms), 2),
        "ttft_ms": round(statistics.median(r["ttft_ms"] for r in runs), 1),
        "plan": last.get("plan"),
        "per_rank": {
            r: {
                k: last["nodes"][r]["decode"]["per_token"][k]
                for k in ("compute_ms", "allreduce_ms", "blocked_ms")
            }
            | {"peak_rss_bytes": last["nodes"][r]["peak_rss_bytes"]}
            for r in last["nodes"]
        },
    }


@click.command()
@click.option("--model", default="SmolLM2-135M-Instruct", show_default=True)
@click.option("--rounds", default=2, show_default=True, help="Runs per placement (median).")
@click.option("--lock", default="/tmp/tpi-machine.lock", show_default=True)
@click.option("--only", multiple=True, help="Run only these scenarios.")
@click.option("--out", default=None)
def main(model: str, rounds: int, lock: str, only: tuple[str, ...], out: str | None) -> None:
    base = Path(tempfile.mkdtemp(prefix="tpi-planner-bench-"))
    results = {}
    for name, sc in SCENARIOS.items():
        if only and name not in only:
            continue
        t0 = time.time()
        print(f"[{name}] {sc['about']}: profiling every node and planning", flush=True)
        plan_cmd = [TPI, *cluster_flags(sc["ranks"], base), "plan", "--json", "--model", model]
        plan_cmd += ["--max-context", str(CONTEXT), "--prompt-tokens", str(PROMPT)]
        plan_cmd += ["--position", str(POSITION), "--refresh-profiles"]
        plan = run_json(plan_cmd, lock)
        rows = []
        for label, subset, shares in sc["placements"]:
            got = measure(sc, subset, shares, model, base, lock, rounds)
            if shares == "auto":
                chosen = got["plan"] or {"nodes": ["master"], "shares": [1]}
                pred_ms = chosen["predicted"]["ms_per_token"] if got["plan"] else None
                pred_ttft = chosen["predicted"]["ttft_ms"] if got["plan"] else None
                row_shares, why = chosen["shares"], None
            else:
                pred, why = predicted(plan, model, subset, shares)
                pred_ms = round(pred.ms_per_token, 2) if pred else None
                pred_ttft = round(pred.ttft_ms, 1) if pred else None
                row_shares = list(shares)
            err = (pred_ms / got["ms_per_token"] - 1) if pred_ms else None
            row = {
                "label": label,
                "ranks": [sc["ranks"][i] for i in subset],
                "shares": row_shares,
                "predicted_ms_per_token": pred_ms,
                "measured_ms_per_token": got["ms_per_token"],
                "error": round(err, 3) if err is not None else None,
                "predicted_ttft_ms": pred_ttft,
                "measured_ttft_ms": got["ttft_ms"],
                "infeasible": why,
                **{k: got[k] for k in ("runs_ms_per_token", "per_rank", "plan")},
            }
            rows.append(row)
            print(
                f"  {label:32s} shares {':'.join(map(str, row_shares)):10s} predicted "
                f"{pred_ms} measured {got['ms_per_token']} ms/token",
                flush=True,
            )
        results[name] = {
            "about": sc["about"],
            "plan": plan["plan"],
            "profiles": plan["profiles"],
            "placements": rows,
            "seconds": round(time.time() - t0, 1),
        }
    summary = summarize(results)
    print(json.dumps(summary, indent=2))
    path = write_result(
        "planner",
        {
            "model": model,
            "prompt_tokens": PROMPT,
            "new_tokens": NEW,
            "summary": summary,
            "scenarios": results,
        },
        out,
    )
    print(f"wrote {path}")


def summarize(results: dict) -> dict:
    rows = [r for sc in results.values() for r in sc["placements"] if r["error"] is not None]
    within = [r for r in rows if abs(r["error"]) <= 0.25]
    out = {
        "placements_compared": len(rows),
        "within_25_percent": len(within),
        "median_abs_error": round(statistics.median(abs(r["error"]) for r in rows), 3)
        if rows
        else None,
    }
    for name, sc in results.items():
        by = {r["label"]: r for r in sc["placements"]}
        auto = by.get("auto")
        even = by.get("even") or by.get("even, all three")
        if auto and even:
            out[f"{name}: auto vs even"] = round(
                even["measured_ms_per_token"] / auto["measured_ms_per_token"], 3
            )
        if auto:
            out[f"{name}: auto chose"] = {
                "nodes": (auto["plan"] or {}).get("nodes"),
                "shares": auto["shares"],
            }
    return out


if __name__ == "__main__":
    main()
