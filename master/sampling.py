"""Next-token choice: greedy, temperature, top-k, top-p, seeded.

The choice itself is tpi.model.vocab_head's (Gumbel-max over candidates), shared
with the vocabulary-parallel head, so a seed gives the same tokens whether the
logits sit on one node or are spread over ranks (tpi.model.vocab_head.distribution
spells out the distribution that is sampled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpi.model.vocab_head import HeadRequest, choose_local


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    max_new_tokens: int = 256

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top-p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max new tokens must be >= 1")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    def checkpoint(self) -> torch.Tensor:
        """The generator's state, to rewind a draw whose step failed (a recovery
        replays the step, and its token must get the same noise)."""
        return self.generator.get_state()

    def rewind(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def request(self) -> HeadRequest:
        """How to choose the next token (draws that token's noise seed)."""
        p = self.params
        if self.greedy:
            return HeadRequest()
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return HeadRequest(p.temperature, p.top_k, p.top_p, seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """Choose one token id from float32 logits of shape (vocab,)."""
        return choose_local(logits.float(), self.request())


def defaults_from_generation_config(config: dict) -> dict:
    """Sampling defaults a model's generation_config.json recommends.

    Models that set do_sample get their temperature/top-k/top-p; others are
    decoded greedily, as transformers would.
    """
    if not config.get("do_sample"):
        return {"temperature": 0.0}
    out: dict = {"temperature": float(config.get("temperature", 1.0))}
    out["top_k"] = int(config.get("top_k", 50))  # transformers' default when sampling
    if config.get("top_p") is not None:
        out["top_p"] = float(config["top_p"])
    return out
