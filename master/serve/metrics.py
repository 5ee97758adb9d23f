"""What `tpi serve` exposes at /metrics, in Prometheus' text format (written by
the well-kept prometheus-client, one registry per server).

Counters and histograms are updated by the generation thread as tokens come;
gauges (queue, batch, KV memory, allreduce totals) are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: inter-token gaps of a few ms on one node to seconds on slow clusters.
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tpi_requests", "Requests finished, by how they ended.", ["finish_reason"], registry=r
        )
        self.tokens = Counter("tpi_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "tpi_time_to_first_token_seconds",
            "From a request's arrival to its first token (queueing included).",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "tpi_inter_token_seconds",
            "Gap between consecutive tokens of one request.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.steps = Counter("tpi_batch_steps", "Forward passes run for requests.", registry=r)

    def gauges(
        self,
        waiting: Callable[[], float],
        running: Callable[[], float],
        kv_bytes: Callable[[], float],
        allreduce: Callable[[], tuple[float, float]],
        failures: Callable[[], float],
        recoveries: Callable[[], float],
    ) -> None:
        """Values read at scrape time from the server's state."""
        r = self.registry
        Gauge(
            "tpi_requests_waiting", "Requests admitted, not yet running.", registry=r
        ).set_function(waiting)
        Gauge("tpi_batch_size", "Requests in the running batch.", registry=r).set_function(running)
        Gauge(
            "tpi_kv_cache_bytes", "KV-cache bytes held or promised on the master.", registry=r
        ).set_function(kv_bytes)
        Gauge(
            "tpi_allreduce_seconds_total",
            "Seconds rank 0 spent in allreduces (rate / tpi_allreduces_total = mean latency).",
            registry=r,
        ).set_function(lambda: allreduce()[1])
        Gauge("tpi_allreduces_total", "Allreduces rank 0 completed.", registry=r).set_function(
            lambda: allreduce()[0]
        )
        Gauge(
            "tpi_cluster_failures_total",
            "Times a rank was lost and the cluster closed.",
            registry=r,
        ).set_function(failures)
        Gauge(
            "tpi_cluster_recoveries_total",
            "Times a failed cluster was connected again.",
            registry=r,
        ).set_function(recoveries)
