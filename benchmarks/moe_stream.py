"""Expert-aware streaming, measured: a Qwen3-MoE-30B-A3B-shaped synthetic int4 model
(hidden 2048, 32 query / 4 KV heads of 128, 128 experts of 768 columns, 8 per
token, vocabulary 151936, groups of 32) streamed with a window of 2 layers under
a 2 GB memory cgroup per rank, at world 1 and 3, next to a dense model of the same
total size: the same layers with one dense MLP of 128 x 768 columns (every token
reads all of it, as a model whose experts were all active).

The 48-layer model is 19.4 GB in int4 (the same for each world size and for the
dense model): `--layers` runs the first LAYERS layers of it (exact per-layer shapes,
the full vocabulary) where the disk holds less, and the report gives per-layer
figures. Splits are written straight from the synthetic source
(tpi.sources.synthetic, tpi.storage.direct_split), one at a time, each removed
after its run; each run is `tpi bench` (world 1) or `tpi cluster
--workers 2 ... bench` (world 3), under the machine lock.

    python benchmarks/moe_stream.py [--layers 48] [--work DIR] [--clean]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402
from benchmarks.scale_70b import drop_page_cache, machine_lock, run_world  # noqa: E402
from benchmarks.synthetic_split import model_card, write_synthetic_split  # noqa: E402

SEED = 30
QWEN3_MOE_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
DENSE_SAME_SIZE = {
    **{k: v for k, v in QWEN3_MOE_30B_A3B.items() if "expert" not in k and "moe" not in k},
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "intermediate_size": 128 * 768,
}
del DENSE_SAME_SIZE["norm_topk_prob"]
MODELS = {"moe": QWEN3_MOE_30B_A3B, "dense": DENSE_SAME_SIZE}


def make_split(work: Path, kind: str, layers: int, world: int) -> Path:
    from tpi.model.partition import plan_partition

    raw = {**MODELS[kind], "num_hidden_layers": layers}
    return write_synthetic_split(
        work / f"{kind}-L{layers}-w{world}",
        raw,
        lambda cfg: plan_partition(cfg, [1.0] * world),
        card=model_card(work, kind, raw),
        model_id=f"synthetic-qwen3-30b-a3b-{kind}-L{layers}-int4g32-seed{SEED}",
        seed=SEED,
        what=f"the {kind} {world}-rank split",
    )


def split_bytes(split: Path) -> dict:
    """Bytes on disk per rank: layer files, experts files, head."""
    out = {}
    for rank_dir in sorted(split.glob("rank*")):
        files = [f for f in rank_dir.iterdir() if f.suffix == ".safetensors"]
        out[rank_dir.name] = {
            "layer_files": sum(f.stat().st_size for f in files if f.name.startswith("layer_")),
            "experts_files": sum(f.stat().st_size for f in files if f.name.startswith("experts_")),
            "head": sum(f.stat().st_size for f in files if f.name.startswith("head")),
        }
    return out


def disk_read_gb_s(split: Path, gigabytes: float = 1.5) -> float:
    """One cold stream of this split's weight files, as the loader reads them."""
    import torch

    from tpi.storage.tensor_file import read_span

    files = sorted(split.glob("rank0/*_*.safetensors"))
    buf = torch.empty(max(f.stat().st_size for f in files), dtype=torch.uint8)
    drop_page_cache()
    done, t0 = 0, time.perf_counter()
    for f in files:
        n = min(f.stat().st_size, int(gigabytes * 1e9) - done)
        if n <= 0:
            break
        read_span(f, 0, buf[:n], drop_cache=True)
        done += n
    return round(done / (time.perf_counter() - t0) / 1e9, 3)


def summarize(report: dict, layers: int) -> dict:
    if "error" in report:
        return report
    nodes = {}
    for r, node in sorted(report["nodes"].items(), key=lambda kv: int(kv[0])):
        d, pt = node["decode"], node["decode"]["per_token"]
        new = report["new_tokens"]
        nodes[r] = {
            "disk_mb_per_token": round(pt["disk_bytes"] / 1e6, 2),
            "expert_mb_per_token": round(d.get("expert_bytes_read", 0) / new / 1e6, 2),
            "experts_read_per_token": round(d.get("experts_loaded", 0) / new, 2),
            "expert_hits_per_token": round(d.get("expert_hits", 0) / new, 2),
            "blocked_ms_per_token": pt["blocked_ms"],
            "compute_ms_per_token": pt["compute_ms"],
            "allreduce_ms_per_token": pt["allreduce_ms"],
            "peak_rss_gb_outside": round(report["outside"]["peak_rss_bytes"].get(r, 0) / 1e9, 3),
            "cgroup_peak_gb": round(report["outside"]["cgroup_peak_bytes"].get(r, 0) / 1e9, 3),
            "window": d.get("window"),
        }
    disk = sum(n["disk_mb_per_token"] for n in nodes.values())
    return {
        "world": report["world"],
        "ms_per_token": report["decode_ms_per_token"],
        "ttft_ms": report["ttft_ms"],
        "disk_mb_per_token_all_ranks": round(disk, 2),
        "disk_mb_per_token_per_layer": round(disk / layers, 2),
        "nodes": nodes,
    }


@click.command()
@click.option(
    "--layers", default=48, show_default=True, help="Layers of the 48 written (fewer: less disk)."
)
@click.option("--worlds", default="1,3", show_default=True)
@click.option("--kinds", default="moe,dense", show_default=True)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/root/.cache/tpi/bench-moe-stream"),
    show_default=True,
)
@click.option("--prompt-tokens", default=16, show_default=True)
@click.option("--new-tokens", default=8, show_default=True)
@click.option("--lock", type=click.Path(path_type=Path), default=Path("/tmp/tpi-machine.lock"))
@click.option("--clean", "clean_only", is_flag=True)
@click.option("--out", default=None)
def main(layers, worlds, kinds, work, prompt_tokens, new_tokens, lock, clean_only, out):
    from tpi.storage.direct_split import remove_split

    if clean_only:
        shutil.rmtree(work, ignore_errors=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    path = Path(out) if out else Path(__file__).parent / "results" / "moe_stream.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(
        {
            "model": "synthetic Qwen3-30B-A3B shapes, int4 groups of 32, seed 30",
            "layers": layers,
            "of_layers": 48,
            "cap": "2GB per rank (cgroup v1 memory, page cache included), window 2",
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "note": "all ranks share this machine's one disk and two cores",
        }
    )
    runs = results.setdefault("runs", {})
    for kind in kinds.split(","):
        for world in (int(w) for w in worlds.split(",")):
            key = f"{kind}_world{world}"
            with machine_lock(lock, f"writing {key}"):
                split = make_split(work, kind, layers, world)
            try:
                with machine_lock(lock, f"{key} run"):
                    gbs = disk_read_gb_s(split)
                    report = run_world(work, split, world, prompt_tokens, new_tokens, window=2)
                runs[key] = {
                    "summary": {**summarize(report, layers), "disk_gb_s": gbs},
                    "bytes_on_disk": split_bytes(split),
                    "raw": report,
                }
                click.echo(json.dumps(runs[key]["summary"])[:2000], err=True)
                write_result("moe_stream", results, str(path))
            finally:
                remove_split(split)
    write_result("moe_stream", results, str(path))
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("TPI_VERIFY_READS", "1")
    main()
