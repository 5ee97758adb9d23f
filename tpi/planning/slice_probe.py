"""Time this node's own layer slices: the real layer code on random weights of the
model's shapes, in the format and layout the runtime would hold them.

A generic matmul benchmark predicts a slice badly: on the 2-core VM a decode
matmul streams at 1.5 to 16 GB/s depending on its shape, format and layout, and a
small slice spends as long in norms, rotary, attention and Python as in its
matmuls. So the probe runs `tpi.model.decoder.Decoder` itself over a stack of
random layer slices and reads the time of every phase off a collective that only
notes when each partial is ready (the decoder's own phase boundaries).

The stack holds as many layers as the model has (bounded by PROBE_BYTES), so the
weights leave the caches between uses as they do in a real pass. Each measured
point is a slice of `q` query heads / `kv` KV heads and `mlp` MLP columns; the
attention phase depends only on the heads and the MLP phase only on the columns,
so one run measures one point of each curve.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch

from tpi.errors import TpiError
from tpi.model.config import ModelConfig
from tpi.model.decoder import Decoder
from tpi.model.layers import logits
from tpi.model.partition import RankSlice
from tpi.model.weights import (
    ATTN_NORM,
    DOWN,
    DOWN_BIAS,
    GATE_UP,
    GATE_UP_BIAS,
    MLP_NORM,
    O_BIAS,
    O_PROJ,
    QKV,
    QKV_BIAS,
    HeadWeights,
    LayerWeights,
)
from tpi.quant.formats import (
    INT4_SUFFIX,
    FloatT,
    hold_transposed,
    weight_from_tensors,
    weight_nbytes,
)
from tpi.quant.int4_pack import to_held
from tpi.quant.quantize import LINEAR_NAMES, QuantSpec, memory_dtype, quantize_tensors
from tpi.quant.quantize import quantize_embedding as quantize_table
from tpi.runtime.resident_layers import ResidentLayers

PROBE_BYTES = 128 << 20  # layer copies held at once (more than any L3 cache)
SHORT_POS = 16  # decode position of the base timing
LONG_POS = 528  # a second position: attention's cost per cached token
PREFILL_ROWS = 128  # a prefill-sized pass (int8 switches to its GEMM path above 96)
REPEATS = 5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ProbeError(TpiError):
    pass


@dataclass(frozen=True)
class Setting:
    """How the weights are held: the compute dtype, the split's quantization and
    whether float matmul weights are held transposed (all layers resident) or as
    read from disk (a sliding window)."""

    dtype: str = "fp32"
    quant: str = "none"
    group_size: int = 32
    resident: bool = True

    def key(self) -> str:
        q = self.quant + (f"g{self.group_size}" if self.quant == "int4" else "")
        # Quantized weights are held alike resident or streamed.
        held = "resident" if self.resident or self.quant in ("int8", "int4") else "stream"
        return f"{self.dtype}/{q}/{held}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Setting:
        s = cls(
            dtype=str(d.get("dtype", "fp32")),
            quant=str(d.get("quant", "none")),
            group_size=int(d.get("group_size", 32)),
            resident=bool(d.get("resident", True)),
        )
        if s.dtype not in DTYPES:
            raise ProbeError(f"unknown compute dtype {s.dtype!r}")
        QuantSpec(s.quant if s.quant != "none" else "none", s.group_size)  # validates
        return s


@dataclass(frozen=True)
class Point:
    """One measured slice: seconds per layer of each phase, as this node ran it."""

    q: int  # query heads
    kv: int  # KV heads
    mlp: int  # MLP columns
    attention_s: float  # decode, one token at position SHORT_POS
    attention_per_position_s: float  # added per cached position
    mlp_s: float  # decode, one token
    attention_prefill_s: float  # PREFILL_ROWS tokens at once
    mlp_prefill_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Point:
        return cls(**{k: (int(d[k]) if k in ("q", "kv", "mlp") else float(d[k])) for k in d})


@dataclass(frozen=True)
class HeadTiming:
    rows: int  # vocabulary rows of the LM head
    decode_s: float  # final norm + LM head + choosing a token, one row
    embed_s: float  # one embedding lookup

    def to_dict(self) -> dict:
        return asdict(self)


def shape_key(cfg: ModelConfig) -> str:
    """What the timings depend on: the shapes, not the weights or the name."""
    c = cfg
    return (
        f"h{c.hidden_size}-i{c.intermediate_size}-q{c.num_heads}-kv{c.num_kv_heads}-d{c.head_dim}"
        f"-v{c.vocab_size}-L{c.num_layers}-b{int(c.attention_bias)}{int(c.o_proj_bias)}{int(c.mlp_bias)}"
    )


def _slice(cfg: ModelConfig, q: int, kv: int, mlp: int) -> RankSlice:
    return RankSlice(rank=0, q_heads=(0, q), kv_heads=(0, kv), mlp=(0, mlp))


def _layer_tensors(
    cfg: ModelConfig, rs: RankSlice, g: torch.Generator, elem_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    hd, h = cfg.head_dim, cfg.hidden_size
    scale = 1.0 / math.sqrt(h)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(elem_dtype)

    t = {
        ATTN_NORM: torch.ones(h, dtype=elem_dtype),
        MLP_NORM: torch.ones(h, dtype=elem_dtype),
        QKV: rand((rs.n_q + 2 * rs.n_kv) * hd, h),
        O_PROJ: rand(h, rs.n_q * hd),
        GATE_UP: rand(2 * rs.n_mlp, h),
        DOWN: rand(h, rs.n_mlp),
    }
    if cfg.attention_bias:
        t[QKV_BIAS] = rand((rs.n_q + 2 * rs.n_kv) * hd)
    if cfg.o_proj_bias:
        t[O_BIAS] = rand(h)
    if cfg.mlp_bias:
        t[GATE_UP_BIAS] = rand(2 * rs.n_mlp)
        t[DOWN_BIAS] = rand(h)
    return t


def _held(tensors: dict[str, torch.Tensor], setting: Setting) -> dict[str, torch.Tensor]:
    """The tensors as the runtime holds them (tpi.runtime.sliding_window's rules)."""
    spec = QuantSpec.for_split(setting.quant, setting.group_size)
    stored = quantize_tensors(tensors, LINEAR_NAMES, spec) if spec.quantized else tensors
    compute = DTYPES[setting.dtype]
    held = {
        k: v.to(memory_dtype(k, v.dtype, compute, spec.quantized)).contiguous()
        for k, v in stored.items()
    }
    for k in [k for k in held if k.endswith(INT4_SUFFIX)]:  # as a shard loads (int4_pack)
        held[k] = to_held(held[k], spec.packing)
    if setting.resident and setting.quant not in ("int8", "int4"):
        held = hold_transposed(held, LINEAR_NAMES)
    return held


def _clone(t: dict) -> dict:
    return {
        k: (FloatT(v.blocks.clone(), v.by_rows) if isinstance(v, FloatT) else v.clone())
        for k, v in t.items()
    }


class _PhaseClock:
    """A world-size-1 collective that notes when each phase's partial is ready."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def allreduce(self, partial, layer, phase):
        self.marks.append(time.perf_counter())
        return partial

    def start(self, partial, layer, phase, pos):
        self.marks.append(time.perf_counter())
        return partial

    def wait(self, pending):
        return pending

    @contextlib.contextmanager
    def pipelined(self) -> Iterator[None]:
        yield


def _phase_seconds(
    decoder: Decoder, clock: _PhaseClock, pos: int, rows: int
) -> tuple[float, float]:
    """Attention and MLP seconds of one layer in one pass: the median over the
    stack's layers, so that a CPU quota's pause (or another process) landing in one
    layer does not count as that slice's speed."""
    h = torch.randn(rows, decoder.cfg.hidden_size).to(decoder.dtype)
    clock.marks.clear()
    t0 = time.perf_counter()
    decoder.forward(h, pos)
    marks = [t0, *clock.marks]
    layers = range(decoder.cfg.num_layers)
    attn = statistics.median(marks[2 * i + 1] - marks[2 * i] for i in layers)
    mlp = statistics.median(marks[2 * i + 2] - marks[2 * i + 1] for i in layers)
    return attn, mlp


def layer_bytes(t: dict) -> int:
    return sum(weight_nbytes(v) for v in t.values())


def measure_point(
    cfg: ModelConfig, setting: Setting, q: int, kv: int, mlp: int, budget: int = PROBE_BYTES
) -> Point:
    """Time one slice shape through the real decoder (best of REPEATS passes)."""
    compute = DTYPES[setting.dtype]
    rs = _slice(cfg, q, kv, mlp)
    g = torch.Generator().manual_seed(q * 1000003 + kv * 1009 + mlp)
    one = _held(_layer_tensors(cfg, rs, g, torch.float32), setting)
    size = max(1, layer_bytes(one))
    copies = max(1, min(cfg.num_layers, budget // size))
    stack = [one] + [_clone(one) for _ in range(copies - 1)]
    layers = ResidentLayers([LayerWeights.from_tensors(t) for t in stack])
    small = replace(
        cfg,
        num_layers=copies,
        sliding_windows=(None,) * copies,
        max_position_embeddings=max(cfg.max_position_embeddings, LONG_POS + PREFILL_ROWS + 1),
    )
    clock = _PhaseClock()
    decoder = Decoder(small, rs, layers, clock, compute, max_positions=LONG_POS + PREFILL_ROWS + 1)
    decoder.cache.reserve(LONG_POS + 1)
    _phase_seconds(decoder, clock, SHORT_POS, 1)  # warm-up: first-touch of caches, kernels
    short = [_phase_seconds(decoder, clock, SHORT_POS, 1) for _ in range(REPEATS)]
    long = [_phase_seconds(decoder, clock, LONG_POS, 1) for _ in range(REPEATS)]
    pre = [_phase_seconds(decoder, clock, 0, PREFILL_ROWS) for _ in range(2)]
    a_short = min(s[0] for s in short)
    a_long = min(s[0] for s in long)
    return Point(
        q=q,
        kv=kv,
        mlp=mlp,
        attention_s=a_short,
        attention_per_position_s=max(0.0, a_long - a_short) / (LONG_POS - SHORT_POS),
        mlp_s=min(s[1] for s in short + long),
        attention_prefill_s=min(p[0] for p in pre),
        mlp_prefill_s=min(p[1] for p in pre),
    )


def measure_head(cfg: ModelConfig, setting: Setting, rows: int) -> HeadTiming:
    """Final norm + LM head + argmax for one row, and one embedding lookup."""
    compute = DTYPES[setting.dtype]
    g = torch.Generator().manual_seed(rows)
    table = torch.randn(rows, cfg.hidden_size, generator=g) / math.sqrt(cfg.hidden_size)
    spec = QuantSpec.for_split(setting.quant, setting.group_size)
    stored = quantize_table("lm_head", table, spec) if spec.quantized else {"lm_head": table}
    held = {k: v.to(memory_dtype(k, v.dtype, compute, spec.quantized)) for k, v in stored.items()}
    held = hold_transposed(held, ("lm_head",))
    w = weight_from_tensors(held, "lm_head")
    head = HeadWeights(embed=w, final_norm=torch.ones(cfg.hidden_size, dtype=compute), lm_head=w)
    h = torch.randn(1, cfg.hidden_size).to(compute)
    from tpi.model.layers import embed

    def once() -> float:
        t0 = time.perf_counter()
        int(logits(h, head, cfg.rms_norm_eps).argmax(-1)[0])
        return time.perf_counter() - t0

    def lookup() -> float:
        t0 = time.perf_counter()
        embed(torch.tensor([rows // 2]), head, compute)
        return time.perf_counter() - t0

    once()
    return HeadTiming(
        rows=rows,
        decode_s=min(once() for _ in range(REPEATS)),
        embed_s=min(lookup() for _ in range(REPEATS)),
    )


def _spread_values(values: list[int], most: int) -> list[int]:
    """At most `most` of the sorted `values`, the smallest and largest kept,
    roughly evenly spaced in between."""
    values = sorted(set(values))
    if len(values) <= most:
        return values
    picks = {values[round(i * (len(values) - 1) / (most - 1))] for i in range(most)}
    return sorted(picks)


MAX_POINTS = 8


def probe_points(cfg: ModelConfig, max_world: int) -> list[tuple[int, int, int]]:
    """The slice shapes worth timing for clusters of up to `max_world` ranks:
    (query heads, KV heads, MLP columns) from a one-rank share to the whole layer."""
    from tpi.model.partition import mlp_blocks

    g = cfg.group_size
    if max_world <= cfg.num_kv_heads:
        qs = [k * g for k in range(1, cfg.num_kv_heads + 1)]
    else:
        qs = list(range(1, cfg.num_heads + 1))
    blocks = mlp_blocks(cfg, max_world)
    unit = cfg.intermediate_size // blocks
    ms = [b * unit for b in range(1, blocks + 1)]
    qs, ms = _spread_values(qs, MAX_POINTS), _spread_values(ms, MAX_POINTS)
    n = max(len(qs), len(ms))
    # Pair them up (one run times one attention and one MLP point): small with small.
    qs = [qs[round(i * (len(qs) - 1) / max(1, n - 1))] for i in range(n)]
    ms = [ms[round(i * (len(ms) - 1) / max(1, n - 1))] for i in range(n)]
    return [(q, -(-q // g), m) for q, m in zip(qs, ms, strict=True)]
