"""The vocabulary-parallel embedding and LM head, both sides of the wire.

Every rank holds its vocabulary rows of the embedding and LM head (a split made
with --vocab-parallel). Only token ids go out with a step (STEP_TOKENS, sent by
the master's forward pass: tpi.master.forward); each rank embeds the ids that
fall in its rows (zeros elsewhere) and an fp32 allreduce assembles the
embeddings; after the layers each rank computes its slice of the logits and
answers the head request (tpi.model.want.Want) that came with the step:

- "logits" (tests, perplexity): its whole logits slice (HEAD mode LOGITS);
- "choose" (generation): for each row of the pass whose next token is wanted
  (one per sequence of a batch), a few token candidates (mode CANDIDATES; the
  choice itself is tpi.model.vocab_head's), so no vocabulary-sized vector
  crosses the wire while generating. A top-p round that cannot decide asks for
  more for that row (HEAD_MORE); a rank answers with its logits slice once that
  is the smaller message, and the master draws its candidates itself (the noise
  is a function of the seed).

`SpreadVocab` is rank 0's side, `HeadService` a worker's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tpi.comm.head_gather import HeadGatherer
from tpi.comm.star_master import StarMaster
from tpi.comm.star_worker import StarWorker
from tpi.comm.step_broadcast import StepBroadcaster
from tpi.comm.wire import HeadMode, Phase, ProtocolError
from tpi.model.config import ModelConfig
from tpi.model.layers import embed, logits
from tpi.model.vocab_head import HeadRequest, candidates, choose, more, slice_is_smaller
from tpi.model.want import Want, WantMode
from tpi.model.weights import HeadWeights

EMBED_LAYER = 0  # the embedding sum is keyed by its phase (Phase.EMBED), not a layer


class SpreadVocab:
    """Rank 0: its own vocabulary rows, the embedding sum over every rank, and the
    head's gathering (with a further top-p round's request, HEAD_MORE)."""

    def __init__(
        self,
        cfg: ModelConfig,
        head: HeadWeights,
        dtype: torch.dtype,
        broadcast: StepBroadcaster,
        collective: StarMaster,
        gatherer: HeadGatherer,
        sizes: list[int],
    ) -> None:
        self.cfg = cfg
        self.head = head  # rank 0's rows
        self.dtype = dtype
        self.broadcast = broadcast
        self.collective = collective
        self.gatherer = gatherer
        self.sizes = sizes  # vocabulary rows per rank
        self.starts = [sum(sizes[:r]) for r in range(len(sizes))]

    def embed(self, ids: list[int]) -> torch.Tensor:
        """The embeddings of `ids`, summed over every rank's rows (each rank got the
        ids with the step and sums its share)."""
        partial = embed(torch.tensor(ids, dtype=torch.long), self.head, self.dtype)
        return self.collective.allreduce(partial, EMBED_LAYER, Phase.EMBED)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full logits: every rank's slice, gathered (tests and perplexity only)."""
        own = logits(h, self.head, self.cfg.rms_norm_eps)
        parts = self.gatherer.gather(0)
        return torch.cat([own, *(parts[key][1] for key in sorted(parts))], dim=-1)

    def choose_rows(self, h: torch.Tensor, reqs: list[HeadRequest], rows: list[int]) -> list[int]:
        """The next token of each of `rows` (pass rows; `h` holds their final states)."""
        own_rows = logits(h, self.head, self.cfg.rms_norm_eps)
        got = self.gatherer.gather(0, rows)
        return [
            self._choose_one(own_rows[i], req, row, {r: got[(r, row)] for r in self._remote})
            for i, (req, row) in enumerate(zip(reqs, rows, strict=True))
        ]

    @property
    def _remote(self) -> range:
        return range(1, len(self.sizes))

    def _choose_one(
        self, own_logits: torch.Tensor, req: HeadRequest, row: int, remote: dict
    ) -> int:
        # Our own rows cost nothing to send: offer them all, once, so only remote
        # ranks can leave a top-p round undecided.
        own = candidates(
            own_logits, self.head.start, self.cfg.vocab_size, replace(req, count=self.sizes[0])
        )
        round_ = 0
        while True:
            parts = [own]
            for r, (mode, out) in sorted(remote.items()):
                if mode == HeadMode.LOGITS:  # the rank sent its logits slice
                    whole = replace(req, count=self.sizes[r])
                    out = candidates(out, self.starts[r], self.cfg.vocab_size, whole)
                parts.append(out)
            token = choose(parts, self.sizes, self.cfg.vocab_size, req)
            if token is not None:
                return token
            req = more(req)
            round_ += 1
            self.broadcast.more(row, round_, req.count)
            remote = {r: v for (r, _), v in self.gatherer.gather(round_, [row]).items()}


class HeadService:
    """A worker: embeds its ids and answers the step's head request.

    It keeps its last logits until the next step, in case top-p asks for more."""

    def __init__(self, cfg: ModelConfig, head: HeadWeights, collective: StarWorker) -> None:
        self.cfg = cfg
        self.head = head
        self.collective = collective
        self._last: dict[int, tuple[torch.Tensor, HeadRequest]] = {}

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The full embeddings of `ids`, summed over ranks."""
        partial = embed(ids, self.head, dtype)
        return self.collective.allreduce(partial, EMBED_LAYER, Phase.EMBED)

    def answer(self, h: torch.Tensor, want: Want) -> None:
        """Send what the step's head request asks for, computed from final states `h`
        (the want was checked against the step's rows when it arrived)."""
        self._last = {}
        if want.mode == WantMode.NONE:
            return
        eps = self.cfg.rms_norm_eps
        if want.mode == WantMode.LOGITS:
            picked = h if want.rows is None else h[list(want.rows)]
            self.collective.send_head(logits(picked, self.head, eps), 0, HeadMode.LOGITS)
            return
        out_rows = logits(h[want.chosen_rows], self.head, eps)
        for (row, req), row_logits in zip(want.requests, out_rows, strict=True):
            self._last[row] = (row_logits, req)
            out = candidates(row_logits, self.head.start, self.cfg.vocab_size, req)
            self.collective.send_head(out, 0, HeadMode.CANDIDATES, row)

    def more(self, row: int, round_: int, count: int) -> None:
        """A further top-p round for one row: `count` candidates from the kept logits,
        or the logits slice itself once that is the smaller message (see slice_is_smaller)."""
        if row not in self._last or count < 1:
            raise ProtocolError("HEAD_MORE without a sampling step to continue")
        row_logits, req = self._last[row]
        if slice_is_smaller(count, row_logits.numel()):
            self.collective.send_head(row_logits, round_, HeadMode.LOGITS, row)
            return
        req = replace(req, count=count)
        self._last[row] = (row_logits, req)
        out = candidates(row_logits, self.head.start, self.cfg.vocab_size, req)
        self.collective.send_head(out, round_, HeadMode.CANDIDATES, row)
