"""Build one rank's decoder: measure its memory, plan it, then hold or stream its layers.

The one load path of every node: the master (rank 0) and every worker build
their rank here from a shard directory, and a single machine running an
unsplit checkpoint does too, so a node's memory behaviour and context limit
do not depend on its role or on how the model was stored. The plan itself is
tpi.runtime.memory_model's, the one the planner predicts with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tpi.model.config import ModelConfig
from tpi.model.decoder import Collective, Decoder
from tpi.model.partition import RankSlice
from tpi.runtime.memory_budget import MemoryBudgetError, effective_budget
from tpi.runtime.memory_model import (
    ExpertSizes,
    RankMemory,
    RankSizes,
    WindowChoice,
    activation_bytes_per_position,
    choose_rank_memory,
    context_limit,
    kv_cache_bytes,
)
from tpi.runtime.resident_layers import ResidentLayers
from tpi.runtime.sliding_window import SlidingWindowLayers, StreamLayout
from tpi.storage.checkpoint_rank import CheckpointRank
from tpi.storage.shard_reader import RankShard
from tpi.system.cgroup_limits import memory_limit
from tpi.system.malloc import release_freed_memory
from tpi.system.process_memory import rss_bytes


@dataclass
class RankRuntime:
    decoder: Decoder
    layers: SlidingWindowLayers | ResidentLayers
    memory: WindowChoice  # the window chosen, and what it needs

    def close(self) -> None:
        self.layers.close()


def measured_baseline(held_bytes: int) -> int:
    """This process before weights: its RSS with freed heap returned to the OS first
    (a profiled process holds none either), less the weights it already holds."""
    release_freed_memory()
    return max(0, rss_bytes() - held_bytes)


def rank_sizes(
    cfg: ModelConfig,
    rs: RankSlice,
    dtype: torch.dtype,
    layout: StreamLayout | None,
    resident: ResidentLayers | None,
    head_bytes: int,
    baseline_bytes: int,
) -> RankSizes:
    """The memory model's inputs, as this rank holds them: a shard's slots, staging
    and experts, or a checkpoint's layers already loaded."""
    elem = torch.empty((), dtype=dtype).element_size()
    experts = None
    if layout is not None:
        slot, staging = layout.slot_bytes, layout.staging_bytes
        if (ex := layout.experts) is not None:
            experts = ExpertSizes(
                ex.held_per_layer(),
                cfg.experts_per_token,
                ex.moe_layers(),
                ex.slot_bytes,
                ex.staging_bytes,
            )
    else:
        slot, staging = resident.resident_bytes // cfg.num_layers, 0
    return RankSizes(
        num_layers=cfg.num_layers,
        layer_bytes=slot,
        staging_bytes=staging,
        head_bytes=head_bytes,
        baseline_bytes=baseline_bytes,
        kv_per_position=kv_cache_bytes(cfg, rs, 1, elem),
        activation_per_position=activation_bytes_per_position(cfg, rs),
        experts=experts,
    )


def _open_layers(
    source: RankShard | CheckpointRank, dtype: torch.dtype, window: int | None
) -> tuple[StreamLayout | None, ResidentLayers | None]:
    """A shard's layout (nothing read yet), or a checkpoint's layers, read whole."""
    if isinstance(source, RankShard):
        return StreamLayout.of(source, dtype), None
    if window is not None and window < source.config.num_layers:
        raise MemoryBudgetError(
            "an unsplit checkpoint is held whole; split it ('tpi split') to stream layers"
        )
    return None, ResidentLayers(source.load_layers(dtype))


def _hold(
    source: RankShard, dtype: torch.dtype, layout: StreamLayout, memory: RankMemory
) -> SlidingWindowLayers:
    if memory.window.window >= source.config.num_layers:
        # Every layer is read once: hold float weights transposed for decoding.
        layout = StreamLayout.of(source, dtype, transpose=True)
    return SlidingWindowLayers(layout, memory.window.window, dtype, memory.expert_slots)


def build_rank(
    source: RankShard | CheckpointRank,
    dtype: torch.dtype,
    collective: Collective,
    *,
    window: int | None = None,
    budget_bytes: int | None = None,
    max_context: int | None = None,
    head_bytes: int = 0,
    echo: Callable[[str], None] | None = None,
    baseline_bytes: int | None = None,
) -> RankRuntime:
    """This rank's decoder over a shard directory (layers streamed through a
    window, or all resident) or an unsplit checkpoint (all resident).
    `baseline_bytes`: this process before weights (None: measured now)."""
    cfg, rs = source.config, source.rank_slice
    planned = window is not None or budget_bytes is not None or memory_limit() is not None
    layout, resident = _open_layers(source, dtype, window)
    held = head_bytes
    if resident is not None:
        window, held = cfg.num_layers, held + resident.resident_bytes
    if baseline_bytes is None:
        baseline_bytes = measured_baseline(held)
    sizes = rank_sizes(cfg, rs, dtype, layout, resident, head_bytes, baseline_bytes)
    budget, budget_source = effective_budget(budget_bytes)
    note = None if echo is None else (lambda m: echo(f"rank {rs.rank}: {m}"))
    memory = choose_rank_memory(
        sizes,
        context=context_limit(cfg, max_context, planned),
        fit=max_context is None and planned,
        window=window,
        budget_bytes=budget,
        budget_source=budget_source,
        note=note,
    )
    if note is not None:
        note(memory.window.describe())
    layers = resident or _hold(source, dtype, layout, memory)
    decoder = Decoder(cfg, rs, layers, collective, dtype, max_positions=memory.context)
    return RankRuntime(decoder, layers, memory.window)
