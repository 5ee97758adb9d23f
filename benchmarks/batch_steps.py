"""Batched decode, steady state, side by side in one process: per-client ms/token
(the time of one decode step) and aggregate tokens/s (batch size / step time)
at 1, 2, 4, 8 concurrent sequences, the batch sizes interleaved round after round
and each figure the median over rounds (min too: on a shared machine the least
disturbed round is the engine's own speed).

Every sequence runs through the continuous batcher (tpi.master.batching) as
`tpi serve` runs it; steps are timed once every sequence decodes.

Configurations (--config, repeatable):
  one-node        the embedded SmolLM2, fp32, this machine alone
  world3-5ms      SmolLM2 on master + 2 local workers behind 5 ms emulated links
                  (also with 2 nano-batches at 8 sequences: "world3-5ms-nano2")
  7b-int8         --big DIR/tpi-int8, resident, one node
  7b-int4-w2      --big DIR/tpi-int4, streamed through a window of 2 layers

With --kernels both, every case runs with tpi's native small-matmul kernels
(tpi.kernels) and with torch's alone, interleaved in the same process.

    python benchmarks/batch_steps.py --config one-node [--rounds 5] [--big DIR]
        [--kernels on|off|both]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402

LEVELS = (1, 2, 4, 8)


@contextlib.contextmanager
def _model(config: str, big: Path | None):
    from tpi.master.loader import MemoryOptions, open_model
    from tpi.sources.default_model import ensure_default_model

    if config.startswith("7b"):
        if big is None:
            raise click.UsageError(f"{config} needs --big DIR")
        name, window = ("tpi-int8", None) if config == "7b-int8" else ("tpi-int4", 2)
        lm = open_model(str(big / name), "fp32", quiet=True, memory=MemoryOptions(window))
        try:
            yield lm
        finally:
            lm.close()
        return
    model = str(ensure_default_model(lambda _m: None))
    if config == "one-node":
        lm = open_model(model, "fp32", quiet=True)
        try:
            yield lm
        finally:
            lm.close()
        return
    from tpi.comm.auth import new_secret
    from tpi.master.local_cluster import LocalCluster, link_from_flags

    os.environ.setdefault("TPI_SECRET", new_secret())  # the local workers inherit it
    with tempfile.TemporaryDirectory() as tmp:
        lc = LocalCluster(2, Path(tmp), threads=1, link=link_from_flags("5ms", None))
        lc.start()
        try:
            lm = open_model(model, "fp32", quiet=True, workers=[w.address for w in lc.workers])
            try:
                yield lm
            finally:
                lm.close()
        finally:
            lc.stop()


def _step_time(engine, batch: int, prompt: int, steps: int, nano: int | None) -> float:
    """Median seconds of a decode step with `batch` sequences all decoding."""
    from tpi.master.batching import Batcher, BatchSequence
    from tpi.master.sampling import SamplingParams

    if nano is not None and engine.chunking is not None:
        engine.chunking.fixed_nano = nano
    engine.reset()
    b = Batcher(engine, max_batch=batch, prefill_chunk=0)
    vocab = engine.cfg.vocab_size
    for i in range(batch):
        ids = [(17 * i + 31 * j) % (vocab - 10) + 10 for j in range(prompt)]
        b.submit(BatchSequence(ids, SamplingParams(max_new_tokens=steps + 4)))
    while any(s.prefilling for s in b.running) or b.waiting:
        b.step()
    b.step()  # every sequence decodes from here
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        b.step()
        times.append(time.perf_counter() - t0)
    for s in list(b.running):
        s.cancel.set()
    b.step()
    return statistics.median(times)


@click.command()
@click.option("--config", "configs", multiple=True, default=["one-node"], show_default=True)
@click.option("--rounds", default=5, show_default=True)
@click.option("--steps", default=8, show_default=True, help="Decode steps timed per batch size.")
@click.option("--prompt-tokens", default=32, show_default=True)
@click.option("--big", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option(
    "--kernels",
    type=click.Choice(["on", "off", "both"]),
    default="on",
    show_default=True,
    help="tpi's native small-matmul kernels, torch's alone, or both side by side.",
)
@click.option("--out", default=None)
def main(configs, rounds, steps, prompt_tokens, big, kernels, out):
    from tpi.kernels import native as kernels

    modes = {"on": (True,), "off": (False,), "both": (True, False)}[kernels]
    results: dict[str, dict] = {}
    for config in configs:
        cases = [(c, None, k) for c in LEVELS for k in modes]
        if config == "world3-5ms":
            cases += [(8, 1, k) for k in modes] + [(8, 2, k) for k in modes]
        samples: dict[str, list[float]] = {}
        with _model(config, big) as lm:
            for r in range(rounds):
                for batch, nano, native in cases if r % 2 == 0 else reversed(cases):
                    key = f"{batch}" if nano is None else f"{batch}-nano{nano}"
                    if len(modes) > 1:
                        key += "" if native else "-torch"
                    kernels.set_enabled(native)
                    t = _step_time(lm.engine, batch, prompt_tokens, steps, nano)
                    samples.setdefault(key, []).append(t)
                    print(f"{config} round {r + 1} {key}: {1000 * t:.1f} ms/step", flush=True)
        fig = {}
        for key, ts in samples.items():
            batch = int(key.split("-")[0])
            med, best = statistics.median(ts), min(ts)
            fig[key] = {
                "per_client_ms_per_token": round(1000 * med, 2),
                "aggregate_tokens_per_second": round(batch / med, 2),
                "per_client_ms_min": round(1000 * best, 2),
                "aggregate_tokens_per_second_best": round(batch / best, 2),
            }
        for key, f in fig.items():
            one = fig["1-torch" if key.endswith("-torch") else "1"]
            f["aggregate_vs_1"] = round(
                f["aggregate_tokens_per_second"] / one["aggregate_tokens_per_second"], 2
            )
            f["per_client_ms_vs_1"] = round(
                f["per_client_ms_per_token"] / one["per_client_ms_per_token"], 2
            )
        results[config] = {"figures": fig, "samples_s": samples}
        print(config, {k: (v["aggregate_vs_1"], v["per_client_ms_vs_1"]) for k, v in fig.items()})
    name = "batch_steps" + ("_" + "_".join(configs) if configs != ("one-node",) else "")
    write_result(
        name,
        {
            "settings": {
                "rounds": rounds,
                "steps": steps,
                "prompt_tokens": prompt_tokens,
                "kernels": kernels,
            },
            "results": results,
        },
        out,
    )


if __name__ == "__main__":
    main()
