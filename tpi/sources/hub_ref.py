"""A model named by its Hugging Face repository: ORG/NAME[@REVISION], or one GGUF
file in it, ORG/NAME/FILE.gguf[@REVISION]; and where its copy lives in the cache."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tpi.errors import ModelError
from tpi.paths import models_dir

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # an org or repository name on the hub
DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class HubRef:
    repo: str  # "ORG/NAME"
    revision: str | None = None  # a branch, tag or commit; None: the default branch
    filename: str | None = None  # a GGUF file in the repository

    def __str__(self) -> str:
        name = self.repo + (f"/{self.filename}" if self.filename else "")
        return name + (f"@{self.revision}" if self.revision else "")

    @property
    def cache_name(self) -> str:
        """The directory name of its copy in $TPI_HOME/models (hub style: '--' for '/')."""
        name = self.repo.replace("/", "--")
        if self.filename:
            name += "--" + Path(self.filename).stem.replace("/", "--")
        if self.revision:
            name += "@" + self.revision.replace("/", "--")
        return name

    @property
    def cache_dir(self) -> Path:
        return models_dir() / self.cache_name


def looks_like_hub_name(spec: str) -> bool:
    """ORG/NAME[/FILE.gguf][@REV] with names the hub allows (and not a path that exists)."""
    try:
        parse_hub_ref(spec)
    except ModelError:
        return False
    return not Path(spec).expanduser().exists()


def parse_hub_ref(spec: str) -> HubRef:
    path, at, revision = spec.strip().partition("@")
    parts = path.split("/")
    if at and not revision:
        raise ModelError(f"{spec!r}: nothing after '@' (a branch, tag or commit)")
    if len(parts) < 2 or not all(_PART.match(p) for p in parts[:2]):
        raise ModelError(f"{spec!r} is not a model name of the form ORG/NAME[@REVISION]")
    filename = "/".join(parts[2:]) or None
    if filename is not None and (not filename.endswith(".gguf") or "" in parts[2:]):
        raise ModelError(
            f"{spec!r}: after ORG/NAME only a .gguf file may follow (ORG/NAME/FILE.gguf)"
        )
    return HubRef("/".join(parts[:2]), revision or None, filename)
