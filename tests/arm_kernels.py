"""The kernels built for AArch64 with a cross compiler and run under qemu-user, for
tests on a machine that is not one (tests/test_kernels_aarch64.py).

Three builds, the ones tpi.kernels.build picks for three kinds of CPU, each run
on an emulated CPU of that kind: plain NEON (a Cortex-A72, the Raspberry Pi 4),
dot products (a Cortex-A76, the Pi 5) and dot products with the int8 matrix and
bfloat16 extensions (qemu's "max", as a Neoverse V1/N2 or an Apple core). A
request goes to tests/kernel_driver.c as the buffers and arguments of one call;
the reply is the buffers after it.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.kernels import build as kbuild

CROSS_CC = "aarch64-linux-gnu-gcc"
SYSROOT = Path("/usr/aarch64-linux-gnu")
KERNELS = Path(kbuild.__file__).parent
DRIVER = Path(__file__).with_name("kernel_driver.c")
# decode_layer.c includes small_matmul.c, int4_matmul.c and decode_ops.c: one
# library holds every decode kernel; f32_gemm.c is the other.
LIBRARIES = ("decode_layer.c", "f32_gemm.c")
TIMEOUT_S = 600


@dataclass(frozen=True)
class Variant:
    name: str
    march: str
    cpu: str  # qemu's model of a CPU that has these extensions (and no more)


VARIANTS = (
    Variant("neon", kbuild.aarch64_march(0, 0), "cortex-a72"),
    Variant("dotprod", kbuild.aarch64_march(kbuild.HWCAP_ASIMDDP, 0), "cortex-a76"),
    Variant(
        "i8mm",
        kbuild.aarch64_march(kbuild.HWCAP_ASIMDDP, kbuild.HWCAP2_I8MM | kbuild.HWCAP2_BF16),
        "max",
    ),
)


def qemu() -> str | None:
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


def missing() -> str | None:
    """Why the AArch64 builds cannot run here (None: they can)."""
    if not shutil.which(CROSS_CC):
        return f"no {CROSS_CC} (apt-get install gcc-aarch64-linux-gnu)"
    if not qemu():
        return "no qemu-aarch64 (apt-get install qemu-user-static)"
    if not (SYSROOT / "lib" / "libgomp.so.1").exists():
        return f"no AArch64 libgomp under {SYSROOT}"
    return None


@dataclass
class Mat:
    """A decode_layer.c Mat argument over tensors (a pointer to the struct)."""

    kind: int
    w: torch.Tensor
    scale: torch.Tensor | None
    bias: torch.Tensor | None
    n: int
    k: int
    group: int = 0


class Call:
    """One kernel call: its arguments (tensors are sent as buffers and come back)."""

    def __init__(self, fn: str, *args, lib: int = 0, threads: int = 1) -> None:
        self.fn, self.lib, self.threads = fn, lib, threads
        self.buffers: list[torch.Tensor] = []
        self.lines: list[str] = []
        for a in args:
            if isinstance(a, torch.Tensor):
                self.lines.append(f"b {self._buffer(a)}")
            elif isinstance(a, Mat):
                ids = [self._buffer(t) if t is not None else -1 for t in (a.w, a.scale, a.bias)]
                self.lines.append(f"m {a.kind} {' '.join(map(str, ids))} {a.n} {a.k} {a.group}")
            elif isinstance(a, float):
                self.lines.append(f"f {a!r}")
            else:
                self.lines.append(f"i {int(a)}")

    def _buffer(self, t: torch.Tensor) -> int:
        self.buffers.append(t.contiguous())
        return len(self.buffers) - 1

    def request(self) -> bytes:
        head = f"call {self.fn} {self.lib} {self.threads} {len(self.buffers)} {len(self.lines)}\n"
        out = [head.encode()]
        for t in self.buffers:
            data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            out += [f"{len(data)}\n".encode(), data]
        out += [(line + "\n").encode() for line in self.lines]
        return b"".join(out)


@dataclass
class Reply:
    rc: int
    buffers: list[torch.Tensor]  # as sent, after the call


class ArmBuild:
    """One variant's libraries and the driver, built once into `where`."""

    def __init__(self, variant: Variant, where: Path) -> None:
        self.variant = variant
        flags = tuple(variant.march if f == "-march=native" else f for f in kbuild.FLAGS)
        self.libs = []
        for name in LIBRARIES:
            path = kbuild.build(KERNELS / name, flags, cc=CROSS_CC)
            if path is None:
                raise RuntimeError(f"cross-compiling {name} for {variant.march} failed")
            self.libs.append(path)
        self.driver = where / "kernel_driver-aarch64"
        if not self.driver.exists():
            subprocess.run(
                [CROSS_CC, "-O2", str(DRIVER), "-o", str(self.driver), "-ldl"],
                check=True,
                capture_output=True,
                timeout=TIMEOUT_S,
            )

    def run(self, calls: list[Call]) -> list[Reply]:
        """Every call in one emulated process, in order."""
        env = {**os.environ, "QEMU_CPU": self.variant.cpu, "QEMU_LD_PREFIX": str(SYSROOT)}
        done = subprocess.run(
            [qemu(), str(self.driver), *map(str, self.libs)],
            input=b"".join(c.request() for c in calls),
            capture_output=True,
            timeout=TIMEOUT_S,
            env=env,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{self.variant.name} kernels under qemu failed ({done.returncode}): "
                + done.stderr.decode(errors="replace")[-2000:]
            )
        out, pos, replies = done.stdout, 0, []
        for c in calls:
            (rc,) = struct.unpack_from("<q", out, pos)
            pos += 8
            bufs = []
            for t in c.buffers:
                n = t.numel() * t.element_size()
                raw = torch.frombuffer(bytearray(out[pos : pos + n]), dtype=torch.uint8)
                bufs.append(raw.view(t.dtype).view(t.shape) if n else t.clone())
                pos += n
            replies.append(Reply(rc, bufs))
        if pos != len(out):
            raise RuntimeError("the driver's replies do not match its requests")
        return replies

    def one(self, fn: str, *args, threads: int = 1, lib: int = 0) -> Reply:
        return self.run([Call(fn, *args, lib=lib, threads=threads)])[0]
