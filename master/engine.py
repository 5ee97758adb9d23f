"""Token ids in, logits out, on the master.

Owns the token side (embedding, final norm, LM head: whole, or rank 0's
vocabulary rows, see master.vocab) and sampling requests; a pass goes through
its `Forward` (tpi.master.forward: the master alone, tensor-parallel, or a
pipeline), which holds rank 0's slice of the layers. Remembers which tokens are
in the KV cache so a new request that shares a prefix (the next chat turn) only
runs the new tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.errors import PromptError
from tpi.master.forward import Forward, LocalForward
from tpi.master.sampling import Sampler
from tpi.master.vocab import Vocab, WholeVocab
from tpi.model.batch import BatchStep, Segment
from tpi.model.config import ModelConfig
from tpi.model.decoder import LocalCollective
from tpi.model.want import Want
from tpi.runtime.prefill_chunking import PrefillChunking
from tpi.runtime.rank_runtime import build_rank
from tpi.storage.checkpoint_rank import CheckpointRank


@dataclass
class BatchRow:
    """One sequence's part of a batched step: tokens `ids` at positions
    [pos, pos + len) of cache slot `slot`, and how to choose the token after them
    (None: no token wanted, e.g. a prompt chunk before its last)."""

    slot: int
    ids: Sequence[int]
    pos: int
    sampler: Sampler | None = None


class Engine:
    def __init__(self, cfg: ModelConfig, vocab: Vocab, forward: Forward) -> None:
        self.cfg = cfg
        self.vocab = vocab
        self.forward_pass = forward
        # Rank 0's own slice: its KV caches, dtype and context limit.
        self.decoder = forward.decoder
        self.dtype = self.decoder.dtype
        # Per cache slot: the tokens whose K/V are valid in it, in order.
        self.slots: dict[int, list[int]] = {0: []}
        self._released: set[int] = set()  # slots to free on every rank with the next pass
        self.last_reused = 0  # prompt tokens the last prefill did not have to run
        self.forward_seconds = 0.0  # time in the decoder (layers, disk waits, allreduces)
        self.steps = 0
        # Cuts long prefills into chunks, and batches into nano-batches, whose
        # allreduces overlap compute (clusters).
        self.chunking: PrefillChunking | None = None
        self.context_cap: int | None = None
        # Tokens per forward pass on a cluster (None: any): see _pieces.
        self.max_pass_tokens: int | None = None

    @property
    def cached(self) -> list[int]:
        """The tokens cached in slot 0 (the single-sequence engine's only slot)."""
        return self.slots.setdefault(0, [])

    @property
    def max_positions(self) -> int:
        """Context limit: this rank's, or the smallest of any rank's (see cap_context)."""
        cap = self.context_cap or self.decoder.max_positions
        return min(self.decoder.max_positions, cap)

    def cap_context(self, positions: int) -> None:
        """Another rank holds a smaller KV cache: never ask it for more."""
        self.context_cap = min(self.context_cap or positions, positions)

    def free(self, slot: int) -> None:
        """A sequence ended: its cache is freed here and, with the next pass, on every rank."""
        self.slots.pop(slot, None)
        self.decoder.caches.release(slot)
        self._released.add(slot)

    def _check(self, slot: int, pos: int, count: int) -> list[int]:
        cached = self.slots.setdefault(slot, [])
        if pos > len(cached):
            raise ValueError(
                f"position {pos} skips uncached tokens (slot {slot} holds {len(cached)})"
            )
        if pos + count > self.max_positions:
            raise PromptError(
                f"sequence of {pos + count} tokens exceeds the context window "
                f"of {self.max_positions} tokens"
            )
        return cached

    def _pass(self, rows: Sequence[BatchRow], want: Want) -> torch.Tensor:
        """Final hidden states of every row of a pass (rows of a sequence in order)."""
        caches = [self._check(r.slot, r.pos, len(r.ids)) for r in rows]
        batch = BatchStep(
            tuple(Segment(r.slot, r.pos, len(r.ids)) for r in rows),
            tuple(sorted(self._released)),
        )
        for r, cached in zip(rows, caches, strict=True):
            # Forget first: if this pass is interrupted the cache holds garbage past pos.
            del cached[r.pos :]
        tokens = batch.tokens
        if self.chunking is None or tokens == 1:
            pieces = 1
        elif len(rows) == 1:
            pieces = self.chunking.chunks(tokens)
        else:
            pieces = self.chunking.nano_batches(len(rows), tokens)
        ids = [t for r in rows for t in r.ids]
        waited = self.forward_pass.waiting_seconds()
        t0 = time.perf_counter()
        h = self.forward_pass.run(ids, batch, pieces, want)
        elapsed = time.perf_counter() - t0
        self._released.clear()
        self.forward_seconds += elapsed
        if self.chunking is not None:
            compute = elapsed - (self.forward_pass.waiting_seconds() - waited)
            # This node's own layers (a pipeline's master runs only its stage's).
            self.chunking.observe(tokens, 2 * self.decoder.cfg.num_layers, compute)
        self.steps += 1
        for r, cached in zip(rows, caches, strict=True):
            cached.extend(r.ids)
        return h

    def _pieces(self, ids: Sequence[int], pos: int) -> list[tuple[Sequence[int], int]]:
        """A pass longer than max_pass_tokens runs as consecutive passes (each
        attends to the cache the previous ones wrote): no frame on the wire is
        larger than tpi.comm.wire.MAX_FRAME_BYTES."""
        n = self.max_pass_tokens or len(ids)
        return [(ids[i : i + n], pos + i) for i in range(0, len(ids), n)]

    def step(self, rows: Sequence[BatchRow]) -> list[int | None]:
        """One forward pass over several sequences at once (weights read once for
        all): the chosen next token of each row that has a sampler, else None."""
        if not rows:
            raise ValueError("a step needs at least one sequence")
        if len({r.slot for r in rows}) != len(rows):
            raise ValueError("a sequence appears twice in one step")
        tokens = sum(len(r.ids) for r in rows)
        if any(not r.ids for r in rows):
            raise ValueError("a sequence of a step has no tokens")
        if self.max_pass_tokens is not None and tokens > self.max_pass_tokens:
            raise ValueError(f"a step of {tokens} tokens exceeds {self.max_pass_tokens}")
        chosen = [i for i, r in enumerate(rows) if r.sampler is not None]
        if not chosen:
            self._pass(rows, Want.nothing())
            return [None] * len(rows)
        last = BatchStep(tuple(Segment(r.slot, r.pos, len(r.ids)) for r in rows)).last_rows()
        picks = [last[i] for i in chosen]
        reqs = [rows[i].sampler.request() for i in chosen]
        h = self._pass(rows, Want.choose(picks, reqs))
        tokens_out = self.vocab.choose_rows(h[picks], reqs, picks)
        out: list[int | None] = [None] * len(rows)
        for i, t in zip(chosen, tokens_out, strict=True):
            out[i] = t
        return out

    def step_logits(self, rows: Sequence[BatchRow]) -> torch.Tensor:
        """Float32 logits (len(rows), vocab) after each row's last token: one batched
        pass, as `step` runs it (tests, scoring)."""
        picks = BatchStep(tuple(Segment(r.slot, r.pos, len(r.ids)) for r in rows)).last_rows()
        h = self._pass(rows, Want.logits(picks))
        return self.vocab.logits(h[picks])

    def forward(self, ids: Sequence[int], pos: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens at positions [pos, pos+len); float32 logits of the last (or all) rows."""
        *early, (last, last_pos) = self._pieces(ids, pos)
        if all_logits:
            outs = []
            for piece, p in [*early, (last, last_pos)]:
                h = self._pass([BatchRow(0, piece, p)], Want.logits())
                outs.append(self.vocab.logits(h))
            return torch.cat(outs)
        for piece, p in early:
            self._pass([BatchRow(0, piece, p)], Want.nothing())
        h = self._pass([BatchRow(0, last, last_pos)], Want.logits([len(last) - 1]))
        return self.vocab.logits(h[-1:])[0]

    def reuse_start(self, prompt: Sequence[int], slot: int = 0) -> int:
        """Where a new prompt must start running in `slot`: after the longest prefix
        already cached there (at least one token runs, to produce logits)."""
        if not prompt:
            raise PromptError("the prompt is empty")
        common = 0
        for a, b in zip(self.slots.get(slot, ()), prompt, strict=False):
            if a != b:
                break
            common += 1
        return min(common, len(prompt) - 1)

    def _reuse(self, prompt: Sequence[int]) -> int:
        self.last_reused = self.reuse_start(prompt)
        return self.last_reused

    def prefill(self, prompt: Sequence[int]) -> torch.Tensor:
        """Logits after the prompt, reusing the longest cached prefix."""
        start = self._reuse(prompt)
        return self.forward(prompt[start:], start)

    def reset(self) -> None:
        for slot in list(self.slots):
            self.slots[slot].clear()


def load_engine(model_dir: Path, dtype: torch.dtype = torch.float32) -> Engine:
    """Single-node engine from a Hugging Face checkpoint directory (held resident)."""
    source = CheckpointRank(model_dir)
    head = source.load_head(dtype)
    runtime = build_rank(source, dtype, LocalCollective(), head_bytes=head.nbytes())
    vocab = WholeVocab(source.config, head, dtype)
    return Engine(source.config, vocab, LocalForward(vocab, runtime.decoder))
