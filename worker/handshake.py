"""Admitting a master: check its HELLO, prove the shared secret both ways, and
make sure the shard it asks for is here (receiving it if the master pushes it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tpi.comm.auth import check, new_nonce, proof
from tpi.comm.wire import Kind
from tpi.worker.master_channel import MasterChannel
from tpi.worker.options import WorkerOptions
from tpi.worker.shard_push import receive_push
from tpi.worker.store import ShardStore

log = logging.getLogger("tpi.worker")

AUTH_TIMEOUT_S = 10.0  # a master that does not answer the challenge is dropped
MAX_WORLD = 1024


class Refused(Exception):
    """The master's request cannot be served; it is told why with REFUSE."""


@dataclass(frozen=True)
class Hello:
    """What a master asks for in its HELLO (fields checked by the wire schema)."""

    session: int
    rank: int
    world: int
    manifest_hash: str
    nonce: str
    auth_mode: str

    @classmethod
    def from_body(cls, body: dict) -> Hello:
        return cls(
            int(body["session"]),
            int(body["rank"]),
            int(body["world"]),
            str(body["manifest"]),
            str(body["nonce"]),
            str(body["auth"]),
        )


def authenticate(channel: MasterChannel, hello: Hello, secret: bytes | None) -> None:
    """Mutual proof of the shared secret (see tpi.comm.auth) before anything else."""
    if secret is None:
        return
    if hello.auth_mode != "hmac":
        raise Refused(
            "this worker requires the cluster's shared secret (set TPI_SECRET or --secret-file on the master)"
        )
    nonce_w = new_nonce()
    channel.control(
        Kind.CHALLENGE,
        nonce=nonce_w,
        proof=proof(secret, "worker", hello.nonce, nonce_w, hello.session),
    )
    msg = channel.next(AUTH_TIMEOUT_S)
    if msg.kind != Kind.AUTH or not check(
        secret, msg.body["proof"], "master", hello.nonce, nonce_w, hello.session
    ):
        log.warning("master %s failed authentication", channel.addr)
        raise Refused("authentication failed: wrong shared secret")


def admit(channel: MasterChannel, hello: Hello, options: WorkerOptions, store: ShardStore) -> Path:
    """Run the handshake; returns the directory of the shard to load."""
    if not (2 <= hello.world <= MAX_WORLD and 1 <= hello.rank < hello.world):
        raise Refused(f"bad rank {hello.rank} of world {hello.world}")
    authenticate(channel, hello, options.secret)
    found = store.find(hello.manifest_hash)
    if found is None and not options.accept_push:
        raise Refused(
            f"no shard with manifest {hello.manifest_hash[:12]}... in {store.root} "
            "and this worker does not accept pushed shards"
        )
    partial = {} if found else store.partial_sizes(hello.manifest_hash)
    channel.control(Kind.WELCOME, have_shard=found is not None, partial=partial)
    return found if found is not None else receive_push(channel, store, hello.manifest_hash)
