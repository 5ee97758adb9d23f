"""Experts across ranks: whole experts per rank (expert parallelism) or every
expert's columns cut across ranks (tensor parallelism)? Measured on one
Qwen3-30B-A3B-shaped MoE layer (hidden 2048, 128 experts of 768 columns, 8 per
token) in int4 (groups of 32), world 3 with even and 2,1,1 shares.

Per decode token and rank: the time of the rank's share of the experts (one
thread, as one small device computes it), and the expert bytes a streamed rank
reads when nothing is cached. A token's MLP waits for the slowest rank (the
allreduce), so the figure that counts is the max over ranks, averaged over
tokens. Routing is uniform at random (8 of 128 per token): a trained router is
less even, which only makes whole-expert placement less balanced.

    python benchmarks/moe_split.py [--tokens 300] [--out FILE]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402
from tpi.model.linear import linear  # noqa: E402
from tpi.model.partition import apportion  # noqa: E402
from tpi.quant.formats import Int4Weight  # noqa: E402

HIDDEN, COLS, EXPERTS, TOP_K, GROUP = 2048, 768, 128, 8, 32


def _int4(rows: int, k: int, g: torch.Generator) -> Int4Weight:
    """Random int4 weights in the kernel's layout (values do not change the cost)."""
    packed = torch.randint(0, 256, (rows, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    sz = (torch.rand(k // GROUP, rows, 2, generator=g) * 0.01).to(torch.bfloat16)
    return Int4Weight(packed, sz)


def _expert(cols: int, g: torch.Generator) -> tuple[Int4Weight, Int4Weight]:
    return _int4(2 * cols, HIDDEN, g), _int4(HIDDEN, cols, g)


def _run(x: torch.Tensor, w: tuple[Int4Weight, Int4Weight]) -> torch.Tensor:
    gate, up = linear(x, w[0]).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w[1])


def _nbytes(w: tuple[Int4Weight, Int4Weight]) -> int:
    return w[0].nbytes() + w[1].nbytes()


def measure(shares: list[float], tokens: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    world = len(shares)
    counts = apportion(EXPERTS, shares, "experts")
    owner = [r for r, c in enumerate(counts) for _ in range(c)]
    col_counts = [c * GROUP for c in apportion(COLS // GROUP, shares, "column blocks")]
    # Distinct weights per expert (so reads come from RAM, not a warm cache).
    whole = [_expert(COLS, g) for _ in range(EXPERTS)]
    sliced = [[_expert(c, g) for _ in range(EXPERTS)] for c in col_counts]
    x = torch.randn(1, HIDDEN, generator=g)
    picks = [torch.randperm(EXPERTS, generator=g)[:TOP_K].tolist() for _ in range(tokens)]
    for e in range(EXPERTS):  # warm-up: every weight touched once
        _run(x, whole[e])
        for r in range(world):
            _run(x, sliced[r][e])
    result = {}
    for how in ("experts", "columns"):
        per_rank = [[0.0] * tokens for _ in range(world)]
        disk = [[0] * tokens for _ in range(world)]
        for t, picked in enumerate(picks):
            for r in range(world):
                mine = (
                    [whole[e] for e in picked if owner[e] == r]
                    if how == "experts"
                    else [sliced[r][e] for e in picked]
                )
                t0 = time.perf_counter()
                for w in mine:
                    _run(x, w)
                per_rank[r][t] = time.perf_counter() - t0
                disk[r][t] = sum(_nbytes(w) for w in mine)
        slowest = [max(per_rank[r][t] for r in range(world)) for t in range(tokens)]
        result[how] = {
            "ms_per_token_slowest_rank": round(1000 * sum(slowest) / tokens, 4),
            "ms_per_token_each_rank": [round(1000 * sum(p) / tokens, 4) for p in per_rank],
            "disk_mb_per_token_slowest_rank": round(
                sum(max(disk[r][t] for r in range(world)) for t in range(tokens)) / tokens / 1e6,
                3,
            ),
            "disk_mb_per_token_each_rank": [round(sum(d) / tokens / 1e6, 3) for d in disk],
        }
    result["experts_per_rank"] = counts
    result["columns_per_rank"] = col_counts
    return result


@click.command()
@click.option("--tokens", default=300, show_default=True)
@click.option("--out", default=None)
def main(tokens: int, out: str | None) -> None:
    torch.set_num_threads(1)
    runs = {name: measure(s, tokens) for name, s in (("1,1,1", [1.0] * 3), ("2,1,1", [2.0, 1, 1]))}
    path = write_result(
        "moe_split",
        {
            "shape": {"hidden": HIDDEN, "cols": COLS, "experts": EXPERTS, "top_k": TOP_K},
            "tokens": tokens,
            "threads": 1,
            "runs": runs,
        },
        out,
    )
    import json

    print(json.dumps(runs, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
