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
        self.context_cap: int | None = None
        # Tokens per forward pass on a cluster (None: any): see _pieces.
        self.max_pass_tokens: int | None = None

    @property
    def max_positions(self) -> int:
        """Context limit: this rank's, or the smallest of any rank's (see cap_context)."""
        cap = self.context_cap or self.decoder.max_positions
        return min(self.decoder.max_positions, cap)

    def cap_context(self, positions: int) -> None:
        """Another rank holds a smaller KV cache: never ask it for more."""
        self.context_cap = min(self.context_cap or positions, positions)

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

    def _pieces(self, ids: Sequence[int], pos: int) -> list[tuple[Sequence[int], int]]:
        """A pass longer than max_pass_tokens runs as consecutive passes (each
        attends to the cache the previous ones wrote): no frame on the wire is
        larger than tpi.comm.wire.MAX_FRAME_BYTES."""
        n = self.max_pass_tokens or len(ids)
        return [(ids[i : i + n], pos + i) for i in range(0, len(ids), n)]

    def forward(self, ids: Sequence[int], pos: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens at positions [pos, pos+len); float32 logits of the last (or all) rows."""
        *early, (last, last_pos) = self._pieces(ids, pos)
        if all_logits:
            outs = []
            for piece, p in [*early, (last, last_pos)]:
                outs.append(
                    self.vocab.logits(self._run(piece, p, {"mode": "logits", "rows": "all"}))
                )
            return torch.cat(outs)
        for piece, p in early:
            self._run(piece, p, {"mode": "none"})
        h = self._run(last, last_pos, {"mode": "logits", "rows": "last"})
        return self.vocab.logits(h[-1:])[0]

    def forward_token(self, ids: Sequence[int], pos: int, sampler: Sampler) -> int:
        """Run tokens at positions [pos, pos+len) and choose the next token."""
        *early, (last, last_pos) = self._pieces(ids, pos)
        for piece, p in early:
            self._run(piece, p, {"mode": "none"})
        req = sampler.request()
        h = self._run(last, last_pos, {"mode": "choose", **req.to_dict()})
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
