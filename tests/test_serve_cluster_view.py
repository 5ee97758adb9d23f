"""The chat page's cluster view (master/serve/cluster_view.py) over a model served
by this process alone: what each node shows, and the per-pass breakdown sampled
between passes (on a fake clock)."""

from __future__ import annotations

import pytest

import tpi.master.serve.cluster_view as cluster_view
from tests.serve_helpers import tiny_holder
from tpi.master.batching import Batcher, BatchSequence
from tpi.master.sampling import SamplingParams
from tpi.master.serve.cluster_view import ClusterMonitor


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(cluster_view.time, "monotonic", lambda: now[0])
    return now


@pytest.fixture
def holder(tiny_llama_dir, plain_torch):
    return tiny_holder(tiny_llama_dir)


def _passes(holder, n: int, monitor: ClusterMonitor | None = None) -> None:
    """`n` forward passes of one sequence (a prefill, then decode steps)."""
    batcher = Batcher(holder.loaded.engine, 1)
    batcher.submit(BatchSequence([5, 6, 7], SamplingParams(max_new_tokens=n)))
    for _ in range(n):
        batcher.step()
        if monitor is not None:
            monitor.maybe_sample()
    assert not batcher.busy


def test_a_single_node_is_the_whole_model_on_the_master(holder):
    view = ClusterMonitor(holder).view()
    cfg = holder.loaded.engine.cfg
    assert view["plan"] is None and view["error"] is None and view["sample_s"] == 2.0
    assert view["nodes"] == [
        {
            "rank": 0,
            "name": "master",
            "state": "ok",
            "q_heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads,
            "mlp_columns": cfg.intermediate_size,
            "mlp_share": 1.0,
            "window": cfg.num_layers,
            "layers": cfg.num_layers,
            "first_layer": 0,
            "limit_bytes": None,
            "limit_source": None,
            "planned_bytes": None,
            "rtt_ms": None,
            "rss_bytes": None,
            "live": None,  # nothing sampled yet
            "predicted": None,
        }
    ]


def test_passes_are_sampled_every_so_many_and_broken_down_per_pass(holder, clock, monkeypatch):
    monkeypatch.setattr(cluster_view, "SAMPLE_PASSES", 3)
    monitor = ClusterMonitor(holder)
    monitor.maybe_sample()  # the first: a baseline, nothing to show per pass yet
    _passes(holder, 2, monitor)
    assert monitor.view()["nodes"][0]["live"] is None  # 2 passes, well within SAMPLE_S
    _passes(holder, 1, monitor)
    node = monitor.view()["nodes"][0]
    live = node["live"]
    assert live["passes"] == 3 and live["forward_ms"] > 0
    assert live["allreduce_ms"] == 0 and live["disk_ms"] == 0  # alone, resident
    assert live["compute_ms"] == live["forward_ms"]
    assert node["rss_bytes"] > 0


def test_after_sample_s_a_single_pass_is_sampled(holder, clock):
    monitor = ClusterMonitor(holder)
    monitor.maybe_sample()
    _passes(holder, 1, monitor)
    assert monitor.view()["nodes"][0]["live"] is None
    clock[0] += cluster_view.SAMPLE_S
    _passes(holder, 1, monitor)
    assert monitor.view()["nodes"][0]["live"]["passes"] == 2


def test_a_reconnected_model_starts_its_counters_over(holder, tiny_llama_dir):
    monitor = ClusterMonitor(holder)
    monitor.sample()
    _passes(holder, 2)
    monitor.sample()
    assert monitor.view()["nodes"][0]["live"]["passes"] == 2
    holder.loaded = tiny_holder(tiny_llama_dir).loaded  # a new engine: its steps start at 0
    _passes(holder, 5)
    monitor.sample()  # a baseline for the new model: not 5 - 2 passes
    assert monitor.view()["nodes"][0]["live"]["passes"] == 2
    _passes(holder, 3)
    monitor.sample()
    assert monitor.view()["nodes"][0]["live"]["passes"] == 3
