"""Does a worker know our cluster's secret? Asked with the opening of the
ordinary handshake, and never answered.

The master says HELLO; a worker that requires a secret answers CHALLENGE with
its proof of the secret (tpi.comm.auth), which the master checks. The master
never sends AUTH, so the check proves nothing of ours, reserves nothing (the
worker forgets an unanswered challenge after a few seconds) and starts no
session. A worker serving another master answers "busy" instead.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import zmq

from tpi.comm.auth import check, hello_body, new_nonce
from tpi.comm.curve import CurveKeys
from tpi.comm.links import configure_socket, normalize_address, tcp_reachable
from tpi.comm.wire import Kind, ProtocolError, decode, encode_control

ANSWER_TIMEOUT_S = 2.0
# No shard has this manifest: a worker that admits the check at once (--insecure) only
# says it lacks the shard, and the END that follows ends the session cleanly.
CHECK_MANIFEST = "0" * 64
MAX_PARALLEL = 16


@dataclass(frozen=True)
class Verdict:
    """What a check found out about one worker."""

    reachable: bool  # something accepts connections at its address
    secret: str  # "same", "foreign", "none" (it runs --insecure) or "unknown"
    state: str  # "free", "busy" or "?"
    note: str = ""  # why, when it is not simply usable

    @property
    def usable(self) -> bool:
        """A free worker of this cluster."""
        return self.reachable and self.secret == "same" and self.state == "free"


def check_worker(
    address: str,
    secret: bytes | None,
    curve: CurveKeys | None = None,
    timeout_s: float = ANSWER_TIMEOUT_S,
) -> Verdict:
    if not tcp_reachable(address):
        return Verdict(False, "unknown", "?", "nothing accepts connections there")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    configure_socket(sock)
    try:
        if curve is not None:
            curve.secure_client(sock)
        sock.connect(normalize_address(address))
        session, nonce = secrets.randbits(62), new_nonce()
        body = hello_body(session, 1, 2, CHECK_MANIFEST, nonce, secret is not None)
        sock.send_multipart([encode_control(Kind.HELLO, body)])
        if not sock.poll(int(timeout_s * 1000)):
            hint = " (different --curve keys?)" if curve is not None else " (does it need --curve?)"
            return Verdict(True, "unknown", "?", "no answer to HELLO" + hint)
        try:
            msg = decode(sock.recv_multipart())
        except ProtocolError as e:
            return Verdict(True, "unknown", "?", f"not a tpi worker: {e}")
        return _verdict(msg, secret, session, nonce, sock)
    finally:
        sock.close(linger=200)  # an END to an insecure worker must leave
        ctx.term()


def _verdict(msg, secret: bytes | None, session: int, nonce: str, sock: zmq.Socket) -> Verdict:
    if msg.kind == Kind.CHALLENGE:
        if secret is None:
            return Verdict(True, "unknown", "free", "it requires a secret: give --secret-file")
        b = msg.body
        same = check(secret, b.get("proof"), "worker", nonce, str(b.get("nonce")), session)
        return Verdict(True, "same" if same else "foreign", "free")
    if msg.kind == Kind.WELCOME:  # --insecure: the session started; end it at once
        with contextlib.suppress(zmq.ZMQError):
            end = {"session": session, "reason": "discovery check"}
            sock.send_multipart([encode_control(Kind.END, end)])
        return Verdict(True, "none", "free", "it runs --insecure: anyone may use it")
    reason = str(msg.body.get("reason", "")) if msg.kind == Kind.REFUSE else msg.kind.name
    if reason.startswith("busy"):
        return Verdict(True, "unknown", "busy", reason)
    if "requires the cluster's shared secret" in reason:
        return Verdict(True, "unknown", "free", "it requires a secret: give --secret-file")
    return Verdict(True, "unknown", "?", f"refused: {reason}")


def check_all(
    addresses: Iterable[str], secret: bytes | None, curve: CurveKeys | None = None
) -> dict[str, Verdict]:
    """Every address checked, in parallel (each check is one round trip)."""
    addresses = list(addresses)
    if not addresses:
        return {}
    with ThreadPoolExecutor(min(MAX_PARALLEL, len(addresses))) as pool:
        verdicts = pool.map(lambda a: check_worker(a, secret, curve), addresses)
        return dict(zip(addresses, verdicts, strict=True))
