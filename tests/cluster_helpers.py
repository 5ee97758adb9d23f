"""Real local worker processes for cluster tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tpi.master.loader import LoadedModel, open_model
from tpi.master.local_cluster import LocalCluster


@contextmanager
def local_workers(
    n: int, base: Path, extra_args: list[str] | None = None
) -> Iterator[LocalCluster]:
    lc = LocalCluster(n, base, threads=1, extra_args=extra_args or [])
    lc.start()
    try:
        yield lc
    finally:
        lc.stop()


def addresses(lc: LocalCluster) -> list[str]:
    return [w.address for w in lc.workers]


@contextmanager
def cluster_model(model_dir, workers: list[str], **kw) -> Iterator[LoadedModel]:
    lm = open_model(str(model_dir), kw.pop("dtype", "fp32"), quiet=True, workers=workers, **kw)
    try:
        yield lm
    finally:
        lm.close()


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, poll: float = 0.1) -> bool:
    """Whether `predicate()` comes true within `timeout` seconds, asked every `poll`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False
