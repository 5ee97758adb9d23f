"""What one rank's collective work cost: calls, time, bytes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AllreduceStats:
    count: int = 0
    seconds: float = 0.0  # time the compute thread spent inside allreduce (start + wait)
    bytes_sent: int = 0
    bytes_received: int = 0

    def record(self, seconds: float, sent: int, received: int) -> None:
        self.count += 1
        self.seconds += seconds
        self.bytes_sent += sent
        self.bytes_received += received

    def to_dict(self) -> dict:
        return {
            "allreduces": self.count,
            "allreduce_seconds": round(self.seconds, 6),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }
