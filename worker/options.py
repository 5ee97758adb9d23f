"""What a worker device decides for itself, whatever the master asks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerOptions:
    accept_push: bool = True
    data_port: int | None = 0  # the data link's port (0: any free one); None: no data link
    window: int | None = None  # layers resident (None: as the master asks, or all)
    budget_bytes: int | None = None  # this device's memory budget
    max_context: int | None = None
    secret: bytes | None = field(default=None, repr=False)  # None: --insecure (never logged)
