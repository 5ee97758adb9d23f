"""A master's connections to its workers: connect, prove the secret both ways,
and the requests any session makes between passes.

connect -> HELLO to every worker -> CHALLENGE/AUTH (the shared secret, both
ways: tpi.comm.auth) -> WELCOME. A worker that refuses or does not answer is
named by rank and address. Every message from the workers then goes through
one Inbox, filed by kind. A model session (tpi.master.cluster) goes on to push
shards and load them; a probe session (tpi.master.probe) only measures.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from tpi.comm.auth import check, hello_body, new_nonce, proof
from tpi.comm.curve import CurveKeys
from tpi.comm.inbox import Inbox
from tpi.comm.links import ClusterError, LinkLost, LinkSet, normalize_address
from tpi.comm.wire import Kind, Message, encode_control

CONNECT_TIMEOUT_S = 10.0  # no TCP connection by then: nobody is listening
HANDSHAKE_TIMEOUT_S = 60.0  # connected yet silent this long: something is wrong there


@dataclass
class WorkerConnections:
    addresses: list[str]
    timeout_s: float = 60.0
    echo: Callable[[str], None] = print
    secret: bytes | None = field(default=None, repr=False)  # None: --insecure
    curve: CurveKeys | None = field(default=None, repr=False)
    session: int = field(default_factory=lambda: secrets.randbits(62))

    def __post_init__(self) -> None:
        self.world = len(self.addresses) + 1
        self.ctx = zmq.Context()
        self.links = LinkSet(self.ctx)
        self.inbox = Inbox(self.links, self.session)

    def _manifest_of(self, rank: int) -> str:
        """What HELLO asks `rank` to run (a shard's manifest hash, or a probe)."""
        raise NotImplementedError

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close("setup failed")
            raise

    def _start(self) -> None:
        self._handshake()

    def _expect(
        self,
        kinds: set[Kind],
        timeout_s: float,
        ranks: set[int],
        what: str,
        connected_timeout_s: float | None = None,
    ) -> dict[int, Message]:
        """One message of `kinds` from each of `ranks`; errors name the rank.

        With `connected_timeout_s`, ranks whose TCP connection is up get that
        longer deadline (they are there, just busy) instead of `timeout_s`.
        """
        got: dict[int, Message] = {}
        start = time.monotonic()
        while len(got) < len(ranks):
            waiting = ranks - set(got)
            patient = connected_timeout_s is not None and all(
                self.links.links[r - 1].connected for r in waiting
            )
            deadline = start + (connected_timeout_s if patient else timeout_s)
            try:
                link, msg = self.inbox.take(
                    kinds, min(1.0, max(0.01, deadline - time.monotonic())), waiting, what
                )
            except TimeoutError:
                if time.monotonic() < deadline:
                    continue
                r = min(waiting)
                raise LinkLost(r, self.links.links[r - 1].name, f"no answer {what}") from None
            got[link.rank] = msg
        return got

    def _handshake(self) -> dict[int, Message]:
        """Connect every worker, say HELLO, prove the secret both ways; returns each
        rank's WELCOME. A worker that does not answer is named (and blamed)."""
        for r, addr in enumerate(self.addresses, start=1):
            self.links.connect(
                r, normalize_address(addr), self.curve.secure_client if self.curve else None
            )
        ranks = set(range(1, self.world))
        nonces = {r: new_nonce() for r in ranks}
        for link in self.links.links:
            hello = hello_body(
                self.session,
                link.rank,
                self.world,
                self._manifest_of(link.rank),
                nonces[link.rank],
                self.secret is not None,
            )
            link.send([encode_control(Kind.HELLO, hello)])
        try:
            first = self._expect(
                {Kind.CHALLENGE, Kind.WELCOME},
                CONNECT_TIMEOUT_S,
                ranks,
                "the handshake",
                connected_timeout_s=HANDSHAKE_TIMEOUT_S,
            )
        except LinkLost as e:
            hint = " with the same --curve keys" if self.curve else ""
            raise ClusterError(
                f"rank {e.rank} ({e.address}) does not answer; is 'tpi worker --listen tcp://{e.address}' "
                f"running there{hint} and reachable?",
                e.address,
            ) from None
        return self._authenticate(first, nonces)

    def _authenticate(
        self, first: dict[int, Message], nonces: dict[int, str]
    ) -> dict[int, Message]:
        """Check each worker's proof of the secret and prove ours (tpi.comm.auth)."""
        for r, msg in first.items():
            link = self.links.links[r - 1]
            if self.secret is None:
                if msg.kind == Kind.CHALLENGE:
                    raise ClusterError(
                        f"rank {r} ({link.name}) requires the cluster's shared secret: set TPI_SECRET "
                        "or --secret-file on the master"
                    )
                continue
            if msg.kind != Kind.CHALLENGE:
                raise ClusterError(
                    f"rank {r} ({link.name}) did not prove the shared secret (is it running with --insecure?)"
                )
            nonce_w = msg.body["nonce"]
            if not check(
                self.secret, msg.body["proof"], "worker", nonces[r], nonce_w, self.session
            ):
                raise ClusterError(
                    f"rank {r} ({link.name}) failed authentication: it does not know the shared secret"
                )
            answer = proof(self.secret, "master", nonces[r], nonce_w, self.session)
            link.send([encode_control(Kind.AUTH, {"session": self.session, "proof": answer})])
        if self.secret is None:
            return first
        return self._expect({Kind.WELCOME}, CONNECT_TIMEOUT_S, set(first), "after authentication")

    def check_links(self) -> None:
        """Between generations: file whatever arrived and raise LinkLost for a link
        that dropped (a worker that died or was frozen while nothing ran)."""
        self.inbox.receive(0.0, where="between requests")

    def measure_rtt(self, pings: int = 5) -> float:
        """Median round trip to the slowest worker (control message, no payload)."""
        times = []
        for _ in range(pings):
            t0 = time.perf_counter()
            for link in self.links.links:
                link.send([encode_control(Kind.PING, {"session": self.session})])
            self._expect({Kind.PONG}, CONNECT_TIMEOUT_S, set(range(1, self.world)), "a ping")
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def stats(self) -> dict[int, dict]:
        """Counters from every worker (asks them; between generations only)."""
        for link in self.links.links:
            link.send([encode_control(Kind.STATS_REQUEST, {"session": self.session})])
        got = self._expect(
            {Kind.STATS}, CONNECT_TIMEOUT_S, set(range(1, self.world)), "a stats request"
        )
        return {r: m.body["stats"] for r, m in got.items()}

    def close(self, reason: str = "done") -> None:
        for link in self.links.links:
            with contextlib.suppress(zmq.ZMQError):
                link.send([encode_control(Kind.END, {"session": self.session, "reason": reason})])
        self.links.close(linger_ms=500)  # let the END frames leave
        self.ctx.term()
