"""A worker's connection to the one master it serves in a session.

Everything the worker receives passes here first: strangers are answered
"busy", the master's PINGs are answered at once (they measure the round trip),
frames of earlier sessions are dropped, END and a vanished master end the
session. What remains is handed out by kind: the star allreduce takes only
SUMs (`wait_sum`), the session loop takes everything else (`next`); a request
or a next step that arrives while an allreduce waits (e.g. STATS_REQUEST, or the
STEP of a pipeline's next micro-batch) is kept for the loop and served between
steps, never in the middle of one.
"""

from __future__ import annotations

import time
from collections import deque

from tpi.comm.data_link import DataLink, DataLinkClosed
from tpi.comm.links import Inbound, WorkerEndpoint
from tpi.comm.reducer import pass_order
from tpi.comm.wire import (
    DataHeader,
    Kind,
    Message,
    ProtocolError,
    SumHeader,
    decode,
    encode_control,
)
from tpi.worker.watchdog import beat

# Requests that may arrive while an allreduce waits, served after the step.
BETWEEN_STEPS = frozenset({Kind.STATS_REQUEST, Kind.PROFILE_REQUEST})
MID_STEP_TIMEOUT_S = 300.0  # backstop only: disconnects are noticed within seconds
POLL_S = 0.5


class PeerLost(Exception):
    """A direct link to another worker broke (a pipeline hop): the master hears
    which rank, and names it."""

    def __init__(self, rank: int, why: str) -> None:
        super().__init__(f"lost the direct link to rank {rank}: {why}")
        self.rank = rank


class SessionEnded(Exception):
    """The master ended the session, vanished, or broke the protocol."""

    def __init__(self, why: str, handover: Inbound | None = None) -> None:
        super().__init__(why)
        self.handover = handover  # a new master's HELLO that arrived as this one vanished


def peer_address(inb: Inbound) -> str:
    try:
        return inb.frames[0].get("Peer-Address")
    except Exception:
        return "?"


class MasterChannel:
    def __init__(self, endpoint: WorkerEndpoint, hello: Inbound, session: int, rank: int) -> None:
        self.endpoint = endpoint
        self.peer = hello.peer
        self.fd = hello.fd
        self.addr = peer_address(hello)
        self.session = session
        self.rank = rank
        self._kept: deque[Message] = deque()
        # A pipeline's rank: the master sends a stage's micro-batches one behind the
        # other, so the next STEP may arrive while this one's allreduce waits.
        self.keep_steps = False
        # The allreduce's own connection (tpi.comm.data_link), if the master opened one.
        self.data: DataLink | None = None
        # Direct links to other workers, by rank (a pipeline with direct hops), whose
        # link brings this rank's steps, and who hubs its allreduces (None: the master).
        self.peers: dict[int, DataLink] = {}
        self.step_source: int | None = None
        self.hub: int | None = None
        # A probe session: answer the other workers' PINGs on the direct links.
        self.echo_peers = False

    # --- sending ---------------------------------------------------------------------

    def send(self, frames: list) -> None:
        if not self.endpoint.send(self.peer, frames):
            raise SessionEnded("master disconnected")

    def send_data(self, frames: list) -> None:
        """An allreduce frame: to the group's hub, over the data link when there is
        one."""
        if self.hub is not None:
            return self.send_to(self.hub, frames)
        if self.data is None:
            return self.send(frames)
        try:
            self.data.send(frames)
        except DataLinkClosed as e:
            raise SessionEnded(f"master disconnected ({e})") from None

    def send_to(self, rank: int, frames: list) -> None:
        """A frame for another worker, over the direct link to it."""
        try:
            self.peers[rank].send(frames)
        except DataLinkClosed as e:
            raise PeerLost(rank, str(e)) from None

    def close_data(self) -> None:
        for link in [self.data, *self.peers.values()]:
            if link is not None:
                link.close()
        self.data, self.peers = None, {}

    def control(self, kind: Kind, **body) -> None:
        self.send([encode_control(kind, {"session": self.session, **body})])

    # --- receiving -------------------------------------------------------------------

    def next(self, timeout_s: float | None) -> Message:
        """The next message for the session loop (kept ones first): from the
        master, or a step from the worker whose link brings this rank's steps."""
        if self._kept:
            return self._kept.popleft()
        return self._receive(timeout_s)

    def wait_sum(self, expected: SumHeader) -> Message:
        """The SUM for exactly this step/layer/phase/pos (the star allreduce's
        channel): from the master's data link or control link, or from the
        group's hub over a direct link."""
        want = expected.key
        source = self.hub
        while True:
            if source is not None:
                msg = self.receive_from(self.peers[source], source)
            elif self.data is not None:
                msg = self.receive_from(self.data)
            else:
                msg = self._receive(MID_STEP_TIMEOUT_S)
            if msg.kind in BETWEEN_STEPS or (self.keep_steps and msg.kind == Kind.STEP):
                self._kept.append(msg)  # served after this step, in order
                continue
            if msg.kind != Kind.SUM:
                raise SessionEnded(f"expected SUM, got {msg.kind.name}")
            got = msg.data.key
            if got != want and pass_order(got) < pass_order(want):
                continue  # stale
            if got != want or msg.data.shape != expected.shape:
                raise SessionEnded(
                    f"SUM for {got} {msg.data.shape}, expected {want} {expected.shape}"
                )
            return msg

    def receive_from(self, link: DataLink, peer: int | None = None) -> Message:
        """The next data message on `link` (the master's data link, or the direct
        link to worker `peer`). While none comes, the control link is looked at
        every POLL_S: an END or a vanished master ends the session, PINGs are
        answered, and what else came from the master is returned (the caller
        keeps a request for after the step)."""
        deadline = time.monotonic() + MID_STEP_TIMEOUT_S
        while True:
            try:
                frames = link.recv(POLL_S)
            except TimeoutError:
                beat()
                if self._master_gone():
                    raise SessionEnded("master disconnected") from None
                if time.monotonic() > deadline:
                    who = "master" if peer is None else f"rank {peer}"
                    raise SessionEnded(f"{who} silent for {MID_STEP_TIMEOUT_S:g} s") from None
                while (inb := self.endpoint.recv(0)) is not None:
                    if (msg := self._accept(inb)) is not None:
                        return msg
                continue
            except (DataLinkClosed, ProtocolError) as e:
                self._link_broke(peer, e)
            if (msg := self._decode_data(frames, peer)) is not None:
                return msg

    def _decode_data(self, frames: list, peer: int | None) -> Message | None:
        """A data link's message of this session (the links carry nothing else;
        anything else is dropped)."""
        try:
            msg = decode(frames)
        except ProtocolError as e:
            self._link_broke(peer, e)
        if isinstance(msg.body, DataHeader) and msg.body.session == self.session:
            return msg
        return None

    def _link_broke(self, peer: int | None, e: Exception) -> None:
        if peer is not None:
            raise PeerLost(peer, str(e)) from None
        if isinstance(e, ProtocolError):
            raise SessionEnded(f"protocol error from master: {e}") from None
        raise SessionEnded(f"master disconnected ({e})") from None

    def _receive(self, timeout_s: float | None) -> Message:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        source = self.step_source
        link = self.peers[source] if source is not None else None
        while True:
            if self.echo_peers and self.peers:
                self._echo_pings()
            if self._master_gone():
                raise SessionEnded("master disconnected")
            if deadline is not None and time.monotonic() > deadline:
                raise SessionEnded(f"master silent for {timeout_s:g} s")
            if self.echo_peers and self.peers:
                self.endpoint.wait(POLL_S, list(self.peers.values()))
                inb = self.endpoint.recv(0)
            elif link is None:
                inb = self.endpoint.recv(POLL_S)
            else:
                # Steps come from another worker: wait on its link and the master's.
                if link.readable() and (msg := self._from_peer(link, source)) is not None:
                    return msg
                self.endpoint.wait(POLL_S, [link])
                inb = self.endpoint.recv(0)
            beat()
            if inb is not None and (msg := self._accept(inb)) is not None:
                return msg

    def _echo_pings(self) -> None:
        """Answer every PING another worker sent over a direct link (a probe
        session's round-trip timing); a peer that closed its link is forgotten."""
        pong = [encode_control(Kind.PONG, {"session": self.session}), b""]
        for rank, link in list(self.peers.items()):
            try:
                while link.readable():
                    if decode(link.recv(0.0)).kind == Kind.PING:
                        link.send(pong)
            except (TimeoutError, DataLinkClosed, ProtocolError):
                link.close()
                del self.peers[rank]

    def _from_peer(self, link: DataLink, peer: int) -> Message | None:
        try:
            frames = link.recv(0.0)
        except TimeoutError:
            return None
        except (DataLinkClosed, ProtocolError) as e:
            self._link_broke(peer, e)
        return self._decode_data(frames, peer)

    def _accept(self, inb: Inbound) -> Message | None:
        """A received message for the session, or None when it was handled here
        (a stranger refused, a PING answered, a late frame dropped)."""
        if inb.peer != self.peer:
            self._refuse_stranger(inb)
            return None
        self.fd = inb.fd
        try:
            msg = decode(inb.frames)
        except ProtocolError as e:
            raise SessionEnded(f"protocol error from master: {e}") from None
        body = msg.body
        sid = body.session if isinstance(body, DataHeader) else body.get("session")
        if sid != self.session or msg.kind == Kind.PONG:
            return None  # a late frame of an earlier session
        if msg.kind == Kind.END:
            raise SessionEnded(f"master ended the session ({body['reason']})")
        if msg.kind == Kind.PING:  # the master measuring the round trip
            # A payload comes back with the PONG: the master timing the link's bandwidth.
            # The CPU this process has used: the master times what a message
            # exchange costs here (tpi.planning: a CPU quota pays for it).
            pong = encode_control(Kind.PONG, {"session": self.session, "cpu": time.process_time()})
            echo = getattr(msg.payload, "buffer", msg.payload)
            self.send([pong, echo] if msg.payload is not None else [pong])
            return None
        return msg

    # --- is the master still there? --------------------------------------------------

    def _probe(self) -> bool:
        """True if our master is still connected (ROUTER_MANDATORY fails a send to a gone peer)."""
        return self.endpoint.send(self.peer, [encode_control(Kind.PING, {"session": self.session})])

    def _master_gone(self) -> bool:
        if self.fd not in self.endpoint.closed_fds:
            return False
        # A disconnect was reported on our master's fd. The event may be stale
        # (fds are reused), so confirm with a probe, and keep probing (every poll)
        # while it succeeds: libzmq reports the disconnect before the ROUTER has
        # dropped the peer, so a probe right after it can still be accepted. The
        # mark goes only when a message from the master arrives on that fd.
        return not self._probe()

    def _refuse_stranger(self, inb: Inbound) -> None:
        try:
            msg = decode(inb.frames)
        except ProtocolError as e:
            self.endpoint.send(inb.peer, [encode_control(Kind.REFUSE, {"reason": str(e)})])
            return
        if msg.kind == Kind.HELLO:
            if not self._probe():
                # Our master is gone (its disconnect not yet reported): serve the newcomer.
                raise SessionEnded("master disconnected", handover=inb)
            reason = f"busy: serving another master ({self.addr}) as rank {self.rank}"
            self.endpoint.send(inb.peer, [encode_control(Kind.REFUSE, {"reason": reason})])
