"""Shards to workers whose stores lack them: resumable, windowed, verified.

Each worker's WELCOME says which files of its shard it has and how much of
each (an interrupted push resumes there). PUSH_WINDOW chunks are in flight per
worker at a time; each PUSH_ACK lets another go. After the last file (the
manifest, written last so a half-pushed shard is never taken for whole),
PUSH_DONE asks the worker to verify the shard; its READY ends the push.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tpi.comm.links import ClusterError, WorkerFailed, WorkerLink
from tpi.comm.wire import Kind, encode_control
from tpi.master.connection import WorkerConnections
from tpi.storage.manifest import MANIFEST_NAME, read_manifest

CHUNK_BYTES = 1 << 20
PUSH_WINDOW = 8  # chunks in flight per worker
VERIFY_TIMEOUT_S = 600.0


@dataclass
class PushState:
    link: WorkerLink
    rank_dir: Path
    files: list[tuple[str, int]]  # (name, size), manifest last
    offsets: dict[str, int]
    file_index: int = 0
    empty_todo: set[str] = field(default_factory=set)  # zero-byte files still to create
    in_flight: int = 0
    sent_bytes: int = 0
    done_sent: bool = False

    def remaining(self) -> int:
        return sum(size - self.offsets.get(name, 0) for name, size in self.files)


class ShardSender:
    def __init__(
        self,
        conn: WorkerConnections,
        rank_dir: Callable[[int], Path],
        progress: Callable[[int, int, str], None] | None = None,
    ) -> None:
        self.conn = conn
        self.rank_dir = rank_dir
        self.progress = progress

    def _plan(self, rank: int, partial: dict) -> PushState:
        rank_dir = self.rank_dir(rank)
        manifest, _ = read_manifest(rank_dir)
        files = [(name, meta["bytes"]) for name, meta in sorted(manifest.files.items())]
        files.append((MANIFEST_NAME, (rank_dir / MANIFEST_NAME).stat().st_size))
        offsets = {}
        for name, size in files:
            have = partial.get(name, 0)
            offsets[name] = have if isinstance(have, int) and 0 <= have <= size else 0
        empty = {name for name, size in files if size == 0 and name not in partial}
        return PushState(
            self.conn.links.links[rank - 1], rank_dir, files, offsets, empty_todo=empty
        )

    def _pump(self, st: PushState) -> None:
        """Keep PUSH_WINDOW chunks in flight for one worker."""
        while st.in_flight < PUSH_WINDOW and st.file_index < len(st.files):
            name, size = st.files[st.file_index]
            off = st.offsets[name]
            if off >= size and name not in st.empty_todo:
                st.file_index += 1
                continue
            with open(st.rank_dir / name, "rb") as f:
                f.seek(off)
                data = f.read(CHUNK_BYTES)
            body = {"session": self.conn.session, "file": name, "offset": off, "total": size}
            st.link.send([encode_control(Kind.PUSH_CHUNK, body), data])
            st.offsets[name] = off + len(data)
            st.in_flight += 1
            st.sent_bytes += len(data)
            st.empty_todo.discard(name)
        if st.file_index >= len(st.files) and st.in_flight == 0 and not st.done_sent:
            st.link.send([encode_control(Kind.PUSH_DONE, {"session": self.conn.session})])
            st.done_sent = True

    def push(self, partials: dict[int, dict]) -> int:
        """Send each rank in `partials` what its store lacks (`partials`: the bytes of
        each file it already has, from its WELCOME); returns the bytes sent."""
        states = {r: self._plan(r, p) for r, p in partials.items()}
        total = sum(s.remaining() for s in states.values())
        resumed = sum(sum(s.offsets.values()) for s in states.values())
        self.conn.echo(
            f"pushing shards to rank(s) {', '.join(map(str, states))}: {total / 1e6:.1f} MB"
            + (f" (resuming; {resumed / 1e6:.1f} MB already there)" if resumed else "")
        )
        for st in states.values():
            self._pump(st)
        finished: set[int] = set()
        while len(finished) < len(states):
            waiting = set(states) - finished
            try:
                link, msg = self.conn.inbox.take(
                    {Kind.PUSH_ACK, Kind.READY}, VERIFY_TIMEOUT_S, waiting
                )
            except TimeoutError:
                r = min(waiting)
                raise ClusterError(
                    f"shard push stalled for rank(s) {sorted(waiting)}",
                    self.conn.links.links[r - 1].name,
                ) from None
            except WorkerFailed as e:
                raise ClusterError(
                    f"rank {e.rank} ({e.address}) rejected its shard: {e.message}", e.address
                ) from None
            st = states[link.rank]
            if msg.kind == Kind.PUSH_ACK:
                st.in_flight -= 1
                self._pump(st)
            elif msg.kind == Kind.READY and st.done_sent:
                finished.add(link.rank)
            if self.progress:
                self.progress(sum(s.sent_bytes for s in states.values()), max(total, 1), "push")
        return sum(s.sent_bytes for s in states.values())
