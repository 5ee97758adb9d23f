"""Before a plan: ask every worker for its profile and time the link to it.

A probe session is a cluster session that asks for no shard (HELLO with
tpi.planning.request.PROBE_MANIFEST): the same connection, authentication and
Curve keys as a real one, then PROFILE_REQUEST/PROFILE and PINGs, then END. The
workers are asked one after another, so that on a shared machine (tpi cluster)
no two nodes time their slices at once.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from tpi.comm.links import ClusterError, LinkLost
from tpi.comm.wire import Kind, encode_control
from tpi.master.connection import CONNECT_TIMEOUT_S, WorkerConnections
from tpi.master.direct_hops import link_workers
from tpi.planning.profile import LinkFacts
from tpi.planning.request import PROBE_MANIFEST, ProfileRequest

PINGS = 7
PEER_TIMEOUT_S = 60.0  # a worker timing its links to every other one
CPU_PINGS = 100  # enough exchanges for the CPU clocks' 10 ms ticks to say something
PROFILE_TIMEOUT_S = 600.0  # a first profile of a slow device takes a while
DEVICE_TIMEOUT_S = 90.0  # the device alone: a few seconds the first time
# Bandwidth: payloads grow until one round trip spends this long on bytes.
MIN_TRANSFER_S = 0.02
MAX_PAYLOAD = 8 << 20


@dataclass
class ProbeSession(WorkerConnections):
    """A session without a split: measure, then close."""

    def _manifest_of(self, rank: int) -> str:
        return PROBE_MANIFEST  # a session that asks for no shard

    def _start(self) -> None:
        self.welcomes = self._handshake()

    def peer_round_trips(self, pings: int = PINGS) -> dict[tuple[int, int], float]:
        """Round trips between workers, by (rank, rank) both ways round: every pair
        linked directly (as a pipeline's direct hops are), then each worker times
        its links in turn while the others echo. A pair that cannot link up, or
        whose timing fails, is missing (the planner then avoids it)."""
        ranks = range(1, self.world)
        pairs = [(a, b) for a in ranks for b in ranks if a > b]
        if not pairs:
            return {}
        why = link_workers(pairs, self.links.links, self.session, self.welcomes, self._expect)
        if why:
            self.echo(f"not every worker reaches every other ({why})")
        out: dict[tuple[int, int], float] = {}
        for r in ranks:
            self.links.links[r - 1].send(
                [encode_control(Kind.PEER_RTT_REQUEST, {"session": self.session, "pings": pings})]
            )
            got = self._expect({Kind.PEER_RTT}, PEER_TIMEOUT_S, {r}, "timing its links")
            for peer, rtt in got[r].body["rtts"].items():
                if str(peer).isdigit() and int(peer) in ranks and isinstance(rtt, float):
                    out[(r, int(peer))] = out[(int(peer), r)] = rtt
        return out

    def profile(self, rank: int, request: ProfileRequest) -> dict:
        """Worker `rank`'s PROFILE answer to `request`."""
        return request_profile(self, rank, request)

    def _ping(self, rank: int, payload: bytes | None) -> float:
        return self._pong(rank, payload)[0]

    def _pong(self, rank: int, payload: bytes | None) -> tuple[float, dict]:
        link = self.links.links[rank - 1]
        frames = [encode_control(Kind.PING, {"session": self.session})]
        if payload:
            frames.append(payload)
        t0 = time.perf_counter()
        link.send(frames)
        got = self._expect({Kind.PONG}, CONNECT_TIMEOUT_S * 6, {rank}, "a ping")
        elapsed = time.perf_counter() - t0
        if payload and len(got[rank].payload or b"") != len(payload):
            raise ClusterError(
                f"rank {rank} ({link.name}) did not echo the bandwidth probe (upgrade it)"
            )
        return elapsed, got[rank].body

    def message_cpu(self, rank: int, count: int = CPU_PINGS) -> tuple[float | None, float]:
        """CPU seconds one message exchange costs the worker (from the CPU time its
        PONGs carry) and this master, over `count` pings back to back."""
        _, first = self._pong(rank, None)
        mine = time.process_time()
        for _ in range(count):
            _, last = self._pong(rank, None)
        master = (time.process_time() - mine) / count
        if not isinstance(first.get("cpu"), float) or not isinstance(last.get("cpu"), float):
            return None, master
        return max(0.0, (last["cpu"] - first["cpu"]) / count), master

    def measure_link(self, rank: int) -> LinkFacts:
        """Round trip (median of PINGS), bandwidth (a payload there and back) and
        what a message exchange costs either side's CPU."""
        rtt = statistics.median(self._ping(rank, None) for _ in range(PINGS))
        worker_cpu, master_cpu = self.message_cpu(rank)
        size = 64 << 10
        while True:
            t = min(self._ping(rank, bytes(size)) for _ in range(3))
            spent = t - rtt
            if spent >= MIN_TRANSFER_S or size >= MAX_PAYLOAD:
                break
            size *= 4
        # There and back: 2 x size bytes. A loopback or LAN too fast to time is "unlimited".
        bw = 2 * size / spent if spent > 1e-4 else None
        return LinkFacts(
            rtt_s=rtt, bytes_per_s=bw, worker_cpu_s=worker_cpu, master_cpu_s=master_cpu
        )


def request_profile(
    session: WorkerConnections, rank: int, request: ProfileRequest, timeout_s: float | None = None
) -> dict:
    """Worker `rank`'s PROFILE answer to `request`, in a probe session or, between
    passes, in a loaded one (tpi bench reports every node's profile). Without a
    timeout: DEVICE_TIMEOUT_S for the device alone (a worker older than this
    master drops the session without a word, so waiting long helps nobody),
    PROFILE_TIMEOUT_S when slices are to be timed."""
    if timeout_s is None:
        timeout_s = DEVICE_TIMEOUT_S if request.model is None else PROFILE_TIMEOUT_S
    link = session.links.links[rank - 1]
    body = {"session": session.session, "request": request.to_body()}
    link.send([encode_control(Kind.PROFILE_REQUEST, body)])
    try:
        got = session._expect({Kind.PROFILE}, timeout_s, {rank}, "while measuring itself")
    except LinkLost as e:
        raise ClusterError(
            f"{e}; a worker older than this master cannot be profiled: upgrade it"
        ) from None
    return got[rank].body["profile"]


def probe_workers(
    addresses: list[str],
    request_for: Callable[[int], ProfileRequest],
    secret: bytes | None,
    curve=None,
    echo: Callable[[str], None] = print,
) -> list[tuple[dict, LinkFacts]]:
    """Each worker's profile and link, in the order given."""
    session = ProbeSession(addresses=list(addresses), secret=secret, curve=curve, echo=echo)
    try:
        session.start()
        out = []
        for r, addr in enumerate(addresses, start=1):
            echo(f"profiling rank {r} ({addr})...")
            asked = request_for(r)
            # The device first: quick, and an old worker fails here within seconds.
            profile = session.profile(r, ProfileRequest(refresh=asked.refresh))
            if asked.model is not None:
                profile = session.profile(r, asked)
            out.append((profile, session.measure_link(r)))
        return out
    finally:
        session.close("probe done")


def ping_ranks(session: WorkerConnections) -> dict[int, float]:
    """Round trip to every worker at once: a PING each, each PONG timed as it
    arrives (between passes only: it uses the session's sockets)."""
    t0 = time.perf_counter()
    for link in session.links.links:
        link.send([encode_control(Kind.PING, {"session": session.session})])
    out: dict[int, float] = {}
    waiting = set(range(1, session.world))
    while waiting:
        link, _ = session.inbox.take({Kind.PONG}, CONNECT_TIMEOUT_S, waiting, "a ping")
        out[link.rank] = time.perf_counter() - t0
        waiting.discard(link.rank)
    return out
