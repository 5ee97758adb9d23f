"""Build one rank's decoder from its shard: plan memory, start the scheduler.

Used alike by the master (rank 0) and by every worker, so a node's memory
behaviour does not depend on its role.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tpi.decoder import Collective, Decoder
from tpi.memory_budget import WindowPlan, activation_bytes, kv_cache_bytes, plan_window
from tpi.node_stats import rss_bytes
from tpi.shard_reader import RankShard
from tpi.sliding_window import SlidingWindowLayers, StreamLayout

DEFAULT_MAX_CONTEXT = 4096


@dataclass
class RankRuntime:
    decoder: Decoder
    layers: SlidingWindowLayers
    plan: WindowPlan

    def close(self) -> None:
        self.layers.close()


def build_rank(
    shard: RankShard,
    dtype: torch.dtype,
    collective: Collective,
    *,
    window: int | None = None,
    budget_bytes: int | None = None,
    max_context: int | None = None,
    head_bytes: int = 0,
    echo: Callable[[str], None] | None = None,
) -> RankRuntime:
    cfg = shard.config
    rs = shard.manifest.rank_slice
    context = min(cfg.max_position_embeddings, max_context or DEFAULT_MAX_CONTEXT)
    layout = StreamLayout.of(shard, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    plan = plan_window(
        num_layers=cfg.num_layers,
        layer_bytes=layout.slot_bytes,
        staging_bytes=layout.staging_bytes,
        kv_bytes=kv_cache_bytes(cfg, rs, context, elem),
        head_bytes=head_bytes,
        activation_bytes=activation_bytes(cfg, rs, context),
        baseline_bytes=max(0, rss_bytes() - head_bytes),
        window=window,
        budget_bytes=budget_bytes,
    )
    if echo is not None:
        echo(f"rank {shard.manifest.rank}: {plan.describe()}")
    layers = SlidingWindowLayers(layout, plan.window, dtype)
    decoder = Decoder(cfg, rs, layers, collective, dtype, max_positions=context)
    return RankRuntime(decoder, layers, plan)
