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
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama written without transformers (fast), whose greedy answers never
    end early: for unit tests of what serves a model (tests/tiny_llama.py)."""
    from tests.tiny_llama import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def plain_torch():
    """torch's own kernels on one thread, for this module: tests of what serves a
    model, not of its speed, spare the native kernels' first build (seconds, in a
    fresh $TPI_HOME) and OpenMP's hand-offs between threads, which cost tens of ms
    per tiny operation on a busy machine."""
    import torch

    from tpi.kernels import native

    was_off, threads = native._off, torch.get_num_threads()
    native.set_enabled(False)
    torch.set_num_threads(1)
    yield
    native._off = was_off
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    """Qwen2-style: q/k/v bias, tied embeddings."""
    return make_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tied=True, seed=1)


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory) -> Path:
    """Llama 3 rope scaling (original context 32, so positions beyond it are scaled)."""
    return make_model(tmp_path_factory.mktemp("llama3"), "llama3", seed=2)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    """Qwen3: per-head q/k norms, tied embeddings."""
    return make_model(tmp_path_factory.mktemp("qwen3"), "qwen3", seed=11)


@pytest.fixture(scope="session")
def phi3_dir(tmp_path_factory) -> Path:
    """Phi-3.5: fused qkv and gate_up, LongRoPE switching to its long factors at 24."""
    return make_model(tmp_path_factory.mktemp("phi3"), "phi3", seed=12)


@pytest.fixture(scope="session")
def gemma2_dir(tmp_path_factory) -> Path:
    """Gemma 2: (1 + w) and sandwich norms, gelu-tanh, scaled embeddings, soft-capped
    scores and logits, local (window 6) and global layers alternating."""
    return make_model(tmp_path_factory.mktemp("gemma2"), "gemma2", seed=13)


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory) -> Path:
    """Gemma 3 (text): as Gemma 2 without soft-caps, with q/k norms and a rotary base
    of its own (and linear scaling on the global one) for the local layers."""
    return make_model(tmp_path_factory.mktemp("gemma3"), "gemma3", seed=14)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory) -> Path:
    """Mixtral: 6 experts, 2 per token (weights renormalised)."""
    return make_model(tmp_path_factory.mktemp("mixtral"), "mixtral", seed=15)


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory) -> Path:
    """Qwen3-MoE: 8 experts of 32 columns, 3 per token (not renormalised), q/k norms,
    and a dense MLP in layer 1 (mlp_only_layers)."""
    return make_model(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe", seed=16)


FAMILY_FIXTURES = [
    "qwen3_dir",
    "phi3_dir",
    "gemma2_dir",
    "gemma3_dir",
    "mixtral_dir",
    "qwen3_moe_dir",
]


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once per test session."""
    from tpi.sources.default_model import ensure_default_model

    return ensure_default_model(lambda _m: None)
