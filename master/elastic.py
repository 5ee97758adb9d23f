"""Elastic clusters: a generation survives the loss of a worker, and the cluster
grows back.

When a rank is lost (killed, frozen, unplugged), the broken session is closed,
the master re-plans over the workers still alive (`open_model` with fewer
workers: a split for the smaller world, made once and cached, pushed to a
survivor only where its store lacks it, verified as every push is) and the
caller replays what its sequences had in the KV cache (prompt + tokens so far)
before going on. With no worker left the master continues alone, if its memory
allows. Greedy tokens are those of an uninterrupted run, and so are seeded
samples: a token's noise depends on its seed and position, not on the world.

A worker that comes back (or one that never answered) is taken back at a
request boundary, never mid-generation: `grow()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tpi.comm.links import ClusterError, display_address, normalize_address, tcp_reachable

MAX_REPLANS = 4  # re-opens per recovery (each may find one more worker gone)
POLICIES = ("continue", "fail")


@dataclass
class Recovery:
    """One loss survived, as reported to users (stream, CLI, /health, bench)."""

    lost: str  # the error that named the lost rank
    world: int  # ranks after the recovery
    seconds: float  # from the loss to the re-planned cluster being ready
    at: float = field(default_factory=time.time)

    def describe(self) -> str:
        return f"{self.lost}; continuing on {self.world} rank(s) (resumed in {self.seconds:.1f} s)"

    def to_dict(self) -> dict:
        return {"lost": self.lost, "world": self.world, "seconds": round(self.seconds, 3)}


def _key(address: str) -> str:
    return display_address(normalize_address(address))


def prestage(opener: Callable[[list[str]], object], workers: list[str]) -> float:
    """Give every worker, ahead of time, the shard it would need if any one other
    worker were lost: the cluster is opened once without each worker in turn
    (the split for the smaller world is made once and cached; each open pushes
    what a store lacks), so a recovery later needs no push. Returns the seconds
    it took; costs each worker the disk of up to two shards of the smaller world."""
    t0 = time.perf_counter()
    if len(workers) >= 2:  # with one worker, losing it leaves the master alone
        for w in workers:
            loaded = opener([x for x in workers if x != w])
            close = getattr(loaded, "close", None)
            if close is not None:
                close("pre-staged")
    return time.perf_counter() - t0


class ElasticCluster:
    """The model of a master whose workers may come and go.

    `opener(workers)` loads the model over these workers (and the master);
    `loaded` is what it returned for `workers`, the configured list."""

    def __init__(
        self,
        opener: Callable[[list[str]], object],
        loaded,
        workers: list[str],
        echo: Callable[[str], None] = lambda _m: None,
        policy: str = "continue",
        discover: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        self.opener = opener
        self.loaded = loaded
        self.configured = list(workers)
        self.active = list(workers)
        self.echo = echo
        self.policy = policy
        self.recoveries: list[Recovery] = []
        # --workers auto: workers found later (given those active) join the cluster.
        self.discover = discover

    @property
    def world(self) -> int:
        return len(self.active) + 1

    def can_recover(self, error: BaseException) -> bool:
        return (
            self.policy == "continue"
            and isinstance(error, ClusterError)
            and error.address is not None
            and _key(error.address) in {_key(w) for w in self.active}
        )

    def recover(self, error: ClusterError):
        """Close the broken session and load the model over the survivors; returns the
        new loaded model (raises the original error when it cannot continue)."""
        if not self.can_recover(error):
            raise error
        t0 = time.perf_counter()
        self._close("a rank was lost")
        lost = {_key(error.address)}
        for _ in range(MAX_REPLANS):
            self.active = [w for w in self.active if _key(w) not in lost]
            try:
                self.loaded = self.opener(list(self.active))
                break
            except ClusterError as e:
                if e.address is None or _key(e.address) not in {_key(w) for w in self.active}:
                    # Not a worker's fault (e.g. a split made for one world size only):
                    # the user needs the loss first, then why it cannot be survived.
                    raise ClusterError(
                        f"{error}; cannot continue on the survivors: {e}", address=error.address
                    ) from e
                lost.add(_key(e.address))  # another one gone (e.g. during the push)
        else:
            raise error
        event = Recovery(str(error), self.world, time.perf_counter() - t0)
        self.recoveries.append(event)
        self.echo(event.describe())
        return self.loaded

    def grow(self) -> bool:
        """At a request boundary: take back configured workers that answer again (and,
        with `discover`, take in new ones). Returns whether the cluster was re-opened
        (the old one is closed)."""
        joined = self._newcomers()
        missing = [w for w in self.configured if _key(w) not in {_key(a) for a in self.active}]
        back = [w for w in missing if tcp_reachable(w)]
        if not back:
            return False
        have = {_key(w) for w in [*self.active, *back]}
        wanted = [w for w in self.configured if _key(w) in have]
        old = self.loaded
        alone = getattr(old, "cluster", None) is None  # a master alone stays usable
        try:
            self._close("growing back")
            self.loaded = self.opener(wanted)
        except ClusterError as e:
            self.echo(f"could not take back {', '.join(back)}: {e}")
            self.loaded = old if alone else self.opener(list(self.active))
            return False
        self.active = wanted
        how = "joined" if set(back) <= set(joined) else "back"
        self.echo(f"worker(s) {', '.join(back)} {how}: running on {self.world} ranks")
        return True

    def _newcomers(self) -> list[str]:
        if self.discover is None:
            return []
        known = {_key(w) for w in self.configured}
        joined = [w for w in self.discover(list(self.active)) if _key(w) not in known]
        self.configured += joined
        return joined

    def _close(self, reason: str) -> None:
        close = getattr(self.loaded, "close", None)
        if close is not None:
            close(reason)
