"""Build one rank's decoder: plan memory, then hold or stream its layers.

The one load path of every node: the master (rank 0) and every worker build
their rank here from a shard directory, and a single machine running an
unsplit checkpoint does too, so a node's memory behaviour and context limit
do not depend on its role or on how the model was stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tpi.model.config import ModelConfig
from tpi.model.decoder import Collective, Decoder
from tpi.runtime.memory_budget import (
    ACTIVATION_BASE,
    MemoryBudgetError,
    WindowPlan,
    activation_bytes,
    activation_bytes_per_position,
    effective_budget,
    fit_context,
    kv_cache_bytes,
    plan_window,
)
from tpi.runtime.resident_layers import ResidentLayers
from tpi.runtime.sliding_window import SlidingWindowLayers, StreamLayout
from tpi.storage.checkpoint_rank import CheckpointRank
from tpi.storage.shard_reader import RankShard
from tpi.system.cgroup_limits import memory_limit
from tpi.system.process_memory import rss_bytes

DEFAULT_MAX_CONTEXT = 4096  # when memory is planned: the KV cache is reserved for this


@dataclass
class RankRuntime:
    decoder: Decoder
    layers: SlidingWindowLayers | ResidentLayers
    plan: WindowPlan

    def close(self) -> None:
        self.layers.close()


def context_limit(cfg: ModelConfig, max_context: int | None, planned: bool) -> int:
    """Tokens the KV cache is sized for and capped at: as asked; else the model's
    own limit, at most DEFAULT_MAX_CONTEXT when memory is planned (a window, a
    budget or a cgroup limit), since the plan reserves the KV cache in full."""
    if max_context:
        return min(cfg.max_position_embeddings, max_context)
    if planned:
        return min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    return cfg.max_position_embeddings


def _expert_slots(cfg: ModelConfig, layout: StreamLayout, window: int | None) -> int:
    """Expert slots per MoE layer: every held expert with a window of every layer;
    else the experts one token picks in a layer (its top k, as far as this rank
    holds them), so the next token finds those it picks again. Without a window,
    build_rank then holds every expert if the budget (or no budget) allows."""
    held = layout.experts.held_per_layer()
    if window is not None and window >= cfg.num_layers:
        return held
    return min(held, max(1, cfg.experts_per_token))


def _fit_expert_slots(
    layout: StreamLayout,
    slots: int,
    staging: int,
    *,
    budget: int | None,
    other: int,
    rank: int,
    echo: Callable[[str], None] | None,
) -> tuple[int, int]:
    """Streamed experts' slots per MoE layer, cut (down to one) so that a window of
    two layers (or the one asked for) still fits the budget: on a small device with
    many MoE layers a token's picks in every layer may not all stay cached. Fewer
    slots than a token picks mean those picks are read one by one, and fewer hits;
    returns (slots, staging with that cache)."""
    ex = layout.experts
    if budget is None:
        return slots, staging
    room = budget - other - (staging - ex.cache_bytes(slots))
    fit = max(1, (room - ex.staging_bytes) // max(1, ex.moe_layers() * ex.slot_bytes))
    if fit >= slots:
        return slots, staging
    if echo is not None:
        echo(
            f"rank {rank}: {fit} expert slot(s) per MoE layer fit the memory budget (of the "
            f"{slots} a token picks): more of its experts are read from disk"
        )
    return fit, staging - ex.cache_bytes(slots) + ex.cache_bytes(fit)


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
) -> RankRuntime:
    """This rank's decoder over a shard directory (layers streamed through a
    window, or all resident) or an unsplit checkpoint (all resident)."""
    cfg = source.config
    rs = source.rank_slice
    planned = window is not None or budget_bytes is not None or memory_limit() is not None
    context = context_limit(cfg, max_context, planned)
    elem = torch.empty((), dtype=dtype).element_size()
    expert_slots = None
    if isinstance(source, RankShard):
        layout = StreamLayout.of(source, dtype)
        slot, staging, resident = layout.slot_bytes, layout.staging_bytes, None
        if layout.experts is not None:
            expert_slots = _expert_slots(cfg, layout, window)
            staging += layout.experts.cache_bytes(expert_slots)
    else:
        if window is not None and window < cfg.num_layers:
            raise MemoryBudgetError(
                "an unsplit checkpoint is held whole; split it ('tpi split') to stream layers"
            )
        resident = ResidentLayers(source.load_layers(dtype))
        slot, staging, window = resident.resident_bytes // cfg.num_layers, 0, cfg.num_layers
    baseline = max(0, rss_bytes() - head_bytes - (resident.resident_bytes if resident else 0))
    if max_context is None and planned:
        # A big model's KV cache for the default context may not fit a small device:
        # then the context shrinks to what leaves room for a window, and says so.
        per_position = kv_cache_bytes(cfg, rs, 1, elem) + activation_bytes_per_position(cfg, rs)

        def fit(with_staging: int) -> int:
            return fit_context(
                context=context,
                per_position_bytes=per_position,
                fixed_bytes=baseline + with_staging + head_bytes + ACTIVATION_BASE,
                layer_bytes=slot,
                num_layers=cfg.num_layers,
                budget_bytes=effective_budget(budget_bytes)[0],
            )

        fitted = fit(staging)
        if expert_slots is not None and fitted == context and expert_slots > 1:
            # Not even a short context fits beside a token's picks cached in every
            # layer: fit it beside one slot per layer, which _fit_expert_slots then
            # grows into what is left (a context first, cached experts second).
            fitted = fit(
                staging - layout.experts.cache_bytes(expert_slots) + layout.experts.cache_bytes(1)
            )
        if fitted < context and echo is not None:
            echo(
                f"rank {rs.rank}: context limited to {fitted} tokens so the KV cache fits the "
                f"memory budget with a window (--max-context sets it)"
            )
        context = fitted
    if expert_slots is not None and window is None:
        # Under a budget: every expert held if all of it fits, else the token's few.
        held = layout.experts.held_per_layer()
        budget = effective_budget(budget_bytes)[0]
        whole = layout.staging_bytes + layout.experts.cache_bytes(held)
        need = (
            baseline
            + cfg.num_layers * slot
            + whole
            + kv_cache_bytes(cfg, rs, context, elem)
            + head_bytes
            + activation_bytes(cfg, rs, context)
        )
        if budget is None or need <= budget:
            expert_slots, staging = held, whole
    if expert_slots is not None and expert_slots < layout.experts.held_per_layer():
        expert_slots, staging = _fit_expert_slots(
            layout,
            expert_slots,
            staging,
            budget=effective_budget(budget_bytes)[0],
            other=baseline
            + min(window or 2, cfg.num_layers) * slot
            + kv_cache_bytes(cfg, rs, context, elem)
            + head_bytes
            + activation_bytes(cfg, rs, context),
            rank=rs.rank,
            echo=echo,
        )
    plan = plan_window(
        num_layers=cfg.num_layers,
        layer_bytes=slot,
        staging_bytes=staging,
        kv_bytes=kv_cache_bytes(cfg, rs, context, elem),
        head_bytes=head_bytes,
        activation_bytes=activation_bytes(cfg, rs, context),
        baseline_bytes=baseline,
        window=window,
        budget_bytes=budget_bytes,
    )
    if echo is not None:
        echo(f"rank {rs.rank}: {plan.describe()}")
    if resident is None and plan.window >= cfg.num_layers:
        # Every layer is read once: hold float weights transposed for decoding.
        layout = StreamLayout.of(source, dtype, transpose=True)
    layers = resident or SlidingWindowLayers(layout, plan.window, dtype, expert_slots)
    decoder = Decoder(cfg, rs, layers, collective, dtype, max_positions=context)
    return RankRuntime(decoder, layers, plan)
