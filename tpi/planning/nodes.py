"""From measured profiles to what the cost model reads (tpi.planning.cost_model.NodeSpeed)."""

from __future__ import annotations

from tpi.model.config import ModelConfig
from tpi.planning.cost_model import NodeSpeed, PhaseCurves
from tpi.planning.profile import LinkFacts, NodeProfile, SliceProfile, slices_key
from tpi.planning.slice_probe import Setting, shape_key
from tpi.runtime.memory_model import expected_baseline


def _curves(p: SliceProfile) -> PhaseCurves:
    return PhaseCurves(
        attention=p.attention(),
        attention_per_position=p.attention_per_position(),
        mlp=p.mlp(),
        attention_prefill=p.attention_prefill(),
        mlp_prefill=p.mlp_prefill(),
    )


def node_speed(
    cfg: ModelConfig, profile: NodeProfile, setting: Setting, master: bool = False
) -> NodeSpeed:
    """The node's speed for `cfg` in `setting` (resident, and streamed if measured);
    `master`: the node that will also hold the tokenizer (its baseline is larger)."""
    shape = shape_key(cfg)
    resident = profile.slices.get(
        slices_key(shape, Setting(**{**setting.to_dict(), "resident": True}).key())
    )
    if resident is None:
        raise KeyError(f"{profile.name}: no timings of this model's slices ({setting.key()})")
    streamed = profile.slices.get(
        slices_key(shape, Setting(**{**setting.to_dict(), "resident": False}).key())
    )
    head = resident.head or {}
    capacity, source = profile.device.capacity
    return NodeSpeed(
        name=profile.name,
        resident=_curves(resident),
        streamed=_curves(streamed) if streamed is not None and streamed is not resident else None,
        head_s=float(head.get("decode_s", 0.0)),
        embed_s=float(head.get("embed_s", 0.0)),
        sustained=sustained(profile.device),
        disk_bytes_per_s=profile.device.disk_read_bytes_per_s,
        capacity=capacity,
        capacity_source=source,
        baseline_bytes=expected_baseline(profile.device.rss_bytes, cfg.vocab_size, master),
        link=profile.link if isinstance(profile.link, LinkFacts) else LinkFacts(),
    )


def sustained(d) -> float:
    """The share of its short-run speed a node keeps: as measured (a CPU quota,
    thermal throttling, or other processes on a shared host all lower it), and never
    more than its CPU quota allows its threads (a measurement over a few of the
    quota's 100 ms periods comes out a little high). benchmarks/planner.py compares
    this with the quota alone: the measured share predicted 15 of 20 emulated
    placements within 25%, the quota alone 13 (emulated ranks share a host)."""
    share = d.sustained
    if d.cpu_limit is not None and d.threads:
        share = min(share, d.cpu_limit / d.threads)
    return max(0.01, min(1.0, share))
