"""Pipeline plans: which ranks form each stage, and which layers each stage runs.

A plan is written as groups of ranks separated by "|", e.g. "master,w1 | w2,w3":
stage 0 is the master and worker 1 running their layers tensor-parallel, stage 1
workers 2 and 3 (Megatron's TP x PP; a group of one is a plain GPipe stage).
Workers are named w1, w2, ... (their place in --workers) or by address. Ranks are
numbered in the plan's order, so the master is rank 0 and stage 0 always holds it:
it owns the embedding, the head and sampling, and the user's text never leaves it.

Layers go to stages in contiguous ranges, even by default or as counted
(`--stage-layers 10,20`, for devices of different speed or memory). Within a
stage, heads and MLP columns are cut for the stage's group exactly as a
tensor-parallel split cuts them for a world (tpi.model.partition).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tpi.model.config import ModelConfig
from tpi.model.partition import (
    DEFAULT_MOE_SPLIT,
    Partition,
    PartitionError,
    Stage,
    apportion,
    plan_partition,
    vocab_ranges,
)

MASTER = "master"


@dataclass(frozen=True)
class Layout:
    """Stage groups over the master and an ordered worker list: `workers` in rank
    order (rank 1 first), `sizes` ranks per stage."""

    workers: tuple[str, ...]
    sizes: tuple[int, ...]

    def groups(self) -> list[tuple[int, ...]]:
        out, start = [], 0
        for n in self.sizes:
            out.append(tuple(range(start, start + n)))
            start += n
        return out

    def describe(self) -> str:
        names = [MASTER, *self.workers]
        return " | ".join(",".join(names[r] for r in g) for g in self.groups())


def is_layout(text: str | None) -> bool:
    """Whether a --plan value is a stage layout (rather than 'auto' or 'even'): it
    has stages ("|") or names the master."""
    if not text:
        return False
    return "|" in text or MASTER in {n.strip() for n in text.split(",")}


def parse_layout(text: str, workers: list[str]) -> Layout:
    """'master,w1 | w2,w3' over --workers -> the workers in rank order and group sizes."""
    groups = [[n.strip() for n in g.split(",") if n.strip()] for g in text.split("|")]
    if any(not g for g in groups):
        raise PartitionError(f"--plan {text!r} has an empty stage")
    by_name = {f"w{i}": w for i, w in enumerate(workers, start=1)}
    by_name.update({w: w for w in workers})
    seen: set[str] = set()
    ordered: list[str] = []
    for s, group in enumerate(groups):
        if MASTER in group:
            if s != 0:
                raise PartitionError(
                    "the master must be in the first stage (it embeds the tokens and samples)"
                )
            group.remove(MASTER)
            group.insert(0, MASTER)
        for name in group:
            if name == MASTER:
                continue
            if name not in by_name:
                raise PartitionError(
                    f"--plan names {name!r}, which is not w1..w{len(workers)} or an address "
                    "given with --workers"
                )
            w = by_name[name]
            if w in seen:
                raise PartitionError(f"--plan names worker {w} twice")
            seen.add(w)
            ordered.append(w)
    if MASTER not in groups[0]:
        raise PartitionError("--plan must put 'master' in the first stage")
    unused = [w for w in workers if w not in seen]
    if unused:
        raise PartitionError(
            f"--plan leaves out worker(s) {', '.join(unused)}: add them or drop them from --workers"
        )
    return Layout(tuple(ordered), tuple(len(g) for g in groups))


def pp_layout(stages: int, workers: list[str]) -> Layout:
    """--pp N: the master and workers in order, cut into N groups as even as can be."""
    world = len(workers) + 1
    if not 1 <= stages <= world:
        raise PartitionError(f"--pp {stages} needs between 1 and {world} stages for {world} ranks")
    return Layout(tuple(workers), tuple(apportion(world, [1.0] * stages, "ranks")))


def stage_layers(
    num_layers: int, stages: int, counts: list[int] | None = None
) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per stage: as counted, or as even as can be."""
    if counts is None:
        counts = apportion(num_layers, [1.0] * stages, "layers")
    if len(counts) != stages:
        raise PartitionError(f"--stage-layers lists {len(counts)} counts for {stages} stages")
    if any(c < 1 for c in counts) or sum(counts) != num_layers:
        raise PartitionError(
            f"--stage-layers must give every stage at least one layer and add up to the "
            f"model's {num_layers} layers (got {','.join(map(str, counts))})"
        )
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def parse_counts(text: str | None, what: str = "--stage-layers") -> list[int] | None:
    """'10,20' -> [10, 20]; None -> None (even)."""
    if not text:
        return None
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PartitionError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise PartitionError(f"{what} must be positive integers, got {text!r}")
    return counts


def plan_pipeline(
    cfg: ModelConfig,
    sizes: list[int] | tuple[int, ...],
    layer_counts: list[int] | None = None,
    shares: list[float] | None = None,
    moe_split: str = DEFAULT_MOE_SPLIT,
    vocab_parallel: bool = False,
) -> Partition:
    """Every rank's slice of a pipeline: stage s holds its layer range, cut for its
    group by `shares` (one per rank, in rank order; default even). With
    `vocab_parallel`, the embedding and LM head rows are dealt over the ranks of
    every stage (Vocabulary Parallelism): no stage carries the whole vocabulary."""
    world = sum(sizes)
    shares = shares or [1.0] * world
    if len(shares) != world:
        raise PartitionError(f"--shares lists {len(shares)} values but the plan has {world} ranks")
    ranges = stage_layers(cfg.num_layers, len(sizes), layer_counts)
    slices, stages, rank = [], [], 0
    for n, (first, end) in zip(sizes, ranges, strict=True):
        group = plan_partition(
            cfg.layers_view(first, end), shares[rank : rank + n], False, moe_split
        )
        for local in group.slices:
            slices.append(replace(local, rank=rank + local.rank, layers=(first, end)))
        stages.append(Stage((first, end), tuple(range(rank, rank + n))))
        rank += n
    if vocab_parallel:
        rows = vocab_ranges(cfg, shares)
        slices = [replace(rs, vocab=rows[rs.rank]) for rs in slices]
    return Partition(world, tuple(shares), tuple(slices), tuple(stages))
