"""Every native kernel library built and loaded at once, for a process that must not
compile later: a worker builds them before it listens, because on a slow board
(a Raspberry Pi compiles decode_layer.c for seconds) a compile inside a session's
first step looks hung to its watchdog (the compiler's CPU time is not the
worker's own)."""

from __future__ import annotations

import time
from collections.abc import Callable

from tpi.kernels.build import kernels_summary


def build_all(echo: Callable[[str], None]) -> bool:
    """Build (or find) and load every kernel library; True if all are there."""
    from tpi.kernels import decode_layer, decode_ops, f32_gemm, int4_matmul, small_matmul

    t0 = time.perf_counter()
    libraries = (small_matmul, decode_ops, int4_matmul, f32_gemm, decode_layer)
    ready = [m.LIBRARY.get() is not None for m in libraries]
    echo(
        f"native kernels: {kernels_summary()} ({sum(ready)}/{len(ready)} libraries, "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    return all(ready)
