"""Where tpi keeps its cache ($TPI_HOME, default ~/.cache/tpi)."""

from __future__ import annotations

import os
from pathlib import Path


def tpi_home() -> Path:
    return Path(os.environ.get("TPI_HOME") or "~/.cache/tpi").expanduser()


def models_dir() -> Path:
    return tpi_home() / "models"
