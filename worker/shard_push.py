"""Receiving a shard the master pushes: chunks written (resumably) into the
store's incoming area, acknowledged one by one, verified when complete."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tpi.comm.wire import Kind
from tpi.worker.master_channel import MID_STEP_TIMEOUT_S, MasterChannel, SessionEnded
from tpi.worker.store import ShardStore

log = logging.getLogger("tpi.worker")
LOG_EVERY_S = 2.0


def receive_push(channel: MasterChannel, store: ShardStore, manifest_hash: str) -> Path:
    received, last_log = 0, time.monotonic()
    while True:
        msg = channel.next(MID_STEP_TIMEOUT_S)
        if msg.kind == Kind.PUSH_CHUNK:
            b = msg.body
            data = msg.payload.buffer if msg.payload is not None else b""
            nxt = store.write_chunk(manifest_hash, b["file"], b["offset"], b["total"], data)
            received += len(data)
            channel.control(Kind.PUSH_ACK, file=b["file"], next=nxt)
            if time.monotonic() - last_log > LOG_EVERY_S:
                log.info("receiving shard: %.1f MB so far", received / 1e6)
                last_log = time.monotonic()
        elif msg.kind == Kind.PUSH_DONE:
            log.info("shard received (%.1f MB this session); verifying", received / 1e6)
            path = store.finalize(manifest_hash)
            channel.control(Kind.READY, verified=True)
            return path
        else:
            raise SessionEnded(f"unexpected {msg.kind.name} during shard push")
