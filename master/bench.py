"""`tpi bench`: one measured generation, reported per node as JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from tpi.cli_options import apply
from tpi.master import cli_options as master_opt
from tpi.master.batching import Batcher, BatchSequence
from tpi.master.cli_options import ENGINE_OPTIONS, open_from_options
from tpi.master.generation import generate_tokens
from tpi.master.sampling import SamplingParams
from tpi.quant.formats import weight_nbytes
from tpi.runtime.node_stats import node_stats

_CUMULATIVE = (
    "steps",
    "forward_seconds",
    "bytes_read",
    "read_seconds",
    "blocked_seconds",
    "layers_loaded",
    "expert_bytes_read",
    "experts_loaded",
    "expert_hits",
    "allreduces",
    "allreduce_seconds",
    "bytes_sent",
    "bytes_received",
    "compute_seconds",
)


def _delta(after: dict, before: dict) -> dict:
    out = dict(after)
    for k in _CUMULATIVE:
        if k in after and k in before:
            out[k] = (
                round(after[k] - before[k], 6)
                if isinstance(after[k], float)
                else after[k] - before[k]
            )
    if out.get("read_seconds"):
        out["disk_time_hidden"] = round(
            max(0.0, 1 - out.get("blocked_seconds", 0) / out["read_seconds"]), 4
        )
    return out


def _master_stats(loaded) -> dict:
    runtime = loaded.runtime
    col = loaded.cluster.topology.collective if loaded.cluster else None
    engine = loaded.engine
    return node_stats(
        runtime.layers if runtime else None,
        col.stats if col else None,
        engine.forward_seconds,
        engine.steps,
        decoder=engine.decoder,
        head_bytes=weight_nbytes(engine.vocab.head.lm_head),
    )


def _all_stats(loaded) -> dict[int, dict]:
    stats = {0: _master_stats(loaded)}
    if loaded.cluster:
        stats.update(loaded.cluster.stats())
    return stats


def _ram_bytes_per_token(stats: dict, loaded, rank: int, context: float) -> int | None:
    """Weights, LM head and KV cache one decode token reads from RAM on this node."""
    weights = stats.get("weight_bytes_per_pass")
    if weights is None and rank == 0:  # a plain in-memory load: no scheduler
        weights = loaded.engine.decoder.layers.nbytes()
    if weights is None:
        return None
    kv = stats.get("kv_bytes_per_position", 0) * context
    return int(weights + stats.get("head_bytes", 0) + kv)


def node_profiles(loaded) -> dict[str, dict]:
    """Every node's device profile (cached measurements, live memory), by rank."""
    from tpi.master.probe import request_profile
    from tpi.paths import tpi_home
    from tpi.planning.device_probe import device_facts
    from tpi.planning.request import ProfileRequest

    out = {"0": {"device": device_facts(tpi_home() / "splits").to_dict()}}
    if loaded.cluster is not None:
        for r in range(1, loaded.cluster.world):
            out[str(r)] = request_profile(loaded.cluster, r, ProfileRequest())
    return out


def run_bench(loaded, prompt_tokens: int, new_tokens: int) -> dict:
    engine = loaded.engine
    vocab = engine.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(min(10, vocab - 1), vocab, (prompt_tokens,), generator=g).tolist()
    # warm-up (allocations, first reads): the prompt's start, no decode step
    list(generate_tokens(engine, prompt[:4], SamplingParams(max_new_tokens=1)))
    engine.reset()
    before = _all_stats(loaded)
    # The loop `tpi generate` runs; the first token comes with the prompt.
    greedy = SamplingParams(temperature=0.0, max_new_tokens=new_tokens + 1)
    t0 = time.perf_counter()
    answer = generate_tokens(engine, prompt, greedy)
    tokens = [next(answer)]
    ttft = time.perf_counter() - t0
    mid = _all_stats(loaded)
    t1 = time.perf_counter()
    tokens += answer
    decode = time.perf_counter() - t1
    after = _all_stats(loaded)
    nodes = {}
    mean_context = prompt_tokens + (new_tokens + 1) / 2
    for r in sorted(after):
        d = _delta(after[r], mid[r])
        wire = d.get("bytes_sent", 0) + d.get("bytes_received", 0)
        ram = _ram_bytes_per_token(after[r], loaded, r, mean_context)
        nodes[str(r)] = {
            "decode": {
                **d,
                "per_token": {
                    "ms": round(1000 * decode / new_tokens, 3),
                    "ram_bytes": ram,
                    "disk_bytes": d.get("bytes_read", 0) // new_tokens,
                    "wire_bytes": wire // new_tokens,
                    "blocked_ms": round(1000 * d.get("blocked_seconds", 0) / new_tokens, 3),
                    "allreduce_ms": round(1000 * d.get("allreduce_seconds", 0) / new_tokens, 3),
                    "compute_ms": round(1000 * d.get("compute_seconds", 0) / new_tokens, 3),
                },
            },
            "prefill": _delta(mid[r], before[r]),
            "peak_rss_bytes": after[r]["peak_rss_bytes"],
        }
    return {
        "model": str(loaded.model_dir),
        "world": len(after),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "ttft_ms": round(1000 * ttft, 3),
        "decode_ms_per_token": round(1000 * decode / new_tokens, 3),
        "tokens_per_second": round(new_tokens / decode, 3),
        # Greedy: the same model must give the same tokens at any world size.
        "tokens": tokens,
        "load_seconds": round(loaded.load_seconds, 3),
        "nodes": nodes,
    }


def run_concurrent(
    loaded, prompt_tokens: int, new_tokens: int, concurrency: int, prefill_chunk: int
) -> dict:
    """`concurrency` requests at once through the continuous batcher (tpi serve's):
    aggregate tokens/s over the decode, when all of them run, and each request's own."""
    engine = loaded.engine
    vocab = engine.cfg.vocab_size
    prompts = [
        torch.randint(
            min(10, vocab - 1), vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(i)
        ).tolist()
        for i in range(concurrency)
    ]
    warm = Batcher(engine, max_batch=concurrency)
    warm.run_all([BatchSequence(p[:4], SamplingParams(max_new_tokens=2)) for p in prompts])
    engine.reset()
    before = _all_stats(loaded)
    params = SamplingParams(max_new_tokens=new_tokens + 1)  # the first comes with the prefill
    seqs = [BatchSequence(p, params) for p in prompts]
    batcher = Batcher(engine, max_batch=concurrency, prefill_chunk=prefill_chunk)
    for q in seqs:
        batcher.submit(q)
    t0 = time.perf_counter()
    decode_start = None
    while batcher.busy:
        batcher.step()
        if decode_start is None and all(q.tokens for q in seqs):
            decode_start = time.perf_counter()  # every request has its first token
    end = time.perf_counter()
    decode_steps = sum(q.stats.decode_steps for q in seqs)
    decode = end - (decode_start or end)
    after = _all_stats(loaded)
    per_request = [
        {
            "ttft_ms": round(1000 * q.stats.prefill_seconds, 3),
            "decode_ms_per_token": round(1000 * q.stats.decode_seconds / q.stats.decode_steps, 3),
            "tokens": q.tokens,
        }
        for q in seqs
    ]
    return {
        "model": str(loaded.model_dir),
        "world": len(after),
        "concurrency": concurrency,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "aggregate_tokens_per_second": round(decode_steps / decode, 3) if decode else None,
        "per_client_ms_per_token": round(1000 * decode / new_tokens, 3),
        "batch_steps": batcher.steps,
        "wall_seconds": round(end - t0, 3),
        "per_request": per_request,
        "load_seconds": round(loaded.load_seconds, 3),
        "nodes": {str(r): _delta(after[r], before[r]) for r in sorted(after)},
    }


@click.command()
@apply(ENGINE_OPTIONS)
@master_opt.prompt_tokens("Length of the (synthetic) prompt whose prefill is timed (TTFT).")
@click.option(
    "--new-tokens",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Decode steps timed after the prefill.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the JSON report to this file.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Requests generated at once, batched as 'tpi serve' batches them: reports "
    "aggregate tokens/s and each request's ms/token.",
)
@master_opt.prefill_chunk(
    0, "With --concurrency: prompt tokens per pass (0: every prompt whole, at once)."
)
@click.option(
    "--nano-batches",
    type=click.IntRange(min=1),
    default=None,
    help="With --concurrency on a cluster: cut each batch into this many nano-batches "
    "whose allreduces overlap (default: chosen from the measured round trip).",
)
def bench(prompt_tokens, new_tokens, out, concurrency, prefill_chunk, nano_batches, **opts):
    """Measure TTFT, ms/token and per-node memory, disk, compute and network; print JSON.

    Per node: peak RSS, bytes read from disk, time blocked waiting for disk, share of
    disk time hidden behind compute, time computing, time in allreduce, bytes on the
    wire; all for the decode phase (per token) and the prefill separately.
    """
    loaded = open_from_options(
        {**opts, "max_context": opts["max_context"] or prompt_tokens + new_tokens + 8}
    )
    if nano_batches is not None and loaded.engine.chunking is not None:
        loaded.engine.chunking.fixed_nano = nano_batches
    if concurrency > 1:
        report = run_concurrent(loaded, prompt_tokens, new_tokens, concurrency, prefill_chunk)
    else:
        report = run_bench(loaded, prompt_tokens, new_tokens)
    report["profiles"] = node_profiles(loaded)
    if loaded.plan is not None:
        from tpi.planning.report import plan_summary

        report["plan"] = plan_summary(loaded.plan)
    text = json.dumps(report, indent=2)
    click.echo(text)
    if out:
        out.write_text(text + "\n")
