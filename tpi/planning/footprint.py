"""Bytes a rank's slice takes, in memory and on disk, before any split exists.

The rules are the ones a split and the runtime follow (tpi.quant.quantize for
what each matrix is stored as, tpi.runtime.sliding_window for what a slot
holds), so that a placement's memory can be predicted for shares nobody has
split yet; the plan over these sizes is the runtime's own
(tpi.runtime.memory_model), imported, not copied.
tests/test_planning_footprint.py checks them against real splits.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpi.model.config import ModelConfig
from tpi.model.partition import RankSlice
from tpi.quant.formats import INT8_K_MULTIPLE
from tpi.quant.int4_pack import ROW_MULTIPLE
from tpi.runtime.memory_budget import MemoryBudgetError
from tpi.runtime.memory_model import (
    RankSizes,
    WindowChoice,
    activation_bytes_per_position,
    choose_rank_memory,
    kv_cache_bytes,
    need_at_window,
)
from tpi.runtime.slot_fill import aligned

ELEM = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Format:
    """How a split stores its weights and how a rank computes with them."""

    dtype: str = "fp32"  # compute dtype
    quant: str = "none"  # none | bf16 | int8 | int4
    group_size: int = 32
    stored: str = "fp32"  # float dtype of the checkpoint (what 'none' splits keep)

    @property
    def quantized(self) -> bool:
        return self.quant != "none"


def _matrix_bytes(n: int, k: int, fmt: Format) -> tuple[int, int]:
    """(bytes held in memory, bytes on disk) of one (n, k) matmul weight."""
    if fmt.quant == "none":
        return n * k * ELEM[fmt.dtype], n * k * ELEM[fmt.stored]
    if fmt.quant == "int4" and n % ROW_MULTIPLE == 0 and k % fmt.group_size == 0:
        b = n * k // 2 + (k // fmt.group_size) * n * 2 * 2  # nibbles + bf16 scale and zero
        return b, b
    if fmt.quant in ("int8", "int4") and k % INT8_K_MULTIPLE == 0:
        b = n * k + 2 * n  # bytes + a bf16 scale per row
        return b, b
    return 2 * n * k, 2 * n * k  # bf16 (asked for, or the fallback of either)


def _vector_bytes(n: int, fmt: Format) -> tuple[int, int]:
    return n * ELEM[fmt.dtype], n * ELEM[fmt.stored]


@dataclass(frozen=True)
class LayerBytes:
    memory: int  # one slot (a layer slice as held)
    disk: int  # what reading the layer file's tensors costs
    staging: int  # a second buffer when stored and held forms differ


def layer_bytes(cfg: ModelConfig, rs: RankSlice, fmt: Format) -> LayerBytes:
    """A layer slice of rank `rs` in format `fmt` (tpi.runtime.sliding_window.StreamLayout)."""
    hd, h = cfg.head_dim, cfg.hidden_size
    mats = [
        ((rs.n_q + 2 * rs.n_kv) * hd, h),  # qkv
        (h, rs.n_q * hd),  # o
        (2 * rs.n_mlp, h),  # gate_up
        (h, rs.n_mlp),  # down
    ]
    vecs = [h, h]  # the two norms
    if cfg.attention_bias:
        vecs.append((rs.n_q + 2 * rs.n_kv) * hd)
    if cfg.o_proj_bias and rs.rank == 0:
        vecs.append(h)
    if cfg.mlp_bias:
        vecs.append(2 * rs.n_mlp)
        if rs.rank == 0:
            vecs.append(h)
    parts = [_matrix_bytes(n, k, fmt) for n, k in mats] + [_vector_bytes(n, fmt) for n in vecs]
    disk = sum(d for _, d in parts)
    # The stored form is held as is unless a float must change dtype (tpi.quant.quantize.memory_dtype).
    convert = fmt.dtype != fmt.stored
    memory = sum(aligned(m) for m, _ in parts) if convert else disk
    return LayerBytes(memory=memory, disk=disk, staging=disk if convert else 0)


def head_bytes(cfg: ModelConfig, fmt: Format, rows: int | None = None) -> int:
    """Embedding + final norm + LM head as held (int8 tables in the int modes)."""
    rows = cfg.vocab_size if rows is None else rows
    table_fmt = Format(fmt.dtype, "int8" if fmt.quant in ("int8", "int4") else fmt.quant)
    table = _matrix_bytes(rows, cfg.hidden_size, table_fmt)[0]
    tables = 1 if cfg.tie_word_embeddings else 2
    return tables * table + cfg.hidden_size * ELEM[fmt.dtype]


@dataclass(frozen=True)
class MemoryNeed:
    """What a rank would plan: tpi.runtime.memory_model's plan over footprint's sizes."""

    choice: WindowChoice
    layer: LayerBytes
    context: int

    @property
    def window(self) -> int:
        """Layers held; == num_layers: all resident, nothing re-read."""
        return self.choice.window

    @property
    def total(self) -> int:
        return self.choice.need_bytes

    @property
    def kv_bytes(self) -> int:
        return self.choice.kv_bytes

    @property
    def head_bytes(self) -> int:
        return self.choice.head_bytes

    @property
    def activation_bytes(self) -> int:
        return self.choice.activation_bytes

    @property
    def baseline_bytes(self) -> int:
        return self.choice.baseline_bytes


def rank_sizes(
    cfg: ModelConfig, rs: RankSlice, fmt: Format, *, baseline_bytes: int, head: int
) -> RankSizes:
    """The memory model's inputs for rank `rs` in format `fmt`, from shapes alone
    (the runtime measures the same from the shard: rank_runtime.rank_sizes)."""
    layer = layer_bytes(cfg, rs, fmt)
    return RankSizes(
        num_layers=cfg.num_layers,
        layer_bytes=layer.memory,
        staging_bytes=layer.staging,
        head_bytes=head,
        baseline_bytes=baseline_bytes,
        kv_per_position=kv_cache_bytes(cfg, rs, 1, ELEM[fmt.dtype]),
        activation_per_position=activation_bytes_per_position(cfg, rs),
    )


def plan_memory(
    cfg: ModelConfig,
    rs: RankSlice,
    fmt: Format,
    *,
    context: int,
    baseline_bytes: int,
    head: int,
    capacity: int | None,
    fit_context_to_capacity: bool = True,
    capacity_source: str = "capacity",
) -> MemoryNeed | None:
    """The largest window (all layers if they fit) within `capacity`, chosen by
    the runtime's own plan; None if not even one layer fits."""
    sizes = rank_sizes(cfg, rs, fmt, baseline_bytes=baseline_bytes, head=head)
    try:
        memory = choose_rank_memory(
            sizes,
            context=context,
            fit=fit_context_to_capacity,
            window=None,
            budget_bytes=capacity,
            budget_source=capacity_source,
        )
    except MemoryBudgetError:
        return None
    return MemoryNeed(memory.window, layer_bytes(cfg, rs, fmt), memory.context)


def memory_at(
    cfg: ModelConfig,
    rs: RankSlice,
    fmt: Format,
    *,
    window: int,
    context: int,
    baseline_bytes: int,
    head: int,
    capacity: int | None,
    fit_context_to_capacity: bool = True,
) -> MemoryNeed:
    """What rank `rs` plans when given `window` layers within `capacity` (over it or
    not: a placement's memory is shown beside the node's capacity)."""
    sizes = rank_sizes(cfg, rs, fmt, baseline_bytes=baseline_bytes, head=head)
    memory = need_at_window(
        sizes, context=context, fit=fit_context_to_capacity, window=window, budget_bytes=capacity
    )
    return MemoryNeed(memory.window, layer_bytes(cfg, rs, fmt), memory.context)
