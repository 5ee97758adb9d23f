"""The master's side of a cluster session.

connect -> HELLO to every worker -> push missing shards (resumable, verified by
the worker) -> LOAD -> steps -> END. Any worker that refuses, does not answer or
disappears is reported by rank and address.

Every message from the workers goes through one Inbox, filed by kind. Once
loaded, the session offers the three parts of rank 0's collective, sharing one
step clock and one set of traffic counters: `broadcast` (starts each step on
every worker), `collective` (the star allreduce of partial sums) and `heads`
(gathers a vocabulary-parallel head's outputs).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from tpi import __version__
from tpi.comm.auth import check, new_nonce, proof
from tpi.comm.curve import CurveKeys
from tpi.comm.data_link import connect as connect_data_link
from tpi.comm.head_gather import HeadGatherer
from tpi.comm.inbox import Inbox
from tpi.comm.links import (
    ClusterError,
    LinkLost,
    LinkSet,
    WorkerFailed,
    WorkerLink,
    normalize_address,
)
from tpi.comm.star_master import StarMaster
from tpi.comm.step_broadcast import StepBroadcaster, StepClock
from tpi.comm.traffic import AllreduceStats
from tpi.comm.wire import Kind, Message, encode_control
from tpi.dtypes import DTYPES
from tpi.master.pipeline import RemoteStage
from tpi.model.partition import Stage
from tpi.storage.manifest import MANIFEST_NAME, read_manifest
from tpi.storage.split import read_split_index

CHUNK_BYTES = 1 << 20
PUSH_WINDOW = 8  # chunks in flight per worker
CONNECT_TIMEOUT_S = 10.0  # no TCP connection by then: nobody is listening
HANDSHAKE_TIMEOUT_S = 60.0  # connected yet silent this long: something is wrong there
VERIFY_TIMEOUT_S = 600.0


@dataclass
class PushState:
    link: WorkerLink
    rank_dir: Path
    files: list[tuple[str, int]]  # (name, size), manifest last
    offsets: dict[str, int]
    file_index: int = 0
    empty_todo: set[str] = field(default_factory=set)  # zero-byte files still to create
    in_flight: int = 0
    sent_bytes: int = 0
    done_sent: bool = False

    def remaining(self) -> int:
        return sum(size - self.offsets.get(name, 0) for name, size in self.files)


@dataclass
class ClusterSession:
    split_dir: Path
    addresses: list[str]
    dtype: str = "fp32"
    wire_dtype: str = "fp32"
    timeout_s: float = 60.0
    echo: Callable[[str], None] = print
    progress: Callable[[int, int, str], None] | None = None
    window: int | None = None
    windows: dict[int, int | None] | None = None  # per worker rank, from a plan (else `window`)
    max_context: int | None = None
    secret: bytes | None = field(default=None, repr=False)  # None: --insecure
    curve: CurveKeys | None = field(default=None, repr=False)
    # Allreduce frames over a direct TCP connection per worker (tpi.comm.data_link),
    # where the worker offers one; off: everything over ZeroMQ.
    data_link: bool = True
    session: int = field(default_factory=lambda: secrets.randbits(62))
    pushed_bytes: int = 0
    worker_info: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = read_split_index(self.split_dir)
        self.world = int(self.index["world"])
        if len(self.addresses) != self.world - 1:
            raise ClusterError(
                f"this split is for {self.world} ranks (master + {self.world - 1} workers) "
                f"but {len(self.addresses)} worker address(es) were given"
            )
        self.ctx = zmq.Context()
        self.links = LinkSet(self.ctx)
        self.inbox = Inbox(self.links, self.session)
        self.broadcast: StepBroadcaster | None = None
        self.collective: StarMaster | None = None
        self.heads: HeadGatherer | None = None
        self.stage_drivers: list[RemoteStage] = []  # a pipeline's later stages

    def rank_dir(self, rank: int) -> Path:
        return self.split_dir / self.index["ranks"][rank]["dir"]

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

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close("setup failed")
            raise

    def _manifest_of(self, rank: int) -> str:
        """What HELLO asks `rank` to run: the sha256 of its shard's manifest."""
        return self.index["ranks"][rank]["manifest_sha256"]

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
            hello = {
                "session": self.session,
                "rank": link.rank,
                "world": self.world,
                "manifest": self._manifest_of(link.rank),
                "tpi_version": __version__,
                "nonce": nonces[link.rank],
                "auth": "hmac" if self.secret else "none",
            }
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

    def _start(self) -> None:
        welcomes = self._handshake()
        need = [r for r, m in welcomes.items() if not m.body["have_shard"]]
        if need:
            self._push({r: welcomes[r].body["partial"] for r in need})
        for link in self.links.links:
            body = {
                "session": self.session,
                "dtype": self.dtype,
                "wire_dtype": self.wire_dtype,
                "window": self.windows.get(link.rank, self.window) if self.windows else self.window,
                "max_context": self.max_context,
                "data_link": self._open_data_link(link, welcomes[link.rank].body),
            }
            link.send([encode_control(Kind.LOAD, body)])
        ranks = set(range(1, self.world))
        ready = self._expect({Kind.READY}, VERIFY_TIMEOUT_S, ranks, "while loading its shard")
        self.worker_info = {r: m.body for r, m in ready.items()}
        clock, stats = StepClock(), AllreduceStats()
        stages = [Stage.from_dict(d) for d in self.index.get("stages") or ()]
        # Stage 0's group (every worker, without a pipeline) shares rank 0's steps
        # and allreduces; later stages are driven one after the other (stage_drivers).
        first = None if not stages else [self.links.links[r - 1] for r in stages[0].ranks[1:]]
        wire = DTYPES[self.wire_dtype]
        self.broadcast = StepBroadcaster(self.links, self.session, clock, stats, members=first)
        self.collective = StarMaster(self.inbox, clock, wire, self.timeout_s, stats, members=first)
        self.heads = HeadGatherer(self.inbox, clock, self.world, stats, self.timeout_s)
        # A pipeline's vocabulary-parallel head spans every rank: token ids, the
        # embedding sum and the final states reach all of them.
        self.world_broadcast, self.world_collective = self.broadcast, self.collective
        self.final_broadcast: StepBroadcaster | None = None  # FINAL: ranks outside the last stage
        if stages:
            self.world_broadcast = StepBroadcaster(self.links, self.session, clock, stats)
            self.world_collective = StarMaster(self.inbox, clock, wire, self.timeout_s, stats)
            if self.index.get("vocab_parallel"):
                last = set(stages[-1].ranks)
                outside = [link for link in self.links.links if link.rank not in last]
                self.final_broadcast = StepBroadcaster(
                    self.links, self.session, clock, stats, members=outside
                )
        self.stage_drivers = []
        # What rank 0 relays for later stages (their steps and allreduces) is counted
        # apart from its own traffic; a pipeline's router thread updates these.
        self.relay_stats = AllreduceStats()
        for i, st in enumerate(stages[1:], start=1):
            group = [self.links.links[r - 1] for r in st.ranks]
            hub = None
            if len(group) > 1:
                hub = StarMaster(
                    self.inbox, clock, wire, self.timeout_s, self.relay_stats, members=group
                )
            bc = StepBroadcaster(self.links, self.session, clock, self.relay_stats, members=group)
            self.stage_drivers.append(RemoteStage(i, st, group, bc, hub))

    def _push_plan(self, rank: int, partial: dict) -> PushState:
        rank_dir = self.rank_dir(rank)
        manifest, _ = read_manifest(rank_dir)
        files = [(name, meta["bytes"]) for name, meta in sorted(manifest.files.items())]
        files.append((MANIFEST_NAME, (rank_dir / MANIFEST_NAME).stat().st_size))
        offsets = {}
        for name, size in files:
            have = partial.get(name, 0)
            offsets[name] = have if isinstance(have, int) and 0 <= have <= size else 0
        empty = {name for name, size in files if size == 0 and name not in partial}
        return PushState(self.links.links[rank - 1], rank_dir, files, offsets, empty_todo=empty)

    def _pump(self, st: PushState) -> None:
        """Keep PUSH_WINDOW chunks in flight for one worker."""
        while st.in_flight < PUSH_WINDOW and st.file_index < len(st.files):
            name, size = st.files[st.file_index]
            off = st.offsets[name]
            if off >= size and name not in st.empty_todo:
                st.file_index += 1
                continue
            with open(st.rank_dir / name, "rb") as f:
                f.seek(off)
                data = f.read(CHUNK_BYTES)
            body = {"session": self.session, "file": name, "offset": off, "total": size}
            st.link.send([encode_control(Kind.PUSH_CHUNK, body), data])
            st.offsets[name] = off + len(data)
            st.in_flight += 1
            st.sent_bytes += len(data)
            st.empty_todo.discard(name)
        if st.file_index >= len(st.files) and st.in_flight == 0 and not st.done_sent:
            st.link.send([encode_control(Kind.PUSH_DONE, {"session": self.session})])
            st.done_sent = True

    def _push(self, partials: dict[int, dict]) -> None:
        states = {r: self._push_plan(r, p) for r, p in partials.items()}
        total = sum(s.remaining() for s in states.values())
        resumed = sum(sum(s.offsets.values()) for s in states.values())
        self.echo(
            f"pushing shards to rank(s) {', '.join(map(str, states))}: {total / 1e6:.1f} MB"
            + (f" (resuming; {resumed / 1e6:.1f} MB already there)" if resumed else "")
        )
        for st in states.values():
            self._pump(st)
        finished: set[int] = set()
        while len(finished) < len(states):
            waiting = set(states) - finished
            try:
                link, msg = self.inbox.take({Kind.PUSH_ACK, Kind.READY}, VERIFY_TIMEOUT_S, waiting)
            except TimeoutError:
                r = min(waiting)
                raise ClusterError(
                    f"shard push stalled for rank(s) {sorted(waiting)}",
                    self.links.links[r - 1].name,
                ) from None
            except WorkerFailed as e:
                raise ClusterError(
                    f"rank {e.rank} ({e.address}) rejected its shard: {e.message}", e.address
                ) from None
            st = states[link.rank]
            if msg.kind == Kind.PUSH_ACK:
                st.in_flight -= 1
                self._pump(st)
            elif msg.kind == Kind.READY and st.done_sent:
                finished.add(link.rank)
            if self.progress:
                self.progress(sum(s.sent_bytes for s in states.values()), max(total, 1), "push")
        self.pushed_bytes += sum(s.sent_bytes for s in states.values())

    def _open_data_link(self, link: WorkerLink, welcome: dict) -> bool:
        """Connect the worker's data link if it offers one (tpi.comm.data_link);
        False: its allreduces stay on the control link."""
        port, ticket = welcome.get("data_port"), welcome.get("data_ticket")
        if not self.data_link or self.curve is not None or not isinstance(port, int) or not port:
            return False
        host = link.address[len("tcp://") :].rpartition(":")[0].strip("[]")
        try:
            data = connect_data_link(
                host,
                port,
                self.session,
                bytes.fromhex(str(ticket)),
                self.timeout_s,
                CONNECT_TIMEOUT_S,
            )
        except (OSError, ValueError) as e:
            self.echo(
                f"rank {link.rank} ({link.name}): no data link on port {port} ({e}); "
                "its allreduces go over the control link"
            )
            return False
        self.links.attach_data(link, data)
        return True

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
