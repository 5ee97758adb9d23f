"""Partition plans, and that the sliced math sums back to the whole layer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpi.model.config import load_config
from tpi.model.decoder import Decoder, LocalCollective
from tpi.model.partition import PartitionError, apportion, parse_shares, plan_partition
from tpi.runtime.resident_layers import ResidentLayers
from tpi.storage.checkpoint_rank import CheckpointRank


@given(
    total=st.integers(1, 200),
    shares=st.lists(st.floats(0.1, 10, allow_nan=False), min_size=1, max_size=8),
)
def test_apportion_is_exact_and_proportional(total, shares):
    if total < len(shares):
        with pytest.raises(PartitionError):
            apportion(total, shares, "units")
        return
    counts = apportion(total, shares, "units")
    assert sum(counts) == total
    assert all(c >= 1 for c in counts)
    # A larger share never gets fewer units.
    for i, j in zip(range(len(shares)), range(1, len(shares)), strict=False):
        if shares[i] > shares[j]:
            assert counts[i] >= counts[j]
        elif shares[i] < shares[j]:
            assert counts[i] <= counts[j]
    # With no minimum to enforce, every count is within one unit of its exact share.
    exact = [total * s / sum(shares) for s in shares]
    if all(e >= 1 for e in exact):
        assert all(abs(c - e) < 1 + 1e-9 for c, e in zip(counts, exact, strict=True))


def test_parse_shares_errors():
    assert parse_shares(None, 3) == [1.0, 1.0, 1.0]
    assert parse_shares("2,1,1", 3) == [2.0, 1.0, 1.0]
    for bad in ("2,1", "a,b,c", "1,0,1", "1,-1,1"):
        with pytest.raises(PartitionError):
            parse_shares(bad, 3)


@pytest.mark.parametrize(
    "shares", [[1], [1, 1], [2, 1], [1, 1, 1], [1, 1, 1, 1], [3, 1, 1, 1, 1], [1] * 8]
)
def test_plan_covers_every_head_and_column_once(llama_dir, shares):
    cfg = load_config(llama_dir)
    part = plan_partition(cfg, shares)
    q = [h for s in part.slices for h in range(*s.q_heads)]
    mlp = [c for s in part.slices for c in range(*s.mlp)]
    assert q == list(range(cfg.num_heads))
    assert mlp == list(range(cfg.intermediate_size))
    for s in part.slices:
        needed = {h // cfg.group_size for h in range(*s.q_heads)}
        assert needed == set(range(*s.kv_heads))


def test_more_ranks_than_kv_heads_replicates_kv(llama_dir):
    cfg = load_config(llama_dir)  # 8 heads, 2 KV heads
    part = plan_partition(cfg, [1, 1, 1])
    total_kv = sum(s.n_kv for s in part.slices)
    assert total_kv > cfg.num_kv_heads  # some KV head is held by two ranks
    with pytest.raises(PartitionError):
        plan_partition(cfg, [1] * (cfg.num_heads + 1))


@settings(deadline=None, max_examples=12)
@given(shares=st.lists(st.integers(1, 4), min_size=1, max_size=6))
def test_sum_of_rank_slices_equals_single_node(llama_dir, shares):
    """Running each rank's slice and summing partials (what the allreduce does)
    gives the single-node hidden states: the decomposition is exact."""
    cfg = load_config(llama_dir)
    part = plan_partition(cfg, [float(s) for s in shares])
    full_rs = plan_partition(cfg, [1.0]).slices[0]

    def resident(rs):
        return ResidentLayers(CheckpointRank(llama_dir, rs).load_layers(torch.float32))

    full = Decoder(cfg, full_rs, resident(full_rs), LocalCollective())
    ranks = [Decoder(cfg, rs, resident(rs), LocalCollective()) for rs in part.slices]
    h = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = full.forward(h, 0)

    # Lock-step emulation of the allreduce: run layer by layer, summing partials.
    from tpi.model.layers import SequenceStep, StepContext, attention_block, mlp_block, rms_norm

    x = h
    for i in range(cfg.num_layers):
        cos, sin = ranks[0].rope.get(0, 6)
        steps = [StepContext([SequenceStep(0, 6, r.cache)], cos, sin, torch.float32) for r in ranks]
        attn = sum(
            attention_block(
                rms_norm(x, r.layers.layers[i].attn_norm, cfg.rms_norm_eps),
                r.layers.layers[i],
                r.layout,
                i,
                s,
                None,
            )
            for r, s in zip(ranks, steps, strict=True)
        )
        x = x + attn
        x = x + sum(
            mlp_block(
                rms_norm(x, r.layers.layers[i].mlp_norm, cfg.rms_norm_eps), r.layers.layers[i]
            )
            for r in ranks
        )
    assert (x - expected).abs().max() < 1e-5
