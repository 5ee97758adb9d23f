"""Resolve what the user passed as --model into a Hugging Face checkpoint directory.

Accepted: nothing (the embedded default), a checkpoint directory, a .gguf file
(converted once into the cache), or the name of a model already in the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tpi.errors import ModelError
from tpi.paths import models_dir
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
    raise ModelError(
        f"model not found: {spec} (not a directory, .gguf file or cached model name; see 'tpi models')"
    )


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size_bytes: int


def cached_models() -> list[CachedModel]:
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and is_converted(d):
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            out.append(CachedModel(d.name, d, size))
    return out
