"""Compiles a kernel's C source once per machine into $TPI_HOME/kernels.

The library is built for the CPU it runs on (-march=native: AVX2 or AVX-512 where
there is one), so it is never shipped prebuilt; a wheel would have to pick one
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
import hashlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

from tpi.paths import tpi_home

log = logging.getLogger("tpi.kernels")

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120


def enabled() -> bool:
    return os.environ.get("TPI_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_features() -> str:
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


def library_path(source: Path, cc: str, flags: tuple[str, ...] = FLAGS) -> Path:
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


def build(source: Path, flags: tuple[str, ...] = FLAGS) -> Path | None:
    """The compiled library of `source` (built now if needed), or None with the
    reason logged once: no compiler, or the compiler failed. (Other `flags`: the
    tests build the AVX2 variant a laptop would get.)"""
    cc = compiler()
    if cc is None:
        log.info("no C compiler found: torch's kernels are used for small matmuls")
        return None
    out = library_path(source, cc, flags)
    if out.exists():
        return out
    # Unique across processes and hosts sharing $TPI_HOME (pids repeat in containers).
    tmp = out.with_name(f".{out.name}.partial-{socket.gethostname()}-{secrets.token_hex(4)}")
    cmd = [cc, *flags, str(source), "-o", str(tmp)]
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
