"""The native int4 kernel (tpi.kernels.int4_matmul): products against a float64
reference built from the quantizer's own output, rows of a batch computed as
alone, the thread count changing no bit, and every case it does not serve left
to torch."""

from __future__ import annotations

import pytest
import torch

from tpi.kernels import int4_matmul as i4
from tpi.kernels.digits import as_digits
from tpi.model.linear import int4_packed_for_the_kernel, linear
from tpi.quant.formats import Int4Weight
from tpi.quant.int4_pack import Int4Layout, held_layout, pack
from tpi.quant.quantize import quantize_int4

pytestmark = pytest.mark.skipif(
    not (i4.available() and int4_packed_for_the_kernel()),
    reason="no compiler, no AVX512-BF16/VBMI or another int4 layout here",
)


def _weight(n: int, k: int, group: int, seed: int, mean: float = 0.0) -> Int4Weight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05 + mean
    q, sz = quantize_int4(w, group)
    return Int4Weight(pack(q, held_layout()), sz), q, sz


def _reference(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """float64 x (rounded as the kernel takes it: to bfloat16 on x86) @ ((q - 8) s + z).T"""
    group = q.shape[1] // sz.shape[0]
    scale = sz[..., 0].double().t().repeat_interleave(group, dim=1)
    zero = sz[..., 1].double().t().repeat_interleave(group, dim=1)
    taken = i4.activations()
    xr = x.bfloat16().double() if taken == 1 else as_digits(x, group) if taken == 2 else x.double()
    return xr @ ((q.double() - 8) * scale + zero).t()


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    err = (got.double() - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), err


@pytest.mark.parametrize(
    ("n", "k", "group"),
    [(64, 32, 32), (192, 576, 32), (1024, 1536, 64), (128, 256, 256), (320, 128, 2)],
)
def test_int4_rows_match_float64(n: int, k: int, group: int) -> None:
    w, q, sz = _weight(n, k, group, seed=n + k + group)
    g = torch.Generator().manual_seed(1)
    for m in range(1, i4.MAX_ROWS + 1):
        x = torch.randn(m, k, generator=g)
        x[:, 0] *= 40  # an outlier channel
        _close(i4.matmul_int4(x, w.packed, w.scale_zero, group), _reference(x, q, sz))


def test_weights_far_from_zero_keep_their_precision() -> None:
    """The kernel multiplies 128 + q and takes 128 times the sum of x back out:
    with weights centred far from zero (large zero points) that must still cancel."""
    w, q, sz = _weight(256, 512, 32, seed=4, mean=3.0)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    _close(i4.matmul_int4(x, w.packed, w.scale_zero, 32), _reference(x, q, sz))


def test_a_row_of_a_batch_is_computed_as_alone_on_any_thread_count() -> None:
    w, _, _ = _weight(640, 576, 32, seed=7)
    x = torch.randn(i4.MAX_ROWS, 576, generator=torch.Generator().manual_seed(3))
    together = i4.matmul_int4(x, w.packed, w.scale_zero, 32)
    for i in range(x.shape[0]):
        alone = i4.matmul_int4(x[i : i + 1].clone(), w.packed, w.scale_zero, 32)
        assert torch.equal(together[i], alone[0])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = i4.matmul_int4(x, w.packed, w.scale_zero, 32)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, together)


def test_what_the_kernel_does_not_serve_is_declined(monkeypatch) -> None:
    w, _, _ = _weight(128, 64, 32, seed=5)
    x = torch.randn(2, 64)
    args = (w.packed, w.scale_zero, 32)
    assert i4.matmul_int4(x, *args) is not None
    assert i4.matmul_int4(torch.randn(i4.MAX_ROWS + 1, 64), *args) is None  # a prefill
    assert i4.matmul_int4(x.bfloat16(), *args) is None
    assert i4.matmul_int4(x[:, :32], *args) is None  # width mismatch
    narrow, _, _ = _weight(80, 64, 32, seed=6)  # rows not in blocks of 64
    assert i4.matmul_int4(x, narrow.packed, narrow.scale_zero, 32) is None
    odd, _, _ = _weight(64, 48, 16, seed=6)  # width not a multiple of 32
    assert i4.matmul_int4(torch.randn(1, 48), odd.packed, odd.scale_zero, 16) is None
    # weights held in a layout the kernel does not read: linear() keeps to torch
    import tpi.model.linear as lin

    monkeypatch.setattr(lin, "held_layout", lambda: Int4Layout(32, False))
    lin.int4_packed_for_the_kernel.cache_clear()
    try:
        assert not lin.int4_packed_for_the_kernel()
        monkeypatch.setattr(lin, "matmul_int4", lambda *a: pytest.fail("kernel called"))
        assert linear(x, w).shape == (2, 128)
    finally:
        lin.int4_packed_for_the_kernel.cache_clear()


def test_linear_takes_the_kernel_for_decode_rows_and_torch_for_prefills(monkeypatch) -> None:
    import tpi.model.linear as lin

    calls: list[int] = []

    def counted(x, packed, scale_zero, group):
        calls.append(x.shape[0])
        return i4.matmul_int4(x, packed, scale_zero, group)

    monkeypatch.setattr(lin, "matmul_int4", counted)
    w, q, sz = _weight(256, 128, 32, seed=8)
    for rows, native in ((1, True), (8, True), (40, False)):
        calls.clear()
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        y = linear(x, w)
        assert calls == [rows]  # asked every time; it declines prefills
        ref = _reference(x, q, sz)
        if native:
            _close(y, ref)
        else:  # torch's kernel: bf16 arithmetic
            assert (y.double() - ref).abs().max() < 1e-2 * ref.abs().max()
