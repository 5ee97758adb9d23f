"""How a model's layers are cut into tensor-parallel slices, one per rank.

Attention is split by query heads. While there are at least as many KV heads as
ranks, whole KV groups go to each rank (every rank keeps plain GQA). With more
ranks than KV heads, query heads are split individually and each rank holds the
KV heads its query heads read, so some KV heads are replicated: peers cap the
world size at the number of KV heads, we do not.

MLP intermediate columns are split by shares in aligned units, so later
group-wise quantization (groups of 32..128) never straddles two ranks.

Experts of a mixture of experts are split one of two ways (MOE_SPLITS): the same
aligned columns of every expert ("columns", tensor parallelism, the dense MLP's
cut applied to each expert: the default), or whole experts by shares ("experts",
expert parallelism). Either way a rank's experts are a RankSlice's `experts`
range with columns `expert_cols`, and the one allreduce of the MLP adds the
partial sums. Columns won the measurement (benchmarks/moe_split.py, Qwen3-30B-
A3B-shaped int4 layer, world 3, one thread per rank): a decode token waits for
the slowest rank, and whole experts put a token's 8 picks unevenly on ranks
(1.24 ms and 11.9 MB read by the slowest rank per token, against 1.04 ms and
7.9 MB with columns at even shares; 1.36 vs 1.35 ms, 13.0 vs 11.8 MB at 2,1,1),
although each column slice is a smaller, less efficient matmul (ranks compute
20% more in total). Whole experts need a world no larger than the number of
experts; beyond it columns are used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tpi.errors import TpiError
from tpi.model.config import ModelConfig


class PartitionError(TpiError):
    """Shares that cannot be mapped onto the model's heads/columns."""


@dataclass(frozen=True)
class RankSlice:
    rank: int
    q_heads: tuple[int, int]  # [start, end) global query heads
    kv_heads: tuple[int, int]  # [start, end) global KV heads read by those query heads
    mlp: tuple[int, int]  # [start, end) intermediate columns
    # [start, end) vocabulary rows of the embedding and LM head, when they are
    # split by vocabulary (None: the master holds them whole).
    vocab: tuple[int, int] | None = None
    # A mixture of experts: [start, end) experts held, and [start, end) columns of each.
    experts: tuple[int, int] | None = None
    expert_cols: tuple[int, int] | None = None
    # A pipeline stage's rank: [start, end) the layers it holds (None: every layer).
    # Its heads and columns are then its share within the stage's group.
    layers: tuple[int, int] | None = None

    @property
    def n_q(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    def holds(self, layer: int) -> bool:
        """Whether this rank holds (its slice of) `layer`."""
        return self.layers is None or self.layers[0] <= layer < self.layers[1]

    @property
    def n_kv(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_mlp(self) -> int:
        return self.mlp[1] - self.mlp[0]

    def kv_of_local_q(self, group_size: int) -> list[int]:
        """For each local query head, the index of its KV head among local KV heads."""
        return [q // group_size - self.kv_heads[0] for q in range(*self.q_heads)]

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("vocab", "experts", "expert_cols", "layers"):
            if d[k] is None:  # splits without them keep their manifests (and hashes)
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RankSlice:
        return cls(
            rank=int(d["rank"]),
            q_heads=tuple(d["q_heads"]),
            kv_heads=tuple(d["kv_heads"]),
            mlp=tuple(d["mlp"]),
            vocab=tuple(d["vocab"]) if d.get("vocab") is not None else None,
            experts=tuple(d["experts"]) if d.get("experts") is not None else None,
            expert_cols=tuple(d["expert_cols"]) if d.get("expert_cols") is not None else None,
            layers=tuple(d["layers"]) if d.get("layers") is not None else None,
        )


def apportion(total: int, shares: list[float], what: str) -> list[int]:
    """Split `total` units proportionally to `shares`, each rank getting >= 1.

    Largest-remainder method: deterministic, and every count is within one
    unit of its exact proportion unless it had to be raised to the minimum.
    """
    n = len(shares)
    if n == 0 or any(s <= 0 for s in shares):
        raise PartitionError("shares must be positive numbers, one per rank")
    if total < n:
        raise PartitionError(
            f"cannot split {total} {what} across {n} ranks (each needs at least one)"
        )
    s = float(sum(shares))
    exact = [total * x / s for x in shares]
    counts = [max(1, int(e)) for e in exact]
    while sum(counts) < total:  # give to the rank furthest below its share
        i = max(range(n), key=lambda k: (exact[k] - counts[k], -k))
        counts[i] += 1
    while sum(counts) > total:  # minimums overshot: take from the furthest above
        i = max((k for k in range(n) if counts[k] > 1), key=lambda k: (counts[k] - exact[k], -k))
        counts[i] -= 1
    return counts


def _ranges(counts: list[int], unit: int = 1) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start * unit, (start + c) * unit))
        start += c
    return out


def _unit(total: int, world: int) -> int:
    """The largest aligned block (128 down to 1) that still gives every rank one."""
    for unit in (128, 64, 32, 16, 8, 4, 2, 1):
        if total % unit == 0 and total // unit >= world:
            return unit
    return 1


def mlp_blocks(cfg: ModelConfig, world: int) -> int:
    """How many aligned MLP column blocks a split for `world` ranks deals out."""
    return cfg.intermediate_size // _unit(cfg.intermediate_size, world)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: layers [start, end) run tensor-parallel by `ranks`
    (rank 0, the master, is always in the first stage)."""

    layers: tuple[int, int]
    ranks: tuple[int, ...]

    @property
    def lead(self) -> int:
        """The rank that hands the stage's output on (the master in stage 0)."""
        return self.ranks[0]

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "ranks": list(self.ranks)}

    @classmethod
    def from_dict(cls, d: dict) -> Stage:
        return cls(layers=tuple(d["layers"]), ranks=tuple(int(r) for r in d["ranks"]))


@dataclass(frozen=True)
class Partition:
    world: int
    shares: tuple[float, ...]
    slices: tuple[RankSlice, ...]
    # A pipeline (tpi.model.pipeline_plan): its stages in order; None: one stage of all.
    stages: tuple[Stage, ...] | None = None

    def to_dict(self) -> dict:
        d = {
            "world": self.world,
            "shares": list(self.shares),
            "slices": [s.to_dict() for s in self.slices],
        }
        if self.stages is not None:  # tensor-parallel splits keep their manifests
            d["stages"] = [st.to_dict() for st in self.stages]
        return d

    @property
    def vocab_parallel(self) -> bool:
        return self.slices[0].vocab is not None

    def stage_of(self, rank: int) -> tuple[int, Stage | None]:
        """The index and stage of `rank`; (0, None) for a split without stages."""
        if self.stages is None:
            return 0, None
        for i, st in enumerate(self.stages):
            if rank in st.ranks:
                return i, st
        raise PartitionError(f"rank {rank} is in no stage of this split")

    @classmethod
    def from_dict(cls, d: dict) -> Partition:
        stages = d.get("stages")
        return cls(
            world=int(d["world"]),
            shares=tuple(float(x) for x in d["shares"]),
            slices=tuple(RankSlice.from_dict(s) for s in d["slices"]),
            stages=tuple(Stage.from_dict(st) for st in stages) if stages is not None else None,
        )


def parse_shares(text: str | None, world: int) -> list[float]:
    """'2,1,1' -> [2.0, 1.0, 1.0]; None -> even shares."""
    if not text:
        return [1.0] * world
    try:
        shares = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PartitionError(f"--shares must be comma-separated numbers, got {text!r}") from None
    if len(shares) != world:
        raise PartitionError(f"--shares lists {len(shares)} values but the world has {world} ranks")
    if any(s <= 0 for s in shares):
        raise PartitionError("--shares values must be positive")
    return shares


MOE_SPLITS = ("experts", "columns")
DEFAULT_MOE_SPLIT = "columns"


def _expert_ranges(cfg: ModelConfig, shares: list[float], how: str) -> tuple[list, list]:
    """Per rank: the experts held and the columns held of each."""
    world = len(shares)
    if not cfg.is_moe:
        return [None] * world, [None] * world
    if how not in MOE_SPLITS:
        raise PartitionError(f"unknown expert split {how!r} (choose {', '.join(MOE_SPLITS)})")
    cols = cfg.moe_intermediate_size
    if how == "experts" and world <= cfg.num_experts:
        experts = _ranges(apportion(cfg.num_experts, shares, "experts"))
        return experts, [(0, cols)] * world
    unit = _unit(cols, world)
    return [(0, cfg.num_experts)] * world, _ranges(
        apportion(cols // unit, shares, "expert column blocks"), unit
    )


def vocab_ranges(cfg: ModelConfig, shares: list[float]) -> list[tuple[int, int]]:
    """[start, end) vocabulary rows of the embedding and LM head per rank, by shares."""
    vunit = _unit(cfg.vocab_size, len(shares))
    out = _ranges(apportion(cfg.vocab_size // vunit, shares, "vocabulary blocks"), vunit)
    # A vocabulary that is not a multiple of the block: the last rank takes the rest.
    out[-1] = (out[-1][0], cfg.vocab_size)
    return out


def plan_partition(
    cfg: ModelConfig,
    shares: list[float],
    vocab_parallel: bool = False,
    moe_split: str = DEFAULT_MOE_SPLIT,
) -> Partition:
    """Heads, MLP columns, experts (and, with `vocab_parallel`, vocabulary rows) per rank."""
    world = len(shares)
    g = cfg.group_size
    if world <= cfg.num_kv_heads:
        kv_counts = apportion(cfg.num_kv_heads, shares, "KV heads")
        kv_ranges = _ranges(kv_counts)
        q_ranges = [(a * g, b * g) for a, b in kv_ranges]
    else:
        q_ranges = _ranges(apportion(cfg.num_heads, shares, "attention heads"))
        kv_ranges = [(a // g, (b - 1) // g + 1) for a, b in q_ranges]
    unit = _unit(cfg.intermediate_size, world)
    mlp_ranges = _ranges(
        apportion(cfg.intermediate_size // unit, shares, "MLP column blocks"), unit
    )
    vocab = vocab_ranges(cfg, shares) if vocab_parallel else [None] * world
    expert_ranges, col_ranges = _expert_ranges(cfg, shares, moe_split)
    slices = tuple(
        RankSlice(
            rank=r,
            q_heads=q_ranges[r],
            kv_heads=kv_ranges[r],
            mlp=mlp_ranges[r],
            vocab=vocab[r],
            experts=expert_ranges[r],
            expert_cols=col_ranges[r],
        )
        for r in range(world)
    )
    return Partition(world=world, shares=tuple(shares), slices=slices)
