"""tpi's float32 GEMM (tpi.kernels.f32_gemm) against torch's, side by side in one
process: the products of a prompt.

M = 16, 64, 128, 512 activation rows against float32 weights held as tpi holds
them resident (FloatT row blocks, one per thread):
  smollm2     SmolLM2-135M's 30 layers (fused qkv, o, gate/up, down)
  7b          one Llama-2-7B-shaped layer
torch's side is what tpi ran before the kernel: FloatT's batched matmul over the
blocks, and the copy of its outputs into place. Kernel and torch alternate within
every round; each figure is the median of the rounds, as ms per pass over all the
case's matrices and as GFLOP/s. The first-run cost (compiling the kernel into an
empty $TPI_HOME) is measured too.

    python benchmarks/f32_gemm.py [--rounds 7] [--lock FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median  # noqa: E402
from benchmarks.scale_70b import machine_lock  # noqa: E402
from benchmarks.small_matmul import (  # noqa: E402
    LLAMA_7B,
    SMOL,
    first_build_seconds,
    interleaved,
    report,
)  # noqa: E402
from tpi.kernels import f32_gemm  # noqa: E402
from tpi.quant.formats import FloatT  # noqa: E402

ROWS = (16, 64, 128, 512)


def cases(g: torch.Generator) -> dict[str, list[FloatT]]:
    threads = torch.get_num_threads()
    return {
        "smollm2": [
            FloatT.of(torch.randn(n, k, generator=g), threads) for _ in range(30) for n, k in SMOL
        ],
        "7b": [FloatT.of(torch.randn(n, k, generator=g), threads) for n, k in LLAMA_7B],
    }


@click.command()
@click.option("--rounds", default=7, show_default=True)
@click.option("--lock", default=None, help="Hold this file's flock during the timed runs.")
@click.option("--out", default=None)
def main(rounds: int, lock: str | None, out: str | None) -> None:
    if f32_gemm.LIBRARY.get() is None:
        raise click.ClickException("the kernel could not be built here (no C compiler?)")
    if torch.get_num_threads() < 2:
        raise click.ClickException("float32 weights are held by rows from 2 threads up")
    g = torch.Generator().manual_seed(0)
    weights = cases(g)
    with machine_lock(Path(lock) if lock else None, "f32 gemm"):
        build_s = first_build_seconds(f32_gemm.LIBRARY.source)
        samples = interleaved(weights, ROWS, rounds, g)
    results = {}
    for name, by_rows in samples.items():
        macs = sum(w.shape[0] * w.shape[1] for w in weights[name])
        results[name] = {}
        for m, sides in by_rows.items():
            med = {side: median(v) for side, v in sides.items()}
            gflops = {side: 2 * macs * int(m) / (t / 1000) / 1e9 for side, t in med.items()}
            results[name][m] = {
                "tpi_ms": round(med["tpi"], 3),
                "torch_ms": round(med["torch"], 3),
                "tpi_gflops": round(gflops["tpi"], 1),
                "torch_gflops": round(gflops["torch"], 1),
                "torch_over_tpi": round(med["torch"] / med["tpi"], 2),
            }
            print(name, m, results[name][m])
    report("f32_gemm", rounds, ROWS, build_s, results, samples, out)


if __name__ == "__main__":
    main()
