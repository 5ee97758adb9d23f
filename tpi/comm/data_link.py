"""A direct TCP connection between the master and one worker that carries only
the star allreduce's frames (PARTIAL up, SUM down); everything else stays on
the worker's ZeroMQ link (tpi.comm.links).

Why a second connection: a ZeroMQ message crosses the sender's and the
receiver's I/O threads, two thread wake-ups per hop on top of the socket's.
On loopback at world 3 (three processes, two cores) a bare pyzmq star round
trip costs 0.28 ms against 0.095 ms over plain TCP sockets, and a decode step
makes two such round trips per layer. The data path is the one place where
that difference is paid 60 times a token.

Framing: u32 length of frame 0, u32 length of frame 1, then their bytes.
Frame 0 is the wire header exactly as on ZeroMQ (tpi.comm.wire.decode checks
it the same way), frame 1 the tensor. Lengths are bounded before anything is
allocated.

Opening: the worker listens on a second port (`--data-port`, by default the
control port + 1) and hands the master a fresh random ticket in its WELCOME,
over the already authenticated control link. The master connects and sends
MAGIC | session (u64) | ticket; the worker accepts only that connection.
Under CurveZMQ there is no data link (it would travel unencrypted).
"""

from __future__ import annotations

import contextlib
import secrets
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

from tpi.comm.wire import MAX_CONTROL_BYTES, MAX_FRAME_BYTES, ProtocolError

OPEN_MAGIC = b"TPIDATA1"
TICKET_BYTES = 16
_OPEN = struct.Struct("<8sQ16s")
_LENGTHS = struct.Struct("<II")
MAX_HEAD_BYTES = MAX_CONTROL_BYTES // 2  # a data header is tens of bytes
SCRATCH_BYTES = MAX_CONTROL_BYTES  # one receive takes whatever is there, up to this much
OPENING_S = 1.0  # a connection's opening must arrive this soon after it is accepted
ALIVE_S = 0.5  # a waiting accept says it is alive this often
STASH_CHUNK = 1 << 20  # taken in at a time while a send waits for room
MAX_SPILL_BYTES = 4 * MAX_FRAME_BYTES  # what a peer may send ahead while it does not read
T = TypeVar("T")


class DataLinkClosed(ConnectionError):
    """The peer closed the data link or it broke."""


def new_ticket() -> bytes:
    return secrets.token_bytes(TICKET_BYTES)


def _tune(sock: socket.socket) -> None:
    # Small frames must leave at once, not wait for an ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class DataLink:
    """One end of a data link. Only one thread may use it (the one that owns the
    collective's sockets)."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        _tune(sock)
        # Non-blocking, waits by our own poll: a socket with a Python timeout polls
        # before every send and receive, a syscall each that a decode step pays
        # four times per allreduce for nothing (the data is usually there).
        sock.setblocking(False)
        self.sock = sock
        self.timeout_s = timeout_s
        self._buf = bytearray(SCRATCH_BYTES)
        self._view = memoryview(self._buf)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        # Bytes the peer sent while a send of ours waited for room (see `send`).
        self._spill = bytearray()
        self._spill_pos = 0
        self._in = select.poll()
        self._in.register(sock, select.POLLIN)
        self._either = select.poll()
        self._either.register(sock, select.POLLIN | select.POLLOUT)
        self.bytes_sent = 0
        self.bytes_received = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    # --- sending ---------------------------------------------------------------------

    def send(self, frames: list) -> None:
        """Send a header frame and a payload frame (bytes or any buffer).

        While the socket has no room, whatever the peer sends meanwhile is taken
        in and kept for `recv`: in an overlapped prefill both ends send a large
        frame before reading the other's (a worker its next chunk's partial, the
        master the last chunk's sum); with neither reading, two frames larger than
        the socket buffers would wait on each other forever."""
        head = frames[0]
        payload = memoryview(frames[1]).cast("B") if len(frames) > 1 else memoryview(b"")
        data = [_LENGTHS.pack(len(head), payload.nbytes), head, payload]
        left = size = _LENGTHS.size + len(head) + payload.nbytes
        deadline = None
        while True:
            try:
                sent = self.sock.sendmsg(data)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                raise DataLinkClosed(f"data link send failed: {e}") from None
            left -= sent
            if not left:
                break
            if sent or deadline is None:
                deadline = time.monotonic() + self.timeout_s  # progress: a fresh wait
            data = [memoryview(d).cast("B") for d in data]
            while sent and sent >= data[0].nbytes:  # drop what went, keep the rest
                sent -= data[0].nbytes
                data.pop(0)
            data[0] = data[0][sent:]
            events = self._either.poll(max(0, int(1000 * (deadline - time.monotonic()))))
            if not events:
                raise DataLinkClosed(f"the peer stopped reading for {self.timeout_s:g} s")
            if events[0][1] & select.POLLIN:
                self._stash()
        self.bytes_sent += size

    def _stash(self) -> None:
        try:
            chunk = self.sock.recv(STASH_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            raise DataLinkClosed(f"data link broke: {e}") from None
        if not chunk:
            raise DataLinkClosed("the peer closed the data link")
        if len(self._spill) - self._spill_pos + len(chunk) > MAX_SPILL_BYTES:
            raise ProtocolError("the peer keeps sending without reading")
        self._spill += chunk

    def _from_spill(self, view: memoryview) -> int:
        n = min(len(self._spill) - self._spill_pos, view.nbytes)
        if n <= 0:
            return 0
        with memoryview(self._spill) as spill:
            view[:n] = spill[self._spill_pos : self._spill_pos + n]
        self._spill_pos += n
        if self._spill_pos == len(self._spill):
            self._spill, self._spill_pos = bytearray(), 0
        return n

    # --- receiving -------------------------------------------------------------------

    def readable(self) -> bool:
        """A message (or part of one) is here already: buffered, or in the socket."""
        return (
            self._end > self._start or self._spill_pos < len(self._spill) or bool(self._in.poll(0))
        )

    def recv(self, timeout_s: float | None = None) -> list:
        """The next message's frames [header bytes, payload bytearray]; waits up
        to `timeout_s` (default: the link's timeout) for it to start, raising
        TimeoutError, and then for the rest of it."""
        if self._end == self._start and not self._receive_now():
            wait = self.timeout_s if timeout_s is None else timeout_s
            if not self._in.poll(max(0, int(wait * 1000))):
                raise TimeoutError
        head_len, payload_len = _LENGTHS.unpack(self._take(_LENGTHS.size))
        if head_len > MAX_HEAD_BYTES or payload_len > MAX_FRAME_BYTES:
            raise ProtocolError(f"data link frame of {head_len}+{payload_len} bytes is too large")
        head = bytes(self._take(head_len))
        payload = bytearray(payload_len)
        self._take_into(memoryview(payload))
        self.bytes_received += _LENGTHS.size + head_len + payload_len
        return [head, payload]

    def _recv_into(self, view: memoryview, wait: bool) -> int:
        """Bytes received into `view`: 0 only when not `wait`ing and none are
        there; waiting (mid-message) is bounded by the link's timeout."""
        if got := self._from_spill(view):
            return got
        while True:
            try:
                got = self.sock.recv_into(view)
            except BlockingIOError:
                if not wait:
                    return 0
                if not self._in.poll(int(1000 * self.timeout_s)):
                    raise DataLinkClosed(
                        f"data link: a message stopped halfway for {self.timeout_s:g} s"
                    ) from None
                continue
            except OSError as e:
                raise DataLinkClosed(f"data link broke: {e}") from None
            if got == 0:
                raise DataLinkClosed("the peer closed the data link")
            return got

    def _receive_now(self) -> bool:
        """Take what the socket holds into the scratch buffer, without waiting."""
        return self._fill(wait=False)

    def _fill(self, wait: bool = True) -> bool:
        """Receive more into the scratch buffer (moving what is unread to its front)."""
        if self._start:
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
        got = self._recv_into(self._view[self._end :], wait)
        self._end += got
        return got > 0

    def _take(self, n: int) -> memoryview:
        """The next n bytes (n <= the scratch buffer), valid until the next receive."""
        while self._end - self._start < n:
            self._fill()
        out = self._view[self._start : self._start + n]
        self._start += n
        return out

    def _take_into(self, out: memoryview) -> None:
        """Fill `out` from what is buffered, then straight from the socket."""
        have = min(self._end - self._start, out.nbytes)
        out[:have] = self._view[self._start : self._start + have]
        self._start += have
        filled = have
        while filled < out.nbytes:
            filled += self._recv_into(out[filled:], wait=True)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _opening(conn: socket.socket, size: int, deadline: float) -> bytes:
    """The first `size` bytes a new connection sends (fewer if it dawdles or closes).
    A real peer sends its opening right after connecting: one that dawdles is a
    stranger's, and must not hold up the real ones."""
    got = b""
    try:
        conn.settimeout(min(OPENING_S, max(0.1, deadline - time.monotonic())))
        while len(got) < size:
            part = conn.recv(size - len(got))
            if not part:
                break
            got += part
    except OSError:
        return b""
    return got


def connect(
    host: str, port: int, session: int, ticket: bytes, timeout_s: float, connect_timeout_s: float
) -> DataLink:
    """The connecting end (the master, or a worker opening a direct hop): connect,
    present the session's ticket. Raises OSError."""
    sock = socket.create_connection((host, port), timeout=connect_timeout_s)
    try:
        sock.sendall(_OPEN.pack(OPEN_MAGIC, session, ticket))
    except OSError:
        sock.close()
        raise
    return DataLink(sock, timeout_s)


class DataListener:
    """The worker's listening socket for data links (bound once, for every session)."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host.strip("[]"), port))
            self.sock.listen(8)
        except OSError:
            self.sock.close()
            raise
        self.port = self.sock.getsockname()[1]

    def accept(
        self,
        session: int,
        ticket: bytes,
        timeout_s: float,
        link_timeout_s: float,
        alive: Callable[[], None] | None = None,
    ) -> DataLink:
        """The master's connection for `session`: whoever does not present its
        ticket first thing is dropped. Raises TimeoutError if none comes in time."""
        try:
            return self.accept_each(session, {ticket: 0}, timeout_s, link_timeout_s, alive)[0]
        except TimeoutError:
            raise TimeoutError("the master did not open its data link in time") from None

    def accept_each(
        self,
        session: int,
        tickets: dict[bytes, T],
        timeout_s: float,
        link_timeout_s: float,
        alive: Callable[[], None] | None = None,
    ) -> dict[T, DataLink]:
        """One connection per ticket (the master's, or other workers' for direct
        pipeline hops), each presenting its ticket first thing; anyone else is
        dropped. Raises TimeoutError, naming what did not come, when not every
        ticket's connection arrived in time (those that did are closed).
        `alive` is called at least every ALIVE_S while waiting (a watchdog's beat)."""
        deadline = time.monotonic() + timeout_s
        wanted = {_OPEN.pack(OPEN_MAGIC, session, t): key for t, key in tickets.items()}
        got: dict[T, DataLink] = {}
        while len(got) < len(tickets) and (left := deadline - time.monotonic()) > 0:
            if alive is not None:
                alive()
            self.sock.settimeout(min(left, ALIVE_S))
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            opening = _opening(conn, len(OPEN_MAGIC) + 8 + TICKET_BYTES, deadline)
            key = next((k for w, k in wanted.items() if secrets.compare_digest(opening, w)), None)
            if key is None or key in got:
                conn.close()  # a stranger, or a late connection of an earlier session
                continue
            got[key] = DataLink(conn, link_timeout_s)
        if len(got) < len(tickets):
            for link in got.values():
                link.close()
            missing = [k for k in tickets.values() if k not in got]
            raise TimeoutError(f"no data link opened in time for {missing}")
        return got

    def close(self) -> None:
        self.sock.close()
