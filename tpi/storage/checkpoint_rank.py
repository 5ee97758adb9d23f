"""One rank's slice of an unsplit Hugging Face checkpoint, cut in memory.

The in-memory counterpart of a shard directory (tpi.storage.shard_reader): the
same questions (config, rank slice, head, layers) answered straight from the
checkpoint, so a model run on one machine without a split goes through the
same rank builder (tpi.runtime.rank_runtime) as a shard does. Its layers can
only be held resident: streaming needs the per-layer files a split writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tpi.model.config import ModelConfig, load_config
from tpi.model.partition import RankSlice, plan_partition
from tpi.model.weights import (
    HeadWeights,
    LayerWeights,
    head_from_tensors,
    head_tensors,
    slice_layer,
)
from tpi.quant.formats import hold_transposed
from tpi.quant.quantize import HEAD_TABLES, LINEAR_NAMES
from tpi.storage.checkpoint import Checkpoint


class CheckpointRank:
    def __init__(self, model_dir: Path, rank_slice: RankSlice | None = None) -> None:
        self.dir = Path(model_dir)
        self.config: ModelConfig = load_config(self.dir)
        self.rank_slice = rank_slice or plan_partition(self.config, [1.0]).slices[0]

    def load_head(self, dtype: torch.dtype) -> HeadWeights:
        # Norm weights stay in the compute dtype like everything else; the norm
        # itself runs in float32 (see tpi.model.layers.rms_norm).
        ckpt = Checkpoint(self.dir)
        try:
            head = head_tensors(lambda n: ckpt.get(n, dtype), self.config)
            return head_from_tensors(hold_transposed(head, HEAD_TABLES), 0, self.config)
        finally:
            ckpt.close()

    def load_layers(self, dtype: torch.dtype) -> list[LayerWeights]:
        ckpt = Checkpoint(self.dir)
        try:
            return [
                LayerWeights.from_tensors(
                    hold_transposed(
                        slice_layer(lambda n: ckpt.get(n, dtype), self.config, i, self.rank_slice),
                        LINEAR_NAMES,
                    )
                )
                for i in range(self.config.num_layers)
            ]
        finally:
            ckpt.close()
