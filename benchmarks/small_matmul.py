"""tpi's native small-matmul kernels against torch's, side by side in one process.

The products of a decode step: M = 1, 2, 4, 8 activation rows (one per sequence
of a batch) against weights far larger than the caches, so every call reads its
weight from DRAM, as in a real model:
  smollm2-fp32    SmolLM2-135M's 30 layers (fused qkv, o, gate/up, down), float32,
                  held as tpi holds them resident (FloatT row blocks) for torch
  smollm2-head    its 49152 x 576 LM head, float32 (FloatT column blocks)
  smollm2-int8    the 30 layers in per-row int8
  7b-int8         two Llama-2-7B-shaped layers in per-row int8
torch's side is what tpi ran before the kernels: FloatT's batched matmul for
float32, and for int8 torch's kernel with the rounding of x to bfloat16 and of the
result back. Kernels and torch alternate within every round; each figure is the
median of the rounds (ms per pass over all the case's matrices). The first-run
cost (compiling the kernels into an empty $TPI_HOME) is measured too.

    python benchmarks/small_matmul.py [--rounds 7] [--lock FILE]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import median, write_result  # noqa: E402
from benchmarks.scale_70b import machine_lock  # noqa: E402
from tpi.kernels import build as kbuild  # noqa: E402
from tpi.kernels import native as kernels  # noqa: E402
from tpi.kernels import small_matmul  # noqa: E402
from tpi.model.linear import linear  # noqa: E402
from tpi.quant.formats import FloatT, Int8Weight  # noqa: E402

ROWS = (1, 2, 4, 8)
SMOL = [(576 + 2 * 192, 576), (576, 576), (2 * 1536, 576), (576, 1536)]
LLAMA_7B = [(3 * 4096, 4096), (4096, 4096), (2 * 11008, 4096), (4096, 11008)]


def _int8(n: int, k: int, g: torch.Generator) -> Int8Weight:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return Int8Weight(q, (torch.rand(n, generator=g) / 100).to(torch.bfloat16))


def cases(g: torch.Generator) -> dict[str, list]:
    threads = torch.get_num_threads()
    return {
        "smollm2-fp32": [
            FloatT.of(torch.randn(n, k, generator=g), threads) for _ in range(30) for n, k in SMOL
        ],
        "smollm2-head": [FloatT.of(torch.randn(49152, 576, generator=g), threads)],
        "smollm2-int8": [_int8(n, k, g) for _ in range(30) for n, k in SMOL],
        "7b-int8": [_int8(n, k, g) for _ in range(2) for n, k in LLAMA_7B],
    }


def one_pass(weights: list, xs: dict[int, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for w in weights:
            linear(xs[w.shape[1]], w)

    return run


def timed(fn: Callable[[], None], repeats: int = 3) -> float:
    fn()  # warm: page faults of the output, the first OpenMP fork
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000


def first_build_seconds(source: Path | None = None) -> float:
    """Seconds to compile `source` (small_matmul.c by default) into an empty $TPI_HOME."""
    source = source or small_matmul.LIBRARY.source
    with tempfile.TemporaryDirectory() as home:
        old = os.environ.get("TPI_HOME")
        os.environ["TPI_HOME"] = home
        try:
            t0 = time.perf_counter()
            assert kbuild.build(source)
            return time.perf_counter() - t0
        finally:
            if old is None:
                os.environ.pop("TPI_HOME")
            else:
                os.environ["TPI_HOME"] = old


def interleaved(
    weights: dict[str, list], rows: tuple[int, ...], rounds: int, g: torch.Generator
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """ms per pass over each case's weights at each row count, the kernels on
    ("tpi") and off ("torch") alternating within every round, which goes first
    alternating between rounds: samples[case][rows][side]."""
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in range(rounds):
        for name, ws in weights.items():
            for m in rows:
                xs = {k: torch.randn(m, k, generator=g) for k in {w.shape[1] for w in ws}}
                for native in (True, False) if r % 2 == 0 else (False, True):
                    kernels.set_enabled(native)
                    ms = timed(one_pass(ws, xs))
                    side = "tpi" if native else "torch"
                    samples.setdefault(name, {}).setdefault(str(m), {}).setdefault(side, []).append(
                        ms
                    )
        print(f"round {r + 1}/{rounds} done", flush=True)
    kernels.set_enabled(True)
    return samples


def report(
    name: str,
    rounds: int,
    rows: tuple[int, ...],
    build_s: float,
    results: dict,
    samples: dict,
    out: str | None,
) -> None:
    """Write a kernel benchmark's JSON (benchmarks/results/<name>.json unless `out`)."""
    path = write_result(
        name,
        {
            "settings": {"rounds": rounds, "rows": rows, "threads": torch.get_num_threads()},
            "first_build_seconds": round(build_s, 2),
            "results": results,
            "samples_ms": samples,
        },
        out,
    )
    print(f"first build {build_s:.2f} s; wrote {path}")


@click.command()
@click.option("--rounds", default=7, show_default=True)
@click.option("--lock", default=None, help="Hold this file's flock during the timed runs.")
@click.option("--out", default=None)
def main(rounds: int, lock: str | None, out: str | None) -> None:
    if small_matmul.library() is None:
        raise click.ClickException("the kernels could not be built here (no C compiler?)")
    g = torch.Generator().manual_seed(0)
    weights = cases(g)
    with machine_lock(Path(lock) if lock else None, "small matmul"):
        build_s = first_build_seconds()
        samples = interleaved(weights, ROWS, rounds, g)
    results = {}
    for name, by_rows in samples.items():
        one = {side: median(v) for side, v in by_rows["1"].items()}
        results[name] = {}
        for m, sides in by_rows.items():
            med = {side: median(v) for side, v in sides.items()}
            results[name][m] = {
                "tpi_ms": round(med["tpi"], 3),
                "torch_ms": round(med["torch"], 3),
                "torch_over_tpi": round(med["torch"] / med["tpi"], 2),
                "tpi_vs_1_row": round(med["tpi"] / one["tpi"], 2),
                "torch_vs_1_row": round(med["torch"] / one["torch"], 2),
            }
            print(name, m, results[name][m])
    report("small_matmul", rounds, ROWS, build_s, results, samples, out)


if __name__ == "__main__":
    main()
