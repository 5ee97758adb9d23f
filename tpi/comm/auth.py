"""Who may join a session: a shared secret, proven without revealing it.

Mutual challenge-response (HMAC-SHA256), bound to both nonces and the session:
    master -> HELLO     {nonce_m}
    worker -> CHALLENGE {nonce_w, proof_w = H(secret, "worker", nonce_m, nonce_w, session)}
    master -> AUTH      {proof_m = H(secret, "master", nonce_m, nonce_w, session)}
A stranger on the LAN can neither join a worker nor pose as one. The secret
comes from a file or an environment variable and is never logged or sent.
Encryption of the traffic itself is CurveZMQ's job (--curve).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from tpi.errors import TpiError

SECRET_ENV = "TPI_SECRET"
MIN_SECRET_BYTES = 16


class AuthError(TpiError):
    pass


def new_secret() -> str:
    return secrets.token_hex(32)


def new_nonce() -> str:
    return secrets.token_hex(16)


def load_secret(secret_file: str | Path | None) -> bytes | None:
    """The shared secret from --secret-file, else $TPI_SECRET; None if neither is set."""
    if secret_file:
        path = Path(secret_file).expanduser()
        try:
            raw = path.read_text().strip()
        except OSError as e:
            raise AuthError(f"cannot read the secret file {path}: {e.strerror or e}") from None
        if not raw:
            raise AuthError(f"the secret file {path} is empty")
    else:
        raw = os.environ.get(SECRET_ENV, "").strip()
        if not raw:
            return None
    if len(raw.encode()) < MIN_SECRET_BYTES:
        raise AuthError(
            f"the shared secret is too short (at least {MIN_SECRET_BYTES} characters; try 'tpi keygen')"
        )
    return raw.encode()


def require_secret(secret_file: str | Path | None, insecure: bool, who: str) -> bytes | None:
    if insecure:
        return None
    secret = load_secret(secret_file)
    if secret is None:
        raise AuthError(
            f"{who} needs the cluster's shared secret: set {SECRET_ENV} or pass --secret-file "
            "(make one with 'tpi keygen DIR'), or run with --insecure on a network you trust"
        )
    return secret


def hello_body(
    session: int, rank: int, world: int, manifest: str, nonce: str, with_secret: bool
) -> dict:
    """A master's HELLO: the session it opens, the rank and shard it asks for, its
    nonce, and whether it will prove the shared secret ("hmac") or not ("none")."""
    from tpi import __version__

    return {
        "session": session,
        "rank": rank,
        "world": world,
        "manifest": manifest,
        "tpi_version": __version__,
        "nonce": nonce,
        "auth": "hmac" if with_secret else "none",
    }


def proof(secret: bytes, role: str, nonce_master: str, nonce_worker: str, session: int) -> str:
    msg = f"tpi-auth-v1|{role}|{nonce_master}|{nonce_worker}|{session}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def check(
    secret: bytes, given: object, role: str, nonce_master: str, nonce_worker: str, session: int
) -> bool:
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(
        given.encode(), proof(secret, role, nonce_master, nonce_worker, session).encode()
    )
