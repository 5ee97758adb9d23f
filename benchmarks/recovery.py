"""How long losing a worker pauses an answer: the gap between the last token
before a worker is killed and the first token after, next to the time one token
takes, for the embedded SmolLM2 at world 3 (master + 2 local workers).

Two cases, each a fresh cluster:
  push    the survivor's store lacks its shard of the smaller world: the master
          pushes it during the recovery (the master's split cache already holds
          that split; making it is a one-time cost per model and world, reported
          apart as split_s by the first round)
  staged  the survivor's store already holds that shard (what a pre-staged
          worker has): the recovery only reconnects, loads and replays

With --big GGUF (a Llama-2-7B-shaped Q4_1 file, e.g. the one
benchmarks/vs_llamacpp.py makes), also that model in int4 (its 4-bit weights
kept, groups of 32), every rank streaming its layers through a window of 2, the
same kill at world 3 ("7b-int4-w2": the survivor gets its shard pushed).

    python benchmarks/recovery.py [--rounds 3] [--kill-at 24] [--big GGUF --work DIR]
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402


def _one(
    case: str,
    kill_at: int,
    new_tokens: int,
    model: str | None = None,
    prompt_tokens: int = 64,
    work: Path | None = None,
    **open_kw,
) -> dict:
    from tests.cluster_helpers import addresses, local_workers
    from tpi.master.elastic import ElasticCluster
    from tpi.master.generation import generate_tokens
    from tpi.master.loader import open_model
    from tpi.master.sampling import SamplingParams
    from tpi.sources.default_model import ensure_default_model

    model = model or str(ensure_default_model(lambda _m: None))
    prompt = list(range(100, 100 + prompt_tokens))
    with tempfile.TemporaryDirectory(dir=work) as tmp, local_workers(2, Path(tmp)) as lc:
        workers = addresses(lc)
        split_s = None
        if case == "staged":  # leave worker 1's world-2 shard in its store, and the split cached
            t0 = time.perf_counter()
            open_model(model, "fp32", quiet=True, workers=workers[:1], **open_kw).close()
            split_s = time.perf_counter() - t0

        def opener(ws):
            return open_model(model, "fp32", quiet=True, workers=ws, **open_kw)

        elastic = ElasticCluster(opener, opener(workers), workers)
        stamps = []
        try:
            tokens = generate_tokens(
                elastic.loaded.engine,
                prompt,
                SamplingParams(max_new_tokens=new_tokens),
                recover=lambda e: elastic.recover(e).engine,
            )
            for i, _t in enumerate(tokens):
                stamps.append(time.perf_counter())
                if i == kill_at:
                    lc.signal_worker(2, signal.SIGKILL)
        finally:
            elastic.loaded.close()
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    pause = gaps[kill_at]  # last token before the kill -> first token after
    before = gaps[: kill_at - 1]
    after = gaps[kill_at + 2 :]
    rec = elastic.recoveries[0]
    return {
        "pause_s": round(pause, 3),
        "replan_s": round(rec.seconds, 3),
        "token_ms_world3": round(1000 * statistics.median(before), 2),
        "token_ms_world2": round(1000 * statistics.median(after), 2),
        "world_after": rec.world,
        "staging_s": round(split_s, 3) if split_s is not None else None,
    }


def _big(gguf: Path, work: Path, case: str, kill_at: int, new_tokens: int) -> dict:
    """The 7B-shaped int4 model, window 2 on every rank, world 3 -> 2."""
    from tpi.master.loader import MemoryOptions
    from tpi.progress import ProgressReporter
    from tpi.sources.gguf_convert import convert_gguf

    hf = work / "llama2-7b-q4_1-kept"
    if not (hf / "config.json").is_file():
        with ProgressReporter("converting (4-bit weights kept)") as progress:
            convert_gguf(gguf, hf, overwrite=True, progress=progress, keep_quant=True)
    return _one(
        case,
        kill_at,
        new_tokens,
        model=str(hf),
        prompt_tokens=16,
        work=work,
        quant="int4",
        memory=MemoryOptions(window=2),
        timeout_s=600.0,
    )


@click.command()
@click.option("--rounds", default=3, show_default=True)
@click.option("--kill-at", default=24, show_default=True, help="Token after which to kill.")
@click.option("--new-tokens", default=64, show_default=True)
@click.option(
    "--big",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A Llama-2-7B-shaped Q4_1 GGUF: also recover it in int4 with window 2 (one round).",
)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--only-big", is_flag=True)
@click.option("--out", default=None)
def main(rounds, kill_at, new_tokens, big, work, only_big, out):
    from tpi.comm.auth import new_secret

    os.environ.setdefault("TPI_SECRET", new_secret())  # the local workers inherit it
    samples: dict[str, list[dict]] = {"push": [], "staged": []}
    for r in range(0 if only_big else rounds):
        # "staged" first: its preparation makes the smaller world's split once.
        for case in ("staged", "push") if r % 2 == 0 else ("push", "staged"):
            got = _one(case, kill_at, new_tokens)
            samples[case].append(got)
            print(f"round {r + 1} {case}: {got}", flush=True)
    if big is not None:
        work = work or Path(tempfile.mkdtemp(prefix="tpi-recovery-"))
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TPI_HOME", str(work / "home"))  # its splits, removed with it
        # "staged" first: its preparation makes the world-2 split (once); "push" then
        # finds it cached and only pushes the survivor's shard during the recovery.
        for case in ("staged", "push"):
            got = _big(big, work, case, kill_at=4, new_tokens=12)
            samples[f"7b-int4-w2-{case}"] = [got]
            print(f"7b-int4-w2-{case}: {got}", flush=True)
    samples = {k: v for k, v in samples.items() if v}
    results = {
        case: {
            k: statistics.median(s[k] for s in runs)
            for k in runs[0]
            if all(s[k] is not None for s in runs)
        }
        for case, runs in samples.items()
    }
    print(results)
    write_result(
        "recovery",
        {
            "model": "SmolLM2-135M-Instruct fp32",
            "settings": {"kill_at": kill_at, "new_tokens": new_tokens, "rounds": rounds},
            "results": results,
            "samples": samples,
        },
        out,
    )


if __name__ == "__main__":
    main()
