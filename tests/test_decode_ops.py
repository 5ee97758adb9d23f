"""The native per-layer decode ops (tpi.kernels.decode_ops) against float64
references, and the decode steps that take them."""

from __future__ import annotations

import pytest
import torch

from tpi.kernels import decode_ops
from tpi.model.rope import RotaryTables, apply_rotary

pytestmark = pytest.mark.skipif(decode_ops.LIBRARY.get() is None, reason="no C compiler here")


def _rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("shape", [(1, 576), (5, 576), (2, 3, 64), (4, 100), (1, 4096)])
def test_rms_norm_matches_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    got = decode_ops.rms_norm(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert (got.double() - _rms_ref(x, w, 1e-5)).abs().max() < 1e-5


def test_rms_norm_rows_are_independent_of_the_batch():
    x, w = torch.randn(7, 576), torch.randn(576)
    batch = decode_ops.rms_norm(x, w, 1e-6)
    for i in range(7):
        assert torch.equal(decode_ops.rms_norm(x[i : i + 1], w, 1e-6), batch[i : i + 1])


def test_rms_norm_declines_what_it_does_not_handle():
    w = torch.randn(64)
    assert decode_ops.rms_norm(torch.randn(64, 4).t(), torch.randn(4), 1e-6) is None  # strided
    assert decode_ops.rms_norm(torch.randn(2, 64, dtype=torch.bfloat16), w, 1e-6) is None
    assert decode_ops.rms_norm(torch.randn(2, 32), w, 1e-6) is None  # weight of another width


def _attend_ref(qkv, cos, ssin, keys, values, pos, nq, scale):
    """The same token the way the general path computes it, in float64."""
    nkv, _, hd = keys.shape
    x = qkv.double().view(1, nq + 2 * nkv, hd)
    qk = apply_rotary(x[:, : nq + nkv], cos.double(), ssin.double())
    q, k, v = qk[0, :nq], qk[0, nq:], x[0, nq + nkv :]
    kc, vc = keys.double().clone(), values.double().clone()
    kc[:, pos], vc[:, pos] = k, v
    kc, vc = kc[:, : pos + 1], vc[:, : pos + 1]
    group = nq // nkv
    out = []
    for h in range(nq):
        scores = (kc[h // group] @ q[h]) * scale
        out.append(scores.softmax(-1) @ vc[h // group])
    return torch.cat(out), k, v


@pytest.mark.parametrize(
    ("nq", "nkv", "hd", "rot", "pos"),
    [
        (9, 3, 64, 64, 0),  # SmolLM2's heads, first position
        (9, 3, 64, 64, 170),
        (8, 8, 32, 16, 40),  # partial rotary, no grouping
        (8, 2, 64, 64, 700),  # enough work for every thread
        (4, 1, 48, 48, 33),  # head size not a multiple of 16
        (8, 2, 128, 128, 90),  # Llama-7B's head size
        (16, 1, 64, 64, 50),  # more query heads per KV head than the fixed kernels take
        (16, 1, 64, 64, 150),  # the general kernel over several chunks of positions
        (9, 3, 64, 64, 63),  # positions filling one chunk exactly
        (9, 3, 64, 64, 64),  # ... and one more: a chunk of one position
    ],
)
def test_attend_one_matches_float64(nq, nkv, hd, rot, pos):
    g = torch.Generator().manual_seed(pos + hd)
    cap = pos + 17
    keys, values = torch.randn(nkv, cap, hd, generator=g), torch.randn(nkv, cap, hd, generator=g)
    before_k, before_v = keys.clone(), values.clone()
    qkv = torch.randn((nq + 2 * nkv) * hd, generator=g)
    cos, ssin = RotaryTables(_rope(rot / hd), hd, torch.float32).get(pos, 1)
    assert cos.shape[-1] == rot
    out = torch.empty(nq * hd)
    scale = hd**-0.5
    assert decode_ops.attend_one(qkv, cos, ssin, keys, values, pos, nq, scale, out)
    want, k, v = _attend_ref(qkv, cos.view(-1), ssin.view(-1), before_k, before_v, pos, nq, scale)
    assert (out.double() - want).abs().max() < 1e-5
    assert (keys[:, pos].double() - k).abs().max() < 1e-5 and torch.equal(values[:, pos], v.float())
    others = [p for p in range(cap) if p != pos]  # nothing else of the cache is touched
    assert torch.equal(keys[:, others], before_k[:, others])
    assert torch.equal(values[:, others], before_v[:, others])


def _rope(share: float):
    from tpi.model.config import RopeConfig

    return RopeConfig(theta=10000.0, partial_rotary=share)


@pytest.mark.parametrize("spread", [1e-3, 1.0, 40.0])
def test_attend_one_softmax_holds_from_flat_to_peaked_scores(spread):
    """Scores from nearly equal to hundreds apart (the exponentials then span the
    float range and most underflow): the vectorized exp stays within float rounding."""
    nq, nkv, hd, pos = 4, 2, 64, 300
    g = torch.Generator().manual_seed(int(spread * 1000))
    keys, values = (
        torch.randn(nkv, pos + 1, hd, generator=g),
        torch.randn(nkv, pos + 1, hd, generator=g),
    )
    qkv = torch.randn((nq + 2 * nkv) * hd, generator=g) * spread
    cos, ssin = torch.ones(1, hd), torch.zeros(1, hd)  # no rotation: scores as given
    out = torch.empty(nq * hd)
    before_k, before_v = keys.clone(), values.clone()
    assert decode_ops.attend_one(qkv, cos, ssin, keys, values, pos, nq, 1.0, out)
    want, _, _ = _attend_ref(qkv, cos.view(-1), ssin.view(-1), before_k, before_v, pos, nq, 1.0)
    assert (out.double() - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())


def test_attend_one_is_the_same_on_one_thread_and_two():
    nq, nkv, hd, pos = 8, 2, 64, 900  # above the threading threshold
    cap = pos + 1
    keys, values = torch.randn(nkv, cap, hd), torch.randn(nkv, cap, hd)
    qkv = torch.randn((nq + 2 * nkv) * hd)
    cos, ssin = RotaryTables(_rope(1.0), hd, torch.float32).get(pos, 1)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = torch.empty(nq * hd)
            assert decode_ops.attend_one(
                qkv, cos, ssin, keys.clone(), values.clone(), pos, nq, 0.125, out
            )
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_attend_one_declines_what_it_does_not_handle():
    keys, values = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    qkv, out = torch.randn(8 * 16), torch.empty(4 * 16)
    cos, ssin = torch.ones(1, 16), torch.zeros(1, 16)
    assert not decode_ops.attend_one(qkv, cos, ssin, keys, values, 8, 4, 0.25, out)  # past cap
    assert not decode_ops.attend_one(qkv, cos, ssin, keys, values, 3, 3, 0.25, out)  # 3 q / 2 kv
    half = keys.to(torch.bfloat16)
    assert not decode_ops.attend_one(qkv, cos, ssin, half, half, 3, 4, 0.25, out)


def test_decode_steps_take_the_native_attention(llama_dir, monkeypatch):
    """A single-node decode step whose half-layers are not fused (here: switched
    off) runs every layer's attention through attend_one, and gives the logits of
    the general path (the kernels switched off)."""
    from tpi.kernels import native
    from tpi.master.engine import load_engine
    from tpi.model import fused_decode

    monkeypatch.setattr(fused_decode, "attention", lambda *a: None)
    engine = load_engine(llama_dir)
    prompt = list(range(3, 20))
    engine.prefill(prompt)
    calls = []
    real = decode_ops.attend_one
    monkeypatch.setattr(decode_ops, "attend_one", lambda *a, **k: calls.append(1) or real(*a, **k))
    native_logits = engine.forward([7], len(prompt))
    assert len(calls) == engine.cfg.num_layers
    native.set_enabled(False)
    try:
        general = engine.forward([7], len(prompt))  # the same position again
    finally:
        native.set_enabled(True)
    assert (native_logits - general).abs().max() < 1e-4


def _rows_ref(q, keys, values, pos, scale):
    """Causal attention in float64: row t of q (T, nq, hd) over positions [0, pos + t]."""
    group = q.shape[1] // keys.shape[0]
    out = torch.empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float64)
    for t in range(q.shape[0]):
        for h in range(q.shape[1]):
            k, v = (
                keys[h // group, : pos + t + 1].double(),
                values[h // group, : pos + t + 1].double(),
            )
            out[t, h] = ((k @ q[t, h].double()) * scale).softmax(-1) @ v
    return out.reshape(q.shape[0], -1)


@pytest.mark.parametrize(
    ("nq", "nkv", "hd", "pos", "t"),
    [
        (9, 3, 64, 0, 128),  # SmolLM2's heads, a whole prompt
        (9, 3, 64, 60, 70),  # after cached rows, across chunks of positions
        (8, 2, 128, 5, 20),  # Llama-7B's head size
        (4, 1, 48, 0, 33),  # head size not a multiple of 16
        (16, 1, 64, 3, 66),  # more query heads per KV head than the fixed kernels take
        (4, 4, 64, 10, 1),  # one row
    ],
)
def test_attend_rows_match_float64(nq, nkv, hd, pos, t):
    g = torch.Generator().manual_seed(pos + t + hd)
    cap = pos + t + 5  # room past the rows: never read
    keys, values = torch.randn(nkv, cap, hd, generator=g), torch.randn(nkv, cap, hd, generator=g)
    keys[:, pos + t :] = float("nan")
    values[:, pos + t :] = float("nan")
    # q rows inside a wider qkv buffer, as attention_block holds them
    qkv = torch.randn(t, nq + 2 * nkv, hd, generator=g) * 2
    q = qkv[:, :nq]
    got = decode_ops.attend_rows(q, keys, values, pos, hd**-0.5)
    assert got.shape == (t, nq * hd)
    assert (got.double() - _rows_ref(q, keys, values, pos, hd**-0.5)).abs().max() < 1e-5


def test_attend_rows_are_the_decode_steps_at_their_positions():
    """Each row is exactly what attend_one computes for that token at its position
    (no rotation, so both start from the same q): a prompt's rows and decoded rows
    attend the same way."""
    nq, nkv, hd, pos, t = 9, 3, 64, 40, 90
    g = torch.Generator().manual_seed(3)
    keys, values = (
        torch.randn(nkv, pos + t, hd, generator=g),
        torch.randn(nkv, pos + t, hd, generator=g),
    )
    qkv = torch.randn(t, nq + 2 * nkv, hd, generator=g)
    qkv[:, nq : nq + nkv] = keys[:, pos:].transpose(0, 1)  # the rows' own keys and values
    qkv[:, nq + nkv :] = values[:, pos:].transpose(0, 1)
    rows = decode_ops.attend_rows(qkv[:, :nq], keys, values, pos, 0.125)
    none = torch.empty(0)
    for i in (0, 23, 24, 89):  # around the chunk boundary at position 64
        out = torch.empty(nq * hd)
        assert decode_ops.attend_one(
            qkv[i].reshape(-1), none, none, keys, values, pos + i, nq, 0.125, out
        )
        assert torch.equal(out, rows[i])


def test_attend_rows_are_the_same_on_one_thread_and_two():
    keys, values = torch.randn(2, 300, 64), torch.randn(2, 300, 64)
    q = torch.randn(200, 8, 64)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(decode_ops.attend_rows(q, keys, values, 100, 0.125))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_attend_rows_decline_what_they_do_not_handle():
    keys, values = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    q = torch.randn(4, 4, 16)
    assert decode_ops.attend_rows(q, keys, values, 5, 0.25) is None  # rows past the cache
    assert decode_ops.attend_rows(q[:, :3], keys, values, 0, 0.25) is None  # 3 q / 2 kv
    assert decode_ops.attend_rows(q.bfloat16(), keys, values, 0, 0.25) is None
    assert decode_ops.attend_rows(q.transpose(0, 1), keys, values, 0, 0.25) is None  # heads apart
    assert decode_ops.attend_rows(q, keys[:, :, :8], values, 0, 0.25) is None


def _prompt_takes(op: str, llama_dir, monkeypatch) -> None:
    """A prompt calls decode_ops.`op` once in every layer, and its logits are those
    of the general path (torch's ops, the kernels switched off)."""
    from tpi.kernels import native
    from tpi.master.engine import load_engine

    engine = load_engine(llama_dir)
    calls = []
    real = getattr(decode_ops, op)
    monkeypatch.setattr(decode_ops, op, lambda *a: calls.append(1) or real(*a))
    prompt = list(range(3, 40))
    native_logits = engine.prefill(prompt)
    assert len(calls) == engine.cfg.num_layers
    engine.reset()
    native.set_enabled(False)
    try:
        general = engine.prefill(prompt)
    finally:
        native.set_enabled(True)
    assert (native_logits - general).abs().max() < 1e-4


def test_prompts_take_the_native_rows_and_match_the_general_path(llama_dir, monkeypatch):
    _prompt_takes("attend_rows", llama_dir, monkeypatch)


def test_which_passes_take_the_native_rows():
    """Grouped heads at any length; ungrouped ones only for short passes (measured
    slower than torch's kernel from ~200 positions); never a binding window, soft-
    capped scores or a KV head split across ranks."""
    from tpi.model.layers import ROWS_MAX_POSITIONS, AttentionLayout, _rows_natively

    smol, mha = AttentionLayout(9, 3, 64, None), AttentionLayout(32, 32, 128, None)
    assert _rows_natively(smol, 4096, None) and _rows_natively(mha, ROWS_MAX_POSITIONS, None)
    assert not _rows_natively(mha, ROWS_MAX_POSITIONS + 1, None)
    assert _rows_natively(smol, 100, 100) and not _rows_natively(smol, 101, 100)
    assert not _rows_natively(AttentionLayout(9, 3, 64, None, softcap=50.0), 10, None)
    assert not _rows_natively(AttentionLayout(3, 2, 64, ((0, 0, 2), (1, 2, 3))), 10, None)


def test_silu_mul_matches_float64_on_the_halves_of_a_product():
    g = torch.Generator().manual_seed(5)
    gu = torch.randn(70, 2 * 300, generator=g) * 30
    gu[0, :300] = torch.linspace(-200, 200, 300)  # exp(-g) far past float range both ways
    gate, up = gu.chunk(2, dim=-1)
    got = decode_ops.silu_mul(gate, up)
    want = torch.nn.functional.silu(gate.double()) * up.double()
    assert got.shape == (70, 300) and got.is_contiguous()
    assert ((got.double() - want).abs() <= 1e-6 * want.abs() + 1e-30).all()


def test_silu_mul_declines_what_it_does_not_handle():
    a = torch.randn(4, 8)
    assert decode_ops.silu_mul(a, torch.randn(4, 9)[:, :8]) is None  # rows at other strides
    assert decode_ops.silu_mul(a.t(), a.t()) is None  # columns apart
    assert decode_ops.silu_mul(a.bfloat16(), a.bfloat16()) is None
    assert decode_ops.silu_mul(a[0], a[1]) is None  # not rows


def test_mlp_blocks_take_the_native_activation(llama_dir, monkeypatch):
    _prompt_takes("silu_mul", llama_dir, monkeypatch)
