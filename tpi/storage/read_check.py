"""Every read of a shard file is checked, not only the first.

A shard's files are verified against their sha256 once (tpi.storage.shard_verify);
later starts trust an unchanged fingerprint (size and mtime), which a flipped
bit on a failing disk does not change. So each shard file also carries the
crc32 of its bytes in the manifest, and every complete read of it (a layer
loaded or streamed by the sliding window, the head at load) is checked against
it: crc32 (tpi.storage.checksum: ISA-L's where installed, ~8 GB/s, else zlib's)
releases the GIL, on the loader thread, so the check costs little next to the
read itself (benchmarks/read_checks.py measures it). A mismatch names the file and makes the next
start hash the shard in full again.

TPI_VERIFY_READS=0 turns the per-read check off (the first-load sha256 stays).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.storage.checksum import crc32
from tpi.storage.manifest import ShardError
from tpi.storage.shard_verify import forget


def reads_checked() -> bool:
    return os.environ.get("TPI_VERIFY_READS", "1") != "0"


class CorruptShard(ShardError):
    """What was read of a shard file does not match its manifest."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"shard file {path} is corrupt (what was read does not match the manifest's checksum)"
        )
        self.path = Path(path)


@dataclass(frozen=True)
class FileCheck:
    """How to check a read of one file's data section: the crc32 of the whole file
    is continued over the header bytes (read once) and the bytes after the data."""

    path: str
    crc32: int
    header_crc: int  # crc32 of the bytes before the data section
    tail: bytes  # the bytes after it (usually none)
    manifest_hash: str

    def verify(self, data: torch.Tensor) -> None:
        """`data`: the data section as read (uint8)."""
        crc = crc32(memoryview(data.numpy()).cast("B"), self.header_crc)
        if crc32(self.tail, crc) != self.crc32:
            forget(self.manifest_hash)  # the next start hashes every file again
            raise CorruptShard(self.path)


def file_check(
    path: Path, expected: int | None, data_begin: int, data_end: int, manifest_hash: str
) -> FileCheck | None:
    """The check of reads of [data_begin, data_end) of `path`; None when the manifest
    has no checksum (a split made before checksums) or checks are turned off."""
    if expected is None or not reads_checked():
        return None
    with open(path, "rb") as f:
        header = f.read(data_begin)
        f.seek(data_end)
        tail = f.read()
    return FileCheck(str(path), int(expected), crc32(header), tail, manifest_hash)
