"""The embedded SmolLM2 (9 heads, 3 KV heads) across 2..5 ranks: at 4 and 5 ranks
KV heads are replicated so query heads and MLP still split."""

from __future__ import annotations

import pytest

from tests.cluster_helpers import addresses, cluster_model, local_workers
from tests.stepping import greedy
from tpi.master.engine import load_engine
from tpi.model.config import load_config
from tpi.model.partition import plan_partition
from tpi.text.tokenizer import TextTokenizer

CHAT = [{"role": "user", "content": "Write a long story about a dragon who learns to code."}]


@pytest.fixture(scope="module")
def reference(smollm_dir):
    prompt = TextTokenizer(smollm_dir).encode_chat(CHAT)
    return prompt, greedy(load_engine(smollm_dir), prompt, 32)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with local_workers(4, tmp_path_factory.mktemp("smol-workers")) as lc:
        yield addresses(lc)


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_smollm_same_greedy_tokens_as_single_node(smollm_dir, reference, workers, world):
    prompt, expected = reference
    part = plan_partition(load_config(smollm_dir), [1.0] * world)
    if world > 3:
        assert sum(s.n_kv for s in part.slices) > 3  # KV heads replicated
    with cluster_model(smollm_dir, workers[: world - 1]) as lm:
        assert greedy(lm.engine, prompt, 32) == expected
