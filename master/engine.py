"""Token ids in, logits out, on the master.

Owns the token side (embedding, final norm, LM head: whole, or rank 0's
vocabulary rows, see master.vocab), sampling requests, and rank 0's slice of
the layers. Remembers which tokens are in the KV cache so a new request that
shares a prefix (the next chat turn) only runs the new tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tpi.errors import PromptError
from tpi.master.sampling import Sampler
from tpi.master.vocab import WholeVocab
from tpi.model.config import ModelConfig
from tpi.model.decoder import Decoder, LocalCollective
from tpi.runtime.prefill_plan import PrefillPlanner
from tpi.runtime.rank_runtime import build_rank
from tpi.runtime.vocab_parallel import SpreadVocab
from tpi.storage.checkpoint_rank import CheckpointRank


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        vocab: WholeVocab | SpreadVocab,
        decoder: Decoder,
    ) -> None:
        self.cfg = cfg
        self.vocab = vocab
        self.decoder = decoder
        self.dtype = decoder.dtype
        self.cached: list[int] = []  # tokens whose K/V are valid in the cache, in order
        self.last_reused = 0  # prompt tokens the last prefill did not have to run
        self.forward_seconds = 0.0  # time in the decoder (layers, disk waits, allreduces)
        self.steps = 0
        # Cuts long prefills into chunks whose allreduces overlap compute (clusters).
        self.planner: PrefillPlanner | None = None

    @property
    def max_positions(self) -> int:
        return self.decoder.max_positions

    def _run(self, ids: Sequence[int], pos: int, want: dict) -> torch.Tensor:
        """Final hidden states of tokens at positions [pos, pos+len)."""
        if pos > len(self.cached):
            raise ValueError(
                f"position {pos} skips uncached tokens (cache holds {len(self.cached)})"
            )
        if pos + len(ids) > self.max_positions:
            raise PromptError(
                f"sequence of {pos + len(ids)} tokens exceeds the context window "
                f"of {self.max_positions} tokens"
            )
        # Forget first: if this pass is interrupted the cache holds garbage past pos.
        del self.cached[pos:]
        chunks = self.planner.chunks(len(ids)) if self.planner and len(ids) > 1 else 1
        waited = self._waiting_seconds()
        t0 = time.perf_counter()
        h = self.vocab.start(list(ids), pos, chunks, want)
        h = self.decoder.forward(h, pos, chunks)
        elapsed = time.perf_counter() - t0
        self.forward_seconds += elapsed
        if self.planner is not None:
            compute = elapsed - (self._waiting_seconds() - waited)
            self.planner.observe(len(ids), 2 * self.cfg.num_layers, compute)
        self.steps += 1
        self.cached.extend(ids)
        return h

    def _waiting_seconds(self) -> float:
        """Time this node has spent waiting for the network and the disk so far."""
        total = 0.0
        for source in (self.decoder.collective, self.decoder.layers):
            stats = getattr(source, "stats", None)
            total += getattr(stats, "seconds", 0.0) + getattr(stats, "blocked_seconds", 0.0)
        return total

    def forward(self, ids: Sequence[int], pos: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens at positions [pos, pos+len); float32 logits of the last (or all) rows."""
        h = self._run(ids, pos, {"mode": "logits", "rows": "all" if all_logits else "last"})
        if all_logits:
            return self.vocab.logits(h)
        return self.vocab.logits(h[-1:])[0]

    def forward_token(self, ids: Sequence[int], pos: int, sampler: Sampler) -> int:
        """Run tokens at positions [pos, pos+len) and choose the next token."""
        req = sampler.request()
        h = self._run(ids, pos, {"mode": "choose", **req.to_dict()})
        return self.vocab.choose(h[-1:], req)

    def _reuse(self, prompt: Sequence[int]) -> int:
        """Where a new prompt must start running: after the longest cached prefix."""
        if not prompt:
            raise PromptError("the prompt is empty")
        common = 0
        for a, b in zip(self.cached, prompt, strict=False):
            if a != b:
                break
            common += 1
        # At least one token must run to produce logits.
        self.last_reused = min(common, len(prompt) - 1)
        return self.last_reused

    def prefill(self, prompt: Sequence[int]) -> torch.Tensor:
        """Logits after the prompt, reusing the longest cached prefix."""
        start = self._reuse(prompt)
        return self.forward(prompt[start:], start)

    def prefill_token(self, prompt: Sequence[int], sampler: Sampler) -> int:
        """The first new token after the prompt, reusing the longest cached prefix."""
        start = self._reuse(prompt)
        return self.forward_token(prompt[start:], start, sampler)

    def reset(self) -> None:
        self.cached.clear()


def load_engine(model_dir: Path, dtype: torch.dtype = torch.float32) -> Engine:
    """Single-node engine from a Hugging Face checkpoint directory (held resident)."""
    source = CheckpointRank(model_dir)
    head = source.load_head(dtype)
    runtime = build_rank(source, dtype, LocalCollective(), head_bytes=head.nbytes())
    return Engine(source.config, WholeVocab(source.config, head, dtype, None), runtime.decoder)
