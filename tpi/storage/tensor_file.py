"""Read tensors from a safetensors file with plain reads, not a memory map.

safetensors' own reader memory-maps the file, and every page it touches stays
in the process's resident set until the file is closed: streaming a model
through a mapping "uses" the whole model. Here each tensor is read with
readinto() into memory we own (optionally a reused buffer), and the pages are
then dropped from the page cache, so what a node holds is what it accounts for.

Format: u64 little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.errors import CheckpointError

DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Where a tensor held in memory must start: torch's CPU kernels use aligned vector
# loads (the int8 matmul of several rows crashes on a weight 8-byte aligned only).
ALIGN = 64
READ_PIECE_BYTES = 32 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(
                        f"corrupt or truncated safetensors file {self.path}: too short"
                    )
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise CheckpointError(
                        f"corrupt or truncated safetensors file {self.path}: bad header length"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror or e}") from None
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(
                f"corrupt safetensors file {self.path}: header unreadable ({e})"
            ) from None
        base = 8 + n
        self.metadata = header.pop("__metadata__", {}) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, meta in header.items():
            try:
                dtype = DTYPES[meta["dtype"]]
                shape = tuple(int(d) for d in meta["shape"])
                begin, end = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"corrupt safetensors file {self.path}: bad entry for {name!r}"
                ) from None
            expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end or end - begin != expected:
                raise CheckpointError(
                    f"corrupt safetensors file {self.path}: bad offsets for {name!r}"
                )
            if base + end > size:
                raise CheckpointError(
                    f"corrupt or truncated safetensors file {self.path}: {name!r} runs past the end"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, base + begin, base + end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def data_span(self) -> tuple[int, int]:
        """[begin, end) of the data section, as absolute file offsets."""
        infos = self.tensors.values()
        begin = min((t.begin for t in infos), default=0)
        return begin, max((t.end for t in infos), default=begin)

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
        """Every tensor as (name, dtype, shape, begin, end) relative to the data section."""
        base = self.data_span[0]
        infos = sorted(self.tensors.values(), key=lambda t: t.begin)
        return [(t.name, t.dtype, t.shape, t.begin - base, t.end - base) for t in infos]

    def read(
        self, name: str, out: torch.Tensor | None = None, drop_cache: bool = False
    ) -> torch.Tensor:
        """The tensor `name`; read into `out` (a buffer of at least its size) if given."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name!r} not in {self.path}")
        if out is None:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
        else:
            flat = out.view(-1).view(torch.uint8) if out.dtype != torch.uint8 else out.view(-1)
            if flat.numel() < info.nbytes:
                raise ValueError(
                    f"buffer of {flat.numel()} bytes is too small for {name!r} ({info.nbytes})"
                )
            buf = flat[: info.nbytes]
        read_span(self.path, info.begin, buf, drop_cache)
        return (
            buf.view(info.dtype).view(info.shape)
            if info.nbytes
            else torch.empty(info.shape, dtype=info.dtype)
        )


def tensor_views(
    raw: torch.Tensor, entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]]
) -> dict[str, torch.Tensor]:
    """Tensors (name, dtype, shape, begin, end) as views into the uint8 buffer `raw`
    (a copy only where a tensor does not start ALIGN-aligned)."""
    out = {}
    for name, dtype, shape, a, b in entries:
        chunk = raw[a:b]
        if chunk.data_ptr() % ALIGN:
            chunk = chunk.clone()
        out[name] = chunk.view(dtype).view(shape) if b > a else torch.empty(shape, dtype=dtype)
    return out


def read_span(path: Path, offset: int, buf: torch.Tensor, drop_cache: bool = False) -> None:
    """Fill the uint8 tensor `buf` with bytes of `path` from `offset` on."""
    n = buf.numel()
    view = memoryview(buf.numpy()).cast("B")
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            got = 0
            drop = drop_cache and hasattr(os, "posix_fadvise")
            while got < n:
                # Bounded pieces: a slow disk shows progress between them (the
                # worker's watchdog counts bytes read), at no cost in speed.
                r = f.readinto(view[got : got + READ_PIECE_BYTES])
                if not r:
                    raise CheckpointError(
                        f"truncated file {path}: wanted {n} bytes at {offset}, got {got}"
                    )
                if drop:
                    # Behind every piece, not after the span: a 0.5 GB layer would
                    # otherwise sit in the page cache twice (there and in its slot),
                    # and a memory cgroup counts the page cache too.
                    os.posix_fadvise(f.fileno(), offset + got, r, os.POSIX_FADV_DONTNEED)
                got += r
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> dict:
    """Write `tensors` as a safetensors file straight from their memory.

    No serialized copy is built (safetensors.torch.save would double the
    memory of a layer); the sha256 (for transfers and the first load) and the
    crc32 (checked on every later read, see tpi.storage.read_check) are
    computed on the way. Returns {"sha256": ..., "bytes": ..., "crc32": ...}.
    """
    import hashlib

    from tpi.storage.checksum import crc32

    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    order = sorted(tensors)
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section, as safetensors does
    h = hashlib.sha256()
    total = crc = 0
    with open(path, "wb") as f:
        for chunk in (len(raw).to_bytes(8, "little"), raw):
            f.write(chunk)
            h.update(chunk)
            crc = crc32(chunk, crc)
            total += len(chunk)
        for name in order:
            t = tensors[name].contiguous()
            if t.numel() == 0:
                continue
            data = memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")
            f.write(data)
            h.update(data)
            crc = crc32(data, crc)
            total += len(data)
    return {"sha256": h.hexdigest(), "bytes": total, "crc32": crc}
