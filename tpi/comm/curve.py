"""CurveZMQ: encrypted, authenticated links between master and workers.

`tpi keygen DIR` writes a keyring to copy to every device:
    DIR/secret                      the shared secret (see tpi.comm.auth)
    DIR/master.key[_secret]         the master's key pair
    DIR/worker.key[_secret]         the workers' key pair
    DIR/authorized/master.key       public keys a worker accepts as master
A worker is the CURVE server: it only completes handshakes with a master whose
public key is in authorized/ (checked by ZeroMQ's ZAP authenticator); the
master knows the worker public key, so a worker cannot be impersonated either.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

from tpi.comm.auth import new_secret
from tpi.errors import TpiError


class CurveKeyError(TpiError):
    pass


@dataclass
class CurveKeys:
    public: bytes
    secret: bytes = field(repr=False)
    peer_public: bytes | None  # the worker's public key (master side)
    authorized_dir: Path | None  # master keys a worker accepts (worker side)
    _auth: object = field(default=None, repr=False)

    @classmethod
    def load(cls, directory: str | Path, role: str) -> CurveKeys:
        if not zmq.has("curve"):
            raise CurveKeyError("this ZeroMQ build has no CURVE support")
        d = Path(directory).expanduser()
        try:
            public, secret = zmq.auth.load_certificate(d / f"{role}.key_secret")
            peer = zmq.auth.load_certificate(d / "worker.key")[0] if role == "master" else None
        except (OSError, ValueError) as e:
            raise CurveKeyError(
                f"cannot read CURVE keys in {d}: {e} (make them with 'tpi keygen {d}')"
            ) from None
        authorized = d / "authorized" if role == "worker" else None
        if authorized is not None and not any(authorized.glob("*.key")):
            raise CurveKeyError(f"no authorized master keys in {authorized}")
        return cls(public, secret, peer, authorized)

    def secure_client(self, sock: zmq.Socket) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.peer_public

    def secure_server(self, sock: zmq.Socket) -> None:
        if self._auth is None:
            from zmq.auth.thread import ThreadAuthenticator

            auth = ThreadAuthenticator(sock.context)
            auth.start()
            auth.configure_curve(domain="*", location=str(self.authorized_dir))
            self._auth = auth
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def keygen(directory: str | Path, force: bool = False) -> Path:
    d = Path(directory).expanduser()
    if d.exists() and any(d.iterdir()) and not force:
        raise CurveKeyError(f"{d} is not empty (use --force to replace the keys)")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for name in ("master", "worker"):
        for suffix in (".key", ".key_secret"):
            (d / f"{name}{suffix}").unlink(missing_ok=True)
        zmq.auth.create_certificates(str(d), name)
        os.chmod(d / f"{name}.key_secret", 0o600)
    authorized = d / "authorized"
    shutil.rmtree(authorized, ignore_errors=True)
    authorized.mkdir()
    shutil.copy(d / "master.key", authorized / "master.key")
    secret = d / "secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_secret() + "\n")
    return d
