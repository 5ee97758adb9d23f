"""Direct hops: the master asks its pipeline's workers to link to each other.

For every pair that needs a link (tpi.master.topology.direct_hop_pairs), the
master makes a ticket and tells both ends over their authenticated control
links (PEERS): the accepting worker takes only a connection that presents that
ticket on its data port, the connecting one presents it. Each worker answers
PEERED. A worker that cannot reach another is said in one line, and the
session keeps every hop through the master (the planner's other shape).

Where a worker's data port is reached at another address than the master's
own (an emulated link's relay, a NAT), TPI_PEER_ROUTES maps it: a JSON object
{connecting worker: {accepting worker: "host:port"}}, workers named by the
addresses the master was given, the master's own data links under "master".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from tpi.comm.data_link import new_ticket
from tpi.comm.links import ClusterError, LinkLost, WorkerLink, display_address, normalize_address
from tpi.comm.wire import Kind, Message, encode_control
from tpi.master.topology import direct_hop_pairs
from tpi.model.partition import Stage

PEERS_TIMEOUT_S = 30.0
ROUTES_ENV = "TPI_PEER_ROUTES"


def _key(address: str) -> str:
    return display_address(normalize_address(address))


def peer_routes() -> dict[str, dict[str, str]]:
    """TPI_PEER_ROUTES, keys normalized (empty when unset)."""
    text = os.environ.get(ROUTES_ENV, "").strip()
    if not text:
        return {}
    try:
        routes = json.loads(text)
        return {
            a if a == "master" else _key(a): {_key(b): str(v) for b, v in to.items()}
            for a, to in routes.items()
        }
    except (ValueError, AttributeError, TypeError):
        raise ClusterError(f"{ROUTES_ENV} is not a JSON object of objects") from None


def route(routes: dict[str, dict[str, str]], source: str, target: str) -> tuple[str, int] | None:
    """Where `source` (a worker's address, or "master") reaches `target`'s data port,
    if TPI_PEER_ROUTES says so."""
    to = routes.get(source if source == "master" else _key(source), {}).get(_key(target))
    if to is None:
        return None
    host, _, port = to.rpartition(":")
    return host, int(port)


def peer_plan(
    pairs: list[tuple[int, int]], links: list[WorkerLink], welcomes: dict[int, Message]
) -> tuple[dict[int, list[dict]], str]:
    """What each rank's PEERS holds for these (connecting, accepting) pairs, or
    ({}, why not) when a worker offers no port."""
    routes = peer_routes()
    wanted: dict[int, list[dict]] = {}
    for conn, acc in pairs:
        port = welcomes[acc].body.get("data_port")
        if not isinstance(port, int) or not port:
            return {}, f"rank {acc} ({links[acc - 1].name}) has no data port for other workers"
        target = links[acc - 1]
        host = target.address[len("tcp://") :].rpartition(":")[0].strip("[]")
        host, port = route(routes, links[conn - 1].address, target.address) or (host, port)
        ticket = new_ticket().hex()
        wanted.setdefault(conn, []).append(
            {"rank": acc, "ticket": ticket, "host": host, "port": port}
        )
        wanted.setdefault(acc, []).append({"rank": conn, "ticket": ticket})
    return wanted, ""


def link_workers(
    pairs: list[tuple[int, int]],
    links: list[WorkerLink],
    session: int,
    welcomes: dict[int, Message],
    expect: Callable[..., dict[int, Message]],
) -> str:
    """Ask the workers to open a direct link for each (connecting, accepting) pair;
    returns "" when all did, else which worker could not and why."""
    wanted, why = peer_plan(pairs, links, welcomes)
    if why:
        return why
    for rank, entries in wanted.items():
        links[rank - 1].send([encode_control(Kind.PEERS, {"session": session, "links": entries})])
    try:
        got = expect({Kind.PEERED}, PEERS_TIMEOUT_S, set(wanted), "opening direct links")
    except LinkLost as e:
        raise ClusterError(str(e), e.address) from None
    failed = [(r, m.body["failed"]) for r, m in sorted(got.items()) if m.body["failed"]]
    # A worker that could not reach another says why; its peer only saw nobody come.
    failed.sort(key=lambda f: "cannot reach" not in f[1])
    if not failed:
        return ""
    r, reason = failed[0]
    return f"rank {r} ({links[r - 1].name}): {reason}"


def open_direct_hops(
    links: list[WorkerLink],
    session: int,
    stages: list[Stage],
    welcomes: dict[int, Message],
    expect: Callable[..., dict[int, Message]],
    echo: Callable[[str], None],
) -> bool:
    """Ask the workers to open the direct links these stages need; False (said
    in one line) when any cannot, and every hop then goes through the master."""
    why = link_workers(direct_hop_pairs(stages), links, session, welcomes, expect)
    if why:
        echo(
            f"direct hops between pipeline stages off ({why}): their outputs go through the master"
        )
        return False
    return True
