"""The model a long-running master serves, and its recovery after a failure.

With an elastic cluster (tpi.master.elastic, the default), losing a worker
mid-generation re-plans over the survivors at once and the batch goes on
(`recover`); a worker that comes back is taken back between requests (`grow`).
Otherwise, or when that is impossible, the broken session is ended (the
remaining workers go back to waiting) and later requests try to connect afresh,
at most every `retry_interval` seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from tpi.comm.links import ClusterError
from tpi.errors import TpiError
from tpi.master.elastic import ElasticCluster


class ModelDown(TpiError):
    pass


class ModelHolder:
    def __init__(
        self,
        loaded,
        reopen: Callable[[], object] | None = None,
        retry_interval: float = 5.0,
        elastic: ElasticCluster | None = None,
    ) -> None:
        self.loaded = loaded
        self.elastic = elastic
        self._last_grow = time.monotonic()
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
        except ClusterError as e:
            if self.elastic is not None and self.elastic.can_recover(e):
                with contextlib.suppress(TpiError):  # recover() recorded a failure
                    self.recover(e)  # re-plan now, not in the next request's way
                return
            self.failed(e)
        except TpiError as e:
            self.failed(e)

    def recover(self, e: ClusterError):
        """A rank was lost: the engine over the survivors (raises when impossible)."""
        with self._lock:
            try:
                self.loaded = self.elastic.recover(e)
            except BaseException as err:
                self.error = str(err)
                self.failures += 1
                raise
            self.failures += 1
            self.recoveries += 1
            return self.loaded.engine

    def grow(self) -> bool:
        """Between requests, now and then: take back workers that answer again."""
        if self.elastic is None or self.error is not None:
            return False
        if time.monotonic() - self._last_grow < self.retry_interval:
            return False
        self._last_grow = time.monotonic()
        with self._lock:
            grown = self.elastic.grow()
            self.loaded = self.elastic.loaded
        return grown

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
            if self.elastic is not None:  # a fresh start with every configured worker
                self.elastic.loaded = self.loaded
                self.elastic.active = list(self.elastic.configured)
            return self.loaded
