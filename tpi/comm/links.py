"""ZeroMQ connections between master and workers, with liveness.

One connection per worker carries everything (control, shard push, tensors):
the worker binds a ROUTER on its --listen address, the master connects one
DEALER per worker. ZeroMQ keeps per-connection order, so control and data can
never overtake each other, and a device needs one open port.

Liveness comes from ZMTP heartbeats, handled by libzmq's I/O thread (so they
keep flowing while Python computes): a killed peer drops the TCP connection at
once, a frozen or unreachable one misses heartbeats and is disconnected after
HEARTBEAT_TIMEOUT_MS. Socket monitors turn those disconnects into errors that
name the rank, instead of a receive that waits forever.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

from tpi.comm.data_link import DataLink, DataLinkClosed
from tpi.comm.wire import MAX_INBOUND_BYTES, Message, ProtocolError, decode
from tpi.errors import TpiError

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000  # a frozen peer is declared lost within ~3-4 s
SRCFD = 2  # ZMQ_SRCFD: which connection a message arrived on
# Zero-copy sends cost pyzmq extra bookkeeping (~10 us here); they only pay off
# for large frames (prefill blocks, shard chunks), so small ones are copied.
ZERO_COPY_MIN_BYTES = 64 * 1024
# A worker that fails reports why on its control link and then drops its data
# link; the report may arrive a little after the drop is seen.
DATA_LOST_GRACE_S = 1.0


def readable(sock: zmq.Socket) -> bool:
    """A whole message is waiting (asking costs far less than a failed receive,
    which raises and builds an exception: measured ~7 us per link per call)."""
    return bool(sock.get(zmq.EVENTS) & zmq.POLLIN)


def _frame_bytes(frames: list) -> int:
    return sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)


class ClusterError(TpiError):
    """A worker failed, refused, or stopped answering. `address` names the worker
    that is to blame when one is (a recovery leaves it out)."""

    def __init__(self, message: str, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class LinkLost(ClusterError):
    """A worker stopped answering: "rank 2 (host:port) stopped answering during layer 17 (why)"."""

    def __init__(self, rank: int, address: str, reason: str, where: str = "") -> None:
        super().__init__(
            f"rank {rank} ({address}) stopped answering{' ' + where if where else ''} ({reason})",
            address,
        )
        self.rank = rank
        self.reason = reason


class WorkerFailed(ClusterError):
    """A worker reported an error: "rank 2 (host:port) failed during layer 17: why"."""

    def __init__(self, rank: int, address: str, message: str, where: str = "") -> None:
        super().__init__(
            f"rank {rank} ({address}) failed{' ' + where if where else ''}: {message}", address
        )
        self.rank = rank
        self.message = message


def normalize_address(
    text: str, default_host: str | None = None, allow_any_port: bool = False
) -> str:
    """'host:port', '[v6]:port' or 'tcp://host:port' -> 'tcp://host:port'.

    `allow_any_port` admits port 0 (bind: let the OS pick)."""
    text = text.strip()
    rest = text[len("tcp://") :] if text.startswith("tcp://") else text
    host, sep, port = rest.rpartition(":")
    if not sep and default_host:
        host, port = default_host, rest
    if not host or not port.isdigit() or not (0 if allow_any_port else 1) <= int(port) < 65536:
        raise TpiError(f"bad address {text!r}: expected host:port (e.g. 192.168.1.20:5555)")
    return f"tcp://{host}:{port}"


def display_address(address: str) -> str:
    return address[len("tcp://") :] if address.startswith("tcp://") else address


def tcp_reachable(address: str, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at a worker's address (a cheap
    check before a handshake that would otherwise wait out its timeout)."""
    host, _, port = display_address(normalize_address(address)).rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def configure_socket(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 200)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)


class DataLinkLost(Exception):
    """A data link broke (the link is marked lost); `arrived`: what its worker
    had said on the control link meanwhile."""

    def __init__(self, arrived: list) -> None:
        super().__init__("data link lost")
        self.arrived = arrived


@dataclass
class WorkerLink:
    """The master's connection to one worker."""

    rank: int
    address: str
    sock: zmq.Socket
    monitor: zmq.Socket
    connected: bool = False
    lost: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    data: DataLink | None = None  # the allreduce's own connection (tpi.comm.data_link)

    @property
    def name(self) -> str:
        return display_address(self.address)

    def send(self, frames: list) -> None:
        size = _frame_bytes(frames)
        self.sock.send_multipart(frames, copy=size < ZERO_COPY_MIN_BYTES)
        self.messages_sent += 1
        self.bytes_sent += size

    def send_data(self, frames: list) -> None:
        """An allreduce frame: over the data link when there is one."""
        if self.data is None:
            return self.send(frames)
        try:
            self.data.send(frames)
        except DataLinkClosed as e:
            self.lost = self.lost or str(e)
            raise LinkLost(self.rank, self.name, self.lost) from None
        self.messages_sent += 1
        self.bytes_sent += _frame_bytes(frames)

    def close(self, linger_ms: int = 0) -> None:
        if self.data is not None:
            self.data.close()
        for s, linger in ((self.sock, linger_ms), (self.monitor, 0)):
            with contextlib.suppress(zmq.ZMQError):
                s.close(linger=linger)


@dataclass
class LinkSet:
    """All worker links of one master session, polled together."""

    ctx: zmq.Context
    links: list[WorkerLink] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.poller = zmq.Poller()
        self._by_socket: dict[zmq.Socket, tuple[WorkerLink, bool]] = {}
        self._extra_pollers: dict[tuple, zmq.Poller] = {}

    def connect(self, rank: int, address: str, secure=None) -> WorkerLink:
        sock = self.ctx.socket(zmq.DEALER)
        configure_socket(sock)
        if secure is not None:
            secure(sock)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(address)
        link = WorkerLink(rank, address, sock, monitor)
        self.links.append(link)
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(monitor, zmq.POLLIN)
        self._by_socket[sock] = (link, False)
        self._by_socket[monitor] = (link, True)
        self._extra_pollers.clear()
        return link

    def attach_data(self, link: WorkerLink, data: DataLink) -> None:
        """From now on `link`'s allreduce frames travel over `data` (polled with the rest)."""
        link.data = data
        self.poller.register(data, zmq.POLLIN)
        self._by_socket[data] = (link, False)
        self._extra_pollers.clear()

    def _handle_monitor(self, link: WorkerLink) -> None:
        while link.monitor.poll(0):
            event = parse_monitor_message(link.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                link.connected = True
            elif event == zmq.EVENT_DISCONNECTED and link.lost is None:
                link.lost = "connection lost: process stopped, crashed, or link down"

    def _drain(self) -> list[tuple[WorkerLink, Message]]:
        """Every message already waiting on a live link, in arrival order per link."""
        out = []
        for link in self.links:
            while link.lost is None and readable(link.sock):
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                link.messages_received += 1
                link.bytes_received += sum(len(f.buffer) for f in frames)
                out.append((link, decode(frames)))
            if link.data is not None:
                self._drain_data(link, out)
        return out

    def _drain_data(self, link: WorkerLink, out: list) -> None:
        try:
            while link.lost is None and link.data.readable():
                out.append((link, self._recv_data(link, None)))
        except (DataLinkClosed, ProtocolError) as e:
            out += self._data_lost(link, e)

    def _recv_data(self, link: WorkerLink, timeout_s: float | None) -> Message:
        frames = link.data.recv(timeout_s)
        link.messages_received += 1
        link.bytes_received += len(frames[0]) + len(frames[1])
        return decode(frames)

    def _data_lost(self, link: WorkerLink, why: Exception) -> list[tuple[WorkerLink, Message]]:
        """Mark `link` lost; returns what the worker said on its control link
        before it dropped the data link (an ERROR explains the drop better)."""
        out = []
        if link.sock.poll(int(1000 * DATA_LOST_GRACE_S)):
            while readable(link.sock):
                out.append((link, decode(link.sock.recv_multipart(zmq.NOBLOCK, copy=False))))
        link.lost = f"data link lost: {why}"
        return out

    def recv_data(self, link: WorkerLink, timeout_s: float) -> Message:
        """The next message on `link`'s data link, waiting up to `timeout_s`
        (TimeoutError). A broken data link raises DataLinkLost."""
        try:
            return self._recv_data(link, timeout_s)
        except (DataLinkClosed, ProtocolError) as e:
            raise DataLinkLost(self._data_lost(link, e)) from None

    def _poller(self, extra: tuple[zmq.Socket, ...]) -> zmq.Poller:
        if not extra:
            return self.poller
        poller = self._extra_pollers.get(extra)
        if poller is None:
            poller = zmq.Poller()
            for sock in self._by_socket:
                poller.register(sock, zmq.POLLIN)
            for sock in extra:
                poller.register(sock, zmq.POLLIN)
            self._extra_pollers[extra] = poller
        return poller

    def receive(
        self, timeout_s: float, ranks: set[int] | None = None, extra=()
    ) -> tuple[list[tuple[WorkerLink, Message]], set[zmq.Socket]]:
        """Messages that arrived (waiting up to `timeout_s` for the first), and
        which `extra` sockets became readable (left unread).

        Raises LinkLost for a link of `ranks` (default: all) that disconnected.
        Returns empty-handed on timeout."""
        # Fast path: messages already waiting need no poll (the common case
        # mid-step, when partials arrive while rank 0 computes its own).
        arrived = self._drain()
        if arrived:
            return arrived, set()
        extra = tuple(extra)
        poller = self._poller(extra)
        deadline = time.monotonic() + timeout_s
        while True:
            # A link seen to drop while we waited on others (a pipeline waits on one
            # stage at a time) has no event left to wake a poll: report it now.
            self._raise_lost(ranks)
            remaining = deadline - time.monotonic()
            # At least one poll, even with no time left: it also collects link events.
            events = dict(poller.poll(max(0, int(remaining * 1000))))
            for sock in events:
                owner = self._by_socket.get(sock)
                if owner is not None and owner[1]:
                    self._handle_monitor(owner[0])
            self._raise_lost(ranks)
            ready = {s for s in extra if s in events}
            arrived = self._drain()
            if arrived or ready:
                return arrived, ready
            if remaining <= 0:
                return [], set()

    def forget(self, extra: tuple[zmq.Socket, ...]) -> None:
        """Drop the poller kept for these extra sockets (they are being closed)."""
        self._extra_pollers.pop(extra, None)

    def _raise_lost(self, ranks: set[int] | None) -> None:
        for link in self.links:
            if link.lost and (ranks is None or link.rank in ranks):
                raise LinkLost(link.rank, link.name, link.lost)

    def close(self, linger_ms: int = 0) -> None:
        for link in self.links:
            link.close(linger_ms)
        self.links.clear()


@dataclass
class Inbound:
    """A message the worker received: who sent it, on which connection."""

    peer: bytes
    fd: int
    frames: list


class WorkerEndpoint:
    """The worker's bound ROUTER socket."""

    def __init__(self, ctx: zmq.Context, address: str, secure=None) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        configure_socket(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer raises, not drops
        # A peer sending a bigger frame is disconnected before it is buffered.
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_BYTES)
        if secure is not None:
            secure(self.sock)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            self.sock.bind(address)
        except zmq.ZMQError as e:
            self.close()
            if e.errno == zmq.EADDRINUSE:
                raise TpiError(
                    f"cannot listen on {display_address(address)}: the port is in use "
                    "(a worker's data link also takes its port + 1: workers sharing a "
                    "machine need ports two apart)"
                ) from None
            raise TpiError(f"cannot listen on {display_address(address)}: {e}") from None
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.closed_fds: set[int] = set()
        self._rcvtimeo = -1

    def _take(self) -> Inbound | None:
        if not readable(self.sock):
            return None
        return self._inbound(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))

    def _inbound(self, frames: list) -> Inbound:
        fd = frames[-1].get(SRCFD)
        self.closed_fds.discard(fd)  # a live message on it: the fd is (re)used
        return Inbound(frames[0].bytes, fd, frames[1:])

    def recv(self, timeout_s: float) -> Inbound | None:
        """The next message, or None on timeout; disconnects are collected in closed_fds.

        Waits in a blocking receive (with a receive timeout) rather than a poll
        and a receive (fewer calls; on an idle machine a raw pyzmq round trip is
        0.08 ms that way against 0.14-0.18). Disconnects reported meanwhile are
        collected before and after each wait (the worker polls at least twice a
        second, so a master that vanished is noticed within that)."""
        if (inb := self._take()) is not None:
            return inb
        self._collect_disconnects()
        wait_ms = max(0, int(timeout_s * 1000))
        if wait_ms != self._rcvtimeo:
            self.sock.setsockopt(zmq.RCVTIMEO, wait_ms)
            self._rcvtimeo = wait_ms
        try:
            frames = self.sock.recv_multipart(copy=False)
        except zmq.Again:
            self._collect_disconnects()
            return None
        return self._inbound(frames)

    def wait(self, timeout_s: float, others: list) -> None:
        """Wait until a message is here or any of `others` (sockets with a fileno:
        a worker's direct links) is readable, at most `timeout_s`; disconnects
        reported meanwhile are collected."""
        self._collect_disconnects()
        if readable(self.sock):
            return
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        for other in others:
            poller.register(other, zmq.POLLIN)
        poller.poll(max(0, int(timeout_s * 1000)))
        self._collect_disconnects()

    def _collect_disconnects(self) -> None:
        while self.monitor.poll(0):
            msg = parse_monitor_message(self.monitor.recv_multipart())
            if msg["event"] == zmq.EVENT_DISCONNECTED:
                self.closed_fds.add(int(msg["value"]))

    def send(self, peer: bytes, frames: list) -> bool:
        """Send to `peer`; False if it is no longer connected."""
        try:
            self.sock.send_multipart(
                [peer, *frames], copy=_frame_bytes(frames) < ZERO_COPY_MIN_BYTES
            )
            return True
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            raise

    def close(self) -> None:
        for s in (getattr(self, "sock", None), getattr(self, "monitor", None)):
            if s is not None:
                with contextlib.suppress(zmq.ZMQError):
                    s.close(linger=0)
