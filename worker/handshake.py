"""Starting a session with an authenticated master (worker.admission): make
sure the shard it asks for is here, receiving it if the master pushes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tpi.comm.wire import Kind
from tpi.worker.master_channel import MasterChannel
from tpi.worker.options import WorkerOptions
from tpi.worker.shard_push import receive_push
from tpi.worker.store import ShardStore

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


def admit(
    channel: MasterChannel,
    hello: Hello,
    options: WorkerOptions,
    store: ShardStore,
    offer: dict | None = None,
) -> Path:
    """Tell the master whether its shard is here (and `offer`: the data link's
    port and ticket); returns the directory to load."""
    found = store.find(hello.manifest_hash)
    if found is None and not options.accept_push:
        raise Refused(
            f"no shard with manifest {hello.manifest_hash[:12]}... in {store.root} "
            "and this worker does not accept pushed shards"
        )
    partial = {} if found else store.partial_sizes(hello.manifest_hash)
    channel.control(Kind.WELCOME, have_shard=found is not None, partial=partial, **(offer or {}))
    return found if found is not None else receive_push(channel, store, hello.manifest_hash)
