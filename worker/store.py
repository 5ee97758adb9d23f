"""The worker's shard store: shards it already has, and shards being pushed.

Layout under --store DIR:
    DIR/manifest.json + files        a pre-copied rank directory (from `tpi split`)
    DIR/<any>/manifest.json + files  several pre-copied rank directories
    DIR/shards/<manifest sha256>/    shards pushed by a master
    DIR/incoming/<manifest sha256>/  pushes in progress (resumable)
A shard is found by the sha256 of its manifest bytes; its files are verified
(sha256) before first use and again only if they change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tpi.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardError,
    sha256_bytes,
    sha256_file,
    verify_files,
)
from tpi.storage.shard_verify import remember, verify_once

MAX_FILE_BYTES = 1 << 40


def _valid_hash(h: str) -> bool:
    return len(h) == 64 and all(c in "0123456789abcdef" for c in h)


class ShardStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _candidates(self) -> list[Path]:
        dirs = [self.root]
        dirs += [
            d
            for d in sorted(self.root.iterdir())
            if d.is_dir() and d.name not in ("shards", "incoming")
        ]
        shards = self.root / "shards"
        if shards.is_dir():
            dirs += sorted(d for d in shards.iterdir() if d.is_dir())
        return dirs

    def find(self, manifest_hash: str) -> Path | None:
        """A directory holding the shard with this manifest hash, or None.

        Only the manifest is matched here (cheap, during the handshake); the files
        are verified by verify() when the shard is loaded.
        """
        if not _valid_hash(manifest_hash):
            return None
        for d in self._candidates():
            try:
                raw = (d / MANIFEST_NAME).read_bytes()
            except OSError:
                continue
            if sha256_bytes(raw) == manifest_hash:
                return d
        return None

    def verify(self, shard_dir: Path, manifest_hash: str) -> None:
        """Check every file against the manifest (once per unchanged shard).

        A pushed shard that fails is removed, so the next session pushes it again.
        """
        m = Manifest.from_bytes(
            (shard_dir / MANIFEST_NAME).read_bytes(), str(shard_dir / MANIFEST_NAME)
        )
        try:
            verify_once(shard_dir, m, manifest_hash)
        except ShardError as e:
            if shard_dir.parent == self.root / "shards":
                shutil.rmtree(shard_dir, ignore_errors=True)
                raise ShardError(
                    f"{e}; it was removed and will be pushed again next session"
                ) from None
            raise

    def discard_pushed(self, shard_dir: Path) -> bool:
        """Remove a pushed shard found corrupt, so the next session pushes it again
        (a rank directory the user copied in is left for the user to replace)."""
        if Path(shard_dir).parent != self.root / "shards":
            return False
        shutil.rmtree(shard_dir, ignore_errors=True)
        return True

    def _incoming(self, manifest_hash: str) -> Path:
        if not _valid_hash(manifest_hash):
            raise ShardError("invalid shard name")
        return self.root / "incoming" / manifest_hash

    def partial_sizes(self, manifest_hash: str) -> dict[str, int]:
        """Bytes already received per file of an interrupted push (to resume)."""
        d = self._incoming(manifest_hash)
        if not d.is_dir():
            return {}
        return {f.name: f.stat().st_size for f in d.iterdir() if f.is_file()}

    def write_chunk(self, manifest_hash: str, name: str, offset: int, total: int, data) -> int:
        """Store bytes of `name` at `offset`; returns the next expected offset."""
        if not name or "/" in name or "\\" in name or name.startswith(".") or len(name) > 255:
            raise ShardError(f"refusing unsafe file name {name!r}")
        if not 0 <= offset <= total <= MAX_FILE_BYTES or offset + len(data) > total:
            raise ShardError("chunk outside the file")
        d = self._incoming(manifest_hash)
        d.mkdir(parents=True, exist_ok=True)
        path = d / name
        size = path.stat().st_size if path.exists() else 0
        if offset > size:
            raise ShardError(f"chunk of {name} at {offset} leaves a gap (have {size} bytes)")
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.seek(offset)
            f.write(data)
            f.truncate(offset + len(data))
        return offset + len(data)

    def finalize(self, manifest_hash: str) -> Path:
        """Verify a completed push and move it into shards/; a bad file is deleted."""
        d = self._incoming(manifest_hash)
        try:
            raw = (d / MANIFEST_NAME).read_bytes()
        except OSError:
            raise ShardError("pushed shard has no manifest") from None
        if sha256_bytes(raw) != manifest_hash:
            (d / MANIFEST_NAME).unlink()
            raise ShardError("pushed manifest does not match its announced sha256")
        m = Manifest.from_bytes(raw, "pushed manifest")
        try:
            verify_files(d, m)
        except ShardError:
            for name, meta in m.files.items():  # drop what is wrong so a retry re-sends it
                p = d / name
                if (
                    p.exists()
                    and p.stat().st_size != meta["bytes"]
                    or p.exists()
                    and sha256_file(p) != meta["sha256"]
                ):
                    p.unlink()
            raise
        extra = {f.name for f in d.iterdir()} - set(m.files) - {MANIFEST_NAME}
        for name in extra:
            (d / name).unlink()
        final = self.root / "shards" / manifest_hash
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(d, final)
        remember(final, m, manifest_hash)
        return final
