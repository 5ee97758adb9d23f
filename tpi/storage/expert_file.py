"""A layer's experts in a file of their own, each readable (and checked) alone.

A mixture-of-experts layer is written as two files per rank: the layer file
(norms, attention, router: read whole, as any layer) and experts_NNN.safetensors
with the experts this rank holds. Tensors are named expertEEEE.<name>
(tpi.model.weights) and a safetensors file keeps them in name order, so each
expert's tensors are one contiguous span. The crc32 of every span is in the
file's header metadata ("crc32.expertEEEE"): the header is covered by the
file's sha256 (checked on first use, as every shard file) and read once at load,
and every later read of a span is checked against it (tpi.storage.read_check
does the same for whole files). So a streamed rank reads only the experts its
tokens picked, each read verified, without loading the whole file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.errors import CheckpointError
from tpi.model.weights import EXPERT_PREFIX, split_expert_name
from tpi.storage.checksum import crc32
from tpi.storage.manifest import ShardError, layer_file
from tpi.storage.read_check import CorruptShard, reads_checked
from tpi.storage.shard_verify import forget
from tpi.storage.tensor_file import SafetensorsFile, write_safetensors

CRC_KEY = "crc32."


def experts_file(layer: int) -> str:
    return f"experts_{layer:03d}.safetensors"


Entry = tuple[str, torch.dtype, tuple[int, ...], int, int]  # name, dtype, shape, begin, end


@dataclass(frozen=True)
class ExpertSpan:
    """One expert's bytes in its file: [begin, end) absolute, its tensors relative to begin."""

    begin: int
    end: int
    crc: int | None
    tensors: tuple[Entry, ...]  # names without the expert prefix

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def verify(self, path: str, data: torch.Tensor, manifest_hash: str) -> None:
        if self.crc is None or not reads_checked():
            return
        if crc32(memoryview(data.numpy()).cast("B")) != self.crc:
            forget(manifest_hash)  # the next start hashes every file again
            raise CorruptShard(Path(path))


@dataclass(frozen=True)
class ExpertFileLayout:
    path: str
    experts: dict[int, ExpertSpan]

    @classmethod
    def of(cls, path: Path) -> ExpertFileLayout:
        try:
            f = SafetensorsFile(path)
        except CheckpointError as e:
            raise ShardError(f"cannot read shard file {path}: {e}") from None
        groups: dict[int, list] = {}
        for info in f.tensors.values():
            parsed = split_expert_name(info.name)
            if parsed is None:
                raise ShardError(f"{path} holds {info.name!r}, which is not an expert's tensor")
            groups.setdefault(parsed[0], []).append((parsed[1], info))
        experts = {}
        for e, items in sorted(groups.items()):
            begin = min(i.begin for _, i in items)
            end = max(i.end for _, i in items)
            if end - begin != sum(i.nbytes for _, i in items):
                raise ShardError(f"expert {e}'s tensors are not contiguous in {path}")
            crc = f.metadata.get(f"{CRC_KEY}{EXPERT_PREFIX}{e:04d}")
            entries = tuple(
                (name, i.dtype, i.shape, i.begin - begin, i.end - begin)
                for name, i in sorted(items, key=lambda x: x[1].begin)
            )
            experts[e] = ExpertSpan(begin, end, int(crc) if crc is not None else None, entries)
        return cls(str(path), experts)


def _span_crcs(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The crc32 of each expert's bytes, in the order write_safetensors writes them."""
    crcs: dict[str, int] = {}
    for name in sorted(tensors):
        parsed = split_expert_name(name)
        if parsed is None:
            raise ValueError(f"{name!r} is not an expert's tensor")
        t = tensors[name].contiguous()
        key = f"{CRC_KEY}{EXPERT_PREFIX}{parsed[0]:04d}"
        if t.numel():
            data = memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")
            crcs[key] = crc32(data, crcs.get(key, 0))
        else:
            crcs.setdefault(key, 0)
    return {k: str(v) for k, v in crcs.items()}


def write_layer_files(
    rank_dir: Path, layer: int, tensors: dict[str, torch.Tensor]
) -> dict[str, dict]:
    """Write layer `layer` of one rank: its experts (if any) to their own file, the
    rest to the layer file. Returns {file name: its manifest entry}."""
    experts = {k: v for k, v in tensors.items() if split_expert_name(k) is not None}
    dense = {k: v for k, v in tensors.items() if k not in experts}
    out = {layer_file(layer): write_safetensors(Path(rank_dir) / layer_file(layer), dense)}
    if experts:
        meta = {"format": "pt", **_span_crcs(experts)}
        name = experts_file(layer)
        out[name] = write_safetensors(Path(rank_dir) / name, experts, meta)
    return out
