"""Direct links between workers, for pipeline hops that skip the master.

In a pipeline with direct hops, a later stage's lead sends the stage's output
straight to the next stage's ranks, and a later group's allreduce is hubbed by
its own lead. Those workers need links to each other. The master, which has
authenticated every one of them, asks each (PEERS, over its authenticated
control link) to open the links it needs: for every pair, one side connects to
the other's data port and presents a ticket the master made for that pair; the
other side accepts only a connection that presents it (tpi.comm.data_link, the
same opening as the master's own data link). A stranger's connection is
dropped at its opening, as on the master's data link. The worker answers
PEERED, with why a link failed if one did (the master then keeps the hops
through itself for the session).

Connections are made first, then accepted: a connect completes in the
listener's backlog before its acceptor calls accept, so no two workers wait on
each other.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from tpi.comm.data_link import DataLink, DataLinkClosed, DataListener, connect
from tpi.comm.wire import Kind, Message, ProtocolError, decode, encode_control

CONNECT_TIMEOUT_S = 5.0
ACCEPT_TIMEOUT_S = 10.0
MAX_PEERS = 64
MAX_PEER_PINGS = 50
PING_TIMEOUT_S = 5.0


class PeerSetupFailed(Exception):
    """A direct link could not be opened; the message names the peer and why."""


@dataclass(frozen=True)
class PeerLink:
    """One link this worker must have: `rank`'s ticket, and where to connect
    (None: the peer connects here)."""

    rank: int
    ticket: bytes
    host: str | None = None
    port: int | None = None

    @classmethod
    def from_body(cls, d: object) -> PeerLink:
        try:
            rank, ticket = d["rank"], bytes.fromhex(d["ticket"])
            host, port = d.get("host"), d.get("port")
        except (TypeError, KeyError, ValueError, AttributeError):
            raise ProtocolError(f"malformed PEERS entry {d!r}") from None
        ok = isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1 and ticket
        connects = host is not None or port is not None
        if connects and not (isinstance(host, str) and isinstance(port, int) and 0 < port < 65536):
            ok = False
        if not ok:
            raise ProtocolError(f"malformed PEERS entry {d!r}")
        return cls(rank, ticket, host, port)


def peer_links(msg: Message) -> list[PeerLink]:
    """The links a PEERS message asks for, checked."""
    links = msg.body["links"]
    if len(links) > MAX_PEERS:
        raise ProtocolError(f"PEERS asks for {len(links)} links")
    out = [PeerLink.from_body(d) for d in links]
    if len({p.rank for p in out}) != len(out):
        raise ProtocolError("PEERS names a rank twice")
    return out


def open_peer_links(
    wanted: list[PeerLink],
    listener: DataListener | None,
    session: int,
    link_timeout_s: float,
    alive: Callable[[], None] | None = None,
) -> dict[int, DataLink]:
    """Every link of `wanted`, by the peer's rank; raises PeerSetupFailed (every
    link opened so far closed) naming the first peer that could not be reached."""
    links: dict[int, DataLink] = {}
    try:
        for p in (p for p in wanted if p.host is not None):
            try:
                links[p.rank] = connect(
                    p.host, p.port, session, p.ticket, link_timeout_s, CONNECT_TIMEOUT_S
                )
            except OSError as e:
                why = f"cannot reach rank {p.rank} at {p.host}:{p.port}: {e}"
                raise PeerSetupFailed(why) from None
        accepting = {p.ticket: p.rank for p in wanted if p.host is None}
        if accepting:
            if listener is None:
                raise PeerSetupFailed("this worker has no data port for other workers to reach")
            try:
                links.update(
                    listener.accept_each(
                        session, accepting, ACCEPT_TIMEOUT_S, link_timeout_s, alive
                    )
                )
            except TimeoutError as e:
                raise PeerSetupFailed(f"other workers did not connect in time ({e})") from None
    except BaseException:
        for link in links.values():
            with contextlib.suppress(OSError):
                link.close()
        raise
    return links


def peer_round_trips(channel, pings: int) -> dict[int, float]:
    """The median round trip to each peer this worker has a link to (the planner's
    link matrix: home networks are not uniform). The peer echoes while it waits
    for its master (MasterChannel.echo_peers); a peer that does not answer within
    PING_TIMEOUT_S is left out."""
    out: dict[int, float] = {}
    ping = [encode_control(Kind.PING, {"session": channel.session}), b""]
    for rank, link in sorted(channel.peers.items()):
        times = []
        try:
            for _ in range(pings):
                t0 = time.perf_counter()
                link.send(ping)
                for _ in range(4):  # a few stray frames at most (a late PONG is one)
                    if decode(link.recv(PING_TIMEOUT_S)).kind == Kind.PONG:
                        break
                else:
                    raise ProtocolError(f"rank {rank} does not answer PINGs")
                times.append(time.perf_counter() - t0)
        except (TimeoutError, DataLinkClosed, ProtocolError):
            continue
        out[rank] = statistics.median(times)
    return out
