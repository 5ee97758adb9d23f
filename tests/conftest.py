from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.factories import make_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Masters and the local workers the tests start share this cluster secret.
os.environ.setdefault("TPI_SECRET", "test-secret-" + "0123456789abcdef" * 2)
_HOME: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    # A private cache so tests never touch the user's ~/.cache/tpi (child
    # processes inherit it through the environment).
    global _HOME
    if "TPI_HOME" not in os.environ or not os.environ.get("TPI_TEST_KEEP_HOME"):
        _HOME = tempfile.mkdtemp(prefix="tpi-test-home-")
        os.environ["TPI_HOME"] = _HOME


def pytest_unconfigure(config: pytest.Config) -> None:
    if _HOME:
        shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """Llama with GQA (8 heads / 2 KV heads), untied embeddings."""
    return make_model(tmp_path_factory.mktemp("llama"), "llama", tied=False)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    """Qwen2-style: q/k/v bias, tied embeddings."""
    return make_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tied=True, seed=1)


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory) -> Path:
    """Llama 3 rope scaling (original context 32, so positions beyond it are scaled)."""
    return make_model(tmp_path_factory.mktemp("llama3"), "llama3", seed=2)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once per test session."""
    from tpi.sources.default_model import ensure_default_model

    return ensure_default_model(lambda _m: None)
