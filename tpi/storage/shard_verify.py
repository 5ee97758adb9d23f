"""Verify a shard directory against its manifest, once.

Hashing a multi-GB shard takes many seconds, so a successful check is
remembered by fingerprint (every file's size and mtime) in $TPI_HOME/verified:
a restarted node does not re-hash an unchanged shard, and a changed file is
always checked again.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from tpi.paths import tpi_home
from tpi.storage.atomic import atomic_write_text
from tpi.storage.manifest import Manifest, verify_files

_memory: dict[str, list] = {}


def fingerprint(rank_dir: Path, manifest: Manifest) -> list:
    out = []
    for name in sorted(manifest.files):
        st = (Path(rank_dir) / name).stat()
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


def _marker(manifest_hash: str) -> Path:
    return tpi_home() / "verified" / f"{manifest_hash}.json"


def is_verified(rank_dir: Path, manifest: Manifest, manifest_hash: str) -> bool:
    try:
        fp = fingerprint(rank_dir, manifest)
    except OSError:
        return False
    if _memory.get(manifest_hash) == fp:
        return True
    try:
        return json.loads(_marker(manifest_hash).read_text()) == {
            "dir": str(Path(rank_dir).resolve()),
            "files": fp,
        }
    except (OSError, ValueError):
        return False


def remember(rank_dir: Path, manifest: Manifest, manifest_hash: str) -> None:
    fp = fingerprint(rank_dir, manifest)
    _memory[manifest_hash] = fp
    marker = _marker(manifest_hash)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"dir": str(Path(rank_dir).resolve()), "files": fp}))
    except OSError:
        pass  # read-only home: verify again next start


def verify_once(rank_dir: Path, manifest: Manifest, manifest_hash: str) -> None:
    """Raise ShardError naming the first bad file, unless verified before unchanged."""
    if is_verified(rank_dir, manifest, manifest_hash):
        return
    verify_files(rank_dir, manifest)
    remember(rank_dir, manifest, manifest_hash)


def forget(manifest_hash: str) -> None:
    """Drop what is remembered of a shard: its next load hashes every file again."""
    _memory.pop(manifest_hash, None)
    with contextlib.suppress(OSError):
        _marker(manifest_hash).unlink()
