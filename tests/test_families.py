"""The families after Llama (Qwen3, Phi-3, Gemma 2/3, Mixtral, Qwen3-MoE) on every
path tpi has: a cluster of three with even and uneven shares, layers streamed
through a window of one, an int8 split, the vocabulary-parallel head. Each is held
to transformers (the single-node parity is in test_parity.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.cluster_helpers import addresses, cluster_model, local_workers
from tests.conftest import FAMILY_FIXTURES
from tests.factories import load_reference
from tests.stepping import greedy, hf_greedy_cached, hf_step_logits, step_logits
from tests.test_parity import _greedy_reference
from tpi.master.engine import load_engine
from tpi.master.loader import MemoryOptions, load_rank0, open_model
from tpi.quant.quantize import QuantSpec
from tpi.storage.split import split_model

_g = torch.Generator().manual_seed(21)
PROMPT = torch.randint(3, 300, (20,), generator=_g).tolist()
FOLLOW = torch.randint(3, 300, (16,), generator=_g).tolist()

assert hf_greedy_cached  # the LongRoPE reference, chosen by _greedy_reference


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with local_workers(2, tmp_path_factory.mktemp("family-workers")) as lc:
        yield addresses(lc)


@pytest.fixture(scope="module")
def references(request):
    """transformers' logits and greedy tokens per family, computed once."""
    cache: dict[str, tuple[torch.Tensor, list[int]]] = {}

    def get(fixture: str):
        if fixture not in cache:
            ref = load_reference(request.getfixturevalue(fixture))
            cache[fixture] = (
                hf_step_logits(ref, PROMPT, FOLLOW),
                _greedy_reference(ref, PROMPT, 32),
            )
        return cache[fixture]

    return get


# The default suite runs the two families that exercise the most of the cluster path
# (Gemma 3: post norms summed after the allreduce, q/k norms, a local rotary; Qwen3-MoE:
# experts by columns, a dense layer among them); the others, and even shares with
# every layer resident, run in the slow suite (the lock-step sums of every family's
# rank slices are checked in the default suite by test_family_config.py).
_DEFAULT_WORLD3 = {"gemma3_dir", "qwen3_moe_dir"}
WORLD3_CASES = [
    pytest.param(
        fixture,
        shares,
        window,
        marks=() if fixture in _DEFAULT_WORLD3 and window == 1 else pytest.mark.slow,
        id=f"{fixture}-{shares}-window{window}",
    )
    for fixture in FAMILY_FIXTURES
    for shares, window in (("2,1,1", 1), ("1,1,1", None))
]


@pytest.mark.parametrize("fixture,shares,window", WORLD3_CASES)
def test_world3_matches_transformers(fixture, shares, window, workers, references, request):
    """Three ranks with uneven shares and a window of one layer on every rank (every
    step streams every layer from disk), or even shares with every layer resident."""
    model_dir = request.getfixturevalue(fixture)
    want_logits, want_tokens = references(fixture)
    memory = MemoryOptions(window=window, max_context=128)
    with cluster_model(model_dir, workers, shares=shares, memory=memory) as lm:
        got = step_logits(lm.engine, PROMPT, FOLLOW)
        assert (got - want_logits).abs().max() <= 1e-4
        lm.engine.reset()
        assert greedy(lm.engine, PROMPT, 32) == want_tokens
        stats = lm.cluster.stats()
        layers = lm.engine.cfg.num_layers
        assert all(s["window"] == (window or layers) for s in stats.values())
        if window == 1:
            assert all(s["layers_loaded"] >= layers * (1 + len(FOLLOW)) for s in stats.values())


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_single_node_window_1_matches_transformers(fixture, references, request):
    model_dir = request.getfixturevalue(fixture)
    want_logits, _ = references(fixture)
    lm = open_model(
        str(model_dir), "fp32", quiet=True, memory=MemoryOptions(window=1, max_context=128)
    )
    try:
        assert lm.runtime.layers.window == 1
        assert (step_logits(lm.engine, PROMPT, FOLLOW) - want_logits).abs().max() <= 1e-4
    finally:
        lm.close()


@pytest.mark.parametrize("fixture", FAMILY_FIXTURES)
def test_int8_split_tracks_fp32(fixture, request, tmp_path):
    """As test_quant's acceptance for Llama: int8 logits cosine >= 0.999 against fp32
    on the fp32 greedy continuation (teacher forced)."""
    model_dir = request.getfixturevalue(fixture)
    ref = load_engine(model_dir)
    follow = greedy(ref, PROMPT, 32)
    ref.reset()
    want = step_logits(ref, PROMPT, follow[:-1])
    split = split_model(model_dir, tmp_path / "int8", [1.0], quant=QuantSpec.for_split("int8"))
    engine, runtime = load_rank0(
        split / "rank0", torch.float32, None, MemoryOptions(), lambda _m: None
    )
    try:
        got = step_logits(engine, PROMPT, follow[:-1])
    finally:
        runtime.close()
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos >= 0.999, float(cos)


@pytest.mark.parametrize("fixture", ["gemma2_dir", "qwen3_moe_dir"])
def test_vocab_parallel_head_matches_transformers(fixture, workers, references, request):
    """Gemma's scaled embeddings and soft-capped logits, each rank on its own
    vocabulary rows; a mixture of experts behind a split head."""
    model_dir = request.getfixturevalue(fixture)
    want_logits, want_tokens = references(fixture)
    with cluster_model(model_dir, workers, shares="2,1,1", vocab_parallel=True) as lm:
        assert (step_logits(lm.engine, PROMPT, FOLLOW) - want_logits).abs().max() <= 1e-4
        lm.engine.reset()
        assert greedy(lm.engine, PROMPT, 32) == want_tokens
