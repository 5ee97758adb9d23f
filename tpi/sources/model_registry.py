"""Resolve what the user passed as --model into a Hugging Face checkpoint directory.

Accepted: nothing (the embedded default), a checkpoint directory, a .gguf file
(converted once into the cache), the name of a model already in the cache, or a
model on the Hugging Face hub, ORG/NAME[@REVISION] or ORG/NAME/FILE.gguf, pulled
into the cache on first use once the user agrees (tpi.sources.hub_pull).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tpi.errors import ModelError
from tpi.paths import models_dir
from tpi.sources.hub_ref import HubRef, looks_like_hub_name, parse_hub_ref
from tpi.storage.file_lock import file_lock

COMPLETE_MARKER = ".tpi-complete"
ProgressFn = Callable[[int, int, str], None]


def is_converted(target: Path) -> bool:
    return (target / COMPLETE_MARKER).is_file()


def ensure_converted(
    gguf: Path, target: Path, echo: Callable[[str], None], progress: ProgressFn | None
) -> Path:
    """Convert `gguf` into `target` unless a finished conversion is already there."""
    from tpi.sources.gguf_convert import convert_gguf

    if is_converted(target):
        return target
    with file_lock(models_dir() / ".lock"):
        if is_converted(target):  # another process finished meanwhile
            return target
        echo(f"Converting {gguf.name} to {target} (once)...")
        convert_gguf(gguf, target, progress=progress, overwrite=True)
        (target / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf)}) + "\n")
    return target


def _gguf_cache_name(gguf: Path) -> str:
    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return f"{gguf.stem}-{hashlib.sha256(key).hexdigest()[:8]}"


def resolve_model(
    spec: str | None,
    echo: Callable[[str], None],
    progress: ProgressFn | None = None,
) -> Path:
    from tpi.sources.default_model import ensure_default_model

    if spec is None:
        return ensure_default_model(echo, progress)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ensure_converted(path, models_dir() / _gguf_cache_name(path), echo, progress)
    if path.is_dir():
        return path
    cached = models_dir() / spec
    if "/" not in spec and is_converted(cached):
        return cached
    if path.exists():
        raise ModelError(f"{spec} is neither a model directory nor a .gguf file")
    if looks_like_hub_name(spec):
        return _from_hub(parse_hub_ref(spec), echo, progress)
    raise ModelError(
        f"model not found: {spec} (not a directory, .gguf file, cached model name or "
        "ORG/NAME on the hub; see 'tpi models')"
    )


def _from_hub(ref: HubRef, echo: Callable[[str], None], progress: ProgressFn | None) -> Path:
    """A hub model's copy in the cache, pulled first if the user agrees."""
    from tpi.sources import consent
    from tpi.sources.hub_pull import list_revision, pull

    if is_converted(ref.cache_dir):
        return ref.cache_dir
    if not consent.can_ask():
        raise ModelError(
            f"{ref} is neither a local path nor downloaded yet: 'tpi pull {ref}' fetches it "
            "from the Hugging Face hub (or add --yes to fetch it now)"
        )
    listing = list_revision(ref)
    question = (
        f"{ref} is not in the cache. Download about {listing.download_bytes() / 1e9:.2f} GB "
        f"from {listing.endpoint} into {models_dir()}?"
    )
    if not consent.granted(question):
        raise ModelError(f"{ref} not downloaded (you said no); 'tpi pull {ref}' fetches it")
    return pull(ref, echo, listing=listing, show_progress=progress is not None)


@dataclass(frozen=True)
class CachedModel:
    name: str  # what --model and 'tpi rm' accept: ORG/NAME[@REV] if pulled, else the directory's
    path: Path
    size_bytes: int
    source: str  # "hub" (pulled), "gguf" (converted) or "default"


def _meta(directory: Path) -> dict:
    try:
        meta = json.loads((directory / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def cached_models() -> list[CachedModel]:
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and is_converted(d):
            meta = _meta(d)
            hub = meta.get("source") == "hub"
            name = str(meta.get("name") or d.name) if hub else d.name
            out.append(CachedModel(name, d, _size(d), "hub" if hub else "gguf"))
    return out


def unfinished_pulls() -> list[tuple[str, int]]:
    """Downloads that stopped before the end: (cache directory name, bytes so far)."""
    root = models_dir() / ".pulling"
    if not root.is_dir():
        return []
    return [(d.name, _size(d)) for d in sorted(root.iterdir()) if d.is_dir()]


def remove_model(name: str) -> tuple[Path, int]:
    """Delete a cached model (by its name in 'tpi models', or its directory's) and any
    unfinished download of it; returns what was removed and the bytes freed."""
    found = [m for m in cached_models() if name in (m.name, m.path.name)]
    partial = None
    if looks_like_hub_name(name):
        partial = models_dir() / ".pulling" / parse_hub_ref(name).cache_name
    if not found and not (partial and partial.exists()):
        raise ModelError(f"no cached model {name!r} (see 'tpi models')")
    freed, removed = 0, None
    with file_lock(models_dir() / ".lock"):
        for path in [m.path for m in found] + ([partial] if partial and partial.exists() else []):
            freed += _size(path)
            shutil.rmtree(path)
            removed = removed or path
    return removed, freed
