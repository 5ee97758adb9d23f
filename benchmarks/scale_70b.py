"""The paper's headline, measured: a Llama-2-70B-shaped model on small devices.

A synthetic int4 model (groups of 32) with Llama-2-70B's shapes (80 layers, hidden
8192, 64 query / 8 KV heads, MLP 28672, vocabulary 32000), ~43 GB, written
directly as a split for each world size (tpi.sources.synthetic through
tpi.storage.direct_split: the same files, manifests and hashes as `tpi split`;
a bf16 checkpoint would be 140 GB, more than this disk holds). Every rank runs
under a 2 GB memory cgroup that counts the page cache, as a real 2 GB device
would; the window comes from --memory-budget; the page cache is dropped before
each run. World 4 (master + 3 workers, `tpi cluster`), world 1 (one process
streaming the whole model) and world 8, in that order, each split removed after
its run (only one fits on this disk at a time).

Per run: every rank's peak RSS measured from outside (VmHWM, polled) and its
cgroup's peak (RSS + page cache), bytes read per token, ms/token next to the
disk-bound limit (bytes per token / measured disk bandwidth: all ranks share this
machine's one disk and two cores), TTFT, and the greedy tokens (identical across
world sizes: the splits hold the same weights).

Heavy steps (writing a split, each run) take the machine lock (--lock) one at a
time, so other benchmarks on a shared machine never run alongside.

    python benchmarks/scale_70b.py [--worlds 4,1,8] [--work DIR] [--keep] [--clean]
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import work_option, write_result  # noqa: E402
from benchmarks.synthetic_split import model_card, write_synthetic_split  # noqa: E402

TPI = str(Path(sys.executable).parent / "tpi")
CAP = "2GB"
SEED = 70
LLAMA2_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# The same pipeline in seconds (80 layers, small matrices): to try the script out.
MINI = {
    **LLAMA2_70B,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
SHAPES = {"70b": LLAMA2_70B, "mini": MINI}


# --- the machine -----------------------------------------------------------------------


@contextlib.contextmanager
def machine_lock(path: Path | None, what: str):
    """Hold the shared machine lock for one heavy step."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        click.echo(f"waiting for {path} ({what}) ...", err=True)
        fcntl.flock(f, fcntl.LOCK_EX)
        click.echo(f"locked: {what}", err=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def disk_bandwidth(split: Path, world: int, gigabytes: float = 4.0) -> dict:
    """Cold reads of the split's layer files as the loader reads them (32 MB pieces into
    a reused buffer, pages dropped behind): one stream, and one per rank at once."""
    import torch

    from tpi.storage.tensor_file import read_span

    def stream(files: list[Path], budget: int, out: list) -> None:
        buf = torch.empty(max(f.stat().st_size for f in files), dtype=torch.uint8)
        done = 0
        for f in files:
            n = min(f.stat().st_size, budget - done)
            if n <= 0:
                break
            read_span(f, 0, buf[:n], drop_cache=True)
            done += n
        out.append(done)

    def measure(groups: list[list[Path]]) -> float:
        drop_page_cache()
        out: list[int] = []
        per = int(gigabytes * 1e9 / len(groups))
        threads = [threading.Thread(target=stream, args=(g, per, out)) for g in groups]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(out) / (time.perf_counter() - t0)

    ranks = [sorted((split / f"rank{r}").glob("layer_*.safetensors")) for r in range(world)]
    # Different layers per reader, as the ranks read different files at once.
    one = measure([ranks[0][40:]])
    result = {"one_stream_gb_s": round(one / 1e9, 3)}
    if world > 1:
        many = measure([ranks[r][10 * r :] for r in range(world)])
        result[f"{world}_streams_gb_s"] = round(many / 1e9, 3)
    result["best_gb_s"] = max(v for v in result.values())
    return result


class PeakSampler:
    """Every rank's peak resident memory, read from outside the processes (VmHWM) and
    its memory cgroup's peak (RSS + page cache), polled until stopped."""

    def __init__(self, root: subprocess.Popen, cgroup_dirs: dict[int, Path] | None = None):
        self.root = root
        self.fixed_cgroups = cgroup_dirs or {}
        self.hwm: dict[int, int] = {}
        self.cgroup_peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _ranks(self) -> dict[int, int]:
        """rank -> pid: the root is rank 0; local workers are found by their store."""
        import psutil

        out = {0: self.root.pid}
        try:
            kids = psutil.Process(self.root.pid).children(recursive=True)
        except psutil.Error:
            return out
        for p in kids:
            with contextlib.suppress(psutil.Error):
                m = re.search(r"worker(\d+)/store", " ".join(p.cmdline()))
                if m:
                    out[int(m.group(1))] = p.pid
        return out

    def _cgroups(self) -> dict[int, Path]:
        from tpi.system.cgroup_limits import own_paths, v1_dir

        found = dict(self.fixed_cgroups)
        base = v1_dir("memory")
        own = own_paths().get("memory")
        if base is None or own is None:
            return found
        d = base / own.lstrip("/")
        for sub in d.glob(f"tpi-{self.root.pid}-*"):
            tag = sub.name.rsplit("-", 1)[1]
            found[0 if tag == "master" else int(tag.lstrip("w"))] = sub
        return found

    def _sample(self) -> None:
        for rank, pid in self._ranks().items():
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        kb = int(line.split()[1])
                        self.hwm[rank] = max(self.hwm.get(rank, 0), kb * 1024)
        for rank, d in self._cgroups().items():
            with contextlib.suppress(OSError, ValueError):
                v = int((d / "memory.max_usage_in_bytes").read_text())
                self.cgroup_peak[rank] = max(self.cgroup_peak.get(rank, 0), v)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- the model -------------------------------------------------------------------------


def make_split(work: Path, shape: str, world: int) -> Path:
    from tpi.model.partition import plan_partition

    return write_synthetic_split(
        work / f"{shape}-int4-w{world}",
        SHAPES[shape],
        lambda cfg: plan_partition(cfg, [1.0] * world),
        card=model_card(work, shape, SHAPES[shape]),
        model_id=f"synthetic-llama2-{shape}-int4g32-seed{SEED}",
        seed=SEED,
        what=f"the {world}-rank split",
    )


# --- one run ---------------------------------------------------------------------------


def link_worker_stores(cluster_dir: Path, split: Path, world: int) -> None:
    """Each local worker finds its rank directory in its store (a link, as a copied rank
    directory would be): no push, no second copy of the shard on this one disk."""
    for r in range(1, world):
        store = cluster_dir / f"worker{r}" / "store"
        store.mkdir(parents=True, exist_ok=True)
        for old in store.iterdir():
            if old.is_symlink():
                old.unlink()
        (store / f"{split.name}-rank{r}").symlink_to(split / f"rank{r}")


def run_world(
    work: Path, split: Path, world: int, prompt: int, new: int, window: int | None = None
) -> dict:
    from tpi.emulation.cgroups import CgroupFactory
    from tpi.runtime.memory_budget import parse_size

    env = dict(os.environ, TPI_HOME=str(work / "home"))
    bench = ["bench", "--model", str(split), "--memory-budget", CAP, "--dtype", "fp32"]
    bench += ["--prompt-tokens", str(prompt), "--new-tokens", str(new)]
    if window:
        bench += ["--window", str(window)]
    cluster_dir = work / "cluster"
    if world == 1:
        cmd = [TPI, *bench]
    else:
        link_worker_stores(cluster_dir, split, world)
        cmd = [TPI, "cluster", "--workers", str(world - 1), "--mem-limit", CAP]
        cmd += ["--dir", str(cluster_dir), *bench]
    factory = CgroupFactory()
    if not factory.available:
        raise SystemExit(f"this benchmark caps every rank with a cgroup: {factory.reason}")
    drop_page_cache()
    own = None
    t0 = time.perf_counter()
    log = work / f"run-w{world}{f'-window{window}' if window else ''}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        if world == 1:  # one process: capped here, as `tpi cluster` caps each of its ranks
            own = factory.create(f"tpi-bench-{proc.pid}", parse_size(CAP), None, True)
            own.add(proc.pid)
        sampler = PeakSampler(proc, {0: own.dirs[0]} if own else None)
        try:
            out, _ = proc.communicate(timeout=3600)
        finally:
            sampler.stop()
            if own is not None:
                own.remove()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        return {"error": "\n".join(tail), "cmd": cmd}
    report = json.loads(out[out.index("{") :])
    report["wall_seconds"] = round(wall, 1)
    report["outside"] = {
        "peak_rss_bytes": {str(r): v for r, v in sorted(sampler.hwm.items())},
        "cgroup_peak_bytes": {str(r): v for r, v in sorted(sampler.cgroup_peak.items())},
    }
    report["log"] = [
        line
        for line in log.read_text(errors="replace").splitlines()
        if any(k in line for k in ("window", "emulation", "context", "expert slot"))
    ]
    return report


def summarize(report: dict, bandwidth: dict) -> dict:
    if "error" in report:
        return report
    outside = report["outside"]
    nodes = {}
    disk = 0
    for r, node in sorted(report["nodes"].items(), key=lambda kv: int(kv[0])):
        pt = node["decode"]["per_token"]
        disk += pt["disk_bytes"]
        nodes[r] = {
            "peak_rss_gb_outside": round(outside["peak_rss_bytes"].get(r, 0) / 1e9, 3),
            "cgroup_peak_gb": round(outside["cgroup_peak_bytes"].get(r, 0) / 1e9, 3),
            "peak_rss_gb_reported": round(node["peak_rss_bytes"] / 1e9, 3),
            "window": node["decode"].get("window"),
            "disk_gb_per_token": round(pt["disk_bytes"] / 1e9, 3),
            "read_ms_per_token": round(
                1000 * node["decode"].get("read_seconds", 0) / report["new_tokens"], 1
            ),
            "blocked_ms_per_token": pt["blocked_ms"],
            "compute_ms_per_token": pt["compute_ms"],
            "allreduce_ms_per_token": pt["allreduce_ms"],
        }
    floor_ms = 1000 * disk / (bandwidth["best_gb_s"] * 1e9)
    return {
        "world": report["world"],
        "ms_per_token": report["decode_ms_per_token"],
        "ttft_ms": report["ttft_ms"],
        "disk_gb_per_token": round(disk / 1e9, 3),
        "disk_bound_ms_per_token": round(floor_ms, 1),
        "ms_over_disk_bound": round(report["decode_ms_per_token"] / floor_ms, 3)
        if floor_ms
        else None,
        "max_peak_rss_gb": max(n["peak_rss_gb_outside"] for n in nodes.values()),
        "max_cgroup_peak_gb": max(n["cgroup_peak_gb"] for n in nodes.values()),
        "tokens": report.get("tokens"),
        "bandwidth": bandwidth,
        "nodes": nodes,
    }


def clean(work: Path) -> None:
    from tpi.storage.direct_split import remove_split

    for shape in SHAPES:
        for world in range(1, 17):
            remove_split(work / f"{shape}-int4-w{world}")
    shutil.rmtree(work, ignore_errors=True)
    click.echo(f"removed {work}", err=True)


@click.command()
@work_option("bench-70b", "Where the splits, the worker stores and the run logs live.")
@click.option("--worlds", default="4,1,8", show_default=True, help="World sizes, in run order.")
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="70b", show_default=True)
@click.option("--prompt-tokens", default=16, show_default=True)
@click.option("--new-tokens", default=4, show_default=True)
@click.option(
    "--lock",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/tmp/tpi-machine.lock"),
    show_default=True,
    help="flock held around each heavy step (shared machine).",
)
@click.option("--keep", is_flag=True, help="Keep each split after its run.")
@click.option("--rerun", is_flag=True, help="Run worlds already in the results again.")
@click.option(
    "--clean", "clean_only", is_flag=True, help="Remove everything this wrote, then exit."
)
@click.option("--out", default=None)
def main(work, worlds, shape, prompt_tokens, new_tokens, lock, keep, rerun, clean_only, out):
    from tpi.storage.direct_split import remove_split

    if clean_only:
        clean(work)
        return
    work.mkdir(parents=True, exist_ok=True)
    name = "scale_70b" if shape == "70b" else f"scale_70b_{shape}"
    path = Path(out) if out else Path(__file__).parent / "results" / f"{name}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(
        {
            "model": f"synthetic Llama-2-70B shapes ({shape}), int4 groups of 32, seed {SEED}",
            "cap": f"{CAP} per rank (cgroup v1 memory, page cache included)",
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "note": "all ranks share this machine's one disk and two cores",
        }
    )
    runs = results.setdefault("runs", {})

    def save() -> None:
        tokens = {k: v["summary"].get("tokens") for k, v in runs.items() if "summary" in v}
        ref = tokens.get("world1")
        results["tokens_identical_to_world1"] = {
            k: t == ref for k, t in tokens.items() if ref and t and k != "world1"
        }
        write_result(name, results, str(path))

    for world in (int(w) for w in worlds.split(",")):
        # The window the budget picks fills each rank's 2 GB; window 2 shows what a
        # rank needs at least, which is what falls with the world size.
        configs = [(f"world{world}", None)] + ([(f"world{world}_window2", 2)] if world > 1 else [])
        todo = [(k, w) for k, w in configs if rerun or k not in runs or "error" in runs[k]]
        if not todo:
            continue
        with machine_lock(lock, f"writing the {world}-rank split"):
            split = make_split(work, shape, world)
        for key, window in todo:
            with machine_lock(lock, f"{key} run"):
                bandwidth = disk_bandwidth(split, world)
                click.echo(f"disk: {bandwidth}", err=True)
                report = run_world(work, split, world, prompt_tokens, new_tokens, window)
            runs[key] = {"summary": summarize(report, bandwidth), "raw": report}
            click.echo(json.dumps(runs[key]["summary"])[:1500], err=True)
            save()
        if not keep:
            remove_split(split)
    save()
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
