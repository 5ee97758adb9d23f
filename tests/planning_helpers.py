"""Synthetic models and node speeds for the planner's tests: numbers small enough
to check the cost model's arithmetic by hand."""

from __future__ import annotations

from tpi.model.config import ModelConfig, RopeConfig
from tpi.planning.cost_model import NodeSpeed, PhaseCurves
from tpi.planning.curves import Curve
from tpi.planning.profile import LinkFacts


def tiny_config(
    layers: int = 2, heads: int = 2, kv: int = 2, intermediate: int = 256
) -> ModelConfig:
    """hidden 8, head_dim 4, vocabulary 32, tied embeddings, no biases."""
    return shaped_config(layers, 8, heads, kv, intermediate, 32, head_dim=4, tied=True)


def shaped_config(
    layers: int,
    hidden: int,
    heads: int,
    kv: int,
    intermediate: int,
    vocab: int,
    head_dim: int | None = None,
    tied: bool = False,
) -> ModelConfig:
    """A Llama config of these shapes (head_dim: hidden / heads unless given), no biases."""
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope=RopeConfig(10000.0),
        tie_word_embeddings=tied,
        attention_bias=False,
        o_proj_bias=False,
        mlp_bias=False,
        sliding_windows=(None,) * layers,
    )


def linear_curves(
    per_head_s: float,
    per_column_s: float,
    heads: int,
    columns: int,
    per_position_s: float = 0.0,
    prefill_factor: float = 4.0,
) -> PhaseCurves:
    """Phase times proportional to a slice's heads (attention) and columns (MLP)."""

    def line(per: float, top: int) -> Curve:
        return Curve.of([(1, per), (top, per * top)])

    return PhaseCurves(
        attention=line(per_head_s, heads),
        attention_per_position=line(per_position_s, heads),
        mlp=line(per_column_s, columns),
        attention_prefill=line(prefill_factor * per_head_s, heads),
        mlp_prefill=line(prefill_factor * per_column_s, columns),
    )


def node(
    name: str,
    curves: PhaseCurves,
    sustained: float = 1.0,
    rtt_s: float = 0.0,
    bytes_per_s: float | None = None,
    capacity: int | None = None,
    head_s: float = 0.0,
    disk: float | None = None,
    baseline: int = 0,
    worker_cpu_s: float | None = None,
    master_cpu_s: float | None = None,
) -> NodeSpeed:
    return NodeSpeed(
        name=name,
        resident=curves,
        head_s=head_s,
        sustained=sustained,
        disk_bytes_per_s=disk,
        capacity=capacity,
        capacity_source="test limit",
        baseline_bytes=baseline,
        link=LinkFacts(rtt_s, bytes_per_s, worker_cpu_s, master_cpu_s),
    )
