"""The kernels as AArch64 CPUs build them (tests/arm_kernels.py: cross-compiled, run
under qemu-user) held to what the x86 builds are held to: every kernel against a
float64 reference, a row's result the same bits alone or in a batch and on any
thread count, the fused half-layers equal to their kernels called one by one.
Three builds: plain NEON (the Raspberry Pi 4's Cortex-A72), dot products (the Pi
5's Cortex-A76) and dot products with the int8 matrix and bfloat16 extensions."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.arm_kernels import VARIANTS, ArmBuild, Call, Mat, missing
from tpi.kernels.digits import as_digits
from tpi.model.rope import RotaryTables, apply_rotary
from tpi.quant.int4_pack import ROWS, pack
from tpi.quant.quantize import quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

F32, INT8, INT4 = 1, 2, 3  # decode_layer.c's Mat kinds
EXACT, DIGITS = 0, 2  # tpi_int8_activations: x as it is, or as two int8 digits


@pytest.fixture(scope="module", params=VARIANTS, ids=[v.name for v in VARIANTS])
def arm(request, tmp_path_factory) -> ArmBuild:
    return ArmBuild(request.param, tmp_path_factory.mktemp(request.param.name))


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    assert got.dtype == torch.float32
    err = (got.double() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item() + 1e-6, err


def _activations(arm: ArmBuild) -> int:
    mode = arm.one("tpi_int8_activations", 64).rc
    assert mode == (EXACT if arm.variant.name == "neon" else DIGITS)
    return mode


def _seen(x: torch.Tensor, mode: int, block: int) -> torch.Tensor:
    """x as the kernel multiplies it, in float64."""
    return as_digits(x, block) if mode == DIGITS else x.double()


def _int4(n: int, k: int, group: int, seed: int, mean: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    q, sz = quantize_int4(torch.randn(n, k, generator=g) * 0.05 + mean, group)
    scale = sz[..., 0].double().t().repeat_interleave(group, dim=1)
    zero = sz[..., 1].double().t().repeat_interleave(group, dim=1)
    return pack(q, ROWS), sz, (q.double() - 8) * scale + zero


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= 40  # an outlier channel
    return x


def test_each_build_has_the_instructions_it_is_named_for(arm):
    """The dot-product builds really use SDOT (and SMMLA), the plain one neither:
    else one variant would be tested in place of another."""
    dump = subprocess.run(
        ["aarch64-linux-gnu-objdump", "-d", str(arm.libs[0])], capture_output=True, text=True
    ).stdout
    want = {"neon": (False, False), "dotprod": (True, False), "i8mm": (True, True)}
    assert ("\tsdot\t" in dump, "\tsmmla\t" in dump) == want[arm.variant.name]


@pytest.mark.parametrize("n,k", [(1, 16), (5, 48), (33, 576), (130, 1536)])
def test_float_and_int8_rows_match_float64(arm, n, k):
    mode = _activations(arm)
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g)
    q, scale = quantize_int8(torch.randn(n, k, generator=g))
    wq = q.double() * scale.double()[:, None]
    rows = (*range(1, 9), 13, 95)
    xs = [_x(m, k, m) for m in rows]
    calls = [
        Call("tpi_matmul_f32", x, m, k, w, n, torch.empty(m, n))
        for m, x in zip(rows[:8], xs, strict=False)
    ]
    calls += [
        Call("tpi_matmul_i8", x, m, k, q, scale, n, torch.empty(m, n))
        for m, x in zip(rows, xs, strict=True)
    ]
    replies = arm.run(calls)
    for x, r in zip(xs, replies[:8], strict=False):
        _close(r.buffers[-1], x.double() @ w.double().T, 2e-6)
    for x, r in zip(xs, replies[8:], strict=True):
        assert r.rc == 0
        _close(r.buffers[-1], _seen(x, mode, k) @ wq.T, 2e-6)


def test_int8_digits_are_closer_to_x_than_bfloat16(arm):
    """What the dot-product builds give up against float32 activations: less than
    x86's bfloat16 rounding (measured here on rows with an outlier channel)."""
    if _activations(arm) != DIGITS:
        pytest.skip("this build multiplies float32 activations")
    n, k = 256, 576
    g = torch.Generator().manual_seed(8)
    q, scale = quantize_int8(torch.randn(n, k, generator=g))
    wq = q.double() * scale.double()[:, None]
    x = _x(8, k, 9)
    got = arm.one("tpi_matmul_i8", x, 8, k, q, scale, n, torch.empty(8, n)).buffers[-1]
    exact = x.double() @ wq.T
    bf16 = x.bfloat16().double() @ wq.T
    assert (got.double() - exact).abs().max() < (bf16 - exact).abs().max() / 4


def test_float_column_blocks_match_float64(arm):
    s, k, nb = 2, 576, 1024
    g = torch.Generator().manual_seed(3)
    w = torch.randn(s * nb, k, generator=g)
    blocks = w.t().reshape(k, s, nb).permute(1, 0, 2).contiguous()
    xs = [torch.randn(m, k, generator=g) for m in (1, 4, 7)]
    replies = arm.run(
        [
            Call("tpi_matmul_f32_cols", x, len(x), k, blocks, s, nb, torch.empty(len(x), s * nb))
            for x in xs
        ]
    )
    for x, r in zip(xs, replies, strict=True):
        _close(r.buffers[-1], x.double() @ w.double().T, 2e-6)


@pytest.mark.parametrize(
    ("n", "k", "group", "mean"),
    [
        (64, 32, 32, 0.0),
        (192, 576, 32, 0.0),
        (1024, 1536, 64, 0.0),
        (128, 256, 128, 0.0),
        (256, 512, 32, 3.0),
    ],
)
def test_int4_rows_match_float64(arm, n, k, group, mean):
    """The split's own layout read in place; mean 3: weights far from zero (large zero
    points), whose offsets must still cancel."""
    mode = _activations(arm)
    packed, sz, w = _int4(n, k, group, seed=n + k + group, mean=mean)
    rows = (*range(1, 9), 13)
    xs = [_x(m, k, m + 100) for m in rows]
    replies = arm.run(
        [
            Call("tpi_matmul_i4", x, len(x), k, packed, sz, group, n, torch.empty(len(x), n))
            for x in xs
        ]
    )
    for x, r in zip(xs, replies, strict=True):
        assert r.rc == 0
        _close(r.buffers[-1], _seen(x, mode, group) @ w.T, 2e-5)


def test_int4_declines_shapes_it_does_not_take(arm):
    packed, sz, _ = _int4(64, 64, 32, seed=1)
    y = torch.empty(1, 64)
    assert arm.one("tpi_int4_layout").rc == 0  # "rows": the split's layout
    # width not a multiple of 32 (K = 48, groups of 16)
    odd = arm.one("tpi_matmul_i4", torch.randn(1, 48), 1, 48, packed, sz, 16, 64, y)
    assert odd.rc == -2


def test_rows_are_the_same_alone_in_a_batch_and_on_two_threads(arm):
    n, k = 1000, 576
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=g)
    q, scale = quantize_int8(torch.randn(n, k, generator=g))
    packed, sz, _ = _int4(640, k, 32, seed=7)
    x = _x(9, k, 6)
    kinds = [
        lambda x, m, t: Call("tpi_matmul_f32", x, m, k, w, n, torch.empty(m, n), threads=t),
        lambda x, m, t: Call("tpi_matmul_i8", x, m, k, q, scale, n, torch.empty(m, n), threads=t),
        lambda x, m, t: Call(
            "tpi_matmul_i4", x, m, k, packed, sz, 32, 640, torch.empty(m, 640), threads=t
        ),
        lambda x, m, t: Call("tpi_gemm_f32", x, m, k, w, n, torch.empty(m, n), threads=t, lib=1),
    ]
    for make in kinds:
        batch = x[:8] if make is kinds[0] else x
        calls = [make(batch, len(batch), 1), make(batch, len(batch), 2)]
        calls += [make(batch[i : i + 1].clone(), 1, 2) for i in (0, 1, len(batch) - 1)]
        one, two, *alone = [r.buffers[-1] for r in arm.run(calls)]
        assert torch.equal(one, two)
        for i, a in zip((0, 1, len(batch) - 1), alone, strict=True):
            assert torch.equal(one[i], a[0])


@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 48), (17, 576, 200), (70, 128, 1536)])
def test_gemm_matches_float64(arm, m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    r = arm.one("tpi_gemm_f32", x, m, k, w, n, torch.empty(m, n), lib=1)
    assert r.rc == 0
    _close(r.buffers[-1], x.double() @ w.double().T, 2e-6)


def _attend_ref(qkv, cos, ssin, keys, values, pos, nq, scale):
    nkv, _, hd = keys.shape
    x = qkv.double().view(1, nq + 2 * nkv, hd)
    qk = apply_rotary(x[:, : nq + nkv], cos.double(), ssin.double())
    q, k, v = qk[0, :nq], qk[0, nq:], x[0, nq + nkv :]
    kc, vc = keys.double().clone(), values.double().clone()
    kc[:, pos], vc[:, pos] = k, v
    group = nq // nkv
    out = [
        ((kc[h // group, : pos + 1] @ q[h]) * scale).softmax(-1) @ vc[h // group, : pos + 1]
        for h in range(nq)
    ]
    return torch.cat(out)


def _rope(share: float, hd: int, pos: int):
    from tpi.model.config import RopeConfig

    return RotaryTables(RopeConfig(theta=10000.0, partial_rotary=share), hd, torch.float32).get(
        pos, 1
    )


def test_norm_activation_and_attention_match_float64(arm):
    g = torch.Generator().manual_seed(11)
    x, nw = torch.randn(5, 576, generator=g) * 3, torch.randn(576, generator=g)
    gu = torch.randn(3, 2 * 300, generator=g) * 8  # gate then up, 300 each: rows at one stride
    up = torch.cat([gu[:, 300:], torch.zeros(3, 300)], dim=1)  # up's rows at gate's stride
    calls = [
        Call("tpi_rms_norm_f32", x, 5, 576, nw, 1e-5, torch.empty(5, 576)),
        Call("tpi_silu_mul_f32", gu, up, 600, 3, 300, torch.empty(3, 300)),
    ]
    cases = [
        (9, 3, 64, 64, 170),
        (8, 8, 32, 16, 40),
        (4, 1, 48, 48, 33),
        (8, 2, 128, 128, 90),
        (16, 1, 64, 64, 150),
    ]
    refs = []
    for nq, nkv, hd, rot, pos in cases:
        cap = pos + 17
        keys, values = (
            torch.randn(nkv, cap, hd, generator=g),
            torch.randn(nkv, cap, hd, generator=g),
        )
        qkv = torch.randn((nq + 2 * nkv) * hd, generator=g)
        cos, ssin = _rope(rot / hd, hd, pos)
        refs.append(_attend_ref(qkv, cos.view(-1), ssin.view(-1), keys, values, pos, nq, hd**-0.5))
        calls.append(
            Call(
                "tpi_attend_one_f32",
                qkv,
                cos,
                ssin,
                rot,
                keys,
                values,
                cap,
                pos,
                nq,
                nkv,
                hd,
                hd**-0.5,
                torch.empty(nq * hd),
                threads=2,
            )
        )
    replies = arm.run(calls)
    xd = x.double()
    want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    assert (replies[0].buffers[-1].double() - want).abs().max() < 1e-5
    gate, up = gu[:, :300].double(), gu[:, 300:].double()
    _close(replies[1].buffers[-1], gate * torch.sigmoid(gate) * up, 1e-6)
    for ref, r in zip(refs, replies[2:], strict=True):
        assert r.rc == 0
        assert (r.buffers[-1].double() - ref).abs().max() < 1e-5


def test_prompt_rows_attend_as_decode_steps_would(arm):
    """tpi_attend_rows: row t of a prompt sees positions [0, pos + t], as a decode
    step at its position (tpi_attend_one) would."""
    nq, nkv, hd, pos, t = 9, 3, 64, 20, 6
    g = torch.Generator().manual_seed(12)
    cap = pos + t + 4
    keys, values = torch.randn(nkv, cap, hd, generator=g), torch.randn(nkv, cap, hd, generator=g)
    q = torch.randn(t, nq, hd, generator=g)
    r = arm.one(
        "tpi_attend_rows_f32",
        q,
        nq * hd,
        t,
        keys,
        values,
        cap,
        pos,
        nq,
        nkv,
        hd,
        0.125,
        torch.empty(t, nq * hd),
        threads=2,
    )
    assert r.rc == 0
    group = nq // nkv
    for row in range(t):
        s = pos + row + 1
        want = torch.cat(
            [
                ((keys[h // group, :s].double() @ q[row, h].double()) * 0.125).softmax(-1)
                @ values[h // group, :s].double()
                for h in range(nq)
            ]
        )
        assert (r.buffers[-1][row].double() - want).abs().max() < 1e-5


HIDDEN, NQ, NKV, HD, FF = 128, 4, 2, 32, 192


def _mat(kind: int, w: torch.Tensor, bias: torch.Tensor | None) -> tuple[Mat, tuple]:
    """The Mat of a weight, and the arguments of its own kernel call (x, y added later)."""
    n, k = w.shape
    if kind == F32:
        return Mat(F32, w, None, bias, n, k), ("tpi_matmul_f32", w, n)
    if kind == INT8:
        q, s = quantize_int8(w)
        return Mat(INT8, q, s, bias, n, k), ("tpi_matmul_i8", q, s, n)
    q, sz = quantize_int4(w, 32)
    p = pack(q, ROWS)
    return Mat(INT4, p, sz, bias, n, k, 32), ("tpi_matmul_i4", p, sz, 32, n)


def _product(arm: ArmBuild, op: tuple, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    name, *weights, n = op
    m, k = x.shape
    args = (x, m, k, *weights, n, torch.empty(m, n))
    y = arm.one(name, *args).buffers[-1]
    return y if bias is None else y + bias


@pytest.mark.parametrize("kind", [F32, INT8, INT4])
def test_fused_halves_are_their_kernels_one_by_one(arm, kind):
    g = torch.Generator().manual_seed(kind)

    def mat(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, generator=g) / k**0.5

    nqkv = (NQ + 2 * NKV) * HD
    norm = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    qkv, qkv_op = _mat(kind, mat(nqkv, HIDDEN), torch.randn(nqkv, generator=g) * 0.1)
    o, o_op = _mat(kind, mat(HIDDEN, NQ * HD), None)
    gu, gu_op = _mat(kind, mat(2 * FF, HIDDEN), None)
    down, down_op = _mat(kind, mat(HIDDEN, FF), torch.randn(HIDDEN, generator=g) * 0.1)
    h = torch.randn(1, HIDDEN, generator=g)
    pos, cap = 90, 128
    keys, values = torch.randn(NKV, cap, HD, generator=g), torch.randn(NKV, cap, HD, generator=g)
    cos, ssin = _rope(1.0, HD, pos)
    scale = HD**-0.5
    fused = arm.one(
        "tpi_attention_half",
        h,
        HIDDEN,
        norm,
        1e-5,
        qkv,
        o,
        cos,
        ssin,
        HD,
        keys,
        values,
        cap,
        pos,
        NQ,
        NKV,
        HD,
        scale,
        torch.empty(1, HIDDEN),
    )
    assert fused.rc == 0
    x = arm.one("tpi_rms_norm_f32", h, 1, HIDDEN, norm, 1e-5, torch.empty(1, HIDDEN)).buffers[-1]
    q = _product(arm, qkv_op, x, qkv.bias)
    att = arm.one(
        "tpi_attend_one_f32",
        q,
        cos,
        ssin,
        HD,
        keys,
        values,
        cap,
        pos,
        NQ,
        NKV,
        HD,
        scale,
        torch.empty(NQ * HD),
    )
    # the token's key and value written to the cache alike (buffers -3, -2: keys, values)
    assert torch.equal(att.buffers[-3], fused.buffers[-3])
    assert torch.equal(att.buffers[-2], fused.buffers[-2])
    assert torch.equal(fused.buffers[-1], _product(arm, o_op, att.buffers[-1].view(1, -1), None))
    mlp = arm.one("tpi_mlp_half", h, HIDDEN, norm, 1e-5, gu, down, torch.empty(1, HIDDEN))
    assert mlp.rc == 0
    x = arm.one("tpi_rms_norm_f32", h, 1, HIDDEN, norm, 1e-5, torch.empty(1, HIDDEN)).buffers[-1]
    y = _product(arm, gu_op, x, None)
    act = arm.one(
        "tpi_silu_mul_f32", y, y[:, FF:].contiguous(), FF, 1, FF, torch.empty(1, FF)
    ).buffers[-1]
    assert torch.equal(mlp.buffers[-1], _product(arm, down_op, act, down.bias))
