"""What a CPU without tpi's native kernels pays: SmolLM2-135M decode (and a prompt)
with the kernels and with torch's alone, fp32, int8 and int4, on this x86 machine.

The nearest stand-in here for a CPU the kernels do not serve (an ARM board without a
C compiler, or one where they fail to build): the same model, weights and process,
only the kernels turned off (tpi.kernels.native.set_enabled, what TPI_KERNELS=0
does from the start). Kernels on and off alternate round after round; medians.

    flock /tmp/tpi-bench.lock python benchmarks/kernels_off.py [--rounds 5]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median, write_result  # noqa: E402
from tpi.kernels import native  # noqa: E402
from tpi.master.loader import open_model  # noqa: E402
from tpi.sources.default_model import ensure_default_model  # noqa: E402

PROMPT = list(range(100, 228))  # 128 tokens


def _run(engine, new: int) -> tuple[float, float]:
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.prefill(PROMPT)
    t1 = time.perf_counter()
    for i in range(new):
        logits = engine.forward([int(logits.argmax())], len(PROMPT) + i)
    return t1 - t0, (time.perf_counter() - t1) / new


@click.command()
@click.option("--rounds", default=5, show_default=True)
@click.option("--new-tokens", default=32, show_default=True)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    help="torch threads (1: a shared machine's other jobs cost OpenMP's barriers most)",
)
def main(rounds: int, new_tokens: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model = ensure_default_model(click.echo)
    results = {}
    for quant in ("none", "int8", "int4"):
        lm = open_model(str(model), "fp32", quiet=True, quant=quant)
        times: dict[str, list[tuple[float, float]]] = {"native": [], "torch": []}
        try:
            for on in (True, False):  # warm-up: first calls build and fault in
                native.set_enabled(on)
                _run(lm.engine, 4)
            for _ in range(rounds):
                for on in (True, False):
                    native.set_enabled(on)
                    times["native" if on else "torch"].append(_run(lm.engine, new_tokens))
        finally:
            native.set_enabled(True)
            lm.close()
        row = {}
        for kind, runs in times.items():
            row[kind] = {
                "decode_ms_per_token": round(1000 * median([d for _, d in runs]), 2),
                "prefill_128_ms": round(1000 * median([p for p, _ in runs]), 1),
            }
        row["torch_vs_native_decode"] = round(
            row["torch"]["decode_ms_per_token"] / row["native"]["decode_ms_per_token"], 2
        )
        row["torch_vs_native_prefill"] = round(
            row["torch"]["prefill_128_ms"] / row["native"]["prefill_128_ms"], 2
        )
        results["fp32" if quant == "none" else quant] = row
        click.echo(f"{quant}: {row}", err=True)
    write_result(
        "kernels_off",
        {
            "settings": {"rounds": rounds, "new_tokens": new_tokens, "prompt_tokens": 128},
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
