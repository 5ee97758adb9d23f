"""Choosing a token from logits spread over ranks equals choosing from the whole vector."""

from __future__ import annotations

import pytest
import torch

from tpi.model.vocab_head import HeadRequest, candidates, choose, choose_local, more


def _spread(logits: torch.Tensor, cuts: list[int], req: HeadRequest) -> tuple[int, int]:
    """Choose over parts [cuts[i], cuts[i+1]); returns (token, rounds needed)."""
    vocab = logits.numel()
    bounds = list(zip(cuts[:-1], cuts[1:], strict=True))
    rounds = 0
    while True:
        rounds += 1
        parts = [candidates(logits[a:b], a, vocab, req) for a, b in bounds]
        token = choose(parts, [b - a for a, b in bounds], vocab, req)
        if token is not None:
            return token, rounds
        req = more(req)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 7, 1.0), (1.0, 0, 0.9), (1.2, 20, 0.7), (3.0, 0, 0.99)],
)
def test_any_split_picks_the_same_token_as_the_whole(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    vocab = 997
    for trial in range(40):
        logits = torch.randn(vocab, generator=g) * float(1 + trial % 4)
        world = 1 + trial % 5
        cuts = sorted(torch.randperm(vocab - 1, generator=g)[: world - 1].add(1).tolist())
        req = HeadRequest(temperature, top_k, top_p, noise_seed=trial, count=8)
        token, _ = _spread(logits, [0, *cuts, vocab], req)
        assert token == choose_local(logits, req), (trial, world)


def test_greedy_ties_go_to_the_lowest_index_like_argmax():
    logits = torch.zeros(100)
    logits[[17, 60, 99]] = 5.0
    token, _ = _spread(logits, [0, 50, 70, 100], HeadRequest())
    assert token == int(torch.argmax(logits)) == 17


def test_a_flat_top_p_needs_more_rounds_and_still_agrees():
    """Nearly uniform logits with top-p 0.95 need most of the vocabulary: the
    first 8 candidates per rank cannot decide, later rounds can."""
    logits = torch.randn(600, generator=torch.Generator().manual_seed(5)) * 0.01
    req = HeadRequest(1.0, 0, 0.95, noise_seed=3, count=8)
    token, rounds = _spread(logits, [0, 200, 400, 600], req)
    assert rounds > 1
    assert token == choose_local(logits, req)


def test_candidates_are_few_rows():
    logits = torch.randn(5000)
    assert candidates(logits, 0, 5000, HeadRequest()).shape == (1, 3)
    assert candidates(logits, 0, 5000, HeadRequest(1.0, 0, 1.0, 1)).shape == (1, 3)
    assert candidates(logits, 0, 5000, HeadRequest(1.0, 40, 1.0, 1)).shape == (41, 3)
    assert candidates(logits, 0, 5000, HeadRequest(1.0, 0, 0.9, 1, count=64)).shape == (65, 3)


def test_bad_requests_from_the_wire_are_refused():
    good = HeadRequest(1.0, 5, 0.9, 7).to_dict()
    assert HeadRequest.from_dict(good) == HeadRequest(1.0, 5, 0.9, 7)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"count": 0}, {"noise_seed": -3}):
        with pytest.raises(ValueError):
            HeadRequest.from_dict({**good, **bad})
