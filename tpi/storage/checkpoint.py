"""Read tensors from a Hugging Face safetensors checkpoint, one at a time.

Tensors are read by name on demand (plain reads, see tensor_file), so callers
can stream a model layer by layer without ever holding it whole. A weight that
`tpi convert-gguf --keep-quant` stored as 4-bit (tpi.quant.int4_rows) reads as floats
like any other; `get_int4` hands out the integers themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tpi.errors import CheckpointError
from tpi.quant.int4_rows import MIN_SUFFIX, Q_SUFFIX, SCALE_SUFFIX, Int4Rows
from tpi.storage.tensor_file import SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"


class Checkpoint:
    """Name -> tensor access over model.safetensors or a sharded index."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._file_of: dict[str, Path] = {}
        self._files: dict[Path, SafetensorsFile] = {}
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"cannot read {index}: {e}") from None
            for name, fname in weight_map.items():
                self._file_of[name] = self.model_dir / fname
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors weights in {self.model_dir}")
            for f in files:
                for name in self._open(f).keys():
                    self._file_of[name] = f

    def _open(self, path: Path) -> SafetensorsFile:
        handle = self._files.get(path)
        if handle is None:
            if not path.is_file():
                raise CheckpointError(f"weights file missing: {path}")
            handle = self._files[path] = SafetensorsFile(path)
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self._file_of or name + Q_SUFFIX in self._file_of

    def names(self) -> list[str]:
        return list(self._file_of)

    def get_int4(self, name: str) -> Int4Rows | None:
        """Weight `name` as kept 4-bit integers, or None if it is stored as floats."""
        if name + Q_SUFFIX not in self._file_of:
            return None
        return Int4Rows.from_stored(
            *(self._read(name + s) for s in (Q_SUFFIX, SCALE_SUFFIX, MIN_SUFFIX))
        )

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The named tensor, converted to `dtype` if given."""
        if name not in self._file_of and (kept := self.get_int4(name)) is not None:
            return kept.dequantize(dtype or torch.float32)
        t = self._read(name)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def _read(self, name: str) -> torch.Tensor:
        path = self._file_of.get(name)
        if path is None:
            raise CheckpointError(
                f"tensor {name!r} not found in the checkpoint at {self.model_dir}"
            )
        return self._open(path).read(name)

    def close(self) -> None:
        self._files.clear()
