"""The served model's failure and recovery (master/serve/model_holder.py), with the
cluster and the elastic re-planner faked (they own the sockets) and a fake clock
for the reconnect rate limit."""

from __future__ import annotations

import pytest

import tpi.master.serve.model_holder as model_holder
from tpi.comm.links import LinkLost
from tpi.errors import TpiError
from tpi.master.serve.model_holder import ModelDown, ModelHolder

LOST = LinkLost(1, "10.0.0.2:5555", "connection lost")


class Cluster:
    def __init__(self, broken: BaseException | None = None) -> None:
        self.broken = broken
        self.checked = 0

    def check_links(self) -> None:
        self.checked += 1
        if self.broken is not None:
            raise self.broken


class Loaded:
    """A loaded model as the holder sees it: its cluster, and closing it."""

    def __init__(self, cluster: Cluster | None = None) -> None:
        self.cluster = cluster
        self.engine = object()
        self.closed: list[str] = []

    def close(self, reason: str = "done") -> None:
        self.closed.append(reason)


class Elastic:
    def __init__(self, loaded: Loaded, recovers: bool = True) -> None:
        self.loaded = loaded
        self.recovers = recovers
        self.configured, self.active = ["a", "b", "c"], ["a", "b"]
        self.grown = 0

    def can_recover(self, e) -> bool:
        return True

    def recover(self, e) -> Loaded:
        if not self.recovers:
            raise TpiError("too few workers left for this model")
        self.loaded = Loaded(Cluster())
        return self.loaded

    def grow(self) -> bool:
        self.grown += 1
        self.loaded = Loaded(Cluster())
        return True


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(model_holder.time, "monotonic", lambda: now[0])
    return now


def test_a_dead_link_noticed_between_requests_closes_the_model_once():
    cluster = Cluster(LOST)
    loaded = Loaded(cluster)
    holder = ModelHolder(loaded)
    holder.check()
    assert holder.error == str(LOST) and holder.failures == 1
    assert loaded.closed == ["a rank failed"]
    holder.check()  # already down: the cluster is not asked again
    assert cluster.checked == 1 and holder.failures == 1
    with pytest.raises(ModelDown, match="rank 1 .* stopped answering"):
        holder.ensure()
    assert not holder.may_retry()  # no way to reconnect


def test_a_model_without_a_cluster_has_nothing_to_check():
    holder = ModelHolder(Loaded())
    holder.check()
    assert holder.error is None and holder.ensure() is holder.loaded


def test_an_elastic_cluster_replans_at_once_when_a_link_dies():
    holder = ModelHolder(Loaded(Cluster(LOST)), elastic=Elastic(Loaded()))
    before = holder.loaded
    holder.check()
    assert holder.loaded is not before and holder.loaded is holder.elastic.loaded
    assert (holder.error, holder.failures, holder.recoveries) == (None, 1, 1)
    assert before.closed == []  # the re-planner owns what happens to the old session


def test_an_elastic_cluster_that_cannot_replan_is_down_with_the_reason():
    holder = ModelHolder(Loaded(Cluster(LOST)), elastic=Elastic(Loaded(), recovers=False))
    holder.check()  # not raised: the next request is told
    assert holder.error == "too few workers left for this model" and holder.failures == 1
    with pytest.raises(TpiError, match="too few workers"):
        holder.recover(LOST)
    assert holder.failures == 2 and holder.recoveries == 0


def test_reconnecting_is_tried_at_most_every_retry_interval(clock):
    attempts: list[float] = []
    fresh = Loaded(Cluster())

    def reopen():
        attempts.append(clock[0])
        if len(attempts) == 1:
            raise TpiError("worker 10.0.0.2:5555 is not reachable")
        return fresh

    elastic = Elastic(Loaded())
    holder = ModelHolder(Loaded(Cluster()), reopen, retry_interval=5.0, elastic=elastic)
    holder.failed(LOST)
    assert holder.may_retry()
    with pytest.raises(ModelDown, match="not reachable"):
        holder.ensure()
    assert holder.error == "worker 10.0.0.2:5555 is not reachable"  # the newest reason
    clock[0] += 4.9
    assert not holder.may_retry()
    with pytest.raises(ModelDown):
        holder.ensure()
    assert len(attempts) == 1  # refused without trying
    clock[0] += 0.2
    assert holder.ensure() is fresh
    assert (holder.error, holder.recoveries, len(attempts)) == (None, 1, 2)
    # A fresh start counts every configured worker in again.
    assert elastic.loaded is fresh and elastic.active == elastic.configured


def test_returning_workers_are_taken_back_at_most_every_retry_interval(clock):
    elastic = Elastic(Loaded())
    holder = ModelHolder(Loaded(Cluster()), retry_interval=5.0, elastic=elastic)
    assert holder.grow() is False and elastic.grown == 0  # just started
    clock[0] += 5.0
    assert holder.grow() is True and holder.loaded is elastic.loaded and elastic.grown == 1
    assert holder.grow() is False and elastic.grown == 1
    holder.failed(LOST)
    clock[0] += 5.0
    assert holder.grow() is False and elastic.grown == 1  # down: a reconnect comes first
    assert ModelHolder(Loaded()).grow() is False  # not elastic
