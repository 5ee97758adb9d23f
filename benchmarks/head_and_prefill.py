"""Vocabulary-parallel head and overlapped prefill on a 3-node local cluster, in one run.

The embedded SmolLM2-135M (fp32), master + 2 workers on this machine, each link
through the user-space shaper with 5 ms one-way latency:

- TTFT of a 512-token prompt: overlapped prefill (automatic chunks) vs plain
  (--prefill-chunks 1), alternating, medians.
- Decode: the whole head on the master vs vocabulary-parallel, greedy and top-p
  sampling: ms/token, and bytes per token the master receives from one worker
  on top of the allreduce partials (the head's share of the wire).

    python benchmarks/head_and_prefill.py [--latency-ms 5] [--repeats 3]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median, write_result  # noqa: E402


def _ttft(lm, prompt: list[int]) -> float:
    lm.engine.reset()
    t0 = time.perf_counter()
    lm.engine.prefill(prompt)
    return time.perf_counter() - t0


def _decode(lm, prompt: list[int], params, steps: int) -> dict:
    from tpi.master.generation import generate_tokens

    engine = lm.engine
    engine.reset()
    link = lm.cluster.links.links[0]
    gen = generate_tokens(engine, prompt, params)
    next(gen)
    before = link.bytes_received
    t0 = time.perf_counter()
    for _ in range(steps):
        next(gen)
    elapsed = time.perf_counter() - t0
    gen.close()
    cfg = engine.cfg
    allreduces = 2 * cfg.num_layers + (1 if type(engine.vocab).__name__ == "SpreadVocab" else 0)
    partials = allreduces * (cfg.hidden_size * 4 + 33)
    return {
        "ms_per_token": round(1000 * elapsed / steps, 2),
        "head_bytes_per_token_from_a_worker": round(
            (link.bytes_received - before) / steps - partials, 1
        ),
    }


@click.command()
@click.option("--latency-ms", default=5.0, show_default=True)
@click.option("--prompt-tokens", default=512, show_default=True)
@click.option("--decode-steps", default=24, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--out", default=None)
def main(latency_ms, prompt_tokens, decode_steps, repeats, out):
    import os

    os.environ.setdefault("TPI_HOME", tempfile.mkdtemp(prefix="tpi-hp-"))
    from tpi.comm.auth import new_secret
    from tpi.emulation.link_shaper import LinkSpec
    from tpi.master.loader import open_model
    from tpi.master.local_cluster import LocalCluster
    from tpi.master.sampling import SamplingParams
    from tpi.sources.default_model import ensure_default_model

    os.environ.setdefault("TPI_SECRET", new_secret())
    model = ensure_default_model(lambda m: click.echo(m, err=True))
    base = Path(tempfile.mkdtemp(prefix="tpi-hp-cluster-"))
    lc = LocalCluster(2, base, threads=1, link=LinkSpec(latency_ms / 1000))
    addrs = lc.start()
    import torch

    torch.set_num_threads(1)
    prompt = list(range(100, 100 + prompt_tokens))
    results: dict = {"latency_ms": latency_ms, "prompt_tokens": prompt_tokens, "runs": {}}
    try:
        ttft: dict[str, list[float]] = {"plain": [], "overlapped": []}
        chunks = None
        # Workers serve one session at a time: alternate fresh sessions.
        for _ in range(repeats):
            for name, kw in (("plain", {"prefill_chunks": 1}), ("overlapped", {})):
                lm = open_model(str(model), "fp32", quiet=True, workers=addrs, **kw)
                try:
                    _ttft(lm, prompt[:32])  # warm-up
                    if name == "overlapped":
                        chunks = lm.engine.chunking.chunks(prompt_tokens)
                        results["measured_rtt_ms"] = round(1000 * lm.engine.chunking.rtt_s, 2)
                    ttft[name].append(_ttft(lm, prompt))
                finally:
                    lm.close()
        results["runs"]["ttft"] = {
            "plain_ms": round(1000 * median(ttft["plain"]), 1),
            "overlapped_ms": round(1000 * median(ttft["overlapped"]), 1),
            "chunks_chosen": chunks,
            "plain_over_overlapped": round(median(ttft["plain"]) / median(ttft["overlapped"]), 3),
        }
        click.echo(results["runs"]["ttft"], err=True)
        sampling = {
            "greedy": SamplingParams(temperature=0.0, max_new_tokens=decode_steps + 2),
            "top_p_0.9_t0.7": SamplingParams(
                temperature=0.7, top_p=0.9, seed=1, max_new_tokens=decode_steps + 2
            ),
        }
        for head, vp in (("whole_head", False), ("vocab_parallel", True)):
            lm = open_model(str(model), "fp32", quiet=True, workers=addrs, vocab_parallel=vp)
            try:
                for sname, params in sampling.items():
                    results["runs"][f"{head}_{sname}"] = _decode(
                        lm, prompt[:32], params, decode_steps
                    )
                    click.echo(f"{head} {sname}: {results['runs'][f'{head}_{sname}']}", err=True)
            finally:
                lm.close()
    finally:
        lc.stop()
    write_result("head_and_prefill", results, out)


if __name__ == "__main__":
    main()
