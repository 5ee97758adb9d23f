"""Who may start a session: a master must prove the shared secret first.

While idle, the worker answers every HELLO with a CHALLENGE at once and
remembers it (a few seconds, a bounded number of peers); the first peer to
answer with a valid AUTH gets the session. Nothing a peer sends before it
has proven the secret can reserve the worker or make it wait, so a stranger
repeating HELLOs cannot keep real masters out. (With --insecure there is no
secret to prove: the first HELLO starts the session.)
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from tpi.comm.auth import check, new_nonce, proof
from tpi.comm.links import Inbound, WorkerEndpoint
from tpi.comm.wire import Kind, Message, encode_control
from tpi.worker.handshake import MAX_WORLD, Hello
from tpi.worker.master_channel import peer_address

log = logging.getLogger("tpi.worker")

AUTH_TIMEOUT_S = 10.0  # a challenge not answered by then is forgotten
MAX_PENDING = 64  # challenges outstanding at once; the oldest is forgotten first


@dataclass
class _Challenge:
    hello: Hello
    body: dict
    nonce_w: str
    deadline: float


class Admission:
    def __init__(self, endpoint: WorkerEndpoint, secret: bytes | None) -> None:
        self.endpoint = endpoint
        self.secret = secret
        self._pending: OrderedDict[bytes, _Challenge] = OrderedDict()

    def _refuse(self, peer: bytes, reason: str, session: int | None = None) -> None:
        body = {"reason": reason} if session is None else {"session": session, "reason": reason}
        self.endpoint.send(peer, [encode_control(Kind.REFUSE, body)])

    def hello(self, inb: Inbound, msg: Message) -> tuple[Inbound, dict] | None:
        """A HELLO: the session to start now (insecure), or None (challenged, or refused)."""
        hello = Hello.from_body(msg.body)
        if not (2 <= hello.world <= MAX_WORLD and 1 <= hello.rank < hello.world):
            self._refuse(inb.peer, f"bad rank {hello.rank} of world {hello.world}", hello.session)
            return None
        if self.secret is None:
            return inb, msg.body
        if hello.auth_mode != "hmac":
            self._refuse(
                inb.peer,
                "this worker requires the cluster's shared secret "
                "(set TPI_SECRET or --secret-file on the master)",
                hello.session,
            )
            return None
        self.expire()
        nonce_w = new_nonce()
        self._pending.pop(inb.peer, None)
        self._pending[inb.peer] = _Challenge(
            hello, msg.body, nonce_w, time.monotonic() + AUTH_TIMEOUT_S
        )
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
        body = {
            "session": hello.session,
            "nonce": nonce_w,
            "proof": proof(self.secret, "worker", hello.nonce, nonce_w, hello.session),
        }
        self.endpoint.send(inb.peer, [encode_control(Kind.CHALLENGE, body)])
        return None

    def auth(self, inb: Inbound, msg: Message) -> tuple[Inbound, dict] | None:
        """An AUTH: the session to start if it answers our challenge to that peer."""
        pending = self._pending.pop(inb.peer, None)
        if pending is None or pending.deadline < time.monotonic():
            return None  # not challenged (or too late): ignored, like any stray frame
        h = pending.hello
        if msg.body["session"] != h.session or not check(
            self.secret, msg.body["proof"], "master", h.nonce, pending.nonce_w, h.session
        ):
            log.warning("master %s failed authentication", peer_address(inb))
            self._refuse(inb.peer, "authentication failed: wrong shared secret", h.session)
            return None
        self._pending.clear()  # one master at a time: the others ask again later
        return inb, pending.body

    def expire(self) -> None:
        now = time.monotonic()
        for peer in [p for p, c in self._pending.items() if c.deadline < now]:
            del self._pending[peer]
