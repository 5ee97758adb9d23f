"""A worker's share of a vocabulary-parallel embedding and LM head.

The worker embeds the token ids that fall in its vocabulary rows (zeros for the
rest: the master's embedding allreduce adds every rank's rows), and after the
layers answers the head request that came with the step: its logits slice (a
full-logits request, for tests and perplexity) or a few token candidates
(generation). It keeps its last logits until the next step, in case top-p
sampling asks for more candidates.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tpi.config import ModelConfig
from tpi.layers import embed, logits
from tpi.star_allreduce import EMBED_LAYER, PHASE_EMBED, StarWorker
from tpi.vocab_head import HeadRequest, candidates, slice_is_smaller
from tpi.weights import HeadWeights
from tpi.wire import ProtocolError

HEAD_MODES = ("none", "logits", "choose")


class HeadService:
    def __init__(self, cfg: ModelConfig, head: HeadWeights, collective: StarWorker) -> None:
        self.cfg = cfg
        self.head = head
        self.collective = collective
        self._last: tuple[torch.Tensor, HeadRequest] | None = None

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The full embeddings of `ids`, summed over ranks."""
        partial = embed(ids, self.head, dtype)
        return self.collective.allreduce(partial, EMBED_LAYER, PHASE_EMBED)

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
            self.collective.send_head(logits(rows, self.head, eps), 0)
            return
        try:
            req = HeadRequest.from_dict(want)
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad head request: {e}") from None
        row = logits(h[-1:], self.head, eps)[0]
        self._last = (row, req)
        self.collective.send_head(candidates(row, self.head.start, self.cfg.vocab_size, req), 0)

    def more(self, round_: int, count: int) -> None:
        """A further top-p round: `count` candidates from the kept logits, or the
        logits slice itself once that is the smaller message (see slice_is_smaller)."""
        if self._last is None or count < 1:
            raise ProtocolError("HEAD_MORE without a sampling step to continue")
        row, req = self._last
        if slice_is_smaller(count, row.numel()):
            self.collective.send_head(row, round_)
            return
        req = replace(req, count=count)
        self._last = (row, req)
        out = candidates(row, self.head.start, self.cfg.vocab_size, req)
        self.collective.send_head(out, round_)
