"""The vocabulary-parallel embedding and LM head, both sides of the wire.

Every rank holds its vocabulary rows of the embedding and LM head (a split made
with --vocab-parallel). Only token ids go out with a step (STEP_TOKENS); each
rank embeds the ids that fall in its rows (zeros elsewhere) and an fp32
allreduce assembles the embeddings; after the layers each rank computes its
slice of the logits and answers the head request that came with the step:

- "logits" (tests, perplexity): its whole logits slice (HEAD mode LOGITS);
- "choose" (generation): a few token candidates (mode CANDIDATES; the choice
  itself is tpi.model.vocab_head's), so no vocabulary-sized vector crosses the
  wire while generating. A top-p round that cannot decide asks for more
  (HEAD_MORE); a rank answers with its logits slice once that is the smaller
  message, and the master draws its candidates itself (the noise is a function
  of the seed).

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
from tpi.model.weights import HeadWeights

EMBED_LAYER = 0  # the embedding sum is keyed by its phase (Phase.EMBED), not a layer
HEAD_MODES = ("none", "logits", "choose")


class SpreadVocab:
    """Rank 0: its own vocabulary rows, plus the step broadcast and head gathering."""

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

    def start(self, ids: list[int], pos: int, chunks: int, want: dict) -> torch.Tensor:
        self.broadcast.tokens(ids, pos, chunks, want)
        partial = embed(torch.tensor(ids, dtype=torch.long), self.head, self.dtype)
        return self.collective.allreduce(partial, EMBED_LAYER, Phase.EMBED)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full logits: every rank's slice, gathered (tests and perplexity only)."""
        own = logits(h, self.head, self.cfg.rms_norm_eps)
        parts = self.gatherer.gather(0)
        return torch.cat([own, *(parts[r][1] for r in sorted(parts))], dim=-1)

    def choose(self, h_last: torch.Tensor, req: HeadRequest) -> int:
        row = logits(h_last, self.head, self.cfg.rms_norm_eps)[0]
        # Our own rows cost nothing to send: offer them all, once, so only remote
        # ranks can leave a top-p round undecided.
        own = candidates(
            row, self.head.start, self.cfg.vocab_size, replace(req, count=self.sizes[0])
        )
        round_ = 0
        while True:
            parts = [own]
            for r, (mode, out) in sorted(self.gatherer.gather(round_).items()):
                if mode == HeadMode.LOGITS:  # the rank sent its logits slice
                    whole = replace(req, count=self.sizes[r])
                    out = candidates(out, self.starts[r], self.cfg.vocab_size, whole)
                parts.append(out)
            token = choose(parts, self.sizes, self.cfg.vocab_size, req)
            if token is not None:
                return token
            req = more(req)
            round_ += 1
            self.broadcast.more(round_, req.count)


class HeadService:
    """A worker: embeds its ids and answers the step's head request.

    It keeps its last logits until the next step, in case top-p asks for more."""

    def __init__(self, cfg: ModelConfig, head: HeadWeights, collective: StarWorker) -> None:
        self.cfg = cfg
        self.head = head
        self.collective = collective
        self._last: tuple[torch.Tensor, HeadRequest] | None = None

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The full embeddings of `ids`, summed over ranks."""
        partial = embed(ids, self.head, dtype)
        return self.collective.allreduce(partial, EMBED_LAYER, Phase.EMBED)

    def answer(self, h: torch.Tensor, want: dict) -> None:
        """Send what the step's head request asks for, computed from final states `h`."""
        mode = want.get("mode")
        if mode not in HEAD_MODES:
            raise ProtocolError(f"unknown head request mode {mode!r}")
        self._last = None
        if mode == "none":
            return
        eps = self.cfg.rms_norm_eps
        if mode == "logits":
            rows = h if want.get("rows") == "all" else h[-1:]
            self.collective.send_head(logits(rows, self.head, eps), 0, HeadMode.LOGITS)
            return
        try:
            req = HeadRequest.from_dict(want)
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad head request: {e}") from None
        row = logits(h[-1:], self.head, eps)[0]
        self._last = (row, req)
        out = candidates(row, self.head.start, self.cfg.vocab_size, req)
        self.collective.send_head(out, 0, HeadMode.CANDIDATES)

    def more(self, round_: int, count: int) -> None:
        """A further top-p round: `count` candidates from the kept logits, or the
        logits slice itself once that is the smaller message (see slice_is_smaller)."""
        if self._last is None or count < 1:
            raise ProtocolError("HEAD_MORE without a sampling step to continue")
        row, req = self._last
        if slice_is_smaller(count, row.numel()):
            self.collective.send_head(row, round_, HeadMode.LOGITS)
            return
        req = replace(req, count=count)
        self._last = (row, req)
        out = candidates(row, self.head.start, self.cfg.vocab_size, req)
        self.collective.send_head(out, round_, HeadMode.CANDIDATES)
