"""The model a long-running master serves, and its recovery after a failure.

When a worker fails, the broken session is ended at once (the remaining
workers go back to waiting); later requests try to connect afresh, at most
every `retry_interval` seconds, so a worker that comes back is used again
without restarting the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tpi.errors import TpiError


class ModelDown(TpiError):
    pass


class ModelHolder:
    def __init__(
        self, loaded, reopen: Callable[[], object] | None = None, retry_interval: float = 5.0
    ) -> None:
        self.loaded = loaded
        self.reopen = reopen
        self.retry_interval = retry_interval
        self.error: str | None = None
        self._last_attempt = 0.0
        self._lock = threading.Lock()
        self.failures = 0  # times the model failed (for /metrics)
        self.recoveries = 0  # times it was connected again

    def check(self) -> None:
        """Between requests: notice a worker that died meanwhile (its link drops)."""
        cluster = self.loaded.cluster
        if self.error is not None or cluster is None:
            return
        try:
            cluster.check_links()
        except TpiError as e:
            self.failed(e)

    def failed(self, e: BaseException) -> None:
        with self._lock:
            self.error = str(e)
            self.failures += 1
            self.loaded.close("a rank failed")

    def may_retry(self) -> bool:
        """Whether a reconnect would be attempted now (they are rate-limited)."""
        return (
            self.reopen is not None and time.monotonic() - self._last_attempt >= self.retry_interval
        )

    def ensure(self):
        """The working model, reconnecting if it failed; raises ModelDown while it cannot."""
        with self._lock:
            if self.error is None:
                return self.loaded
            if self.reopen is None or time.monotonic() - self._last_attempt < self.retry_interval:
                raise ModelDown(self.error)
            self._last_attempt = time.monotonic()
            try:
                self.loaded = self.reopen()
            except TpiError as e:
                self.error = str(e)
                raise ModelDown(self.error) from None
            self.error = None
            self.recoveries += 1
            return self.loaded
