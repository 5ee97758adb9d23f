"""The solver: uneven devices get uneven shares, memory limits hold, ties are
broken the same way every time, devices that slow the cluster are left out,
infeasible inputs name the node that does not fit, and the mixed-integer path
for big clusters agrees with exact search."""

from __future__ import annotations

import pytest

import tpi.planning.cost_model as cost_model
import tpi.planning.solver as solver
from tests.planning_helpers import linear_curves, node, shaped_config
from tpi.planning.cost_model import Workload, predict
from tpi.planning.footprint import Format
from tpi.planning.solver import NoPlacement, solve

# 4 layers, hidden 96, 12 query / 12 KV heads, 3072 MLP columns (24 blocks of 128).
CFG = shaped_config(layers=4, hidden=96, heads=12, kv=12, intermediate=3072, vocab=100)
WL = Workload(Format(), position=16, context=64)


def curves(scale: float = 1.0):
    return linear_curves(1e-3 * scale, 1e-5 * scale, heads=12, columns=3072)


def test_uneven_devices_get_uneven_shares_and_beat_even_shares():
    nodes = [
        node("master", curves()),
        node("half", curves(), sustained=0.5, rtt_s=1e-4),
        node("quarter", curves(), sustained=0.25, rtt_s=1e-4),
    ]
    plan = solve(CFG, nodes, WL)
    assert plan.chosen.node_names == ("master", "half", "quarter")
    a, b, c = plan.chosen.shares
    assert a > b > c  # the faster the node, the larger its share
    even = next(x for x in plan.candidates if x.label == "even shares, all nodes")
    assert even.prediction.ms_per_token / plan.chosen.prediction.ms_per_token >= 1.3
    assert plan.method == "exact" and plan.evaluated > 50


def test_equal_devices_tie_to_even_shares_and_the_same_answer_every_time():
    nodes = [node(n, curves(), rtt_s=0.0) for n in ("master", "a", "b")]
    first = solve(CFG, nodes, WL)
    assert first.chosen.shares == (8, 8, 8)
    again = solve(CFG, list(nodes), WL)
    assert (again.chosen.node_names, again.chosen.shares) == (
        first.chosen.node_names,
        first.chosen.shares,
    )


def test_a_tie_between_sets_of_nodes_goes_to_fewer_nodes_then_earlier_workers(monkeypatch):
    # The master cannot hold the model alone; one worker suffices, and where
    # compute is negligible next to the link a second one saves almost nothing
    # (with no cost per message on the master, it saves a little).
    monkeypatch.setattr(cost_model, "MASTER_MESSAGE_S", 0.0)
    alone = solve(CFG, [node("master", curves(1e-3))], WL).chosen.prediction.ranks[0]
    cap = alone.memory_bytes - 1
    nodes = [
        node("master", curves(1e-3), capacity=cap),
        node("a", curves(1e-3), rtt_s=1e-3),
        node("b", curves(1e-3), rtt_s=1e-3),
    ]
    plan = solve(CFG, nodes, WL)
    with_a = next(c for c in plan.candidates if c.node_names == ("master", "a"))
    with_b = next(c for c in plan.candidates if c.node_names == ("master", "b"))
    both = next(c for c in plan.candidates if c.label == "all nodes")
    assert with_a.prediction.ms_per_token == pytest.approx(with_b.prediction.ms_per_token)
    assert both.prediction.ms_per_token < with_a.prediction.ms_per_token  # but within the tie
    assert plan.chosen.node_names == ("master", "a")
    why = next(r for r in plan.reasons if r.startswith("b left out"))
    assert "not worth another node" in why
    master_alone = next(c for c in plan.candidates if c.label == "master alone")
    assert "rank 0 (master) does not fit" in master_alone.infeasible


def test_a_device_behind_a_slow_link_is_dropped():
    nodes = [
        node("master", curves()),
        node("fast", curves(), rtt_s=2e-4),
        node("far", curves(), sustained=0.25, rtt_s=20e-3),  # 10 ms each way
    ]
    plan = solve(CFG, nodes, WL)
    assert plan.chosen.node_names == ("master", "fast")
    far = next(r for r in plan.reasons if r.startswith("far left out"))
    assert "slower than without it" in far
    with_far = next(c for c in plan.candidates if c.label == "all nodes")
    assert with_far.prediction.ms_per_token > plan.chosen.prediction.ms_per_token
    assert "link" in with_far.prediction.bottleneck


def test_every_rank_stays_within_its_memory_and_streams_when_it_must():
    full = solve(CFG, [node("master", curves()), node("w", curves())], WL)
    need = max(r.memory_bytes for r in full.chosen.prediction.ranks)
    slot = 4 * (96 * 96 * 4 + 3 * 96 * 3072) // 2  # about half a layer, in bytes
    cap = need - 2 * slot  # the worker cannot hold every layer of its share any more
    nodes = [
        node("master", curves()),
        node("small", curves(), capacity=cap, disk=1e12),
    ]
    plan = solve(CFG, nodes, WL)
    for r in plan.chosen.prediction.ranks:
        assert r.capacity_bytes is None or r.memory_bytes <= r.capacity_bytes
    small = plan.chosen.prediction.ranks[1]
    assert small.window < CFG.num_layers or small.mlp_columns < 768  # it streams or takes less


def test_a_worker_too_small_for_any_slice_is_left_out_and_says_why():
    nodes = [node("master", curves()), node("tiny", curves(), capacity=1 << 20, disk=1e9)]
    plan = solve(CFG, nodes, WL)
    assert plan.chosen.node_names == ("master",)
    why = next(r for r in plan.reasons if r.startswith("tiny left out"))
    assert "rank 1 (tiny) does not fit" in why and "test limit" in why


def test_no_placement_names_the_node_that_does_not_fit():
    nodes = [node("master", curves(), capacity=1 << 20, disk=1e9), node("w", curves())]
    with pytest.raises(NoPlacement, match=r"rank 0 \(master\) does not fit: needs .* has 1.00 MiB"):
        solve(CFG, nodes, WL)


BIG = shaped_config(layers=80, hidden=8192, heads=64, kv=8, intermediate=28672, vocab=32000)


def big_nodes(count: int):
    speeds = [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2][:count]
    return [
        node(
            "master" if i == 0 else f"w{i}",
            linear_curves(2e-4, 2e-6, heads=64, columns=28672),
            sustained=s,
            rtt_s=0 if i == 0 else 5e-4,
            capacity=24 << 30,
            disk=2e9,
            baseline=300 << 20,
        )
        for i, s in enumerate(speeds)
    ]


def test_big_clusters_use_the_mixed_integer_program_within_memory():
    wl = Workload(Format(quant="int4"), position=16, context=256)
    plan = solve(BIG, big_nodes(8)[:5], wl)  # 224 blocks over 5 ranks: 1e8 splits
    assert plan.method == "milp"
    for r in plan.chosen.prediction.ranks:
        assert r.memory_bytes <= r.capacity_bytes
    even = next(c for c in plan.candidates if c.label == "even shares, all nodes")
    assert plan.chosen.prediction.ms_per_token <= even.prediction.ms_per_token


def test_the_mixed_integer_program_finds_what_exact_search_finds(monkeypatch):
    cfg = shaped_config(layers=8, hidden=512, heads=8, kv=4, intermediate=3072, vocab=1000)
    nodes = [
        node(
            f"n{i}",
            linear_curves(1e-4, 1e-6, heads=8, columns=3072),
            sustained=s,
            rtt_s=0 if i == 0 else 3e-4,
        )
        for i, s in enumerate([1.0, 0.7, 0.3])
    ]
    wl = Workload(Format(), position=16, context=64)
    exact = solve(cfg, nodes, wl)
    assert exact.method == "exact"
    monkeypatch.setattr(solver, "EXACT_LIMIT", 0)
    milp = solve(cfg, nodes, wl)
    assert milp.method == "milp"
    assert milp.chosen.prediction.ms_per_token <= 1.01 * exact.chosen.prediction.ms_per_token
    best = predict(cfg, nodes, exact.placement, wl).ms_per_token
    assert best == pytest.approx(exact.chosen.prediction.ms_per_token)
