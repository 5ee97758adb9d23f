"""The native float32 GEMM (tpi.kernels.f32_gemm): products against float64, a
row's result the same bits whatever rows surround it and however many threads
run, the narrower-vector build (AVX2) as right as the AVX-512 one, and the
prompt products of tpi.model.linear routed to it."""

from __future__ import annotations

import ctypes

import pytest
import torch

from tpi.kernels import build as kbuild
from tpi.kernels import f32_gemm
from tpi.kernels.small_matmul import MAX_ROWS as SMALL_ROWS
from tpi.model import linear as linear_mod
from tpi.quant.formats import FloatT

pytestmark = pytest.mark.skipif(f32_gemm.LIBRARY.get() is None, reason="no C compiler here")


def _close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Within float32 rounding of a k-long sum: relative to sum |x| |w|."""
    want = x.double() @ w.double().t()
    bound = x.double().abs() @ w.double().abs().t()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got.double() - want).abs() <= 1e-6 * bound + 1e-30).all()


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [
        (128, 576, 960),  # SmolLM2's QKV over a prompt
        (9, 576, 96),  # just above the small kernel's rows
        (65, 1100, 13),  # rows past a block, k past a pass (512), n not a tile multiple
        (17, 7, 5),  # tiny, nothing a multiple of anything
        (1, 33, 1),
        (200, 64, 300),
    ],
)
def test_products_match_float64(m: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(m * k + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    x[:, 0] *= 50  # an outlier channel
    _close(f32_gemm.gemm_f32(x, w), x, w)


def test_a_row_is_the_same_bits_alone_in_a_block_or_in_a_prompt() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(150, 576, generator=g), torch.randn(100, 576, generator=g)
    whole = f32_gemm.gemm_f32(x, w)
    for rows in (slice(70, 71), slice(64, 80), slice(5, 150), slice(0, 9)):
        assert torch.equal(f32_gemm.gemm_f32(x[rows], w), whole[rows])


def test_one_thread_and_two_give_the_same_bits() -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(70, 600, generator=g), torch.randn(250, 600, generator=g)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(f32_gemm.gemm_f32(x, w))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_declines_what_it_does_not_handle() -> None:
    x, w = torch.randn(20, 64), torch.randn(32, 64)
    assert f32_gemm.gemm_f32(x.bfloat16(), w) is None
    assert f32_gemm.gemm_f32(x, w.bfloat16()) is None
    assert f32_gemm.gemm_f32(x, torch.randn(64, 32).t()) is None  # w not held by rows
    assert f32_gemm.gemm_f32(x[:, :32], w) is None  # widths differ
    assert f32_gemm.gemm_f32(x[:0], w) is None


def test_a_strided_x_is_read_as_its_values() -> None:
    x, w = torch.randn(64, 40).t(), torch.randn(24, 64)
    _close(f32_gemm.gemm_f32(x, w), x, w)


@pytest.mark.skipif(" avx2" not in kbuild._cpu_features(), reason="this CPU has no AVX2")
def test_the_avx2_build_computes_the_same_products(tmp_path, monkeypatch) -> None:
    """Machines without AVX-512 (most laptops) build smaller tiles: that variant
    built here too, and held to float64."""
    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    flags = tuple(f for f in kbuild.FLAGS if f != "-march=native") + ("-mavx2", "-mfma")
    path = kbuild.build(f32_gemm.LIBRARY.source, flags)
    assert path is not None
    lib = ctypes.CDLL(str(path))
    f32_gemm._bind(lib)
    g = torch.Generator().manual_seed(2)
    for m, k, n in [(100, 576, 77), (33, 1030, 10), (5, 16, 3)]:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        y = torch.empty(m, n)
        assert lib.tpi_gemm_f32(x.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr()) == 0
        _close(y, x, w)


def test_prompt_products_go_to_the_gemm(monkeypatch) -> None:
    """linear() sends more than the small kernel's rows to the GEMM, for a weight
    held in per-thread row blocks and for a plain one; a decode's few rows stay
    with the small kernel."""
    calls = []
    real = f32_gemm.gemm_f32
    monkeypatch.setattr(linear_mod, "gemm_f32", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g)
    blocks = FloatT.of(w, threads=2)
    assert blocks.by_rows
    for weight in (blocks, w):
        for rows in (SMALL_ROWS, SMALL_ROWS + 1, 128):
            x = torch.randn(rows, 64, generator=g)
            _close(linear_mod.linear(x, weight), x, w)
    assert calls == [SMALL_ROWS + 1, 128] * 2
    gate, up = linear_mod.gate_and_up(torch.randn(20, 64, generator=g), blocks)
    assert gate.shape == up.shape == (20, 48) and calls[-1] == 20


def test_one_thread_holds_rows_where_the_kernels_read_them(monkeypatch) -> None:
    """With the kernels built a single thread's float weights are rows of w too
    (the kernels read them), and products at one thread go native; with the kernels
    off, torch alone gets w.T, its faster single-thread layout. Wide matrices (an
    LM head) stay columns either way."""
    from tpi.kernels import native

    w = torch.randn(96, 64)
    held = FloatT.of(w, threads=1)
    assert held.by_rows and held.blocks.shape == (1, 96, 64)
    calls = []
    real = f32_gemm.gemm_f32
    monkeypatch.setattr(linear_mod, "gemm_f32", lambda *a: calls.append(1) or real(*a))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x = torch.randn(40, 64)
        _close(linear_mod.linear(x, held), x, w)
    finally:
        torch.set_num_threads(before)
    assert calls == [1]
    assert not FloatT.of(torch.randn(16 * 64, 64), threads=1).by_rows
    native.set_enabled(False)
    try:
        assert not FloatT.of(w, threads=1).by_rows
    finally:
        native.set_enabled(True)
