"""Vocabulary-parallel embedding and LM head across real worker processes."""

from __future__ import annotations

import pytest
import torch

from tests.cluster_helpers import addresses, cluster_model, local_workers
from tests.factories import make_model
from tests.stepping import greedy, step_logits
from tpi.comm.wire import ProtocolError, ids_payload, payload_ids
from tpi.errors import TpiError
from tpi.master.engine import load_engine
from tpi.master.generation import generate_tokens
from tpi.master.sampling import SamplingParams
from tpi.storage.manifest import read_manifest
from tpi.storage.split import split_model

PROMPT = list(range(5, 25))
FOLLOW = list(range(40, 52))
VOCAB = 2048  # large enough that a logits slice would dwarf the candidates
SAMPLING = [
    SamplingParams(temperature=0.0, max_new_tokens=32),
    SamplingParams(temperature=0.9, seed=11, max_new_tokens=32),
    SamplingParams(temperature=0.8, top_k=20, seed=5, max_new_tokens=32),
    SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=32),
    SamplingParams(temperature=1.2, top_k=50, top_p=0.8, seed=3, max_new_tokens=32),
]


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory):
    """Llama (GQA, untied) with a 2048-token vocabulary."""
    return make_model(tmp_path_factory.mktemp("bigvocab"), "llama", vocab=VOCAB, tied=False, seed=4)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with local_workers(3, tmp_path_factory.mktemp("vpworkers")) as lc:
        yield addresses(lc)


def _tokens(engine, params: SamplingParams) -> list[int]:
    engine.reset()
    return list(generate_tokens(engine, PROMPT, params))


def test_split_gives_every_rank_its_vocabulary_rows(big_vocab_dir, tmp_path):
    out = split_model(big_vocab_dir, tmp_path / "s", [2.0, 1.0, 1.0], vocab_parallel=True)
    ranges = []
    for r in range(3):
        m, _ = read_manifest(out / f"rank{r}")
        assert "head.safetensors" in m.files
        ranges.append(m.rank_slice.vocab)
    assert ranges[0][0] == 0 and ranges[-1][1] == VOCAB
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert ranges[0][1] - ranges[0][0] == VOCAB // 2  # shares 2,1,1


@pytest.mark.parametrize("shares", ["1,1", "1,1,1", "1,1,1,1", "2,1,1"])
def test_same_logits_and_tokens_as_the_whole_head(big_vocab_dir, workers, shares):
    """Acceptance: identical tokens (greedy and seeded sampling, incl. top-k/top-p)
    and logits within 1e-4 of the single-node engine, at world sizes 2..4 with
    even and uneven shares."""
    world = len(shares.split(","))
    single = load_engine(big_vocab_dir)
    want_logits = step_logits(single, PROMPT, FOLLOW)
    want_tokens = [_tokens(single, p) for p in SAMPLING]
    with cluster_model(
        big_vocab_dir, workers[: world - 1], shares=shares, vocab_parallel=True
    ) as lm:
        assert lm.engine.vocab.__class__.__name__ == "SpreadVocab"
        got = step_logits(lm.engine, PROMPT, FOLLOW)
        assert (got - want_logits).abs().max() <= 1e-4
        for params, want in zip(SAMPLING, want_tokens, strict=True):
            assert _tokens(lm.engine, params) == want, params


def test_world_one_with_a_vocab_parallel_split_is_the_plain_engine(big_vocab_dir, tmp_path):
    from tpi.master.loader import open_model

    split = split_model(big_vocab_dir, tmp_path / "s1", [1.0], vocab_parallel=True)
    lm = open_model(str(split), "fp32", quiet=True)
    try:
        assert greedy(lm.engine, PROMPT, 16) == greedy(load_engine(big_vocab_dir), PROMPT, 16)
    finally:
        lm.close()


@pytest.mark.parametrize(
    "params,limit",
    [
        # (sampling, head bytes a worker may send per token on top of its partials)
        (SAMPLING[0], 200),  # greedy: one candidate row (24 B) + header
        (SAMPLING[2], 21 * 24 + 200),  # top-k 20: its 20 best rows + a summary row
        (SamplingParams(temperature=0.2, top_p=0.9, seed=7, max_new_tokens=32), 65 * 24 + 200),
        # Nearly flat (a random model at T=1): the nucleus is most of the vocabulary;
        # a second round answers with the rank's logits slice, never the whole vocabulary.
        (SAMPLING[3], 65 * 24 + VOCAB // 3 * 4 + 400),
    ],
)
def test_no_vocabulary_vector_crosses_the_wire_while_generating(
    big_vocab_dir, workers, params, limit
):
    """Per decode token each worker receives the token id (not a hidden state) and
    sends its allreduce partials plus a few candidate rows, not its logits."""
    cfg = load_engine(big_vocab_dir).cfg
    steps = 16
    with cluster_model(big_vocab_dir, workers[:2], vocab_parallel=True) as lm:
        engine, links = lm.engine, list(lm.cluster.links.links)
        gen = generate_tokens(engine, PROMPT, params)
        next(gen)  # the prefill (and first token) is not a decode step
        before_in = [lk.bytes_received for lk in links]
        before_out = [lk.bytes_sent for lk in links]
        allreduces_before = engine.vocab.collective.stats.count
        for _ in range(steps):
            next(gen)
        gen.close()
        allreduces = engine.vocab.collective.stats.count - allreduces_before
    # One embedding sum plus two per layer, per token.
    assert allreduces == steps * (2 * cfg.num_layers + 1)
    # Each partial: its tensor plus a 33-byte header (prefix, fields, 2 dims).
    partial_bytes = (2 * cfg.num_layers + 1) * (cfg.hidden_size * 4 + 33)
    assert len(links) == 2
    for i, lk in enumerate(links):
        received = (lk.bytes_received - before_in[i]) / steps
        sent = (lk.bytes_sent - before_out[i]) / steps
        head_and_headers = received - partial_bytes
        assert 0 < head_and_headers <= limit, head_and_headers
        assert head_and_headers < VOCAB * 4  # never a whole-vocabulary vector
        # Out: the sums, plus the token id and its small JSON header.
        assert sent - partial_bytes < 300, sent - partial_bytes


def test_workers_check_the_token_ids_they_are_sent():
    assert payload_ids(ids_payload([0, 5, 2047]), 2048).tolist() == [0, 5, 2047]
    for bad in (ids_payload([2048]), ids_payload([-1]), b"", b"\x01\x02\x03"):
        with pytest.raises(ProtocolError):
            payload_ids(bad, 2048)


def test_vocab_parallel_flag_on_a_plain_split_is_refused(llama_dir, tmp_path):
    from tpi.master.loader import open_model

    split = split_model(llama_dir, tmp_path / "plain", [1.0, 1.0])
    with pytest.raises(TpiError, match="without --vocab-parallel"):
        open_model(str(split), "fp32", quiet=True, workers=["127.0.0.1:1"], vocab_parallel=True)


def test_embedding_rows_outside_a_rank_are_zero():
    from tpi.model.layers import embed
    from tpi.model.weights import HeadWeights

    table = torch.arange(12.0).view(6, 2)
    head = HeadWeights(embed=table[2:4], final_norm=torch.ones(2), lm_head=table[2:4], start=2)
    got = embed(torch.tensor([0, 2, 3, 5]), head, torch.float32)
    assert torch.equal(got, torch.tensor([[0.0, 0.0], [4.0, 5.0], [6.0, 7.0], [0.0, 0.0]]))
