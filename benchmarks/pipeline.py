"""Pipeline, tensor and hybrid parallelism over 4 ranks, side by side in one run.

Four ranks (master + 3 local workers, one process each, one thread each: this
machine has 2 cores, so the four share them), emulated one-way link latency
0/1/5/10 ms on every link, and a "slow link" case (three ranks on 0.5 ms links,
one on 10 ms). Plans:

  tp4      every layer cut over all four ranks (2 allreduces per layer per token)
  pp4      four stages of a quarter of the layers each (one hop per stage per token)
  tp2xpp2  "master,w1 | w2,w3": two stages of two ranks each
  hybrid   (slow link) "master,w1,w2 | w3": the far device alone in the last stage,
           with a quarter of the layers (--stage-layers)
  pp4-nano2, pp4-nano4  pp4 with 8 requests cut into 2 or 4 micro-batches that
           flow through the stages within each decode step (0 and 5 ms)

For each: single-sequence decode ms/token (`tpi bench`), the aggregate tokens/s
of 8 concurrent requests (`tpi bench --concurrency 8`, continuous batching), and
every node's peak RSS. Configurations are interleaved within each round.

With --big, the same plans on a Llama-2-7B-shaped synthetic model in int8
(per-row, `--big-quant int8`, the default) or int4 (groups of 32), each plan's
split written directly (tpi.storage.direct_split: a bf16 checkpoint to cut would
need more disk than this machine has), linked into the workers' stores, removed
after use.

    python benchmarks/pipeline.py [--rounds 1] [--big WORKDIR [--big-quant int8]] [--lock FILE]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median, write_result  # noqa: E402
from benchmarks.make_synthetic import LLAMA2_7B  # noqa: E402
from benchmarks.scale_70b import SEED, link_worker_stores, machine_lock  # noqa: E402
from benchmarks.synthetic_split import model_card, write_synthetic_split  # noqa: E402

TPI = str(Path(sys.executable).parent / "tpi")
LATENCIES = ("0ms", "1ms", "5ms", "10ms")
SLOW = "0.5ms,0.5ms,10ms"
PLANS = {
    "tp4": [],
    "pp4": ["--pp", "4"],
    "tp2xpp2": ["--plan", "master,w1 | w2,w3"],
}
# The far device alone in the last stage, with a quarter of the layers (SmolLM2: 30).
HYBRID = ["--plan", "master,w1,w2 | w3", "--stage-layers", "22,8"]
SLOW_PLANS = {**{k: v for k, v in PLANS.items() if k != "tp2xpp2"}, "hybrid": HYBRID}
# Decode micro-batches through the stages (GPipe within a batched step), 8 requests.
NANO = {f"pp4-nano{n}": ["--pp", "4", "--nano-batches", str(n)] for n in (2, 4)}
# Stage sizes of each plan (None: tensor parallel), for the directly written 7B splits.
SIZES = {"tp4": None, "pp4": [1, 1, 1, 1], "tp2xpp2": [2, 2], "hybrid": [3, 1]}
LAYERS_7B = {"hybrid": [24, 8]}  # a quarter of the 32 layers for the far device


def _cases(only: set[str] | None) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(latency label, --link-latency value, plan, concurrencies) per configuration."""
    out = [(lat, lat, plan, (1, 8)) for lat in LATENCIES for plan in PLANS]
    out += [("slow", SLOW, plan, (1, 8)) for plan in SLOW_PLANS]
    out += [(lat, lat, plan, (8,)) for lat in ("0ms", "5ms") for plan in NANO]
    return [c for c in out if only is None or c[2] in only]


def _run(
    latency: str,
    plan_args: list[str],
    bench: list[str],
    lock: str | None,
    env: dict,
    cluster_args: tuple[str, ...] = (),
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.json"
        cmd = [TPI, "cluster", "--workers", "3"]
        if latency != "0ms":
            cmd += ["--link-latency", latency]
        cmd += [*cluster_args, "bench", *bench, *plan_args, "--out", str(out)]
        if lock:
            cmd = ["flock", lock, *cmd]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-3:], "cmd": cmd}
        report = json.loads(out.read_text())
        report["wall_seconds"] = round(time.perf_counter() - t0, 1)
        return report


def _figures(report: dict) -> dict:
    if "error" in report:
        return report
    rss = {r: n.get("peak_rss_bytes") for r, n in report.get("nodes", {}).items()}
    if "aggregate_tokens_per_second" in report:
        return {
            "aggregate_tokens_per_second": report["aggregate_tokens_per_second"],
            "peak_rss": rss,
        }
    return {
        "decode_ms_per_token": report["decode_ms_per_token"],
        "ttft_ms": report["ttft_ms"],
        "peak_rss": rss,
    }


def _write_7b(work: Path, plan: str, quant: str) -> Path:
    from tpi.model.partition import plan_partition
    from tpi.model.pipeline_plan import plan_pipeline

    sizes = SIZES[plan]

    def partition(cfg):
        if sizes is None:
            return plan_partition(cfg, [1.0] * 4)
        return plan_pipeline(cfg, sizes, LAYERS_7B.get(plan))

    form = "int4g32" if quant == "int4" else quant
    return write_synthetic_split(
        work / f"7b-{quant}-{plan}",
        LLAMA2_7B,
        partition,
        card=model_card(work, "7b", LLAMA2_7B),
        model_id=f"synthetic-llama2-7b-{form}-seed{SEED}",
        seed=SEED,
        what=f"the {plan} split",
        quant=quant,
    )


def _summarize(samples: dict) -> dict:
    """Medians per configuration; memory per node is the smaller peak RSS of the
    plan's two runs (the first run of a plan also splits the model in the master)."""
    out: dict = {}
    for key, runs in samples.items():
        good = [r for r in runs if "error" not in r]
        out[key] = (
            {k: median([r[k] for r in good]) for k in good[0] if k != "peak_rss"}
            if good
            else runs[-1]
        )
    plans = {key.rsplit("/", 1)[0] for key in samples}
    for plan in sorted(plans):
        rss = [
            r["peak_rss"]
            for c in ("c1", "c8")
            for r in samples.get(f"{plan}/{c}", [])
            if "error" not in r
        ]
        if rss:
            out[f"{plan}/peak_rss_mb"] = {
                rank: round(min(x[rank] or 0 for x in rss) / 2**20) for rank in rss[0]
            }
    return out


@click.command()
@click.option("--rounds", default=1, show_default=True)
@click.option("--prompt-tokens", default=32, show_default=True)
@click.option("--new-tokens", default=16, show_default=True)
@click.option("--lock", default=None, help="Hold this file's flock during every timed run.")
@click.option(
    "--big",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Work directory for the 7B-shaped splits (written per plan, then removed).",
)
@click.option("--big-quant", type=click.Choice(["int8", "int4"]), default="int8", show_default=True)
@click.option("--only-big", is_flag=True)
@click.option("--only", default=None, help="Comma-separated plans to run (default: all).")
@click.option("--out", default=None)
def main(rounds, prompt_tokens, new_tokens, lock, big, big_quant, only_big, only, out):
    only = set(only.split(",")) if only else None
    env = dict(os.environ)
    own_home = "TPI_HOME" not in env  # then its splits are removed at the end
    env.setdefault("TPI_HOME", tempfile.mkdtemp(prefix="tpi-pipeline-bench-"))
    if not env.get("TPI_SECRET"):
        from tpi.comm.auth import new_secret

        env["TPI_SECRET"] = new_secret()
    single = ["--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens)]
    samples: dict[str, list] = {}
    if not only_big:
        for r in range(rounds):
            cases = _cases(only) if r % 2 == 0 else list(reversed(_cases(only)))
            for label, latency, plan, concurrencies in cases:
                plan_args = (PLANS | SLOW_PLANS | NANO)[plan]
                for conc in concurrencies:
                    bench = single + (["--concurrency", "8"] if conc == 8 else [])
                    fig = _figures(_run(latency, plan_args, bench, lock, dict(env)))
                    key = f"smollm2/{label}/{plan}/c{conc}"
                    samples.setdefault(key, []).append(fig)
                    print(f"round {r + 1} {key}: {fig}", flush=True)
    if big is not None:
        big.mkdir(parents=True, exist_ok=True)
        cluster_dir = big / "cluster"
        small = ["--prompt-tokens", "16", "--new-tokens", "4"]
        for plan in [p for p in ("tp4", "pp4", "tp2xpp2", "hybrid") if only is None or p in only]:
            with machine_lock(Path(lock) if lock else None, f"writing the 7B {plan} split"):
                split = _write_7b(big, plan, big_quant)
            link_worker_stores(cluster_dir, split, 4)
            lats = [("slow", SLOW)] if plan == "hybrid" else [(lat, lat) for lat in LATENCIES]
            if plan in SLOW_PLANS and plan != "hybrid":
                lats.append(("slow", SLOW))
            for label, latency in lats:
                for conc in (1, 8):
                    bench = ["--model", str(split), *small]
                    bench += ["--concurrency", "8"] if conc == 8 else []
                    dirs = ("--dir", str(cluster_dir))
                    fig = _figures(_run(latency, [], bench, lock, dict(env), dirs))
                    key = f"7b-{big_quant}/{label}/{plan}/c{conc}"
                    samples.setdefault(key, []).append(fig)
                    print(f"{key}: {fig}", flush=True)
            shutil.rmtree(split)
    if own_home:
        shutil.rmtree(env["TPI_HOME"], ignore_errors=True)
    results = _summarize(samples)
    write_result(
        "pipeline",
        {
            "what": "decode ms/token (1 sequence) and aggregate tokens/s (8 concurrent), "
            "4 ranks on one 2-core machine, per plan and emulated link latency",
            "rounds": rounds,
            "results": results,
        },
        out,
    )


if __name__ == "__main__":
    main()
