"""What the chat page's cluster view shows (GET /cluster): every node with its
share, window, memory used of its limit and link round trip, and a live
per-pass breakdown of its time (compute, waiting on sums, waiting on disk), next
to what the plan predicted.

The numbers are the ones `tpi bench` collects (tpi.runtime.node_stats), asked
of every rank between forward passes: `sample` runs on the generation thread
(which owns the cluster's sockets), at most every SAMPLE_S while requests run.
The web thread only reads the last snapshot.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tpi.errors import TpiError
from tpi.runtime.node_stats import node_stats
from tpi.storage.shard_reader import RankShard

SAMPLE_S = 2.0
SAMPLE_PASSES = 64
_COUNTERS = ("forward_seconds", "compute_seconds", "allreduce_seconds", "blocked_seconds", "steps")


class ClusterMonitor:
    def __init__(self, holder) -> None:
        self.holder = holder
        self._lock = threading.Lock()
        self._last: dict[int, dict] = {}  # rank -> counters at the last sample
        self._live: dict[int, dict] = {}  # rank -> per-pass breakdown since then
        self._rtt: dict[int, float] = {}
        self._rss: dict[int, int] = {}
        self._sampled = 0.0
        self._passes = 0
        self._loaded_id = None
        self._static: tuple[int, list[dict]] | None = None  # (id of the loaded model, per rank)

    # --- the generation thread --------------------------------------------------------

    def maybe_sample(self) -> None:
        """After a pass: sample every SAMPLE_S, or every SAMPLE_PASSES passes (fast
        models finish a whole answer in less than SAMPLE_S)."""
        self._passes += 1
        if time.monotonic() - self._sampled >= SAMPLE_S or self._passes >= SAMPLE_PASSES:
            self._passes = 0
            self.sample()

    def sample(self) -> None:
        """Counters from every rank; the per-pass breakdown of the passes since last time."""
        self._sampled = time.monotonic()
        loaded = self.holder.loaded
        if id(loaded) != self._loaded_id:  # reconnected: counters start over
            self._loaded_id, self._last = id(loaded), {}
        try:
            stats = {0: _master_stats(loaded)}
            cluster = loaded.cluster
            if cluster is not None:
                stats.update(cluster.stats())
                from tpi.master.probe import ping_ranks

                rtt = ping_ranks(cluster)
            else:
                rtt = {}
        except (TpiError, TimeoutError):
            return  # the next pass reports the failure; nothing to show meanwhile
        live = {}
        for r, s in stats.items():
            before = self._last.get(r)
            self._last[r] = {k: s.get(k, 0) for k in _COUNTERS}
            if before is None:
                continue
            passes = s.get("steps", 0) - before["steps"]
            if passes <= 0:
                continue

            def per(key: str, s=s, before=before, passes=passes) -> float:
                return round(1000 * (s.get(key, 0) - before[key]) / passes, 3)

            live[r] = {
                "passes": passes,
                "forward_ms": per("forward_seconds"),
                "compute_ms": per("compute_seconds"),
                "allreduce_ms": per("allreduce_seconds"),
                "disk_ms": per("blocked_seconds"),
            }
        with self._lock:
            self._live.update(live)
            self._rtt = rtt
            self._rss = {r: int(s.get("rss_bytes", 0)) for r, s in stats.items()}

    # --- the web thread ---------------------------------------------------------------

    def view(self) -> dict:
        loaded = self.holder.loaded
        plan = getattr(loaded, "plan", None)
        predicted = (
            {r["rank"]: r for r in plan.chosen.prediction.to_dict()["ranks"]} if plan else {}
        )
        with self._lock:
            live, rtt, rss = dict(self._live), dict(self._rtt), dict(self._rss)
        nodes = []
        if self._static is None or self._static[0] != id(loaded):
            self._static = (id(loaded), _static(loaded))
        for r, info in enumerate(self._static[1]):
            node = {
                **info,
                "rtt_ms": round(1000 * rtt[r], 3) if r in rtt else None,
                "rss_bytes": rss.get(r),
                "live": live.get(r),
                "predicted": predicted.get(r),
            }
            nodes.append(node)
        return {
            "nodes": nodes,
            "plan": None
            if plan is None
            else {
                "predicted_ms_per_token": round(plan.chosen.prediction.ms_per_token, 2),
                "reasons": list(plan.reasons),
            },
            "error": self.holder.error,
            "sample_s": SAMPLE_S,
        }


def _master_stats(loaded) -> dict:
    runtime, engine = loaded.runtime, loaded.engine
    col = loaded.cluster.topology.collective if loaded.cluster else None
    return node_stats(
        runtime.layers if runtime else None,
        col.stats if col else None,
        engine.forward_seconds,
        engine.steps,
    )


def _static(loaded) -> list[dict]:
    """Per rank: its address, share of the heads and MLP columns (of the whole model:
    a pipeline stage's rank holds only its layers), layers held, window and limit."""
    cluster, cfg = loaded.cluster, loaded.engine.cfg
    out = []
    world = cluster.world if cluster is not None else 1
    for r in range(world):
        rs = None
        if cluster is not None:
            rs = RankShard(Path(cluster.rank_dir(r))).manifest.rank_slice
        elif loaded.runtime is not None:
            rs = RankShard(Path(loaded.model_dir)).manifest.rank_slice
        memory = (
            loaded.runtime.memory.to_dict()
            if r == 0 and loaded.runtime is not None
            else (cluster.worker_info.get(r, {}).get("memory") if cluster is not None else None)
        )
        link = cluster.links.links[r - 1] if cluster is not None and r > 0 else None
        # A pipeline stage's rank holds only its layers: its share is of the whole model.
        first, end = rs.layers if rs is not None and rs.layers else (0, cfg.num_layers)
        cols = rs.n_mlp if rs else cfg.intermediate_size
        out.append(
            {
                "rank": r,
                "name": "master" if r == 0 else link.name,
                "state": "ok" if link is None else ("lost" if link.lost else "ok"),
                "q_heads": rs.n_q if rs else cfg.num_heads,
                "kv_heads": rs.n_kv if rs else cfg.num_kv_heads,
                "mlp_columns": cols,
                "mlp_share": round(
                    cols * (end - first) / (cfg.intermediate_size * cfg.num_layers), 4
                ),
                "window": memory["window"] if memory else end - first,
                "layers": end - first,
                "first_layer": first,
                "limit_bytes": memory.get("budget_bytes") if memory else None,
                "limit_source": memory.get("budget_source") if memory else None,
                "planned_bytes": memory.get("need_bytes") if memory else None,
            }
        )
    return out
