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

from benchmarks.common import work_option, write_result  # noqa: E402
from benchmarks.make_synthetic import make_synthetic  # noqa: E402

TPI = str(Path(sys.executable).parent / "tpi")


def _json_tail(text: str) -> dict:
    start = text.index("{")
    return json.loads(text[start:])


def run_capped(cmd: list[str], env: dict | None, cap_bytes: int | None, timeout: float = 7200):
    """Run `cmd`; with `cap_bytes`, inside a fresh memory cgroup after dropping the page
    cache, so page cache counts against the same limit as RSS (equal-memory runs)."""
    if cap_bytes is None:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    from tpi.emulation.cgroups import CgroupFactory

    factory = CgroupFactory()
    if not factory.available:
        raise SystemExit(f"capped runs need cgroups: {factory.reason}")
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")
    cg = factory.create(f"tpi-bench-{os.getpid()}-{time.monotonic_ns()}", cap_bytes, None)
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        cg.add(proc.pid)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    finally:
        cg.remove()


def run_tpi(
    model: Path,
    world: int,
    window: int | None,
    prompt: int,
    new: int,
    env: dict,
    cap_bytes: int | None = None,
) -> dict:
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
    res = run_capped(cmd, env, cap_bytes)
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
        nodes[str(r)] = {
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


def _hf_runs(
    model: Path, results: dict, prompt_tokens: int, new_tokens: int, want, save, cap_gb: float
) -> None:
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

    def record(name: str, res) -> None:
        runs[name] = (
            _json_tail(res.stdout) if res.returncode == 0 else {"error": res.stderr[-1500:]}
        )
        click.echo(f"{name}: {runs[name]}", err=True)
        save()

    if want("transformers_full"):
        record("transformers_full", run_capped([*base, "--mode", "full"], None, None))
    if "tpi_world1_window2" not in runs:
        return
    # The same memory as our single-node streaming run with window 2.
    limit = f"{runs['tpi_world1_window2']['summary']['nodes']['0']['peak_rss_gb']:.2f}GB"
    offload = [*base, "--mode", "offload", "--max-memory", limit]
    if want("transformers_accelerate_offload"):
        # Unconstrained machine: its reads are served by the page cache, outside its RSS.
        record("transformers_accelerate_offload", run_capped(offload, None, None))
    if want("transformers_accelerate_offload_capped"):
        record(
            "transformers_accelerate_offload_capped", run_capped(offload, None, int(cap_gb * 1e9))
        )


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
    capped = runs.get("tpi_world1_window2_capped", {}).get("summary", {})
    off_capped = runs.get("transformers_accelerate_offload_capped", {})
    if capped and "decode_ms_per_token" in off_capped:
        out["capped_accelerate_offload_ms_over_tpi"] = round(
            off_capped["decode_ms_per_token"] / capped["ms_per_token"], 2
        )
    return out


@click.command()
@work_option("bench", "Where the synthetic model and splits live.")
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
@click.option(
    "--cap-gb",
    default=2.0,
    show_default=True,
    help="Memory cgroup cap (RSS + page cache) for the equal-memory runs.",
)
@click.option("--out", default=None)
def main(work, prompt_tokens, new_tokens, tmpfs, skip_hf, only, cap_gb, out):
    from tpi.storage.manifest import HEAD_FILE, layer_file
    from tpi.storage.split import ensure_split

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
        if world == 1 and want("tpi_world1_window2_capped"):
            name = "tpi_world1_window2_capped"
            click.echo(f"running {name} (cgroup cap {cap_gb} GB incl. page cache) ...", err=True)
            report = run_tpi(model, 1, 2, prompt_tokens, new_tokens, env, int(cap_gb * 1e9))
            results["runs"][name] = {
                "summary": summarize(report, slice_bytes, 2, head_bytes),
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
        _hf_runs(model, results, prompt_tokens, new_tokens, want, save, cap_gb)
    save()
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
