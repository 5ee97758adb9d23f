"""How many chunks to cut a prefill into so its allreduces hide behind compute.

With n chunks moving through a layer one after the other, the allreduce of a
chunk travels while the other n - 1 chunks of the same phase compute; it is
hidden once (n - 1) / n * T * t >= RTT, where T is the number of tokens and t
the compute time of one token through one phase on this node. Smaller chunks
make smaller matmuls (less efficient) and more messages, so: no chunking when
the link is fast next to compute (RTT under 5% of a phase) or the prompt is
short; else the fewest chunks that hide the round trip, at most MAX_CHUNKS.

RTT comes from a ping at session start, t from a short matmul timing at load
and then from the prefills actually run (an exponential average).

A batch of sequences is cut the same way, between sequences (NanoFlow's
nano-batches), but its cost is not linear in its rows: a decode-sized pass
reads every weight once whatever its rows (a fixed a per phase) and then pays b
per row. With n nano-batches of a batch of B rows, a phase takes about
max(n * a + b * B, a + b * B / n + RTT) against a + b * B + RTT without: a gain
only where compute per row is large next to the weight reads and the round
trip is not negligible. a is learnt from one-token passes (a + b), b from prefills.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

MAX_CHUNKS = 4
MIN_CHUNK_TOKENS = 16
NEGLIGIBLE_RTT_SHARE = 0.05


def choose_nano_batches(
    sequences: int, rows: int, rtt_s: float, fixed_s: float, row_s: float
) -> int:
    """Nano-batches for a pass of `rows` rows over `sequences` sequences (1 = none)."""

    def phase(n: int) -> float:
        if n == 1:
            return fixed_s + row_s * rows + rtt_s
        return max(n * fixed_s + row_s * rows, fixed_s + row_s * rows / n + rtt_s)

    best = min(range(1, min(MAX_CHUNKS, sequences) + 1), key=phase)
    # Only where it pays clearly: a mispredicted split costs a weight read per piece.
    return best if phase(best) < 0.9 * phase(1) else 1


def choose_chunks(tokens: int, rtt_s: float, token_phase_s: float) -> int:
    """Chunks for a prefill of `tokens` (1 = no overlap)."""
    most = min(MAX_CHUNKS, tokens // MIN_CHUNK_TOKENS)
    phase_s = tokens * token_phase_s
    if most < 2 or rtt_s <= NEGLIGIBLE_RTT_SHARE * phase_s:
        return 1
    for n in range(2, most + 1):
        if (n - 1) / n * phase_s >= rtt_s:
            return n
    return most


PROBE_MAX_WIDTH = 1024  # 4 x 1024 x 1024 fp32 = 16 MB


def measure_flops_per_second(hidden: int, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matmul speed on a prefill-shaped product (best of a few runs).

    The probe matrix is capped at 16 MB: one of the model's own width would be
    4 x hidden^2 floats, 1 GB for a 70B-shaped model (hidden 8192), more than a
    2 GB device has left next to its window and head (it was OOM-killed there)."""
    k = min(hidden, PROBE_MAX_WIDTH)
    x = torch.randn(64, k, dtype=dtype)
    w = torch.randn(4 * k, k, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.shape[0] * w.numel() / max(best, 1e-9)


@dataclass
class PrefillChunking:
    """Chooses chunk counts for one master: RTT fixed per session, speed learnt."""

    rtt_s: float
    token_phase_s: float  # compute seconds per token per phase (attention or MLP)
    fixed: int | None = None  # --prefill-chunks N (None: automatic)
    fixed_nano: int | None = None  # --nano-batches N (None: automatic)
    one_token_phase_s: float | None = None  # a one-token pass, per phase (learnt)

    @classmethod
    def estimate(
        cls, rtt_s: float, flops_per_token_phase: float, hidden: int, fixed: int | None = None
    ) -> PrefillChunking:
        speed = measure_flops_per_second(hidden)
        return cls(rtt_s, flops_per_token_phase / speed, fixed)

    def chunks(self, tokens: int) -> int:
        if self.fixed is not None:
            return max(1, min(self.fixed, tokens))
        return choose_chunks(tokens, self.rtt_s, self.token_phase_s)

    def nano_batches(self, sequences: int, rows: int) -> int:
        if self.fixed_nano is not None:
            return max(1, min(self.fixed_nano, sequences))
        if self.one_token_phase_s is None:
            return 1  # not measured yet
        fixed = max(0.0, self.one_token_phase_s - self.token_phase_s)
        return choose_nano_batches(sequences, rows, self.rtt_s, fixed, self.token_phase_s)

    def observe(self, tokens: int, phases: int, compute_s: float) -> None:
        """Learn from a pass: `compute_s` seconds of this node's own compute."""
        if phases < 1 or compute_s <= 0:
            return
        per_phase = compute_s / phases
        if tokens == 1:
            old = self.one_token_phase_s
            self.one_token_phase_s = per_phase if old is None else 0.5 * old + 0.5 * per_phase
        elif tokens >= MIN_CHUNK_TOKENS:  # short passes measure latency, not throughput
            self.token_phase_s = 0.5 * self.token_phase_s + 0.5 * per_phase / tokens
