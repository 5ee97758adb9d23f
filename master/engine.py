"""Token ids in, logits out, on the master.

Owns what never leaves the master (embedding, final norm, LM head) and rank 0's
slice of the layers. Remembers which tokens are in the KV cache so a new
request that shares a prefix (the next chat turn) only runs the new tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from tpi.config import ModelConfig, load_config
from tpi.decoder import Decoder, LocalCollective, ResidentLayers
from tpi.errors import PromptError
from tpi.layers import embed, logits
from tpi.loading import load_head, load_layers, open_checkpoint
from tpi.partition import plan_partition
from tpi.weights import HeadWeights


class StepListener(Protocol):
    """Told about each forward pass before rank 0 runs it (the cluster hooks in here)."""

    def begin_step(self, h: torch.Tensor, pos: int) -> None: ...


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        head: HeadWeights,
        decoder: Decoder,
        listener: StepListener | None = None,
    ) -> None:
        self.cfg = cfg
        self.head = head
        self.decoder = decoder
        self.listener = listener
        self.dtype = decoder.dtype
        self.cached: list[int] = []  # tokens whose K/V are valid in the cache, in order
        self.last_reused = 0  # prompt tokens the last prefill did not have to run
        self.forward_seconds = 0.0  # time in the decoder (layers, disk waits, allreduces)
        self.steps = 0

    @property
    def max_positions(self) -> int:
        return self.decoder.max_positions

    def forward(self, ids: Sequence[int], pos: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens at positions [pos, pos+len); float32 logits of the last (or all) rows."""
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
        x = torch.tensor(list(ids), dtype=torch.long)
        h = embed(x, self.head, self.dtype)
        if self.listener is not None:
            self.listener.begin_step(h, pos)
        t0 = time.perf_counter()
        h = self.decoder.forward(h, pos)
        self.forward_seconds += time.perf_counter() - t0
        self.steps += 1
        self.cached.extend(ids)
        if all_logits:
            return logits(h, self.head, self.cfg.rms_norm_eps)
        return logits(h[-1:], self.head, self.cfg.rms_norm_eps)[0]

    def prefill(self, prompt: Sequence[int]) -> torch.Tensor:
        """Logits after the prompt, reusing the longest cached prefix."""
        if not prompt:
            raise PromptError("the prompt is empty")
        common = 0
        for a, b in zip(self.cached, prompt, strict=False):
            if a != b:
                break
            common += 1
        # At least one token must run to produce logits.
        start = min(common, len(prompt) - 1)
        self.last_reused = start
        return self.forward(prompt[start:], start)

    def reset(self) -> None:
        self.cached.clear()


def load_engine(model_dir: Path, dtype: torch.dtype = torch.float32) -> Engine:
    """Single-node engine from a Hugging Face checkpoint directory."""
    cfg = load_config(model_dir)
    part = plan_partition(cfg, [1.0])
    ckpt = open_checkpoint(model_dir)
    try:
        head = load_head(ckpt, cfg, dtype)
        layers = load_layers(ckpt, cfg, part.slices[0], dtype)
    finally:
        ckpt.close()
    decoder = Decoder(cfg, part.slices[0], ResidentLayers(layers), LocalCollective(), dtype)
    return Engine(cfg, head, decoder)
