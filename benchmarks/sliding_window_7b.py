"""Sliding window on a Llama-2-7B-shaped model (32 layers, hidden 4096, MLP 11008,
vocab 32000, bf16 random weights, ~13.5 GB), against transformers resident and
transformers + accelerate disk offload at the same memory, in one run.

Per configuration (world 1 and 3, window 1 and 2) and per node: peak RSS,
ms/token, share of disk time hidden behind compute (1 - blocked / read).
Every configuration runs in fresh processes, so peak RSS belongs to it alone.

    python benchmarks/sliding_window_7b.py [--work DIR] [--new-tokens 3]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402
from benchmarks.make_synthetic import make_synthetic  # noqa: E402

TPI = str(Path(sys.executable).parent / "tpi")


def _json_tail(text: str) -> dict:
    start = text.index("{")
    return json.loads(text[start:])


def run_tpi(model: Path, world: int, window: int | None, prompt: int, new: int, env: dict) -> dict:
    args = [
        "bench",
        "--model",
        str(model),
        "--dtype",
        "bf16",
        "--prompt-tokens",
        str(prompt),
        "--new-tokens",
        str(new),
    ]
    if window:
        args += ["--window", str(window)]
    cmd = [TPI, *args] if world == 1 else [TPI, "cluster", "--workers", str(world - 1), *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    report = _json_tail(res.stdout)
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def summarize(
    report: dict, slice_bytes: dict[int, int], window: int | None, head_bytes: int
) -> dict:
    nodes = {}
    for r, node in report["nodes"].items():
        d = node["decode"]
        r = int(r)
        w = window or 32
        kv = 0  # a few dozen tokens of context: negligible next to layers
        held = w * slice_bytes[r] + kv + (head_bytes if r == 0 else 0)
        nodes[r] = {
            "peak_rss_gb": round(node["peak_rss_bytes"] / 1e9, 3),
            "window_x_slice_gb": round(w * slice_bytes[r] / 1e9, 3),
            "head_gb": round(head_bytes / 1e9, 3) if r == 0 else 0,
            "peak_over_held": round(node["peak_rss_bytes"] / held, 3),
            "disk_time_hidden": d.get("disk_time_hidden"),
            "disk_gb_per_token": round(d["per_token"]["disk_bytes"] / 1e9, 3),
            "blocked_ms_per_token": d["per_token"]["blocked_ms"],
            "compute_ms_per_token": d["per_token"]["compute_ms"],
            "allreduce_ms_per_token": d["per_token"]["allreduce_ms"],
        }
    return {
        "ms_per_token": report["decode_ms_per_token"],
        "ttft_ms": report["ttft_ms"],
        "nodes": nodes,
    }


def _hf_runs(model: Path, results: dict, prompt_tokens: int, new_tokens: int, want, save) -> None:
    base = [
        sys.executable,
        str(Path(__file__).parent / "hf_baseline.py"),
        str(model),
        "--prompt-tokens",
        str(prompt_tokens),
        "--new-tokens",
        str(new_tokens),
    ]
    runs = results["runs"]
    if want("transformers_full"):
        click.echo("running transformers, full model ...", err=True)
        full = subprocess.run(
            [*base, "--mode", "full"], capture_output=True, text=True, timeout=7200
        )
        runs["transformers_full"] = (
            _json_tail(full.stdout) if full.returncode == 0 else {"error": full.stderr[-1500:]}
        )
        click.echo(runs["transformers_full"], err=True)
        save()
    if want("transformers_accelerate_offload") and "tpi_world1_window2" in runs:
        # The same memory as our single-node streaming run with window 2.
        limit = f"{runs['tpi_world1_window2']['summary']['nodes']['0']['peak_rss_gb']:.2f}GB"
        click.echo(f"running transformers + accelerate disk offload at {limit} ...", err=True)
        off = subprocess.run(
            [*base, "--mode", "offload", "--max-memory", limit],
            capture_output=True,
            text=True,
            timeout=7200,
        )
        runs["transformers_accelerate_offload"] = (
            _json_tail(off.stdout) if off.returncode == 0 else {"error": off.stderr[-1500:]}
        )
        click.echo(runs["transformers_accelerate_offload"], err=True)
        save()


def _ratios(runs: dict) -> dict:
    out = {}
    ours = runs.get("tpi_world1_window2", {}).get("summary", {})
    off = runs.get("transformers_accelerate_offload", {})
    full = runs.get("transformers_full", {})
    if ours and "decode_ms_per_token" in off:
        out["accelerate_offload_ms_over_tpi_world1_window2"] = round(
            off["decode_ms_per_token"] / ours["ms_per_token"], 2
        )
        out["accelerate_offload_peak_rss_over_tpi"] = round(
            off["peak_rss_bytes"] / 1e9 / ours["nodes"]["0"]["peak_rss_gb"], 2
        )
    if ours and "decode_ms_per_token" in full:
        out["tpi_world1_window2_ms_over_transformers_full"] = round(
            ours["ms_per_token"] / full["decode_ms_per_token"], 2
        )
        out["transformers_full_peak_rss_over_tpi_world1_window2"] = round(
            full["peak_rss_bytes"] / 1e9 / ours["nodes"]["0"]["peak_rss_gb"], 2
        )
    return out


@click.command()
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(os.environ.get("TPI_HOME", "~/.cache/tpi")).expanduser() / "bench",
    show_default=True,
    help="Where the synthetic model and splits live.",
)
@click.option("--prompt-tokens", default=16, show_default=True)
@click.option("--new-tokens", default=3, show_default=True)
@click.option(
    "--tmpfs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also run world 1 from a copy of its split on this tmpfs (disk speed out of the way).",
)
@click.option("--skip-hf", is_flag=True, help="Skip the transformers baselines.")
@click.option(
    "--only",
    default=None,
    help="Comma-separated run names to (re)run; the others are kept from the existing results.",
)
@click.option("--out", default=None)
def main(work, prompt_tokens, new_tokens, tmpfs, skip_hf, only, out):
    from tpi.manifest import HEAD_FILE, layer_file
    from tpi.split import ensure_split

    model = make_synthetic(work / "llama2-7b-synthetic")
    env = dict(os.environ, TPI_HOME=str(work / "home"))
    os.environ["TPI_HOME"] = env["TPI_HOME"]
    path = Path(out) if out else Path(__file__).parent / "results" / "sliding_window_7b.json"
    wanted = set(only.split(",")) if only else None
    results: dict = {
        "model": str(model),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "runs": {},
    }
    if path.is_file():  # resume: keep runs already measured
        results["runs"] = json.loads(path.read_text()).get("runs", {})

    def want(name: str) -> bool:
        return (wanted is None and name not in results["runs"]) or (
            wanted is not None and name in wanted
        )

    def save() -> None:
        results["ratios"] = _ratios(results["runs"])
        results["targets"] = {
            "peak_rss_per_node": "<= window x slice + KV + 20% (head and runtime listed per node)",
            "disk_time_hidden": ">= 0.8",
            "vs_accelerate_offload": "faster at equal memory",
        }
        write_result("sliding_window_7b", results, str(path))

    for world in (1, 3):
        split = ensure_split(model, [1.0] * world, lambda m: click.echo(m, err=True))
        slice_bytes = {r: (split / f"rank{r}" / layer_file(0)).stat().st_size for r in range(world)}
        head_bytes = (split / "rank0" / HEAD_FILE).stat().st_size
        for window in (1, 2):
            name = f"tpi_world{world}_window{window}"
            if want(name):
                click.echo(f"running {name} ...", err=True)
                report = run_tpi(model, world, window, prompt_tokens, new_tokens, env)
                results["runs"][name] = {
                    "summary": summarize(report, slice_bytes, window, head_bytes),
                    "raw": report,
                }
                click.echo(json.dumps(results["runs"][name]["summary"]), err=True)
                save()
        names = [f"tpi_world1_window{w}_tmpfs" for w in (1, 2)]
        if world == 1 and tmpfs and any(want(n) for n in names):
            import shutil

            fast = Path(tmpfs) / "tpi-bench-split"
            if not fast.exists():
                shutil.copytree(split, fast)
            try:
                for window, name in zip((1, 2), names, strict=True):
                    if want(name):
                        report = run_tpi(fast, 1, window, prompt_tokens, new_tokens, env)
                        results["runs"][name] = {
                            "summary": summarize(report, slice_bytes, window, head_bytes),
                            "raw": report,
                        }
                        click.echo(json.dumps(results["runs"][name]["summary"]), err=True)
                        save()
            finally:
                shutil.rmtree(fast, ignore_errors=True)
    if not skip_hf:
        _hf_runs(model, results, prompt_tokens, new_tokens, want, save)
    save()
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
