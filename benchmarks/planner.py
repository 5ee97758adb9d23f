"""The planner against measurements: emulated heterogeneous clusters (`tpi cluster`
with per-rank CPU caps, memory caps and a slow link), predicted vs measured decode
ms/token for many placements, the auto plan vs even shares, and a cluster where
leaving the slowest device out is right.

For every scenario: `tpi cluster ... plan --json --refresh-profiles` measures every
node under its caps (profiles) and chooses; then each placement runs as `tpi
cluster ... bench` (the ranks it uses, with their caps), and its prediction comes
from the same profiles through tpi.planning.cost_model. `auto` runs with --plan
auto. Every timed step holds the machine lock (--lock), all ranks share this
machine's 2 cores, so the caps add up to at most 1.75 cores. Other sessions'
test suites share the machine without the lock: a timed step first waits (up to
2 minutes) for the 1-minute load to fall to --max-load, records the load, and
the placement's figure is its fastest run (the least disturbed).

    python benchmarks/planner.py [--rounds 2] [--lock /tmp/tpi-machine.lock]
    python benchmarks/planner.py --table benchmarks/results/planner.json   # docs/performance.md's table
"""

from __future__ import annotations

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
from benchmarks.scale_70b import machine_lock  # noqa: E402

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
    # A model whose compute per token outweighs 12 allreduces: where splitting pays.
    "uneven-1b": {
        "about": "a 1.2 GB fp32 model (6 layers of hidden 2048) on 1.0 / 0.5 / 0.25 core, 3 GB each",
        "model": "synthetic-1b",
        "ranks": [(1.0, "3GB", None), (0.5, "3GB", None), (0.25, "3GB", None)],
        "placements": [
            ("auto", (0, 1, 2), "auto"),
            ("even", (0, 1, 2), (1, 1, 1)),
            ("2:1:1", (0, 1, 2), (2, 1, 1)),
            ("without the 0.25 core, even", (0, 1), (1, 1)),
            ("master alone", (0,), (1,)),
        ],
    },
    "even-1b": {
        "about": "the same model on 0.5 / 0.5 / 0.5 core, 3 GB each",
        "model": "synthetic-1b",
        "ranks": [(0.5, "3GB", None), (0.5, "3GB", None), (0.5, "3GB", None)],
        "placements": [("auto", (0, 1, 2), "auto"), ("even", (0, 1, 2), (1, 1, 1))],
    },
}
# MHA (16 KV heads, so attention splits as finely as the MLP), random bf16 weights.
SYNTHETIC_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def model_for(scenario: dict, default: str, base: Path, lock: str | None) -> str:
    if scenario.get("model") != "synthetic-1b":
        return default
    from benchmarks.make_synthetic import make_synthetic

    with machine_lock(Path(lock) if lock else None, "writing the 1.2 GB model"):
        return str(make_synthetic(base.parent / "tpi-planner-synthetic-1b", SYNTHETIC_1B))


def cluster_flags(ranks: list[Rank], base: Path) -> list[str]:
    flags = ["cluster", "--workers", str(len(ranks) - 1), "--dir", str(base), "--threads", "1"]
    flags += ["--cpus", ",".join(f"{c:g}" for c, _, _ in ranks)]
    flags += ["--mem-limit", ",".join(m for _, m, _ in ranks)]
    if len(ranks) > 1 and any(lat for _, _, lat in ranks[1:]):
        flags += ["--link-latency", ",".join(lat or "0ms" for _, _, lat in ranks[1:])]
    return flags


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def quiet(max_load: float, wait_s: float = 120.0) -> float:
    """Wait (up to `wait_s`) until the 1-minute load is at most `max_load`: other
    sessions' test suites share this machine without taking the lock, and a run
    next to one measures them, not us. Returns the load when it started."""
    deadline = time.monotonic() + wait_s
    while (load := load_average()) > max_load and time.monotonic() < deadline:
        time.sleep(10)
    return load


def run_json(
    cmd: list[str], lock: str | None, out: Path | None = None, max_load: float = 99.0
) -> dict:
    with machine_lock(Path(lock) if lock else None, "a timed run"):
        start_load = quiet(max_load)
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        seconds = time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    data = json.loads(out.read_text() if out else res.stdout)
    # The load while it ran (1-minute average at its end; ours is ~the ranks' caps).
    data["machine_load"] = {
        "start": start_load,
        "end": load_average(),
        "seconds": round(seconds, 1),
    }
    return data


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
    nodes = [node_speed(cfg, p, Setting(), master=i == 0) for i, p in enumerate(profiles)]
    pl = placement_for(cfg, nodes, wl, subset, shares)
    if isinstance(pl, str):
        return None, pl
    return predict(cfg, nodes, pl, wl), None


def measure(
    scenario: dict, subset, shares, model: str, base: Path, lock, rounds: int, max_load: float
) -> dict:
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
            runs.append(run_json(cmd, lock, out, max_load))
    ms = [r["decode_ms_per_token"] for r in runs]
    # The least disturbed run: other sessions load this shared machine unannounced,
    # and the model predicts devices that have their CPU to themselves.
    last = min(runs, key=lambda r: r["decode_ms_per_token"])
    return {
        "runs_ms_per_token": ms,
        "ms_per_token": round(min(ms), 2),
        "median_ms_per_token": round(statistics.median(ms), 2),
        "ttft_ms": round(last["ttft_ms"], 1),
        "plan": last.get("plan"),
        "machine_load": [r["machine_load"] for r in runs],
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
@click.option(
    "--max-load",
    default=1.0,
    show_default=True,
    help="Start a timed run only once the machine's 1-minute load is at most this.",
)
@click.option("--out", default=None)
def main(
    model: str, rounds: int, lock: str, only: tuple[str, ...], max_load: float, out: str | None
) -> None:
    base = Path(tempfile.mkdtemp(prefix="tpi-planner-bench-"))
    results = {}
    for name, sc in SCENARIOS.items():
        if only and name not in only:
            continue
        t0 = time.time()
        sc_model = model_for(sc, model, base, lock)
        print(f"[{name}] {sc['about']}: profiling every node and planning", flush=True)
        plan_cmd = [TPI, *cluster_flags(sc["ranks"], base), "plan", "--json", "--model", sc_model]
        plan_cmd += ["--max-context", str(CONTEXT), "--prompt-tokens", str(PROMPT)]
        plan_cmd += ["--position", str(POSITION), "--refresh-profiles"]
        plan = run_json(plan_cmd, lock, max_load=max_load)
        rows = []
        for label, subset, shares in sc["placements"]:
            got = measure(sc, subset, shares, sc_model, base, lock, rounds, max_load)
            if shares == "auto":
                chosen = got["plan"] or {"nodes": ["master"], "shares": [1]}
                pred_ms = chosen["predicted"]["ms_per_token"] if got["plan"] else None
                pred_ttft = chosen["predicted"]["ttft_ms"] if got["plan"] else None
                row_shares, why = chosen["shares"], None
            else:
                pred, why = predicted(plan, sc_model, subset, shares)
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
                **{
                    k: got[k]
                    for k in (
                        "median_ms_per_token",
                        "runs_ms_per_token",
                        "per_rank",
                        "plan",
                        "machine_load",
                    )
                },
            }
            rows.append(row)
            print(
                f"  {label:32s} shares {':'.join(map(str, row_shares)):10s} predicted "
                f"{pred_ms} measured {got['ms_per_token']} ms/token",
                flush=True,
            )
        results[name] = {
            "about": sc["about"],
            "model": sc_model,
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


def repredict(path: Path) -> None:
    """Predict every placement of a results file again from its stored profiles
    (the cost model as it is now), and rewrite its errors and summary."""
    data = json.loads(Path(path).read_text())
    for sc in data["scenarios"].values():
        plan = {"profiles": sc["profiles"]}
        for r in sc["placements"]:
            if r["label"] == "auto":
                chosen = r.get("plan") or {"nodes": ["master"]}
                nodes = chosen["nodes"]
                subset = tuple(
                    chosen.get("node_indices")
                    or (range(len(nodes)) if len(nodes) in (1, len(r["ranks"])) else ())
                )
                if not subset:
                    continue  # which workers it took was not recorded
            else:
                subset = tuple(SCEN_INDEX[(sc["about"], r["label"])])
            pred, why = predicted(plan, sc.get("model", data["model"]), subset, tuple(r["shares"]))
            r["predicted_ms_per_token"] = round(pred.ms_per_token, 2) if pred else None
            r["predicted_ttft_ms"] = round(pred.ttft_ms, 1) if pred else None
            r["infeasible"] = why
            m = r["measured_ms_per_token"]
            r["error"] = round(r["predicted_ms_per_token"] / m - 1, 3) if pred else None
    data["summary"] = summarize(data["scenarios"])
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data["summary"], indent=2))


SCEN_INDEX = {
    (sc["about"], label): subset
    for sc in SCENARIOS.values()
    for label, subset, _ in sc["placements"]
}


def table(path: Path) -> str:
    """The markdown table of docs/performance.md from a results file."""
    data = json.loads(Path(path).read_text())
    lines = [
        "| cluster | placement | shares | predicted ms/token | measured ms/token | error | predicted / measured TTFT ms |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, sc in data["scenarios"].items():
        for r in sc["placements"]:
            pred = r["predicted_ms_per_token"]
            err = f"{100 * r['error']:+.0f}%" if r["error"] is not None else "-"
            nodes = (r.get("plan") or {}).get("nodes")
            label = r["label"] + (
                f" ({len(nodes)} nodes)" if r["label"] == "auto" and nodes else ""
            )
            lines.append(
                f"| {name} | {label} | {':'.join(map(str, r['shares']))} | "
                f"{pred if pred is not None else '-'} | {r['measured_ms_per_token']} | {err} | "
                f"{r['predicted_ttft_ms']} / {r['measured_ttft_ms']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(Path(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "--repredict":
        repredict(Path(sys.argv[2]))
    else:
        main()
