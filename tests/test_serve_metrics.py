"""What /metrics exposes (master/serve/metrics.py), scraped from the registry
directly: gauges read at scrape time, each from its own source. (Counting what a
live server served: test_serve.py.)"""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tpi.master.serve.metrics import ServeMetrics


def _scrape(m: ServeMetrics) -> dict[str, float]:
    text = generate_latest(m.registry).decode()
    return {
        s.name + "".join(f"[{v}]" for v in s.labels.values()): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _metrics(state: dict) -> ServeMetrics:
    m = ServeMetrics()
    m.gauges(
        waiting=lambda: state["waiting"],
        running=lambda: state["running"],
        kv_bytes=lambda: state["kv"],
        allreduce=lambda: (state["allreduces"], state["allreduce_s"]),
        failures=lambda: state["failures"],
        recoveries=lambda: state["recoveries"],
    )
    return m


def test_gauges_are_read_from_their_own_source_at_each_scrape():
    state = dict(
        waiting=0, running=0, kv=0, allreduces=0, allreduce_s=0.0, failures=0, recoveries=0
    )
    m = _metrics(state)
    state.update(
        waiting=3, running=2, kv=4096, allreduces=120, allreduce_s=0.75, failures=1, recoveries=1
    )
    got = _scrape(m)
    assert got["tpi_requests_waiting"] == 3 and got["tpi_batch_size"] == 2
    assert got["tpi_kv_cache_bytes"] == 4096
    assert got["tpi_allreduces_total"] == 120 and got["tpi_allreduce_seconds_total"] == 0.75
    assert got["tpi_cluster_failures_total"] == 1 and got["tpi_cluster_recoveries_total"] == 1
    state.update(waiting=0, running=1)
    got = _scrape(m)
    assert got["tpi_requests_waiting"] == 0 and got["tpi_batch_size"] == 1


def test_counters_and_histograms_count_by_reason_and_bucket():
    m = ServeMetrics()
    m.requests.labels("length").inc()
    m.requests.labels("stop").inc(2)
    m.ttft.observe(0.3)
    m.inter_token.observe(0.015)
    got = _scrape(m)
    assert got["tpi_requests_total[length]"] == 1 and got["tpi_requests_total[stop]"] == 2
    assert got["tpi_time_to_first_token_seconds_bucket[0.25]"] == 0
    assert got["tpi_time_to_first_token_seconds_bucket[0.5]"] == 1
    assert got["tpi_inter_token_seconds_bucket[0.01]"] == 0
    assert got["tpi_inter_token_seconds_bucket[0.02]"] == 1


def test_two_servers_in_one_process_keep_separate_counts():
    a, b = ServeMetrics(), ServeMetrics()  # a shared registry would refuse the second
    a.tokens.inc(5)
    assert _scrape(a)["tpi_generated_tokens_total"] == 5
    assert _scrape(b)["tpi_generated_tokens_total"] == 0
