"""The manifest of one rank's shard directory, and the split index above them.

A rank directory holds manifest.json plus the files it lists with their sha256.
The manifest's own sha256 (of its exact bytes) names the shard: master and
worker compare it in the handshake, and a pushed shard is stored under it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpi.errors import TpiError
from tpi.model.config import ModelConfig
from tpi.model.partition import Partition, RankSlice
from tpi.quant.quantize import QuantError, QuantSpec

FORMAT = "tpi-shard"
FORMAT_VERSION = 1
# Version 2 adds quantized weights ("quant"); unquantized shards keep writing 1
# so their manifests (and hashes, and shards cached on workers) stay the same.
QUANT_FORMAT_VERSION = 2
READABLE_VERSIONS = (FORMAT_VERSION, QUANT_FORMAT_VERSION)
SPLIT_FORMAT = "tpi-split"
MANIFEST_NAME = "manifest.json"
SPLIT_INDEX_NAME = "split.json"
HEAD_FILE = "head.safetensors"
READ_CHUNK = 4 * 1024 * 1024


class ShardError(TpiError):
    """A shard is missing, incomplete, corrupt or does not belong to this model."""


def layer_file(i: int) -> str:
    return f"layer_{i:03d}.safetensors"


def sha256_file(path: Path) -> str:
    """The file's sha256, its pages dropped from the page cache behind the reads: a
    multi-GB shard hashed on a device under a memory cap (which counts the page
    cache) should not push out what the device holds."""
    h = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), done, len(chunk), os.POSIX_FADV_DONTNEED)
            done += len(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    model_id: str
    config: ModelConfig
    partition: Partition
    rank: int
    dtype: str
    files: dict[str, dict[str, Any]]  # name -> {"sha256": str, "bytes": int}
    quant: QuantSpec = QuantSpec()

    @property
    def world(self) -> int:
        return self.partition.world

    @property
    def rank_slice(self) -> RankSlice:
        return self.partition.slices[self.rank]

    def to_bytes(self) -> bytes:
        data = {
            "format": FORMAT,
            "format_version": QUANT_FORMAT_VERSION if self.quant.quantized else FORMAT_VERSION,
            "model_id": self.model_id,
            "rank": self.rank,
            "dtype": self.dtype,
            "config": self.config.to_dict(),
            "partition": self.partition.to_dict(),
            "files": {k: self.files[k] for k in sorted(self.files)},
        }
        if self.quant.quantized:
            data["quant"] = self.quant.to_dict()
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "manifest") -> Manifest:
        try:
            d = json.loads(raw)
            if d.get("format") != FORMAT:
                raise ShardError(f"{where} is not a tpi shard manifest")
            if d.get("format_version") not in READABLE_VERSIONS:
                raise ShardError(
                    f"{where} has shard format version {d.get('format_version')}, this tpi reads "
                    f"{' and '.join(map(str, READABLE_VERSIONS))}; re-run 'tpi split'"
                )
            files = d["files"]
            if not isinstance(files, dict) or not all(
                isinstance(v, dict)
                and isinstance(v.get("sha256"), str)
                and isinstance(v.get("bytes"), int)
                and isinstance(v.get("crc32", 0), int)
                for v in files.values()
            ):
                raise ShardError(f"{where} has a malformed file list")
            for name in files:
                if "/" in name or "\\" in name or name.startswith("."):
                    raise ShardError(f"{where} lists an unsafe file name {name!r}")
            m = cls(
                model_id=str(d["model_id"]),
                config=ModelConfig.from_dict(d["config"]),
                partition=Partition.from_dict(d["partition"]),
                rank=int(d["rank"]),
                dtype=str(d["dtype"]),
                files=files,
                quant=QuantSpec.from_dict(d.get("quant")),
            )
        except ShardError:
            raise
        except (ValueError, KeyError, TypeError, QuantError) as e:
            raise ShardError(f"{where} is malformed: {e}") from None
        if not 0 <= m.rank < m.world:
            raise ShardError(f"{where} names rank {m.rank} of a world of {m.world}")
        return m

    def sha256(self) -> str:
        return sha256_bytes(self.to_bytes())


def read_manifest(rank_dir: Path) -> tuple[Manifest, str]:
    """The manifest of `rank_dir` and its hash (of the bytes on disk)."""
    path = Path(rank_dir) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ShardError(f"no shard manifest at {path}: {e.strerror or e}") from None
    return Manifest.from_bytes(raw, str(path)), sha256_bytes(raw)


def verify_files(rank_dir: Path, manifest: Manifest) -> None:
    """Check every listed file's size and sha256; name the first bad one."""
    for name, meta in manifest.files.items():
        path = Path(rank_dir) / name
        if not path.is_file():
            raise ShardError(f"shard file missing: {path}")
        if path.stat().st_size != meta["bytes"]:
            raise ShardError(
                f"shard file {path} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
            )
        if sha256_file(path) != meta["sha256"]:
            raise ShardError(f"shard file {path} is corrupt (sha256 does not match the manifest)")
