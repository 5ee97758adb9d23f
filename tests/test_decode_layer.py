"""A decode token's half-layers in one native call (tpi.kernels.decode_layer via
tpi.model.fused_decode): the same numbers as the native ops run one by one, for
float32, int8 and int4 weights with and without biases; silu exact to float64 at
extreme gates; a model's decode steps taking them and matching the general path;
and everything else left to the op-by-op path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tpi.kernels import decode_layer, decode_ops, int4_matmul
from tpi.model import fused_decode
from tpi.model.config import RopeConfig
from tpi.model.kv_cache import KVCache
from tpi.model.layers import SequenceStep, StepContext
from tpi.model.linear import int4_packed_for_the_kernel, linear
from tpi.model.rope import RotaryTables
from tpi.model.weights import LayerWeights
from tpi.quant.formats import FloatT, Int4Weight, Int8Weight
from tpi.quant.int4_pack import held_layout, pack
from tpi.quant.quantize import quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(decode_layer.library() is None, reason="no C compiler here")

HIDDEN, NQ, NKV, HD, FF = 128, 4, 2, 32, 192
INT4_OK = int4_matmul.available() and int4_packed_for_the_kernel()


def _held(w: torch.Tensor, kind: str):
    if kind == "fp32":
        return FloatT.of(w, 2)  # row blocks, as a resident layer on 2 threads holds them
    if kind == "int8":
        return Int8Weight(*quantize_int8(w))
    q, sz = quantize_int4(w, 32)
    return Int4Weight(pack(q, held_layout()), sz)


def _layer(kind: str, bias: bool, seed: int = 0) -> LayerWeights:
    g = torch.Generator().manual_seed(seed)

    def mat(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, generator=g) / k**0.5

    def b(n: int) -> torch.Tensor | None:
        return torch.randn(n, generator=g) * 0.1 if bias else None

    nqkv = (NQ + 2 * NKV) * HD
    return LayerWeights(
        attn_norm=1 + 0.1 * torch.randn(HIDDEN, generator=g),
        mlp_norm=1 + 0.1 * torch.randn(HIDDEN, generator=g),
        qkv=_held(mat(nqkv, HIDDEN), kind),
        qkv_bias=b(nqkv),
        o=_held(mat(HIDDEN, NQ * HD), kind),
        o_bias=b(HIDDEN),
        gate_up=_held(mat(2 * FF, HIDDEN), kind),
        gate_up_bias=None,
        down=_held(mat(HIDDEN, FF), kind),
        down_bias=b(HIDDEN),
    )


def _cache(pos: int, seed: int) -> KVCache:
    cache = KVCache(1, NKV, HD, 256, torch.float32)
    keys, values = cache.buffers(0, pos + 1)
    g = torch.Generator().manual_seed(seed)
    keys.copy_(torch.randn(keys.shape, generator=g))
    values.copy_(torch.randn(values.shape, generator=g))
    return cache


def _step(pos: int, cache: KVCache, rot_share: float = 1.0) -> StepContext:
    rope = RotaryTables(RopeConfig(theta=10000.0, partial_rotary=rot_share), HD, torch.float32)
    cos, sin = rope.get(pos, 1)
    return StepContext([SequenceStep(pos, 1, cache)], cos, sin, torch.float32)


@dataclasses.dataclass(frozen=True)
class _Layout:  # the fields of AttentionLayout that the fused path reads
    n_q: int = NQ
    n_kv: int = NKV
    head_dim: int = HD
    segments: None = None
    softcap: None = None
    query_scale: float = HD**-0.5


class _Cfg:
    rms_norm_eps = 1e-5
    norm_offset = 0.0
    hidden_act = "silu"


KINDS = ["fp32", "int8", pytest.param("int4", marks=pytest.mark.skipif(not INT4_OK, reason="int4"))]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rot_share", [1.0, 0.5])
def test_attention_half_is_the_native_ops_one_by_one(kind, bias, rot_share):
    w = _layer(kind, bias)
    h = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(1))
    pos = 90
    fused_cache, ops_cache = _cache(pos, 2), _cache(pos, 2)
    step = _step(pos, fused_cache, rot_share)
    got = fused_decode.attention(h, w, _Layout(), 0, step, _Cfg, None)
    assert got is not None
    # The same kernels, called one by one as tpi.model.layers does.
    x = decode_ops.rms_norm(h, w.attn_norm, _Cfg.rms_norm_eps)
    qkv = linear(x, w.qkv, w.qkv_bias)
    keys, values = ops_cache.buffers(0, pos + 1)
    att = torch.empty(1, NQ * HD)
    cos, sin = step.cos[0], step.sin[0]
    assert decode_ops.attend_one(qkv[0], cos, sin, keys, values, pos, NQ, HD**-0.5, att[0])
    want = linear(att, w.o, w.o_bias)
    assert torch.equal(got, want)
    # ... and the token's key and value are in the cache, as the ops put them.
    fk, fv = fused_cache.buffers(0, pos + 1)
    assert torch.equal(fk, keys) and torch.equal(fv, values)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_half_is_the_native_ops_one_by_one(kind, bias):
    w = _layer(kind, bias, seed=3)
    h = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(4))
    got = fused_decode.mlp(h, w, _Cfg)
    x = decode_ops.rms_norm(h, w.mlp_norm, _Cfg.rms_norm_eps)
    gate, up = linear(x, w.gate_up).chunk(2, dim=-1)
    want = linear(F.silu(gate) * up, w.down, w.down_bias)  # torch's silu: not bit for bit
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_silu_holds_at_extreme_gates():
    """Gates from -200 to 200 (exp(-g) past float's range on one side): silu(g) * up
    within float rounding of float64."""
    ff = 64
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, HIDDEN, generator=g)
    norm = torch.ones(HIDDEN)
    x = decode_ops.rms_norm(h, norm, 1e-5)
    # Gate rows chosen so the gates are exactly a spread of values: rows = target * x / |x|^2.
    targets = torch.linspace(-200, 200, ff, dtype=torch.float64)
    xd = x[0].double()
    gate_rows = targets[:, None] * xd[None] / xd.dot(xd)
    up_rows = torch.randn(ff, HIDDEN, generator=g, dtype=torch.float64) * 0.1
    gate_up = torch.cat([gate_rows, up_rows]).float().contiguous()
    down = torch.randn(HIDDEN, ff, generator=g)
    mats = [fused_decode._mat(t, None) for t in (gate_up, down)]
    got = decode_layer.mlp_half(h, norm, 1e-5, *mats)
    gu = x.double() @ gate_up.double().T
    gd, ud = gu[:, :ff], gu[:, ff:]
    want = (gd * torch.sigmoid(gd) * ud) @ down.double().T
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("model", ["llama_dir", "qwen2_dir"])  # qwen2: biases, tied head
def test_decode_steps_take_the_fused_halves(model, request, monkeypatch):
    from tpi.kernels import native
    from tpi.master.engine import load_engine

    # Float32 weights are held in row blocks for 2+ threads; one thread holds them
    # transposed, which only torch's product reads (the op-by-op path).
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = load_engine(request.getfixturevalue(model))
    finally:
        torch.set_num_threads(before)
    prompt = list(range(3, 20))
    engine.prefill(prompt)
    calls: list[str] = []
    for name in ("attention_half", "mlp_half"):
        real = getattr(decode_layer, name)
        spy = (lambda r, n: lambda *a: calls.append(n) or r(*a))(real, name)
        monkeypatch.setattr(decode_layer, name, spy)
    fused = engine.forward([7], len(prompt))
    layers = engine.cfg.num_layers
    assert calls.count("attention_half") == layers and calls.count("mlp_half") == layers
    native.set_enabled(False)
    try:
        general = engine.forward([7], len(prompt))  # the same position again, torch's ops
    finally:
        native.set_enabled(True)
    assert (fused - general).abs().max() < 1e-4


def test_what_is_not_one_float32_token_takes_the_op_by_op_path():
    w = _layer("fp32", bias=False)
    h = torch.randn(1, HIDDEN)
    cache = _cache(10, 1)
    step = _step(10, cache)
    assert fused_decode.attention(h, w, _Layout(), 0, step, _Cfg, None) is not None
    two = StepContext(
        [step.seqs[0], SequenceStep(3, 1, _cache(3, 2))], step.cos, step.sin, step.dtype
    )
    assert fused_decode.attention(torch.randn(2, HIDDEN), w, _Layout(), 0, two, _Cfg, None) is None
    assert fused_decode.attention(h.bfloat16(), w, _Layout(), 0, step, _Cfg, None) is None
    assert fused_decode.attention(h, w, _Layout(), 0, step, _Cfg, 8) is None  # window masks
    capped = dataclasses.replace(_Layout(), softcap=50.0)
    assert fused_decode.attention(h, w, capped, 0, step, _Cfg, None) is None

    class Gelu(_Cfg):
        hidden_act = "gelu_tanh"

    class Gemma(_Cfg):
        norm_offset = 1.0

    assert fused_decode.mlp(h, w, _Cfg) is not None
    assert fused_decode.mlp(h, w, Gelu) is None
    assert fused_decode.mlp(h, w, Gemma) is None
    # Weights no native kernel reads: float32 held transposed (for torch alone), bf16.
    m = torch.randn(64, HIDDEN)
    assert fused_decode._mat(FloatT(m.t().contiguous()[None], by_rows=False), None) is None
    assert fused_decode._mat(m.bfloat16(), None) is None
    assert fused_decode._mat(m, torch.zeros(64, dtype=torch.bfloat16)) is None
    assert fused_decode._mat(m, None) is not None
