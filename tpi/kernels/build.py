"""Compiles a kernel's C source once per machine into $TPI_HOME/kernels.

The library is built for the CPU it runs on (on x86 -march=native: AVX2 or AVX-512
where there is one; on AArch64 the extensions the kernel reports, see
`aarch64_march`), so it is never shipped prebuilt; a wheel would have to pick one
instruction set for every machine. Compiling takes under a second with gcc
(0.6-0.8 s measured, benchmarks/results/small_matmul.json).
The file name carries a hash of the source, the compiler's version, the flags and
the CPU's feature list, so a new tpi, compiler or CPU (a copied $TPI_HOME) builds
anew. The result is written under a temporary name and renamed into place: two
processes building at once each finish a whole file, and the last rename wins.

Without a C compiler (or with TPI_KERNELS=0) there is no library, and callers use
torch's kernels: same results up to float rounding, slower for several rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

from tpi.paths import tpi_home

log = logging.getLogger("tpi.kernels")

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120

# AArch64 extensions the kernels use, as the kernel reports them to a process
# (getauxval; the bits of Linux's asm/hwcap.h). gcc's -march=native reads
# /proc/cpuinfo instead, which names no features under emulation (qemu shows the
# host's) and whose names differ between kernels; the bits do not.
HWCAP_ASIMDDP = 1 << 20  # SDOT/UDOT
HWCAP2_I8MM = 1 << 13  # SMMLA
HWCAP2_BF16 = 1 << 14
_AT_HWCAP, _AT_HWCAP2 = 16, 26


def aarch64_march(hwcap: int, hwcap2: int) -> str:
    """The -march for an AArch64 CPU with these hwcaps: plain NEON (armv8-a), else
    armv8.2-a with the dot product, int8 matrix and bfloat16 extensions it has."""
    ext = "".join(
        name
        for have, name in (
            (hwcap & HWCAP_ASIMDDP, "+dotprod"),
            (hwcap2 & HWCAP2_I8MM, "+i8mm"),
            (hwcap2 & HWCAP2_BF16, "+bf16"),
        )
        if have
    )
    return f"-march=armv8.2-a{ext}" if ext else "-march=armv8-a"


def _hwcaps() -> tuple[int, int]:
    try:
        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        return int(getauxval(_AT_HWCAP)), int(getauxval(_AT_HWCAP2))
    except (OSError, AttributeError):  # not glibc: plain NEON is always there
        return 0, 0


def machine_flags() -> tuple[str, ...]:
    """The compiler flags for this machine's CPU."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return tuple(aarch64_march(*_hwcaps()) if f == "-march=native" else f for f in FLAGS)
    return FLAGS


def enabled() -> bool:
    return os.environ.get("TPI_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def kernels_summary() -> str:
    """Which native kernels this process runs, in a few words (device profiles carry
    it: slices timed with one build say nothing about another)."""
    from tpi.kernels import native

    if not enabled() or native.disabled():
        return "torch (native kernels off)"
    if compiler() is None:
        return "torch (no C compiler)"
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "NEON" + aarch64_march(*_hwcaps()).removeprefix("-march=armv8.2-a").removeprefix(
            "-march=armv8-a"
        )
    flags = f" {_cpu_features()} "
    for name, want in (
        ("AVX-512+BF16", " avx512_bf16 "),
        ("AVX-512", " avx512f "),
        ("AVX2", " avx2 "),
    ):
        if want in flags:
            return name
    return f"{platform.machine()} (generic vectors)"


def _cpu_features() -> str:
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "hwcaps {:x} {:x}".format(*_hwcaps())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, timeout=30)
        first = out.stdout.decode(errors="replace").splitlines()
        return first[0] if first else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):  # not there, or its directory never was
        path.unlink()


def library_path(source: Path, cc: str, flags: tuple[str, ...]) -> Path:
    # The headers and sources beside the source are part of it (it may include them:
    # decode_layer.c includes the other kernels).
    beside = sorted(p for p in source.parent.glob("*.[ch]") if p != source)
    headers = [h.read_bytes() for h in beside]
    key = hashlib.sha256(
        b"\0".join(
            s.encode() if isinstance(s, str) else s
            for s in (source.read_bytes(), *headers, _version(cc), " ".join(flags), _cpu_features())
        )
    ).hexdigest()[:16]
    return tpi_home() / "kernels" / f"{source.stem}-{key}.so"


def build(source: Path, flags: tuple[str, ...] | None = None, cc: str | None = None) -> Path | None:
    """The compiled library of `source` (built now if needed), or None with the
    reason logged once: no compiler, or the compiler failed. (Other `flags` and
    `cc`: the tests build the AVX2 variant a laptop would get, and AArch64 ones
    with a cross compiler.)"""
    flags = machine_flags() if flags is None else flags
    cc = cc or compiler()
    if cc is None:
        log.info("no C compiler found: torch's kernels are used for small matmuls")
        return None
    out = library_path(source, cc, flags)
    if out.exists():
        return out
    # Unique across processes and hosts sharing $TPI_HOME (pids repeat in containers).
    tmp = out.with_name(f".{out.name}.partial-{socket.gethostname()}-{secrets.token_hex(4)}")
    # libm named: a process without it loaded (a test driver) can load the library too.
    cmd = [cc, *flags, str(source), "-o", str(tmp), "-lm"]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(cmd, capture_output=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not compile %s (%s): torch's kernels are used", source.name, e)
        _discard(tmp)
        return None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()[-3:]
        log.warning(
            "compiling %s failed (%s): torch's kernels are used\n%s",
            source.name,
            " ".join(cmd),
            "\n".join(tail),
        )
        _discard(tmp)
        return None
    try:
        os.replace(tmp, out)
    except OSError as e:
        log.warning("could not keep %s (%s): torch's kernels are used", out, e)
        _discard(tmp)
        return None
    return out
