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

    python benchmarks/recovery.py [--rounds 3] [--kill-at 24] [--lock FILE]
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


def _one(case: str, kill_at: int, new_tokens: int) -> dict:
    from tests.cluster_helpers import addresses, local_workers
    from tpi.master.elastic import ElasticCluster
    from tpi.master.generation import generate_tokens
    from tpi.master.loader import open_model
    from tpi.master.sampling import SamplingParams
    from tpi.sources.default_model import ensure_default_model

    model = str(ensure_default_model(lambda _m: None))
    prompt = list(range(100, 164))
    with tempfile.TemporaryDirectory() as tmp, local_workers(2, Path(tmp)) as lc:
        workers = addresses(lc)
        split_s = None
        if case == "staged":  # leave worker 1's world-2 shard in its store, and the split cached
            t0 = time.perf_counter()
            open_model(model, "fp32", quiet=True, workers=workers[:1]).close()
            split_s = time.perf_counter() - t0

        def opener(ws):
            return open_model(model, "fp32", quiet=True, workers=ws)

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


@click.command()
@click.option("--rounds", default=3, show_default=True)
@click.option("--kill-at", default=24, show_default=True, help="Token after which to kill.")
@click.option("--new-tokens", default=64, show_default=True)
@click.option("--out", default=None)
def main(rounds, kill_at, new_tokens, out):
    from tpi.comm.auth import new_secret

    os.environ.setdefault("TPI_SECRET", new_secret())  # the local workers inherit it
    samples: dict[str, list[dict]] = {"push": [], "staged": []}
    for r in range(rounds):
        # "staged" first: its preparation makes the smaller world's split once.
        for case in ("staged", "push") if r % 2 == 0 else ("push", "staged"):
            got = _one(case, kill_at, new_tokens)
            samples[case].append(got)
            print(f"round {r + 1} {case}: {got}", flush=True)
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
