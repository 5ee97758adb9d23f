"""The planner's byte counts equal what real splits hold and what the runtime
plans, before any split exists: layer slots, disk reads, staging, the head."""

from __future__ import annotations

import pytest
import torch

from tests.factories import make_model
from tpi.model.config import load_config
from tpi.planning.footprint import Format, head_bytes, layer_bytes, plan_memory
from tpi.quant.quantize import QuantSpec
from tpi.runtime.memory_model import activation_bytes, choose_window, kv_cache_bytes
from tpi.runtime.sliding_window import StreamLayout
from tpi.storage.shard_reader import RankShard
from tpi.storage.split import split_model


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """Biases everywhere (q/k/v), a width the int4 kernel takes (rows of 16s, groups of 32)."""
    return make_model(
        tmp_path_factory.mktemp("fp"),
        "qwen2",
        hidden=64,
        heads=4,
        kv_heads=2,
        layers=2,
        intermediate=256,
        tied=True,
    )


@pytest.mark.parametrize(
    "quant,dtype,stored",
    [
        ("none", "fp32", torch.float32),
        ("none", "bf16", torch.float32),  # converted on load: a staging buffer
        ("none", "fp32", torch.bfloat16),
        ("bf16", "fp32", torch.float32),
        ("int8", "fp32", torch.float32),
        ("int4", "fp32", torch.float32),
    ],
)
def test_layer_and_head_bytes_match_real_splits(tmp_path, quant, dtype, stored):
    model = make_model(
        tmp_path / "m",
        "qwen2",
        hidden=64,
        heads=4,
        kv_heads=2,
        layers=2,
        intermediate=256,
        tied=False,
        dtype=stored,
    )
    cfg = load_config(model)
    split = split_model(model, tmp_path / "s", [3.0, 1.0], quant=QuantSpec.for_split(quant, 32))
    fmt = Format(dtype, quant, 32, {torch.float32: "fp32", torch.bfloat16: "bf16"}[stored])
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for rank in (0, 1):
        shard = RankShard(split / f"rank{rank}")
        real = StreamLayout.of(shard, compute)
        guess = layer_bytes(cfg, shard.manifest.rank_slice, fmt)
        assert guess.memory == real.slot_bytes
        assert guess.staging == real.staging_bytes
        assert guess.disk == pytest.approx(real.layouts[0].data_bytes, rel=0.02)
    head = RankShard(split / "rank0").load_head(compute)
    assert head_bytes(cfg, fmt) == pytest.approx(head.nbytes(), rel=0.01)


def test_plan_memory_chooses_the_window_the_runtime_chooses(qwen_like, tmp_path):
    cfg = load_config(qwen_like)
    split = split_model(qwen_like, tmp_path / "s", [1.0, 1.0])
    shard = RankShard(split / "rank1")
    rs = shard.manifest.rank_slice
    layout = StreamLayout.of(shard, torch.float32)
    fmt = Format()
    context, baseline = 64, 100 << 20
    full = plan_memory(
        cfg, rs, fmt, context=context, baseline_bytes=baseline, head=0, capacity=None
    )
    assert full.window == cfg.num_layers
    # A budget one byte short of every layer: the runtime and the planner both take one less.
    budget = full.total - 1
    runtime = choose_window(
        num_layers=cfg.num_layers,
        layer_bytes=layout.slot_bytes,
        staging_bytes=layout.staging_bytes,
        kv_bytes=kv_cache_bytes(cfg, rs, context, 4),
        head_bytes=0,
        activation_bytes=activation_bytes(cfg, rs, context),
        baseline_bytes=baseline,
        window=None,
        budget_bytes=budget,
    )
    ours = plan_memory(
        cfg,
        rs,
        fmt,
        context=context,
        baseline_bytes=baseline,
        head=0,
        capacity=budget,
        fit_context_to_capacity=False,
    )
    assert ours.window == runtime.window == cfg.num_layers - 1
    assert ours.total == runtime.need_bytes
    assert (
        plan_memory(cfg, rs, fmt, context=context, baseline_bytes=baseline, head=0, capacity=1000)
        is None
    )
