"""Cluster speed on one machine: world sizes 1..4 against the single-process engine.

Every rank is a real process on loopback; on a machine with fewer cores than
ranks they share cores, so this measures overhead and correctness of the
distributed path, not the speed-up of real separate devices.

    python benchmarks/cluster.py [--model DIR] [--max-world 4]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median, write_result  # noqa: E402


def _measure(engine, prompt: list[int], new: int, repeats: int) -> dict:
    ttft, decode = [], []
    for _ in range(repeats):
        engine.reset()
        t0 = time.perf_counter()
        logits = engine.prefill(prompt)
        tok = int(logits.argmax())
        ttft.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        for i in range(new):
            tok = int(engine.forward([tok], len(prompt) + i).argmax())
        decode.append((time.perf_counter() - t1) / new)
    return {
        "ttft_ms": round(1000 * median(ttft), 2),
        "decode_ms_per_token": round(1000 * median(decode), 2),
    }


@click.command()
@click.option("--model", default=None, help="Model (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--max-world", default=4, show_default=True)
@click.option("--prompt-tokens", default=128, show_default=True)
@click.option("--new-tokens", default=32, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--wire-dtype", type=click.Choice(["fp32", "bf16"]), default="fp32")
@click.option("--quant", type=click.Choice(["none", "int8", "int4"]), default="none")
@click.option("--min-world", default=1, show_default=True)
@click.option(
    "--data-link",
    type=click.Choice(["on", "off", "both"]),
    default="on",
    show_default=True,
    help="Allreduces over the workers' data links, over ZeroMQ, or both in turn per world.",
)
@click.option("--out", default=None)
def main(
    model,
    max_world,
    prompt_tokens,
    new_tokens,
    repeats,
    wire_dtype,
    quant,
    min_world,
    data_link,
    out,
):
    from tpi.comm.auth import new_secret
    from tpi.master.engine import load_engine
    from tpi.master.loader import open_model
    from tpi.master.local_cluster import LocalCluster
    from tpi.sources.model_registry import resolve_model

    # The local workers and the master share a fresh secret (workers require one).
    os.environ.setdefault("TPI_SECRET", new_secret())
    model_dir = resolve_model(model, lambda m: click.echo(m, err=True))
    cores = os.cpu_count() or 1
    ref_engine = load_engine(model_dir)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, ref_engine.cfg.vocab_size, (prompt_tokens,), generator=g).tolist()
    _measure(ref_engine, prompt[:8], 2, 1)  # warm-up
    reference = _measure(ref_engine, prompt, new_tokens, repeats)
    click.echo(f"single process ({torch.get_num_threads()} threads): {reference}", err=True)
    del ref_engine
    rows = []
    links = {"on": [True], "off": [False], "both": [True, False]}[data_link]
    for world, direct in [(w, d) for w in range(min_world, max_world + 1) for d in links]:
        if world == 1 and not direct and len(links) > 1:
            continue  # no workers, no links: measured once
        threads = max(1, cores // world)
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            lc = LocalCluster(world - 1, Path(tmp), threads=threads)
            workers = lc.start() if world > 1 else []
            try:
                lm = open_model(
                    str(model_dir),
                    "fp32",
                    quiet=True,
                    workers=workers,
                    wire_dtype=wire_dtype,
                    quant=None if quant == "none" else quant,
                    data_link=direct,
                )
                try:
                    _measure(lm.engine, prompt[:8], 2, 1)
                    col = lm.cluster.topology.collective if lm.cluster else None
                    before = (
                        (col.stats.bytes_sent + col.stats.bytes_received, col.stats.count)
                        if col
                        else (0, 0)
                    )
                    r = _measure(lm.engine, prompt, new_tokens, repeats)
                    if col:
                        # Decode-only traffic: one token more than measured steps per repeat.
                        lm.engine.reset()
                        lm.engine.prefill(prompt)
                        b0, c0 = col.stats.bytes_sent + col.stats.bytes_received, col.stats.count
                        for i in range(8):
                            lm.engine.forward([5], prompt_tokens + i)
                        r["wire_bytes_per_token"] = (
                            col.stats.bytes_sent + col.stats.bytes_received - b0
                        ) // 8
                        r["allreduces_per_token"] = (col.stats.count - c0) // 8
                        del before
                    else:
                        r["wire_bytes_per_token"] = 0
                        r["allreduces_per_token"] = 0
                finally:
                    lm.close()
            finally:
                lc.stop()
        r.update(
            world=world,
            data_link=direct and world > 1,
            threads_per_process=threads,
            decode_vs_single_process=round(
                r["decode_ms_per_token"] / reference["decode_ms_per_token"], 3
            ),
            ttft_vs_single_process=round(r["ttft_ms"] / reference["ttft_ms"], 3),
        )
        click.echo(r, err=True)
        rows.append(r)
    path = write_result(
        f"cluster_{wire_dtype}" + ("" if quant == "none" else f"_{quant}"),
        {
            "model": str(model_dir),
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "wire_dtype": wire_dtype,
            "quant": quant,
            "reference_single_process (fp32)": reference,
            "worlds": rows,
            "note": "all ranks on one machine; fewer cores than ranks means shared cores",
        },
        out,
    )
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
