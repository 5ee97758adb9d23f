"""The per-node numbers `tpi bench` reports: memory, disk, compute, network."""

from __future__ import annotations

from tpi.system.process_memory import peak_rss_bytes, rss_bytes


def node_stats(
    layers,
    allreduce_stats,
    forward_seconds: float,
    steps: int,
    decoder=None,
    head_bytes: int = 0,
) -> dict:
    """`layers` is a SlidingWindowLayers (or None), `allreduce_stats` an AllreduceStats (or None).

    compute_seconds = forward time not spent waiting for disk or the network.
    What one decode token reads from RAM: every weight of this node's layer slices
    once (weight_bytes_per_pass: quantized weights count as stored), its LM head
    (head_bytes) and the KV cache up to the current position (kv_bytes_per_position
    per cached token).
    """
    out: dict = {
        "steps": steps,
        "forward_seconds": round(forward_seconds, 6),
        "rss_bytes": rss_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    blocked = 0.0
    if layers is not None:
        out["window"] = layers.window
        out["resident_layer_bytes"] = layers.resident_bytes
        out.update(layers.stats.to_dict())
        blocked = layers.stats.blocked_seconds
    allreduce = 0.0
    if allreduce_stats is not None:
        out.update(allreduce_stats.to_dict())
        allreduce = allreduce_stats.seconds
    out["compute_seconds"] = round(max(0.0, forward_seconds - blocked - allreduce), 6)
    if layers is not None:
        out["weight_bytes_per_pass"] = layers.pass_bytes
    out["head_bytes"] = head_bytes
    if decoder is not None:
        out["kv_bytes_per_position"] = decoder.caches.bytes_per_position
    return out
