"""Many requests at once: aggregate tokens/s and per-client ms/token at 1, 2, 4, 8
concurrent requests, side by side in one run (fresh `tpi bench --concurrency C`
processes, the concurrency levels interleaved within every round).

Configurations:
  one-node    the embedded SmolLM2, fp32, this machine alone
  world3-5ms  SmolLM2 on master + 2 local workers behind 5 ms emulated links
  nano        world3-5ms at 8 requests with 1 (no overlap) and 2 nano-batches
  with --big DIR (a directory holding the int8 and int4 splits of a
  Llama-2-7B-shaped model, as benchmarks/vs_llamacpp.py makes them):
  7b-int8     resident, one node
  7b-int4-w2  streamed through a window of 2 layers, one node
And, in this process, a new request joining 3 running streams with a 512-token
prompt: the running streams' worst gap between tokens while it prefills, with
the prompt fed in chunks of 64 tokens between their decode steps and whole.

    python benchmarks/batching.py [--rounds 3] [--lock FILE]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median, write_result  # noqa: E402
from benchmarks.scale_70b import machine_lock  # noqa: E402

TPI = str(Path(sys.executable).parent / "tpi")
LEVELS = (1, 2, 4, 8)
CLUSTER_5MS = ["cluster", "--workers", "2", "--link-latency", "5ms"]
# name -> (command prefix, extra bench arguments)
CONFIGS: dict[str, tuple[list[str], list[str]]] = {
    "one-node": ([], []),
    "world3-5ms": (CLUSTER_5MS, []),
}


def big_configs(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    return {
        "7b-int8": ([], ["--model", str(root / "tpi-int8")]),
        "7b-int4-w2": ([], ["--model", str(root / "tpi-int4"), "--window", "2"]),
    }


def _bench(prefix: list[str], args: list[str], lock: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.json"
        cmd = [TPI, *prefix, "bench", *args, "--out", str(out)]
        if lock:
            cmd = ["flock", lock, *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=1800)
        return json.loads(out.read_text())


def _figures(report: dict) -> dict:
    if "aggregate_tokens_per_second" in report:
        return {
            "aggregate_tokens_per_second": report["aggregate_tokens_per_second"],
            "per_client_ms_per_token": report["per_client_ms_per_token"],
        }
    return {
        "aggregate_tokens_per_second": report["tokens_per_second"],
        "per_client_ms_per_token": report["decode_ms_per_token"],
    }


def join_gap(prefill_chunk: int, new_prompt: int = 512, running: int = 3) -> dict:
    """Worst and median gap between the running streams' tokens while a new
    request's prompt is prefilled, in one process (the embedded SmolLM2)."""
    from tpi.master.batching import Batcher, BatchSequence
    from tpi.master.engine import load_engine
    from tpi.master.sampling import SamplingParams
    from tpi.sources.default_model import ensure_default_model

    engine = load_engine(ensure_default_model(lambda _m: None))
    b = Batcher(engine, max_batch=running + 1, prefill_chunk=prefill_chunk)
    streams = [
        BatchSequence(list(range(10 + i, 42 + i)), SamplingParams(max_new_tokens=400))
        for i in range(running)
    ]
    for s in streams:
        b.submit(s)
    for _ in range(8):  # all running and decoding
        b.step()
    newcomer = BatchSequence(list(range(100, 100 + new_prompt)), SamplingParams(max_new_tokens=4))
    b.submit(newcomer)
    gaps = []
    last = time.perf_counter()
    while not newcomer.tokens and len(gaps) < 1000:
        b.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return {
        "prefill_chunk": prefill_chunk,
        "steps_while_prefilling": len(gaps),
        "worst_gap_ms": round(1000 * max(gaps), 2),
        "median_gap_ms": round(1000 * median(gaps), 2),
        "newcomer_ttft_ms": round(1000 * sum(gaps), 2),
    }


@click.command()
@click.option("--rounds", default=3, show_default=True)
@click.option("--prompt-tokens", default=64, show_default=True)
@click.option("--new-tokens", default=32, show_default=True)
@click.option("--lock", default=None, help="Hold this file's flock during every timed run.")
@click.option(
    "--big",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory with tpi-int8/ and tpi-int4/ splits of a 7B-shaped model.",
)
@click.option("--big-new-tokens", default=8, show_default=True)
@click.option("--only-big", is_flag=True, help="Skip the SmolLM2 configurations.")
@click.option("--out", default=None)
def main(rounds, prompt_tokens, new_tokens, lock, big, big_new_tokens, only_big, out):
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    base = ["--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens)]
    big_base = ["--prompt-tokens", "16", "--new-tokens", str(big_new_tokens)]
    configs = {} if only_big else dict(CONFIGS)
    if big is not None:
        configs.update(big_configs(big))
    samples: dict[str, dict[str, list[dict]]] = {}
    for r in range(rounds):
        for name, (prefix, extra) in configs.items():
            levels = LEVELS if r % 2 == 0 else tuple(reversed(LEVELS))
            for c in levels:
                args = [*(big_base if name.startswith("7b") else base), *extra]
                fig = _figures(_bench(prefix, [*args, "--concurrency", str(c)], lock))
                samples.setdefault(name, {}).setdefault(str(c), []).append(fig)
                print(f"round {r + 1} {name} c={c}: {fig}", flush=True)
        for nano in () if only_big else (1, 2):
            args = [*base, "--concurrency", "8", "--nano-batches", str(nano)]
            fig = _figures(_bench(CLUSTER_5MS, args, lock))
            samples.setdefault("nano", {}).setdefault(str(nano), []).append(fig)
            print(f"round {r + 1} nano={nano}: {fig}", flush=True)
    results: dict[str, dict] = {}
    for name, by_level in samples.items():
        results[name] = {
            level: {k: median([f[k] for f in figs]) for k in figs[0]}
            for level, figs in by_level.items()
        }
    ratios: dict = {}
    for name in configs:
        one = results[name]["1"]
        ratios[name] = {
            c: {
                "aggregate_vs_1": round(
                    results[name][c]["aggregate_tokens_per_second"]
                    / one["aggregate_tokens_per_second"],
                    2,
                ),
                "per_client_ms_vs_1": round(
                    results[name][c]["per_client_ms_per_token"] / one["per_client_ms_per_token"], 2
                ),
            }
            for c in results[name]
        }
    joins = {}
    if not only_big:
        nano = results["nano"]
        ratios["nano_gain_aggregate_2_vs_1"] = round(
            nano["2"]["aggregate_tokens_per_second"] / nano["1"]["aggregate_tokens_per_second"],
            3,
        )
        with machine_lock(Path(lock) if lock else None, "join gap"):
            joins = {"chunked_64": join_gap(64), "whole": join_gap(0)}
    targets = {}
    checks = {
        "one-node aggregate at 4 >= 2.5x of 1": ("one-node", "4", "aggregate_vs_1", 2.5),
        "world3-5ms aggregate at 8 >= 6x of 1": ("world3-5ms", "8", "aggregate_vs_1", 6),
        "7b-int8 aggregate at 4 >= 3x of 1": ("7b-int8", "4", "aggregate_vs_1", 3),
        "7b-int4-w2 aggregate at 8 >= 5x of 1": ("7b-int4-w2", "8", "aggregate_vs_1", 5),
    }
    for text, (name, level, key, least) in checks.items():
        if name in ratios:
            targets[text] = ratios[name][level][key] >= least
    if "7b-int8" in ratios:
        targets["7b-int8 per-client ms at 4 <= 1.5x of 1"] = (
            ratios["7b-int8"]["4"]["per_client_ms_vs_1"] <= 1.5
        )
    report = {
        "benchmark": "batching",
        "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": rounds},
        "results": results,
        "ratios": ratios,
        "join_512_token_prompt": joins,
        "targets": targets,
        "samples": samples,
    }
    print(
        json.dumps(
            {k: report[k] for k in ("results", "ratios", "join_512_token_prompt", "targets")},
            indent=1,
        )
    )
    write_result("batching_7b" if only_big else "batching", report, out)


if __name__ == "__main__":
    main()
