"""Which files of a Hugging Face repository tpi downloads, and the checksums the
hub publishes for them.

Only what tpi reads: config.json, generation_config.json, the fast tokenizer
(tokenizer.json, tokenizer_config.json, chat_template.jinja) and the safetensors
weights (model.safetensors, or the shards model.safetensors.index.json names);
or, for a GGUF, that one file. No README, no PyTorch .bin, no other formats.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tpi.errors import ModelError

INDEX_NAME = "model.safetensors.index.json"
REQUIRED = ("config.json", "tokenizer.json")
OPTIONAL = ("generation_config.json", "tokenizer_config.json", "chat_template.jinja")
SINGLE_WEIGHTS = "model.safetensors"
CHUNK = 1 << 20


@dataclass(frozen=True)
class HubFile:
    name: str  # path in the repository
    size: int | None
    sha256: str | None  # a Git LFS file's content hash
    git_sha1: str | None  # a file kept in git: its blob id

    @classmethod
    def from_sibling(cls, sibling) -> HubFile:
        lfs = sibling.lfs
        sha256 = (
            (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None))
            if lfs
            else None
        )
        return cls(sibling.rfilename, sibling.size, sha256, None if lfs else sibling.blob_id)

    @property
    def checksum(self) -> str | None:
        return (
            f"sha256 {self.sha256}"
            if self.sha256
            else (f"git sha1 {self.git_sha1}" if self.git_sha1 else None)
        )


def checkpoint_files(repo: str, listed: dict[str, HubFile]) -> tuple[list[HubFile], bool]:
    """The metadata files tpi reads and, if the repository has no shard index, its
    weights; returns them and whether the shards are named by an index (fetched
    with the rest, then `shard_files`)."""
    missing = [n for n in REQUIRED if n not in listed]
    if missing:
        raise ModelError(
            f"{repo} has no {' or '.join(missing)}: not a Hugging Face checkpoint tpi can read "
            "(for a GGUF, name the file: ORG/NAME/FILE.gguf)"
        )
    files = [listed[n] for n in REQUIRED + OPTIONAL if n in listed]
    if INDEX_NAME in listed:
        return files + [listed[INDEX_NAME]], True
    if SINGLE_WEIGHTS in listed:
        return files + [listed[SINGLE_WEIGHTS]], False
    roots = [f for n, f in listed.items() if n.endswith(".safetensors") and "/" not in n]
    if len(roots) == 1:
        return files + roots, False
    others = sorted({Path(n).suffix for n in listed if Path(n).suffix in (".bin", ".pt", ".gguf")})
    found = f" (it has {', '.join(others)} files)" if others else ""
    raise ModelError(f"{repo} has no safetensors weights tpi can read{found}")


def shard_files(repo: str, index_path: Path, listed: dict[str, HubFile]) -> list[HubFile]:
    """The weight files a downloaded model.safetensors.index.json names."""
    import json

    try:
        names = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{repo}: cannot read {INDEX_NAME}: {e}") from None
    absent = [n for n in names if n not in listed]
    if absent:
        raise ModelError(f"{repo}: {INDEX_NAME} names files the repository lacks: {absent[:3]}")
    return [listed[n] for n in names]


def weights_estimate(listed: dict[str, HubFile]) -> int:
    """Bytes of the root safetensors files (what a download will be, near enough,
    before the index says exactly which)."""
    return sum(
        f.size or 0
        for n, f in listed.items()
        if n.endswith(".safetensors") and "/" not in n and not n.startswith("consolidated")
    )


def mismatch(path: Path, expected: HubFile) -> str | None:
    """None if `path` holds what the hub published for `expected`, else what differs."""
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        return f"{size} bytes, the hub says {expected.size}"
    if expected.sha256:
        digest = hashlib.sha256()
    elif expected.git_sha1:
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(f"blob {size}\0".encode())  # git hashes a header, then the bytes
    else:
        return None
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    got = digest.hexdigest()
    want = expected.sha256 or expected.git_sha1
    if got != want:
        kind = "sha256" if expected.sha256 else "git sha1"
        return f"its {kind} is {got[:16]}..., the hub publishes {want[:16]}..."
    return None
