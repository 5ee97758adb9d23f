"""Fakes at the worker's socket boundary, and small shards built by hand, for the
worker's unit tests (no process, no model)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tests.planning_helpers import tiny_config
from tpi.comm.links import Inbound
from tpi.comm.wire import Kind, Message, decode, encode_control
from tpi.model.partition import plan_partition
from tpi.storage.manifest import MANIFEST_NAME, Manifest, sha256_bytes

SECRET = b"unit-test-secret-0123456789abcdef"


def write_shard(directory: Path, files: dict[str, bytes], model_id: str = "unit") -> str:
    """A rank-1-of-2 shard of `files` (any bytes) in `directory`; returns its manifest hash."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    raw = shard_manifest(files, model_id)
    (directory / MANIFEST_NAME).write_bytes(raw)
    return sha256_bytes(raw)


def shard_manifest(files: dict[str, bytes], model_id: str = "unit") -> bytes:
    cfg = tiny_config()
    listed = {n: {"sha256": sha256_bytes(d), "bytes": len(d)} for n, d in files.items()}
    m = Manifest(model_id, cfg, plan_partition(cfg, [1, 1]), 1, "fp32", listed)
    return m.to_bytes()


def message(kind: Kind, payload=None, **body) -> Message:
    """A control message as the worker receives it (encoded and checked by the wire)."""
    frames = [encode_control(kind, body)] + ([payload] if payload is not None else [])
    return decode(frames)


def inbound(kind: Kind, peer: bytes = b"master", **body) -> tuple[Inbound, Message]:
    frames = [encode_control(kind, body)]
    return Inbound(peer, 7, frames), decode(frames)


@dataclass
class FakeEndpoint:
    """Records what the worker sends, per peer, decoded."""

    sent: list[tuple[bytes, Message]] = field(default_factory=list)

    def send(self, peer: bytes, frames: list) -> bool:
        self.sent.append((peer, decode(frames)))
        return True

    def kinds(self, peer: bytes | None = None) -> list[Kind]:
        return [m.kind for p, m in self.sent if peer is None or p == peer]


class FakeChannel:
    """A master channel that hands out scripted messages and records the worker's answers."""

    def __init__(self, script: list[Message]) -> None:
        self.script = deque(script)
        self.answers: list[tuple[Kind, dict]] = []

    def next(self, timeout_s: float | None) -> Message:
        return self.script.popleft()

    def control(self, kind: Kind, **body) -> None:
        self.answers.append((kind, body))
