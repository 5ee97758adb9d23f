"""Load one rank's weights from its shard directory (the output of `tpi split`)."""

from __future__ import annotations

from pathlib import Path

import torch

from tpi.errors import CheckpointError
from tpi.model.weights import HeadWeights, LayerWeights, head_from_tensors
from tpi.quant.formats import INT4_SUFFIX, FloatT, hold_transposed
from tpi.quant.int4_pack import to_native
from tpi.quant.quantize import HEAD_TABLES, memory_dtype
from tpi.storage.expert_file import experts_file
from tpi.storage.manifest import HEAD_FILE, ShardError, layer_file, read_manifest, verify_files
from tpi.storage.read_check import file_check
from tpi.storage.tensor_file import SafetensorsFile, read_span, tensor_views


class RankShard:
    def __init__(self, rank_dir: Path) -> None:
        self.dir = Path(rank_dir)
        self.manifest, self.manifest_sha256 = read_manifest(self.dir)

    @property
    def config(self):
        """The model as this rank runs it: a pipeline stage's rank sees only its
        layers, numbered from 0 (the whole model is `manifest.config`)."""
        layers = self.manifest.rank_slice.layers
        return self.manifest.config if layers is None else self.manifest.config.layers_view(*layers)

    @property
    def rank_slice(self):
        return self.manifest.rank_slice

    def _global(self, i: int) -> int:
        """The model's number of this rank's layer i (files keep the model's numbers)."""
        layers = self.manifest.rank_slice.layers
        return i if layers is None else layers[0] + i

    def layer_path(self, i: int) -> Path:
        return self.dir / layer_file(self._global(i))

    def _load(self, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        path = self.dir / name
        try:
            f = SafetensorsFile(path)
            begin, end = f.data_span
            data = torch.empty(end - begin, dtype=torch.uint8)
            read_span(path, begin, data)
            crc = self.manifest.files[name].get("crc32")
            if (check := file_check(path, crc, begin, end, self.manifest_sha256)) is not None:
                check.verify(data)
            tensors = tensor_views(data, f.entries())
        except CheckpointError as e:
            raise ShardError(f"cannot read shard file {path}: {e}") from None
        quant = self.manifest.quant
        out = {}
        for k, v in tensors.items():
            if k.endswith(INT4_SUFFIX):
                v = to_native(v, quant.packing)
            else:
                v = v.to(memory_dtype(k, v.dtype, dtype, quant.quantized))
            out[k] = v
        return out

    def experts_path(self, i: int) -> Path | None:
        """Layer i's experts file, for a mixture-of-experts layer (else None)."""
        name = experts_file(self._global(i))
        return self.dir / name if name in self.manifest.files else None

    def load_layer(self, i: int, dtype: torch.dtype) -> LayerWeights:
        """Layer i with all its experts in memory."""
        tensors = self._load(layer_file(self._global(i)), dtype)
        if self.experts_path(i) is not None:
            tensors.update(self._load(experts_file(self._global(i)), dtype))
        return LayerWeights.from_tensors(tensors)

    @property
    def has_head(self) -> bool:
        return HEAD_FILE in self.manifest.files

    def load_head(self, dtype: torch.dtype) -> HeadWeights:
        """The embedding/LM head: whole on rank 0, or this rank's vocabulary rows."""
        if not self.has_head:
            raise ShardError(f"{self.dir} holds no embedding/LM head (only rank 0 does)")
        vocab = self.manifest.rank_slice.vocab
        # Always resident: float tables are held transposed (tpi.quant.formats.FloatT).
        tensors = hold_transposed(self._load(HEAD_FILE, dtype), HEAD_TABLES)
        if any(isinstance(t, FloatT) for t in tensors.values()):
            # The tables were copied out of the file's buffer; the final norm, a view
            # into it, would keep the whole buffer (the tables' size again) alive.
            tensors = {k: t if isinstance(t, FloatT) else t.clone() for k, t in tensors.items()}
        return head_from_tensors(tensors, vocab[0] if vocab else 0, self.config)

    def verify(self) -> None:
        verify_files(self.dir, self.manifest)
