"""The sliding-window memory scheduler: a rank keeps only `window` layers of its
slice in memory and streams the rest from its local shard directory.

A loader thread walks the layers cyclically (0..L-1, 0..L-1, ...): while layer
i computes and talks, layers up to i+window-1 are loaded, and as soon as a
layer is released its slot receives the next one, so the first layers of the
next token are read while the last layers of this one still compute.

Memory is a ring of `window` preallocated slot buffers, reused for the life of
the process: a layer file's data section is read with one readinto() straight
into a slot and its tensors are views into it, so RSS stays flat however many
layers stream through. After each read the file's pages are dropped from the
page cache (POSIX_FADV_DONTNEED): the memory a node uses is the memory it holds.

A mixture-of-experts layer streams its dense part here and its experts through
an ExpertStore (tpi.runtime.expert_stream): only the experts its tokens pick.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from tpi.errors import TpiError
from tpi.model.weights import LayerWeights
from tpi.quant.formats import TRANSPOSED_SUFFIX, FloatT, transposable
from tpi.quant.int4_pack import Int4Layout, held_layout
from tpi.quant.quantize import LINEAR_NAMES, memory_dtype
from tpi.runtime.expert_stream import ExpertLayouts, ExpertStore
from tpi.runtime.slot_fill import converted_bytes, place, repack_int4
from tpi.storage.expert_file import ExpertFileLayout
from tpi.storage.manifest import ShardError
from tpi.storage.read_check import FileCheck, file_check
from tpi.storage.shard_reader import RankShard
from tpi.storage.tensor_file import ALIGN, SafetensorsFile, read_span, tensor_views
from tpi.system.malloc import pin_mmap_threshold

log = logging.getLogger("tpi.runtime.sliding_window")


@dataclass
class StreamStats:
    bytes_read: int = 0
    read_seconds: float = 0.0  # loader thread time spent reading (and converting)
    blocked_seconds: float = 0.0  # compute thread time spent waiting for a layer
    layers_loaded: int = 0
    # Of those: experts read on demand (also in bytes_read), and experts found cached.
    expert_bytes_read: int = 0
    experts_loaded: int = 0
    expert_hits: int = 0

    def to_dict(self) -> dict:
        hidden = 1.0 - self.blocked_seconds / self.read_seconds if self.read_seconds > 0 else 1.0
        out = {
            "bytes_read": self.bytes_read,
            "read_seconds": round(self.read_seconds, 6),
            "blocked_seconds": round(self.blocked_seconds, 6),
            "layers_loaded": self.layers_loaded,
            "disk_time_hidden": round(max(0.0, hidden), 4),
        }
        if self.experts_loaded or self.expert_hits:
            out.update(
                expert_bytes_read=self.expert_bytes_read,
                experts_loaded=self.experts_loaded,
                expert_hits=self.expert_hits,
            )
        return out


@dataclass(frozen=True)
class LayerLayout:
    """Where a layer file's tensors sit within its data section."""

    path: str
    data_begin: int
    data_bytes: int
    tensors: tuple[
        tuple[str, torch.dtype, tuple[int, ...], int, int], ...
    ]  # name, dtype, shape, rel begin, end
    check: FileCheck | None = None  # how every read of the data section is verified


def layer_layout(path, expected_crc: int | None = None, manifest_hash: str = "") -> LayerLayout:
    f = SafetensorsFile(path)
    begin, end = f.data_span
    return LayerLayout(
        str(path),
        begin,
        end - begin,
        tuple(f.entries()),
        file_check(path, expected_crc, begin, end, manifest_hash),
    )


@dataclass(frozen=True)
class StreamLayout:
    """Per-layer file layouts and the slot sizes they need, before any allocation."""

    layouts: tuple[LayerLayout, ...]
    convert: bool  # some stored float dtype differs from the one kept in memory
    slot_bytes: int
    staging_bytes: int
    pass_bytes: int  # all layers as held in memory: what one forward pass reads from RAM
    dtype: torch.dtype
    quantized: bool
    int4_layout: Int4Layout | None  # how packed int4 weights are stored (None: no int4)
    transpose: bool = False  # float matmul weights held transposed (resident only: FloatT)
    experts: ExpertLayouts | None = None  # the experts files of a mixture of experts
    manifest_hash: str = ""

    def target_dtype(self, name: str, stored: torch.dtype) -> torch.dtype:
        return memory_dtype(name, stored, self.dtype, self.quantized)

    @classmethod
    def of(cls, shard: RankShard, dtype: torch.dtype, transpose: bool = False) -> StreamLayout:
        """`transpose`: hold float matmul weights as FloatT (a copy per read, so
        only for layers read once, i.e. all resident)."""
        files = shard.manifest.files
        layouts = tuple(
            layer_layout(
                shard.layer_path(i),
                files.get(shard.layer_path(i).name, {}).get("crc32"),
                shard.manifest_sha256,
            )
            for i in range(shard.config.num_layers)
        )
        quant = shard.manifest.quant
        int4 = Int4Layout.parse(quant.int4_layout) if quant.int4_layout else None

        def held(name: str, dt: torch.dtype) -> torch.dtype:
            return memory_dtype(name, dt, dtype, quant.quantized)

        # Shards stored in another float dtype are converted into the slot, and
        # tensors not ALIGN-aligned in the file are copied to aligned places in it;
        # the raw bytes then need one staging buffer of their own.
        convert = any(
            held(name, dt) != dt
            or a % ALIGN
            or (transpose and name in LINEAR_NAMES and dt.is_floating_point)
            for lay in layouts
            for name, dt, _, a, _ in lay.tensors
        )

        def need(lay: LayerLayout) -> int:
            return converted_bytes(lay.tensors, held) if convert else lay.data_bytes

        slot = max(need(lay) for lay in layouts)
        staging = max(lay.data_bytes for lay in layouts) if convert else 0
        total = sum(need(lay) for lay in layouts)
        experts = None
        paths = getattr(shard, "experts_path", lambda _i: None)
        expert_files = tuple(
            ExpertFileLayout.of(p) if (p := paths(i)) is not None else None
            for i in range(shard.config.num_layers)
        )
        if any(f is not None for f in expert_files):
            experts = ExpertLayouts.of(expert_files, dtype, quant.quantized)
            # A decode token reads its picked experts (at most top-k per MoE layer).
            picked = min(shard.config.experts_per_token, experts.held_per_layer())
            total += experts.moe_layers() * picked * experts.slot_bytes
        return cls(
            layouts,
            convert,
            slot,
            staging,
            total,
            dtype,
            quant.quantized,
            int4,
            transpose,
            experts,
            shard.manifest_sha256,
        )


class SlidingWindowLayers:
    """LayerSource that streams layers from a rank directory through `window` slots
    (and, for a mixture of experts, `expert_slots` experts per layer: all held by
    default)."""

    def __init__(
        self,
        layout: StreamLayout,
        window: int,
        dtype: torch.dtype,
        expert_slots: int | None = None,
    ) -> None:
        pin_mmap_threshold()
        self.dtype = dtype
        self.layout = layout
        self.layouts = layout.layouts
        held = held_layout()
        # int4 is stored in the split's portable layout; this CPU's products may read
        # another, made as each layer loads (tpi.quant.int4_pack).
        self.repack_int4 = layout.int4_layout is not None and layout.int4_layout != held
        if self.repack_int4:
            log.info(
                "int4 weights are stored as %s, held here as %s: repacked as each layer loads",
                layout.int4_layout.name,
                held.name if held else "torch's layout",
            )
        self.convert = layout.convert
        self.threads = torch.get_num_threads()  # FloatT blocks, one per thread
        self.num_layers = len(self.layouts)
        self.window = max(1, min(window, self.num_layers))
        self.stats = StreamStats()
        self.slot_bytes = layout.slot_bytes
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8) for _ in range(self.window)]
        self.staging = (
            torch.empty(layout.staging_bytes, dtype=torch.uint8) if self.convert else None
        )
        self.resident = self.window >= self.num_layers
        self.experts: ExpertStore | None = None
        if layout.experts is not None:
            self.experts = ExpertStore(
                layout.experts,
                expert_slots or layout.experts.held_per_layer(),
                layout.int4_layout,
                self.repack_int4,
                layout.manifest_hash,
                self.stats,
            )
            if self.experts.resident:
                self.experts.preload()
        self._cond = threading.Condition()
        self._loaded: dict[int, LayerWeights] = {}  # sequence number -> weights
        self._next_load = 0  # sequence number the loader reads next
        self._released = 0  # sequence numbers below this are free again
        self._consume = 0  # sequence number the compute thread wants next
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        if self.resident:
            for i in range(self.num_layers):
                self._loaded[i] = self._read(i, self.slots[i])
            self.staging = None  # read once: never needed again
        else:
            self._thread = threading.Thread(
                target=self._loader, name="tpi-layer-loader", daemon=True
            )
            self._thread.start()

    @property
    def pass_bytes(self) -> int:
        """What one forward pass reads from RAM: every layer's weights as held."""
        return self.layout.pass_bytes

    @property
    def resident_bytes(self) -> int:
        n = sum(s.numel() for s in self.slots) + (
            self.staging.numel() if self.staging is not None else 0
        )
        return n + (self.experts.resident_bytes if self.experts is not None else 0)

    # --- loading -----------------------------------------------------------------

    def _read(self, layer: int, slot: torch.Tensor) -> LayerWeights:
        lay = self.layouts[layer]
        t0 = time.perf_counter()
        target = self.staging if self.convert else slot
        raw = target[: lay.data_bytes]
        read_span(lay.path, lay.data_begin, raw, drop_cache=True)
        if lay.check is not None:
            lay.check.verify(raw)
        tensors = tensor_views(raw, list(lay.tensors))
        if self.convert:
            tensors = place(tensors, slot, self.layout.target_dtype, self._held_transposed)
        if self.repack_int4:
            repack_int4(tensors, self.layout.int4_layout)
        self.stats.read_seconds += time.perf_counter() - t0
        self.stats.bytes_read += lay.data_bytes
        self.stats.layers_loaded += 1
        experts = None
        if self.experts is not None and self.layout.experts.files[layer] is not None:
            experts = self.experts.view(layer)
        return LayerWeights.from_tensors(tensors, experts)

    def _held_transposed(
        self, name: str, t: torch.Tensor, dt: torch.dtype, room: torch.Tensor
    ) -> tuple[str, FloatT] | None:
        """A float linear weight is held transposed in blocks (see FloatT)."""
        if self.layout.transpose and transposable(name, t, LINEAR_NAMES):
            return name + TRANSPOSED_SUFFIX, FloatT.of(t.to(dt), self.threads, room.view(dt))
        return None

    def _loader(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and self._next_load - self._released >= self.window:
                        self._cond.wait()
                    if self._stop:
                        return
                    seq = self._next_load
                weights = self._read(seq % self.num_layers, self.slots[seq % self.window])
                with self._cond:
                    if seq == self._next_load:  # not reset meanwhile
                        self._loaded[seq] = weights
                        self._next_load += 1
                    self._cond.notify_all()
        except BaseException as e:  # surfaced to the compute thread at acquire()
            with self._cond:
                self._error = e
                self._cond.notify_all()

    # --- LayerSource ---------------------------------------------------------------

    def start_pass(self) -> None:
        if self.resident or self._consume % self.num_layers == 0:
            return
        # The previous pass was abandoned mid-way: restart the ring at layer 0.
        with self._cond:
            aligned = (self._consume // self.num_layers + 1) * self.num_layers
            self._loaded.clear()
            self._consume = self._released = self._next_load = aligned
            self._cond.notify_all()

    def acquire(self, layer: int) -> LayerWeights:
        if self.resident:
            return self._loaded[layer]
        seq = self._consume
        if seq % self.num_layers != layer:
            raise RuntimeError(
                f"layers must be acquired in order: wanted {seq % self.num_layers}, got {layer}"
            )
        with self._cond:
            if seq not in self._loaded:
                t0 = time.perf_counter()
                while seq not in self._loaded and self._error is None:
                    self._cond.wait()
                self.stats.blocked_seconds += time.perf_counter() - t0
            if isinstance(self._error, ShardError):
                raise self._error  # it names the file already
            if self._error is not None:
                raise TpiError(f"loading layer {layer} failed: {self._error}") from self._error
            return self._loaded[seq]

    def release(self, layer: int) -> None:
        if self.resident:
            return
        with self._cond:
            self._loaded.pop(self._consume, None)
            self._consume += 1
            self._released = self._consume
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.experts is not None:
            self.experts.close()
        self._loaded.clear()
