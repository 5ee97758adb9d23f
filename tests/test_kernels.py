"""The native small-matmul kernels (tpi.kernels): products against float64 torch,
rows of a batch computed exactly as alone, any thread count giving the same bits,
and every way of not having them (disabled, no compiler, unsupported shapes)
falling back to torch."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpi.kernels import build as kbuild
from tpi.kernels import native
from tpi.kernels import small_matmul as sm
from tpi.kernels.digits import as_digits
from tpi.model.linear import gate_and_up, linear
from tpi.quant.formats import FloatT, Int8Weight

pytestmark = pytest.mark.skipif(sm.library() is None, reason="no C compiler here")

SHAPES = [(1, 16), (3, 16), (5, 48), (33, 576), (577, 576), (130, 1536), (4099, 64)]


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    err = (got.double() - ref).abs().max().item()
    assert err <= 2e-6 * ref.abs().max().item() + 1e-6, err


@pytest.mark.parametrize("n,k", SHAPES)
def test_float_rows_match_float64(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=g)
    for m in range(1, sm.MAX_ROWS + 1):
        x = torch.randn(m, k, generator=g)
        _close(sm.matmul_f32(x, w), x.double() @ w.double().T)


@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_rows_match_float64(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 11 + k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, generator=g) + 0.01).to(torch.bfloat16)
    ref_w = q.double() * scale.double()[:, None]
    # Where the CPU has bfloat16 dot products the kernel rounds x to bfloat16 (as
    # torch's int8 kernel does); AArch64 with dot products takes two int8 digits;
    # elsewhere it multiplies x as it is.
    taken = sm.int8_activations(k)
    assert (taken == sm.AS_BF16) == sm.int8_rounds_to_bf16(k)
    for m in (*range(1, sm.MAX_ROWS + 1), 13, 95):  # int8: any row count
        x = torch.randn(m, k, generator=g)
        x[:, 0] *= 40  # an outlier channel
        xr = {
            sm.AS_FLOAT32: x.double(),
            sm.AS_BF16: x.bfloat16().double(),
            sm.AS_DIGITS: as_digits(x, k) if taken == sm.AS_DIGITS else None,
        }[taken]
        _close(sm.matmul_int8(x, q, scale), xr @ ref_w.T)


@pytest.mark.parametrize("s,k,nb", [(1, 16, 16), (2, 576, 1024), (3, 64, 528)])
def test_float_column_blocks_match_float64(s: int, k: int, nb: int) -> None:
    g = torch.Generator().manual_seed(s + k + nb)
    w = torch.randn(s * nb, k, generator=g)
    blocks = w.t().reshape(k, s, nb).permute(1, 0, 2).contiguous()  # FloatT's column blocks
    for m in range(1, sm.MAX_ROWS + 1):
        x = torch.randn(m, k, generator=g)
        _close(sm.matmul_f32_cols(x, blocks), x.double() @ w.double().T)


def test_a_row_of_a_batch_is_computed_as_alone() -> None:
    """What makes a batched decode give each sequence its solo tokens: a row's
    result does not depend on the other rows, bit for bit."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1000, 576, generator=g)
    q = torch.randint(-127, 128, (1000, 576), dtype=torch.int8, generator=g)
    scale = torch.rand(1000, generator=g).to(torch.bfloat16)
    blocks = w.t().reshape(576, 2, 500).permute(1, 0, 2).contiguous()[:, :, :496].contiguous()
    x = torch.randn(7, 576, generator=g)
    for i in range(7):
        row = x[i : i + 1].clone()
        assert torch.equal(sm.matmul_f32(x, w)[i], sm.matmul_f32(row, w)[0])
        assert torch.equal(sm.matmul_int8(x, q, scale)[i], sm.matmul_int8(row, q, scale)[0])
        assert torch.equal(sm.matmul_f32_cols(x, blocks)[i], sm.matmul_f32_cols(row, blocks)[0])
    # From 8 rows int8 weights are converted once per block into a buffer (a
    # prefill): still the very numbers of a row alone.
    many = torch.randn(45, 576, generator=g)
    together = sm.matmul_int8(many, q, scale)
    for i in (0, 8, 44):
        assert torch.equal(together[i], sm.matmul_int8(many[i : i + 1].clone(), q, scale)[0])


def test_thread_count_does_not_change_a_bit() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3000, 576, generator=g)
    q = torch.randint(-127, 128, (3002, 576), dtype=torch.int8, generator=g)
    scale = torch.rand(3002, generator=g).to(torch.bfloat16)
    x = torch.randn(12, 576, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            results.append(
                (
                    sm.matmul_f32(x[:4], w),
                    sm.matmul_int8(x[:4], q, scale),
                    sm.matmul_int8(x, q, scale),
                )
            )
    finally:
        torch.set_num_threads(before)
    for one, many in zip(*results, strict=True):
        assert torch.equal(one, many)


def test_linear_takes_the_kernels_and_agrees_with_torch() -> None:
    g = torch.Generator().manual_seed(9)
    w = torch.randn(1536, 576, generator=g)
    held = FloatT.of(w, 2)  # row blocks, as a resident layer holds them
    q = Int8Weight(
        torch.randint(-127, 128, (1536, 576), dtype=torch.int8, generator=g),
        torch.rand(1536, generator=g).to(torch.bfloat16),
    )
    x = torch.randn(3, 576, generator=g)
    assert torch.equal(linear(x, held), sm.matmul_f32(x, w))
    assert torch.equal(linear(x, q), sm.matmul_int8(x, q.q, q.scale))
    gate, up = gate_and_up(x, held)
    assert torch.equal(torch.cat([gate, up], dim=-1), sm.matmul_f32(x, w))
    bias = torch.randn(1536, generator=g)
    gate, up = gate_and_up(x, held, bias)
    _close(torch.cat([gate, up], dim=-1), x.double() @ w.double().T + bias.double())
    gate, up = gate_and_up(x, q)
    assert torch.equal(torch.cat([gate, up], dim=-1), sm.matmul_int8(x, q.q, q.scale))
    # An LM head held in column blocks: the kernel from 2 rows, torch's product for one.
    head = torch.randn(9728, 576, generator=g)  # wide: N >= 16 K
    cols = FloatT.of(head, 2)
    assert not cols.by_rows
    assert torch.equal(linear(x, cols), sm.matmul_f32_cols(x, cols.blocks))
    _close(linear(x[:1], cols), x[:1].double() @ head.double().T)
    native.set_enabled(False)
    try:
        torch_f = linear(x, held)
        torch_q = linear(x, q)
        torch_gate, torch_up = gate_and_up(x, held)
    finally:
        native.set_enabled(True)
    _close(torch_f, x.double() @ w.double().T)
    _close(torch.cat([torch_gate, torch_up], dim=-1), x.double() @ w.double().T)
    # torch's int8 kernel rounds the activations to bfloat16: close, not equal.
    ref = x.double() @ q.dequantize(torch.float64).T
    assert (torch_q.double() - ref).abs().max() < 1e-2 * ref.abs().max()


def test_what_the_kernels_do_not_serve_returns_none() -> None:
    w = torch.randn(64, 40)
    assert sm.matmul_f32(torch.randn(1, 40), w) is None  # K not a multiple of 16
    w = torch.randn(64, 48)
    assert sm.matmul_f32(torch.randn(sm.MAX_ROWS + 1, 48), w) is None  # a prefill
    assert sm.matmul_f32(torch.randn(1, 48, dtype=torch.bfloat16), w) is None
    assert sm.matmul_f32(torch.randn(1, 48), w.t().contiguous().t()) is None  # not row-major
    q = torch.zeros(64, 48, dtype=torch.int8)
    assert sm.matmul_int8(torch.randn(1, 48), q, torch.ones(64)) is None  # fp32 scales
    short = torch.ones(63, dtype=torch.bfloat16)
    assert sm.matmul_int8(torch.randn(1, 48), q, short) is None  # a scale per row, or nothing
    native.set_enabled(False)
    try:
        assert sm.library() is None
        assert sm.matmul_f32(torch.randn(1, 48), w) is None
    finally:
        native.set_enabled(True)


def test_no_compiler_or_a_failing_one_means_torch(monkeypatch, tmp_path, caplog) -> None:
    source = tmp_path / "k.c"
    source.write_text("int f(void) { return 1; }\n")
    monkeypatch.setenv("TPI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(kbuild, "compiler", lambda: None)
    assert kbuild.build(source) is None
    # A compiler that writes part of its output, then fails (a full disk, say).
    broken = tmp_path / "broken-cc"
    broken.write_text(
        '#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho partial > "$2"\nexit 1\n'
    )
    broken.chmod(0o755)
    monkeypatch.setattr(kbuild, "compiler", lambda: str(broken))
    with caplog.at_level(logging.WARNING, logger="tpi.kernels"):
        assert kbuild.build(source) is None
    assert "torch's kernels are used" in caplog.text
    assert (tmp_path / "home" / "kernels").is_dir()
    assert not any((tmp_path / "home").rglob("*.so*"))  # no partial file left behind


def test_a_library_that_cannot_be_had_never_fails_a_matmul(monkeypatch, caplog) -> None:
    def unreadable() -> None:
        raise PermissionError("$TPI_HOME/kernels: permission denied")

    monkeypatch.setattr(sm.LIBRARY, "_load", unreadable)
    sm.LIBRARY.forget()
    try:
        with caplog.at_level(logging.WARNING, logger="tpi.kernels"):
            assert sm.library() is None
        assert "permission denied" in caplog.text
        x, w = torch.randn(2, 48), torch.randn(64, 48)
        _close(linear(x, w), x.double() @ w.double().T)  # torch's path
    finally:
        monkeypatch.undo()
        sm.LIBRARY.forget()


def test_an_unwritable_tpi_home_means_torch_not_a_crash(monkeypatch, tmp_path, caplog) -> None:
    source = tmp_path / "k.c"
    source.write_text("int f(void) { return 1; }\n")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("TPI_HOME", str(blocker))  # kernels/ cannot be made under a file
    with caplog.at_level(logging.WARNING, logger="tpi.kernels"):
        assert kbuild.build(source) is None
    assert "torch's kernels are used" in caplog.text


def test_built_once_per_source_and_kept_in_tpi_home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    source = tmp_path / "k.c"
    source.write_text("int f(void) { return 1; }\n")
    first = kbuild.build(source)
    assert first is not None and first.parent == tmp_path / "kernels"
    stamp = first.stat().st_mtime_ns
    assert kbuild.build(source) == first and first.stat().st_mtime_ns == stamp
    source.write_text("int f(void) { return 2; }\n")
    second = kbuild.build(source)
    assert second is not None and second != first
    # A header it includes is part of the source: a change to it builds anew.
    (tmp_path / "v.h").write_text("#define TWO 2\n")
    source.write_text('#include "v.h"\nint f(void) { return TWO; }\n')
    third = kbuild.build(source)
    (tmp_path / "v.h").write_text("#define TWO 3\n")
    fourth = kbuild.build(source)
    assert third is not None and fourth is not None and fourth != third


def test_tpi_kernels_0_turns_them_off() -> None:
    code = "from tpi.kernels import small_matmul as sm; print(sm.library() is None)"
    env = {**os.environ, "TPI_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


@pytest.mark.skipif(" avx2" not in kbuild._cpu_features(), reason="this CPU has no AVX2")
def test_the_avx2_build_a_laptop_gets_matches_float64(tmp_path, monkeypatch) -> None:
    """This CPU has AVX-512 (and bfloat16 dot products); most laptops have AVX2
    only: build that variant too and hold its three products to float64."""
    import ctypes

    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    flags = tuple(f for f in kbuild.FLAGS if f != "-march=native") + ("-mavx2", "-mfma")
    path = kbuild.build(Path(sm.__file__).with_name("small_matmul.c"), flags)
    assert path is not None
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.tpi_matmul_f32.argtypes = [p, i, i, p, i, p]
    lib.tpi_matmul_i8.argtypes = [p, i, i, p, p, i, p]
    lib.tpi_matmul_f32_cols.argtypes = [p, i, i, p, i, i, p]
    lib.tpi_int8_rounds_to_bf16.argtypes = [i]
    assert lib.tpi_int8_rounds_to_bf16(576) == 0  # no bfloat16 dot products in AVX2
    g = torch.Generator().manual_seed(21)
    n, k, m = 1001, 576, 5
    w = torch.randn(n, k, generator=g)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g)
    y = torch.empty(m, n)
    lib.tpi_matmul_f32(x.data_ptr(), m, k, w.data_ptr(), n, y.data_ptr())
    _close(y, x.double() @ w.double().T)
    assert (
        lib.tpi_matmul_i8(x.data_ptr(), m, k, q.data_ptr(), scale.data_ptr(), n, y.data_ptr()) == 0
    )
    _close(y, x.double() @ (q.double() * scale.double()[:, None]).T)
    blocks = w[:992].t().reshape(k, 2, 496).permute(1, 0, 2).contiguous()
    yc = torch.empty(m, 992)
    lib.tpi_matmul_f32_cols(x.data_ptr(), m, k, blocks.data_ptr(), 2, 496, yc.data_ptr())
    _close(yc, x.double() @ w[:992].double().T)


def test_int8_takes_the_kernel_at_every_row_count(monkeypatch) -> None:
    """Decode rows, batches and prefills alike (the kernel is the faster one at
    every count measured), so a row's numbers never depend on how many ran with it."""
    import tpi.model.linear as lin

    calls: list[int] = []

    def counted(x, q, scale):
        calls.append(x.shape[0])
        return sm.matmul_int8(x, q, scale)

    monkeypatch.setattr(lin, "matmul_int8", counted)
    g = torch.Generator().manual_seed(13)
    w = Int8Weight(
        torch.randint(-127, 128, (256, 64), dtype=torch.int8, generator=g),
        torch.rand(256, generator=g).to(torch.bfloat16),
    )
    x = torch.randn(700, 64, generator=g)
    alone = linear(x[:1], w)
    for rows in (1, 7, 8, 95, 128, 700):
        calls.clear()
        y = linear(x[:rows], w)
        assert calls == [rows]
        assert torch.equal(y[0], alone[0]), rows


def test_a_worker_builds_every_kernel_library_before_it_listens(monkeypatch, tmp_path) -> None:
    """tpi.kernels.warm: all five libraries built and loaded at once (a worker does
    this before listening, so no compile falls inside a session's step)."""
    from tpi.kernels import decode_layer, decode_ops, f32_gemm, int4_matmul
    from tpi.kernels.warm import build_all

    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    libraries = (sm, decode_ops, int4_matmul, f32_gemm, decode_layer)
    for m in libraries:
        m.LIBRARY.forget()
    said: list[str] = []
    try:
        assert build_all(said.append)
        built = sorted(p.name.split("-")[0] for p in (tmp_path / "kernels").glob("*.so"))
        assert built == sorted(
            ["decode_layer", "decode_ops", "f32_gemm", "int4_matmul", "small_matmul"]
        )
        assert said and kbuild.kernels_summary() in said[0] and "5/5" in said[0]
    finally:
        for m in libraries:
            m.LIBRARY.forget()
