"""Quantized splits on the Llama-2-7B-shaped synthetic model, in one run.

For fp32 (compute; the bf16 weights widened on load), bf16, int8 and int4
(groups of 32), at world 1 and 3 (all ranks on this machine), resident and
with window 2: decode ms/token and, per node, peak RSS and bytes per token
read from RAM, from disk and sent on the wire. Every configuration runs in
fresh processes, the page cache dropped first, so disk reads are real.

Targets (issue "Beyond the paper"): int8 decode >= 1.6x faster than bf16 when
resident; disk-streamed ms/token within 1.2x of (bytes read per token /
measured disk bandwidth).

Also the TTFT of a 512-token prompt over emulated 5 ms links (world 3),
overlapped prefill (automatic chunks) vs not (--prefill-chunks 1).

    python benchmarks/quant_7b.py [--work DIR] [--new-tokens 4] [--only NAME,...]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import work_option, write_result  # noqa: E402
from benchmarks.make_synthetic import make_synthetic  # noqa: E402

TPI = str(Path(sys.executable).parent / "tpi")
MODES = ("fp32", "bf16", "int8", "int4")
RAM_LIMIT = 20e9  # resident runs that would need more than this are skipped (24 GiB machine)


def drop_page_cache() -> None:
    os.sync()
    # Not root: the loader's fadvise(DONTNEED) still drops what it reads.
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3")


def disk_bandwidth(model: Path) -> float:
    """Bytes/s reading 2 GB of the model's files cold in 200 MB pieces, as the loader
    reads a layer (plain reads into a reused buffer, pages dropped behind)."""
    import torch

    from tpi.storage.tensor_file import read_span

    path = sorted(model.glob("*.safetensors"))[0]
    piece = 200 * 1024**2
    drop_page_cache()
    buf = torch.empty(piece, dtype=torch.uint8)
    t0 = time.perf_counter()
    for i in range(10):
        read_span(path, i * piece, buf, drop_cache=True)
    return 10 * piece / (time.perf_counter() - t0)


def bench_cmd(model: Path, world: int, mode: str, window: int | None, prompt: int, new: int):
    args = ["bench", "--model", str(model), "--prompt-tokens", str(prompt)]
    args += ["--new-tokens", str(new), "--dtype", "fp32"]
    if mode != "fp32":
        args += ["--quant", mode]
    if window:
        args += ["--window", str(window)]
    if world == 1:
        return [TPI, *args]
    return [TPI, "cluster", "--workers", str(world - 1), *args]


def run(cmd: list[str], env: dict, timeout: float = 7200) -> dict:
    drop_page_cache()
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        return {"error": res.stderr[-2000:], "cmd": cmd}
    report = json.loads(res.stdout[res.stdout.index("{") :])
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def summarize(report: dict, bandwidth: float) -> dict:
    if "error" in report:
        return report
    nodes = {}
    for r, node in report["nodes"].items():
        pt = node["decode"]["per_token"]
        nodes[r] = {
            "peak_rss_gb": round(node["peak_rss_bytes"] / 1e9, 3),
            "ram_gb_per_token": round((pt.get("ram_bytes") or 0) / 1e9, 3),
            "disk_gb_per_token": round(pt["disk_bytes"] / 1e9, 3),
            "wire_kb_per_token": round(pt["wire_bytes"] / 1e3, 1),
            "blocked_ms": pt["blocked_ms"],
            "compute_ms": pt["compute_ms"],
            "disk_time_hidden": node["decode"].get("disk_time_hidden"),
        }
    out = {"ms_per_token": report["decode_ms_per_token"], "ttft_ms": report["ttft_ms"]}
    disk = sum(n["disk_gb_per_token"] for n in nodes.values()) * 1e9
    if disk > 0:
        # All ranks read from this one disk: the floor is their bytes together, at
        # the cold-read bandwidth measured at the start of the benchmark...
        floor_ms = 1000 * disk / bandwidth
        out["disk_floor_ms"] = round(floor_ms, 1)
        out["ms_over_disk_floor"] = round(report["decode_ms_per_token"] / floor_ms, 2)
        # ...which this VM's disk does not hold steady (1.4-2.0 GB/s between runs), so
        # also against the time the loaders themselves spent reading in this run.
        new = report["new_tokens"]
        read_ms = max(
            1000 * n["decode"].get("read_seconds", 0) / new for n in report["nodes"].values()
        )
        out["read_ms_per_token"] = round(read_ms, 1)
        out["achieved_disk_gb_s"] = round(disk / 1e9 / (read_ms / 1000), 3)
        out["ms_over_read_time"] = round(report["decode_ms_per_token"] / read_ms, 2)
    out["nodes"] = nodes
    return out


def ttft_runs(model: Path, env: dict, work: Path, results: dict, want, save) -> None:
    """512-token prefill over 5 ms links at world 3, overlapped vs not (bf16 compute)."""
    for name, chunks in (("ttft512_5ms_plain", "1"), ("ttft512_5ms_overlapped", None)):
        if not want(name):
            continue
        cmd = [TPI, "cluster", "--workers", "2", "--link-latency", "5ms", "--dir", str(work / "c")]
        cmd += ["bench", "--model", str(model), "--quant", "int8", "--wire-dtype", "bf16"]
        cmd += ["--prompt-tokens", "512", "--new-tokens", "2", "--max-context", "600"]
        if chunks:
            cmd += ["--prefill-chunks", chunks]
        click.echo(f"running {name} ...", err=True)
        report = run(cmd, env)
        results["runs"][name] = {
            "ttft_ms": report.get("ttft_ms"),
            "error": report.get("error"),
            "raw": report,
        }
        save()


@click.command()
@work_option("bench", "Where the synthetic model and the splits live.")
@click.option("--prompt-tokens", default=16, show_default=True)
@click.option("--new-tokens", default=4, show_default=True)
@click.option("--only", default=None, help="Comma-separated run names to (re)run.")
@click.option("--keep-splits", is_flag=True, help="Keep each split after its runs (disk space).")
@click.option("--out", default=None)
def main(work, prompt_tokens, new_tokens, only, keep_splits, out):
    from tpi.quant.quantize import QuantSpec
    from tpi.storage.split import ensure_split

    model = make_synthetic(work / "llama2-7b-synthetic")
    env = dict(os.environ, TPI_HOME=str(work / "home"))
    os.environ["TPI_HOME"] = env["TPI_HOME"]
    path = Path(out) if out else Path(__file__).parent / "results" / "quant_7b.json"
    wanted = set(only.split(",")) if only else None
    results: dict = {"model": str(model), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    results["runs"] = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    results["disk_bandwidth_gb_s"] = round(disk_bandwidth(model) / 1e9, 3)

    def want(name: str) -> bool:
        return (wanted is None and name not in results["runs"]) or (
            wanted is not None and name in wanted
        )

    def save() -> None:
        for run in results["runs"].values():  # against this run's disk measurement
            if "raw" in run and "summary" in run:
                run["summary"] = summarize(run["raw"], results["disk_bandwidth_gb_s"] * 1e9)
        results["ratios"] = ratios(results["runs"])
        results["targets"] = {
            "int8_resident_speedup_over_bf16": ">= 1.6",
            "streamed_ms_over_disk_floor": "<= 1.2 (see also ms_over_read_time)",
        }
        write_result("quant_7b", results, str(path))

    for world in (1, 3):
        for mode in MODES:
            names = [f"{mode}_world{world}_{kind}" for kind in ("resident", "window2")]
            if not any(want(n) for n in names):
                continue
            quant = QuantSpec.for_split("none" if mode == "fp32" else mode)
            split = ensure_split(
                model, [1.0] * world, lambda m: click.echo(m, err=True), quant=quant
            )
            bandwidth = results["disk_bandwidth_gb_s"] * 1e9
            layer_bytes = sum(f.stat().st_size for f in split.glob("rank*/layer_*"))
            # In memory fp32 widens the stored bf16 weights.
            held = layer_bytes * (2 if mode == "fp32" else 1)
            for name, window in zip(names, (None, 2), strict=True):
                if not want(name):
                    continue
                if window is None and held > RAM_LIMIT:
                    results["runs"][name] = {
                        "skipped": f"needs ~{held / 1e9:.0f} GB resident; this machine has 24 GiB"
                    }
                    save()
                    continue
                click.echo(f"running {name} ...", err=True)
                report = run(bench_cmd(model, world, mode, window, prompt_tokens, new_tokens), env)
                results["runs"][name] = {"summary": summarize(report, bandwidth), "raw": report}
                click.echo(json.dumps(results["runs"][name]["summary"])[:400], err=True)
                save()
            if not keep_splits:
                shutil.rmtree(split, ignore_errors=True)
    ttft_runs(model, env, work, results, want, save)
    save()
    click.echo(f"wrote {path}")


def ratios(runs: dict) -> dict:
    def ms(name: str) -> float | None:
        return runs.get(name, {}).get("summary", {}).get("ms_per_token")

    out = {}
    for world in (1, 3):
        for kind in ("resident", "window2"):
            base = ms(f"bf16_world{world}_{kind}")
            for mode in ("fp32", "int8", "int4"):
                got = ms(f"{mode}_world{world}_{kind}")
                if base and got:
                    out[f"bf16_over_{mode}_world{world}_{kind}"] = round(base / got, 2)
    plain = runs.get("ttft512_5ms_plain", {}).get("ttft_ms")
    lapped = runs.get("ttft512_5ms_overlapped", {}).get("ttft_ms")
    if plain and lapped:
        out["ttft512_plain_over_overlapped"] = round(plain / lapped, 3)
    return out


if __name__ == "__main__":
    main()
