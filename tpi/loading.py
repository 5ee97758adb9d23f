"""Build in-memory weights for one rank straight from a Hugging Face checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tpi.checkpoint import Checkpoint
from tpi.config import ModelConfig
from tpi.partition import RankSlice
from tpi.weights import HeadWeights, LayerWeights, head_from_tensors, head_tensors, slice_layer

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_layers(
    ckpt: Checkpoint,
    cfg: ModelConfig,
    rs: RankSlice,
    dtype: torch.dtype,
    progress: Callable[[int], None] | None = None,
) -> list[LayerWeights]:
    layers = []
    for i in range(cfg.num_layers):
        tensors = slice_layer(lambda n: ckpt.get(n, dtype), cfg, i, rs)
        layers.append(LayerWeights.from_tensors(tensors))
        if progress:
            progress(1)
    return layers


def load_head(ckpt: Checkpoint, cfg: ModelConfig, dtype: torch.dtype) -> HeadWeights:
    # Norm weights stay in the compute dtype like everything else; the norm
    # itself runs in float32 (see layers.rms_norm).
    return head_from_tensors(head_tensors(lambda n: ckpt.get(n, dtype), cfg))


def open_checkpoint(model_dir: Path) -> Checkpoint:
    return Checkpoint(model_dir)
