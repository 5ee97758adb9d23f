"""Sampling against transformers' logits warpers (an independent implementation)."""

from __future__ import annotations

import pytest
import torch

from tpi.master.sampling import Sampler, SamplingParams, defaults_from_generation_config
from tpi.model.vocab_head import distribution


def _hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits[None].clone()
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)[0]


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9), (0.5, 10, 0.8), (1.3, 3, 0.5)],
)
def test_distribution_matches_transformers(temperature, top_k, top_p):
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1)) * 3
    request = Sampler(
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    ).request()
    ours = distribution(logits, request).float()
    ref = _hf_probs(logits, temperature, top_k, top_p)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_greedy_is_argmax_and_seed_reproduces():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(2))
    assert Sampler(SamplingParams(temperature=0))(logits) == int(logits.argmax())

    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(logits) for _ in range(20)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    s = Sampler(SamplingParams(temperature=2.0, top_k=1, seed=0))
    assert {s(logits) for _ in range(20)} == {int(logits.argmax())}


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0)],
)
def test_invalid_params_rejected(bad):
    with pytest.raises(ValueError):
        Sampler(SamplingParams(**bad))


def test_generation_config_defaults():
    assert defaults_from_generation_config({}) == {"temperature": 0.0}
    d = defaults_from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    assert d == {"temperature": 0.6, "top_k": 50, "top_p": 0.9}


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.9), (1.3, 3, 0.5)]
)
def test_drawn_tokens_follow_the_distribution(temperature, top_k, top_p):
    """The Gumbel-max draws land on each token as often as transformers' warped
    softmax says (4000 draws: each frequency within 5 standard errors)."""
    logits = torch.randn(30, generator=torch.Generator().manual_seed(4)) * 2
    want = _hf_probs(logits, temperature, top_k, top_p)
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=9))
    n = 4000
    counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(n)]), minlength=30)
    freq = counts.double() / n
    se = (want.double() * (1 - want.double()) / n).sqrt()
    assert ((freq - want.double()).abs() <= 5 * se + 1e-9).all()
    assert (counts[want == 0] == 0).all()  # filtered tokens are never drawn
