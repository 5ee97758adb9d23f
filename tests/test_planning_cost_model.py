"""The cost model's arithmetic, checked by hand on synthetic profiles (the
numbers in the comments are worked out from tests/planning_helpers.py)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.planning_helpers import linear_curves, node, tiny_config
from tpi.model.partition import plan_partition
from tpi.planning.cost_model import (
    TOKEN_OVERHEAD_S,
    Placement,
    PlacementError,
    RankPlacement,
    Stage,
    Workload,
    predict,
)
from tpi.planning.curves import Curve
from tpi.planning.footprint import Format, head_bytes, layer_bytes

T = TOKEN_OVERHEAD_S
M = 50e-6  # the master's CPU per message exchange with the worker (as its link measured)
W = 100e-6  # the worker's


def placement(cfg, shares, windows, nodes=None):
    part = plan_partition(cfg, shares)
    ranks = tuple(
        RankPlacement(nodes[i] if nodes else i, rs, windows[i]) for i, rs in enumerate(part.slices)
    )
    return Placement((Stage((0, cfg.num_layers), ranks),), tuple(shares))


def two_nodes(disk=None):
    # 1 ms per query head (attention), 1 ms per 128 MLP columns, 1 us per head and cached token.
    curves = linear_curves(1e-3, 1e-3 / 128, heads=2, columns=256, per_position_s=1e-6)
    master = node("master", curves, head_s=2e-3, baseline=1000, disk=disk)
    worker = node(
        "w1",
        curves,
        sustained=0.5,
        rtt_s=1e-3,
        bytes_per_s=1e6,
        disk=disk,
        worker_cpu_s=W,
        master_cpu_s=M,
    )
    return [master, worker]


def test_curves_interpolate_between_points_and_extend_the_last_segment():
    c = Curve.of([(1, 1.0), (3, 2.0), (5, 6.0)])
    assert c(2) == pytest.approx(1.5)
    assert c(4) == pytest.approx(4.0)
    assert c(7) == pytest.approx(10.0)  # beyond the last point: its segment's slope
    assert c(0) == pytest.approx(0.5)  # before the first: the first segment's
    assert Curve.of([(2, 4.0)])(3) == pytest.approx(6.0)  # one point: proportional
    assert Curve.of([(1, 1.0), (2, 0.0)])(5) == 0.0  # never negative


def test_decode_ms_per_token_by_hand():
    cfg = tiny_config(layers=2)
    pl = placement(cfg, [1, 1], [2, 2])  # 1 head and 128 columns each, all resident
    wl = Workload(Format(), position=116, prompt_tokens=64, context=16)
    p = predict(cfg, two_nodes(), pl, wl)
    # Position 116 is 100 past the timed one: +100 us of attention per head, so
    # each rank's attention phase is 1.1 ms and its MLP phase 1.0 ms at full speed.
    # Link: 1 ms round trip + a partial and a sum of 8 fp32 (32 B each) at 1 MB/s = 1.064 ms.
    t_att = max(1.1e-3, 1.1e-3 + 1.064e-3) + M
    t_mlp = max(1.0e-3, 1.0e-3 + 1.064e-3) + M
    sync = 2 * (t_att + t_mlp) + 2e-3 + T  # + the master's head and per-token overhead
    # CPU per token: the phases, and every allreduce's message exchange (2 per layer).
    master_cpu = 2 * (2.1e-3 + 2 * M) + 2e-3 + T
    worker_cpu = 2 * (2.1e-3 + 2 * W)
    # The worker keeps half its speed: its 4.6 ms of CPU take 9.2 ms, within the 11.4 ms.
    assert sync > worker_cpu / 0.5
    assert p.ms_per_token == pytest.approx(1000 * sync)
    master, worker = p.ranks
    assert master.compute_ms == pytest.approx(1000 * master_cpu)
    assert worker.compute_ms == pytest.approx(1000 * worker_cpu / 0.5)
    assert worker.allreduce_ms == pytest.approx(p.ms_per_token - 1000 * worker_cpu / 0.5)
    assert master.disk_ms == worker.disk_ms == 0.0
    assert p.bottleneck == "the link to rank 1 (w1): 1.06 ms per allreduce"  # 2.13 > 2.1 ms


def test_a_node_that_cannot_keep_its_speed_bounds_the_token_by_its_cpu():
    cfg = tiny_config(layers=2)
    nodes = two_nodes()
    nodes[1] = dataclasses.replace(nodes[1], sustained=0.2)  # a 0.2-core quota
    p = predict(cfg, nodes, placement(cfg, [1, 1], [2, 2]), Workload(Format(), position=116))
    # 4.6 ms of CPU at a fifth of its speed: 23 ms, more than the 11.4 ms at full speed.
    assert p.ms_per_token == pytest.approx(1000 * 2 * (2.1e-3 + 2 * W) / 0.2)
    assert p.ranks[1].compute_ms == pytest.approx(p.ms_per_token) and p.ranks[1].allreduce_ms == 0.0
    assert "the CPU of rank 1 (w1), which keeps 20%" in p.bottleneck


def test_ttft_by_hand():
    cfg = tiny_config(layers=2)
    pl = placement(cfg, [1, 1], [2, 2])
    wl = Workload(Format(), position=16, prompt_tokens=64, context=16)
    p = predict(cfg, two_nodes(), pl, wl)
    # Prefill curves are 4x the decode ones for PREFILL_ROWS = 128 rows; 64 rows: 2x,
    # so 2 ms a phase. Link: 1 ms + 2 x 64 rows x 32 B / 1 MB/s = 5.096 ms.
    phase = max(2e-3, 2e-3 + 5.096e-3)
    expected = 2 * (2 * phase + 2 * M) + 2e-3 + T
    assert expected > 2 * (4e-3 + 2 * W) / 0.5  # the worker's 8.4 ms of CPU at half speed fit
    assert p.ttft_ms == pytest.approx(1000 * expected)


def test_peak_memory_by_hand():
    cfg = tiny_config(layers=2)
    pl = placement(cfg, [1, 1], [2, 2])
    wl = Workload(Format(), context=16)
    master = predict(cfg, two_nodes(), pl, wl).ranks[0]
    # A 1-head, 128-column fp32 slice: qkv 12x8, o 8x4, gate_up 256x8, down 8x128, 2 norms of 8.
    layer = 4 * (12 * 8 + 8 * 4 + 256 * 8 + 8 * 128 + 2 * 8)
    assert layer == 12864
    kv = 16 * 2 * 2 * 1 * 4 * 4  # positions x (K, V) x layers x KV heads x head_dim x fp32
    act = 16 * 6 * 256 * 4 + 32 * 1024**2  # widest temporary: the 2 x 128 gate/up columns
    head = 32 * 8 * 4 + 8 * 4  # tied table + final norm
    assert head_bytes(cfg, Format()) == head
    assert master.memory_bytes == 1000 + 2 * layer + kv + act + head


def test_a_streamed_rank_with_a_window_of_one_reads_in_line():
    cfg = tiny_config(layers=4)
    disk = 12864 * 1000  # one layer file per ms
    nodes = two_nodes(disk=disk)
    wl = Workload(Format(), position=16, context=16)
    resident = predict(cfg, nodes, placement(cfg, [1, 1], [4, 4]), wl)
    one = predict(cfg, nodes, placement(cfg, [1, 1], [4, 1]), wl)
    # The worker's attention phase gains its 1 ms read every layer: 4 layers, +4 ms.
    assert layer_bytes(cfg, plan_partition(cfg, [1, 1]).slices[1], Format()).disk == 12864
    assert one.ms_per_token == pytest.approx(resident.ms_per_token + 4.0)
    assert one.ranks[1].disk_ms == pytest.approx(4.0)


def test_a_streamed_rank_with_a_window_overlaps_its_reads():
    cfg = tiny_config(layers=4)
    wl = Workload(Format(), position=16, context=16)
    fast = two_nodes(disk=12864 * 1000)  # 1 ms a layer: hidden behind ~6 ms a layer
    p = predict(cfg, fast, placement(cfg, [1, 1], [4, 2]), wl)
    resident = predict(cfg, fast, placement(cfg, [1, 1], [4, 4]), wl)
    assert p.ms_per_token == pytest.approx(resident.ms_per_token)
    assert p.ranks[1].disk_ms == 0.0
    slow = two_nodes(disk=12864 * 10)  # 100 ms a layer: the disk sets the pace
    p = predict(cfg, slow, placement(cfg, [1, 1], [4, 2]), wl)
    assert p.ms_per_token == pytest.approx(4 * 100.0)  # the loader never stops reading
    assert "disk reads of rank 1" in p.bottleneck
    with pytest.raises(PlacementError, match="disk speed is unknown"):
        predict(cfg, two_nodes(), placement(cfg, [1, 1], [4, 2]), wl)


def test_pipelines_are_refused_until_the_runtime_runs_them():
    cfg = tiny_config(layers=2)
    one = placement(cfg, [1, 1], [2, 2])
    two_stages = Placement(
        (Stage((0, 1), one.stages[0].ranks[:1]), Stage((1, 2), one.stages[0].ranks[1:])),
        (1, 1),
    )
    with pytest.raises(PlacementError, match="pipeline"):
        predict(cfg, two_nodes(), two_stages, Workload(Format()))
