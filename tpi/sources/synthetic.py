"""A synthetic int4 (or int8) Llama model, made slice by slice: big shapes with no checkpoint.

Llama-2-70B's shapes in bf16 are 140 GB, more than a small machine's disk; as an
int4 split (groups of 32) they are ~40 GB. This source hands out each rank's
stored tensors of a layer directly (packed int4 nibbles plus bf16 scale and zero
per group, int8 vocabulary tables), so no float matrix of a layer is ever held.

Weights are random but depend only on (seed, layer, tensor, block): every 64-row
block of a row-split matrix (q, k, v, gate, up, the vocabulary tables) and every
64-column block of a column-split one (o, down) is drawn from its own generator,
straight in the packed layout of `LAYOUT`. A partition whose cuts fall on
multiples of 64 takes whole blocks, so the world-1, world-4 and world-8 splits
hold the same model, only sliced differently, and greedy tokens can be compared
across world sizes. The logical nibble of weight (n, k) is what unpacking the
stored bytes gives (tpi.quant.int4_pack.unpack); `full_int4` returns a whole
matrix that way, e.g. to write the same model as a checkpoint.

Scales keep the residual stream well conditioned, so the greedy token does not
hinge on rounding (world sizes round partial sums differently): q, k, v, gate
and up give unit-RMS outputs for unit-RMS inputs, and o and down are scaled so
all layers together add about half the embedding's RMS to the residual stream.

A mixture of experts (a Qwen3-MoE config) gets a float router (the same on every
rank) and experts drawn like the MLP, each expert's blocks from generators of
their own, cut by the rank slice's experts and columns; models with per-head
q/k norms (Qwen3) get them as ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tpi.errors import ModelError
from tpi.model.config import ModelConfig
from tpi.model.partition import RankSlice
from tpi.model.weights import (
    ATTN_NORM,
    DOWN,
    EMBED,
    FINAL_NORM,
    GATE_UP,
    K_NORM,
    LM_HEAD,
    MLP_NORM,
    O_PROJ,
    Q_NORM,
    QKV,
    ROUTER,
    expert_name,
)
from tpi.quant.formats import INT4_SCALE_ZERO, INT4_SUFFIX, INT8_SCALE, INT8_SUFFIX, QUANT_DTYPE
from tpi.quant.int4_pack import Int4Layout, unpack
from tpi.quant.int4_rows import Int4Rows

LAYOUT = Int4Layout(64, True)  # the packing the model is defined in (torch's AVX512 one)
BLOCK = 64  # rows (or columns) drawn from one generator: the layout's row block
GROUP = 32
NIBBLE_RMS = math.sqrt((16**2 - 1) / 12)  # of q - 7.5 for q uniform in 0..15
INT8_RMS = math.sqrt((255**2 - 1) / 12)  # of q uniform in -127..127
SILU_GLU_RMS = 0.6  # RMS of silu(g) * u for unit-normal g and u, roughly
LAYERS_SHARE = 0.5  # RMS all layers add to the residual, relative to the embedding's
LOGIT_RMS = 4.0
SCALE_SPREAD = 0.25  # group scales vary by +-25% around their tensor's base
# Stable ids of the tensors (part of every generator's seed).
TENSOR_IDS = {
    "q": 0, "k": 1, "v": 2, "o": 3, "gate": 4, "up": 5, "down": 6, EMBED: 7, LM_HEAD: 8,
    "router": 9, "expert_gate": 10, "expert_up": 11, "expert_down": 12,
}  # fmt: skip
EXPERT_BLOCKS = 1 << 20  # expert e's block b draws from generator block e * EXPERT_BLOCKS + b


def _generator(seed: int, layer: int, tensor: str, block: int) -> torch.Generator:
    key = hashlib.blake2b(
        f"{seed}/{layer}/{TENSOR_IDS[tensor]}/{block}".encode(), digest_size=8
    ).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


def _random_bytes(n: int, g: torch.Generator) -> torch.Tensor:
    """n uniform bytes (n % 8 == 0); int64 draws are ~4x faster than uint8 ones."""
    return (
        torch.empty(n // 8, dtype=torch.int64)
        .random_(-(2**63), 2**63 - 1, generator=g)
        .view(torch.uint8)
    )


def _scales(shape: tuple[int, ...], base: float, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=g) * 2 - 1
    return (base * (1 + SCALE_SPREAD * u)).to(QUANT_DTYPE)


def _scale_zero(scale: torch.Tensor) -> torch.Tensor:
    """torch's kernel computes (q - 8) * scale + zero: zero = scale / 2 centres q on 7.5
    (exact in bf16: halving changes only the exponent)."""
    return torch.stack([scale, scale / 2], dim=-1).contiguous()


def _check_cut(a: int, b: int, total: int, what: str) -> None:
    if a % BLOCK or (b % BLOCK and b != total):
        raise ModelError(
            f"synthetic weights are cut in blocks of {BLOCK}: {what} [{a}, {b}) does not "
            "fall on them (choose shares whose slices are multiples of 64)"
        )


@dataclass(frozen=True)
class SyntheticInt4Model:
    """Every tensor of an int4 (groups of 32) split of a random `cfg` model."""

    cfg: ModelConfig
    seed: int = 0
    float_dtype: torch.dtype = torch.float32  # norms (what `dtype` a split records)

    def __post_init__(self) -> None:
        c = self.cfg
        if c.attention_bias or c.o_proj_bias or c.mlp_bias:
            raise ModelError("synthetic models have no biases")
        for name, k in (("hidden", c.hidden_size), ("intermediate", c.intermediate_size)):
            if k % BLOCK:
                raise ModelError(f"synthetic models need a {name} size divisible by {BLOCK}")
        if (c.head_dim * c.num_kv_heads) % BLOCK:
            raise ModelError(f"synthetic models need KV widths divisible by {BLOCK}")
        if c.is_moe and c.moe_intermediate_size % BLOCK:
            raise ModelError(f"synthetic experts need a width divisible by {BLOCK}")

    # --- shapes and scales -------------------------------------------------------

    def _shape(self, tensor: str) -> tuple[int, int]:
        """(outputs, inputs) of a whole matrix."""
        c = self.cfg
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return {
            "q": (q, c.hidden_size),
            "k": (kv, c.hidden_size),
            "v": (kv, c.hidden_size),
            "o": (c.hidden_size, q),
            "gate": (c.intermediate_size, c.hidden_size),
            "up": (c.intermediate_size, c.hidden_size),
            "down": (c.hidden_size, c.intermediate_size),
            "expert_gate": (c.moe_intermediate_size, c.hidden_size),
            "expert_up": (c.moe_intermediate_size, c.hidden_size),
            "expert_down": (c.hidden_size, c.moe_intermediate_size),
            EMBED: (c.vocab_size, c.hidden_size),
            LM_HEAD: (c.vocab_size, c.hidden_size),
        }[tensor]

    def _base_scale(self, tensor: str) -> float:
        k = self._shape(tensor)[1]
        per_block = LAYERS_SHARE / math.sqrt(2 * self.cfg.num_layers)
        if tensor == EMBED:
            return 1 / INT8_RMS
        if tensor == LM_HEAD:
            return LOGIT_RMS / (INT8_RMS * math.sqrt(k))
        if tensor == "o":  # its input, a mix of unit-RMS values, has RMS <= 1
            return per_block / (NIBBLE_RMS * math.sqrt(k))
        if tensor == "down":
            return per_block / (NIBBLE_RMS * math.sqrt(k) * SILU_GLU_RMS)
        if tensor == "expert_down":  # a token sums experts_per_token of them
            top = self.cfg.experts_per_token
            return per_block / (NIBBLE_RMS * math.sqrt(k * top) * SILU_GLU_RMS)
        return 1 / (NIBBLE_RMS * math.sqrt(k))

    # --- int4 matrices -----------------------------------------------------------

    def _block_generators(
        self, layer: int, tensor: str, a: int, b: int, expert: int
    ) -> Iterator[torch.Generator]:
        """The generator of each block of rows (or columns) [a, b), in order."""
        for blk in range(a // BLOCK, b // BLOCK):
            yield _generator(self.seed, layer, tensor, expert * EXPERT_BLOCKS + blk)

    def rows_int4(
        self, layer: int, tensor: str, a: int, b: int, expert: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output rows [a, b) of a row-split matrix: (packed (b-a, K/2), scale_zero (K/g, b-a, 2))."""
        n, k = self._shape(tensor)
        _check_cut(a, b, n, f"{tensor} rows")
        base = self._base_scale(tensor)
        packed, sz = [], []
        for g in self._block_generators(layer, tensor, a, b, expert):
            # A row block's packed bytes are K-major (K, BLOCK/2): its own, whatever the cut.
            packed.append(_random_bytes(BLOCK * k // 2, g).view(BLOCK, k // 2))
            sz.append(_scale_zero(_scales((k // GROUP, BLOCK), base, g)))
        return torch.cat(packed), torch.cat(sz, dim=1)

    def cols_int4(
        self, layer: int, tensor: str, a: int, b: int, expert: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input columns [a, b) of a column-split matrix: (packed (N, (b-a)/2),
        scale_zero ((b-a)/g, N, 2))."""
        n, k = self._shape(tensor)
        _check_cut(a, b, k, f"{tensor} columns")
        base = self._base_scale(tensor)
        packed, sz = [], []
        for g in self._block_generators(layer, tensor, a, b, expert):
            # In each row block, column k's BLOCK nibbles are BLOCK/2 consecutive bytes.
            packed.append(_random_bytes(n * BLOCK // 2, g).view(n // LAYOUT.block_n, BLOCK, -1))
            sz.append(_scale_zero(_scales((BLOCK // GROUP, n), base, g)))
        return torch.cat(packed, dim=1).reshape(n, (b - a) // 2), torch.cat(sz)

    def full_int4(self, layer: int, tensor: str) -> Int4Rows:
        """A whole matrix as 4-bit integers with scale and minimum (checkpoint form)."""
        n, k = self._shape(tensor)
        packed, sz = (
            self.rows_int4(layer, tensor, 0, n)
            if tensor in ("q", "k", "v", "gate", "up")
            else self.cols_int4(layer, tensor, 0, k)
        )
        scale = sz[..., 0].float().t().contiguous()
        zero = sz[..., 1].float().t().contiguous()
        return Int4Rows(unpack(packed, LAYOUT), scale, zero - 8 * scale)

    # --- what a split stores -----------------------------------------------------

    # A matrix is stored as (rows of a row-split matrix, fused where a split fuses
    # them) or (columns of a column-split one); the int8 model stores them its way.
    def _rows(self, layer: int, tensor: str, a: int, b: int, expert: int = 0) -> tuple:
        return self.rows_int4(layer, tensor, a, b, expert)

    def _cols(self, layer: int, tensor: str, a: int, b: int, expert: int = 0) -> tuple:
        return self.cols_int4(layer, tensor, a, b, expert)

    def _stored(self, name: str, part: tuple) -> dict[str, torch.Tensor]:
        packed, sz = part
        return {name + INT4_SUFFIX: packed, name + INT4_SCALE_ZERO: sz}

    def _fused(self, name: str, parts: list[tuple]) -> dict[str, torch.Tensor]:
        """Matrices stacked by rows (q/k/v, gate/up), as a split fuses them."""
        packed = torch.cat([p for p, _ in parts])
        return self._stored(name, (packed, torch.cat([sz for _, sz in parts], dim=1)))

    def layer(self, layer: int, rs: RankSlice) -> dict[str, torch.Tensor]:
        """Rank `rs`'s stored tensors of `layer`, named as in a `tpi split --quant` file."""
        hd = self.cfg.head_dim
        parts = [
            self._rows(layer, "q", rs.q_heads[0] * hd, rs.q_heads[1] * hd),
            self._rows(layer, "k", rs.kv_heads[0] * hd, rs.kv_heads[1] * hd),
            self._rows(layer, "v", rs.kv_heads[0] * hd, rs.kv_heads[1] * hd),
        ]
        out = self._fused(QKV, parts)
        out.update(
            self._stored(O_PROJ, self._cols(layer, "o", rs.q_heads[0] * hd, rs.q_heads[1] * hd))
        )
        if self.cfg.layer_is_moe(layer):
            out.update(self._experts(layer, rs))
        else:
            parts = [self._rows(layer, t, *rs.mlp) for t in ("gate", "up")]
            out.update(self._fused(GATE_UP, parts))
            out.update(self._stored(DOWN, self._cols(layer, "down", *rs.mlp)))
        ones = torch.ones(self.cfg.hidden_size, dtype=self.float_dtype)
        out[ATTN_NORM], out[MLP_NORM] = ones, ones.clone()
        if self.cfg.qk_norm:
            head_ones = torch.ones(hd, dtype=self.float_dtype)
            out[Q_NORM], out[K_NORM] = head_ones, head_ones.clone()
        return out

    def _experts(self, layer: int, rs: RankSlice) -> dict[str, torch.Tensor]:
        """The router (whole, on every rank) and the rank's columns of its experts."""
        c = self.cfg
        g = _generator(self.seed, layer, "router", 0)
        router = torch.randn(c.num_experts, c.hidden_size, generator=g) / math.sqrt(c.hidden_size)
        out = {ROUTER: router.to(self.float_dtype)}
        c0, c1 = rs.expert_cols
        for e in range(*rs.experts):
            parts = [self._rows(layer, t, c0, c1, e) for t in ("expert_gate", "expert_up")]
            for k, v in self._fused(GATE_UP, parts).items():
                out[expert_name(e, k)] = v
            down = self._stored(DOWN, self._cols(layer, "expert_down", c0, c1, e))
            for k, v in down.items():
                out[expert_name(e, k)] = v
        return out

    def table_int8(self, tensor: str, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [a, b) of a vocabulary table: (int8 (b-a, hidden), bf16 scale (b-a,))."""
        n, k = self._shape(tensor)
        _check_cut(a, b, n, f"{tensor} rows")
        base = self._base_scale(tensor)
        qs, scales = [], []
        for blk in range(a // BLOCK, (b + BLOCK - 1) // BLOCK):
            g = _generator(self.seed, -1, tensor, blk)
            rows = min(BLOCK, n - blk * BLOCK)
            q = torch.empty(rows, k, dtype=torch.int8).random_(-127, 128, generator=g)
            # Each row reaches 127, so requantizing the dequantized row (absmax / 127)
            # finds the same scale and integers again: `tpi split` reproduces it exactly.
            q[:, 0] = 127
            qs.append(q)
            scales.append(_scales((rows,), base, g))
        return torch.cat(qs), torch.cat(scales)

    def head(self, rs: RankSlice | None = None) -> dict[str, torch.Tensor]:
        """The final norm and int8 vocabulary tables: all rows, or `rs.vocab`'s."""
        a, b = rs.vocab if rs is not None and rs.vocab else (0, self.cfg.vocab_size)
        out = {FINAL_NORM: torch.ones(self.cfg.hidden_size, dtype=self.float_dtype)}
        tables = (EMBED,) if self.cfg.tie_word_embeddings else (EMBED, LM_HEAD)
        for t in tables:
            q, scale = self.table_int8(t, a, b)
            out[t + INT8_SUFFIX], out[t + INT8_SCALE] = q, scale
        return out


@dataclass(frozen=True)
class SyntheticInt8Model(SyntheticInt4Model):
    """The same kind of random model with per-output-channel int8 matrices (as
    `tpi split --quant int8` stores them: int8 (N, K) and a bf16 scale per row).
    Row blocks and column blocks draw from their own generators as in the int4
    model; a column-split matrix's row scales come from one generator of their
    own, so every rank's columns share them and any cut holds the same model."""

    def full_int4(self, layer: int, tensor: str) -> Int4Rows:
        raise ModelError("a synthetic int8 model has no int4 form")

    def _int8_base(self, tensor: str) -> float:
        return self._base_scale(tensor) * NIBBLE_RMS / INT8_RMS  # int8's spread, not int4's

    def _rows(self, layer: int, tensor: str, a: int, b: int, expert: int = 0) -> tuple:
        n, k = self._shape(tensor)
        _check_cut(a, b, n, f"{tensor} rows")
        base, qs, scales = self._int8_base(tensor), [], []
        for blk in range(a // BLOCK, b // BLOCK):
            g = _generator(self.seed, layer, tensor, expert * EXPERT_BLOCKS + blk)
            qs.append(torch.empty(BLOCK, k, dtype=torch.int8).random_(-127, 128, generator=g))
            scales.append(_scales((BLOCK,), base, g))
        return torch.cat(qs), torch.cat(scales)

    def _cols(self, layer: int, tensor: str, a: int, b: int, expert: int = 0) -> tuple:
        n, k = self._shape(tensor)
        _check_cut(a, b, k, f"{tensor} columns")
        qs = []
        for blk in range(a // BLOCK, b // BLOCK):
            g = _generator(self.seed, layer, tensor, expert * EXPERT_BLOCKS + blk)
            qs.append(torch.empty(n, BLOCK, dtype=torch.int8).random_(-127, 128, generator=g))
        g = _generator(self.seed, layer, tensor, expert * EXPERT_BLOCKS + EXPERT_BLOCKS - 1)
        return torch.cat(qs, dim=1), _scales((n,), self._int8_base(tensor), g)

    def _stored(self, name: str, part: tuple) -> dict[str, torch.Tensor]:
        q, scale = part
        return {name + INT8_SUFFIX: q, name + INT8_SCALE: scale}

    def _fused(self, name: str, parts: list[tuple]) -> dict[str, torch.Tensor]:
        q = torch.cat([q for q, _ in parts])
        return self._stored(name, (q, torch.cat([scale for _, scale in parts])))
