"""An arm64 Debian root with Python 3.11, torch (the registry's manylinux_2_28_aarch64
wheel) and tpi's dependencies, run under qemu-user as an ARM worker
(tests/test_arm_worker.py; `python -m tests.arm64_root` builds it ahead).

Made once into $TPI_ARM64_ROOT (default /var/cache/tpi/arm64-root), kept while its
recipe (RECIPE below) is the same: debootstrap's first stage here, its second under
qemu (~6 min on 2 cores), then the wheels installed from this machine's pip for the
aarch64 platform (no emulated pip). tpi itself is copied in fresh for each run.

The registry's aarch64 torch 2.13.0 is its CUDA build: its libraries name the CUDA
runtime libraries, which must be there to load even where no GPU is. The registry
serves them for aarch64 except the profiler's libcupti, so that one is a library of
the same name whose functions (only ever called to trace a GPU) return an error.
qemu-user shows the host's /sys, where oneDNN's AArch64 CPU probe crashes: the root
has a /sys of its own with the CPU list and a Cortex-A76's ID register instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the arm64 root needs 3.11's tomllib
    tomllib = None

ROOT = Path(os.environ.get("TPI_ARM64_ROOT", "/var/cache/tpi/arm64-root"))
MIRROR = os.environ.get("TPI_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"  # its python3 is 3.11
PACKAGES = "python3,gcc,libc6-dev"  # gcc: the kernels compile at first use, as on a Pi
SITE = "opt/site"  # torch and the dependencies, on the root's PYTHONPATH
PLATFORMS = (
    "manylinux_2_28_aarch64",
    "manylinux_2_27_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux2014_aarch64",
)
TORCH = "torch==2.13.0"
# The CUDA runtime libraries torch's aarch64 build is linked against (by soname), in
# versions the registry serves for aarch64.
CUDA = (
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cublas==13.0.2.14",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-nvjitlink==13.0.88",
    "nvidia-cufft==12.0.0.61",
    "nvidia-cufile==1.15.1.6",
    "nvidia-curand==10.4.0.35",
    "nvidia-cusparse==12.6.3.3",
    "nvidia-cudnn-cu13==9.28.1.4",
    "nvidia-cusparselt-cu13==0.8.1",
    "nvidia-nccl-cu13==2.32.3",
    "nvidia-nvshmem-cu13==3.4.5",
)
# torch's own dependencies; tpi's are read from pyproject.toml (without torch itself).
TORCH_DEPS = (
    "filelock",
    "typing-extensions>=4.10",
    "sympy>=1.13.3",
    "networkx>=2.5.1",
    "jinja2>=3.1",
    "fsspec>=0.8.5",
)
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def tpi_dependencies() -> tuple[str, ...]:
    if tomllib is None:
        return ()
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return tuple(d for d in deps if not d.replace(" ", "").startswith("torch"))


PYTHON_DEPS = (*TORCH_DEPS, *tpi_dependencies())
RECIPE = "\n".join((SUITE, PACKAGES, TORCH, *CUDA, *PYTHON_DEPS, "sys-a76", "v1"))
MARK = ".tpi-root"
BUILD_TIMEOUT_S = 40 * 60


def missing() -> str | None:
    """Why an arm64 root cannot be made or run here (None: it can)."""
    if os.geteuid() != 0:
        return "an arm64 root needs root (debootstrap, chroot)"
    if tomllib is None:
        return "making an arm64 root reads pyproject.toml with Python 3.11's tomllib"
    for tool in ("debootstrap", "chroot", "unshare"):
        if not shutil.which(tool):
            return f"no {tool} (apt-get install debootstrap util-linux)"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return (
            "qemu-user's binfmt handler for aarch64 is not registered "
            "(apt-get install qemu-user-static binfmt-support; mount binfmt_misc)"
        )
    return None


def _key() -> str:
    return hashlib.sha256(RECIPE.encode()).hexdigest()[:16]


def ready(root: Path = ROOT) -> bool:
    mark = root / MARK
    return mark.is_file() and mark.read_text().strip() == _key()


def _run(cmd: list[str], log: Path, **kw) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        done = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S, **kw
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): " + " | ".join(tail))


def _pip(target: Path, *args: str, log: Path) -> None:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--target",
            str(target),
            *platforms,
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            "--only-binary=:all:",
            *args,
        ],
        log,
    )


def _cupti(site: Path, log: Path) -> None:
    """libcupti.so.13: the functions torch's libraries name, each returning an error."""
    names = set()
    for lib in (site / "torch" / "lib").glob("*.so*"):
        out = subprocess.run(
            ["readelf", "--dyn-syms", "-W", str(lib)], capture_output=True, text=True
        )
        names |= {w.split("@")[0] for w in out.stdout.split() if w.endswith("@libcupti.so.13")}
    src = log.with_name("cupti.c")
    src.write_text(
        "".join(
            f"int {n}(void) {{ return 999; /* CUPTI_ERROR_UNKNOWN */ }}\n" for n in sorted(names)
        )
    )
    script = log.with_name("cupti.map")
    script.write_text("libcupti.so.13 { global: *; };\n")
    out = site / "nvidia" / "cu13" / "lib" / "libcupti.so.13"
    _run(
        [
            "aarch64-linux-gnu-gcc",
            "-shared",
            "-fPIC",
            "-O1",
            f"-Wl,--version-script={script}",
            "-Wl,-soname,libcupti.so.13",
            str(src),
            "-o",
            str(out),
        ],
        log,
    )


def _sys(root: Path, cpus: int) -> None:
    """The /sys the root's processes see (never the host's, see the docstring)."""
    cpu = root / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpu / name).write_text(f"0-{cpus - 1}\n")
    for i in range(cpus):
        ident = cpu / f"cpu{i}" / "regs" / "identification"
        ident.mkdir(parents=True, exist_ok=True)
        (ident / "midr_el1").write_text("0x00000000414fd0b1\n")  # Arm Cortex-A76 r4p1


def build(root: Path = ROOT, echo=print) -> Path:
    """The root, made now if it is not there (or was made by another recipe)."""
    if ready(root):
        return root
    if (why := missing()) is not None:
        raise RuntimeError(why)
    part = root.with_name(root.name + ".partial")
    log = root.with_name(root.name + ".log")
    stage = part / ".tpi-stage"  # a Debian base made by an earlier, unfinished build
    if (root / stage.name).is_file() and not part.exists():
        root.rename(part)  # another recipe on the same Debian base: redo what follows it
    if not (stage.is_file() and stage.read_text().strip() == f"{SUITE} {PACKAGES}"):
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        log.unlink(missing_ok=True)
        echo(f"making an arm64 root in {root} (log: {log})")
        _run(
            [
                "debootstrap",
                "--arch=arm64",
                "--variant=minbase",
                "--foreign",
                f"--include={PACKAGES}",
                SUITE,
                str(part),
                MIRROR,
            ],
            log,
        )
        echo("debootstrap's second stage, under qemu")
        _run(["chroot", str(part), "/debootstrap/debootstrap", "--second-stage"], log)
        stage.write_text(f"{SUITE} {PACKAGES}\n")
    site = part / SITE
    shutil.rmtree(site, ignore_errors=True)
    echo("torch, the CUDA runtime it names, and tpi's dependencies, for aarch64")
    _pip(site, "--no-deps", TORCH, *CUDA, log=log)
    _pip(site, "--upgrade", *PYTHON_DEPS, log=log)
    _cupti(site, log)
    _sys(part, os.cpu_count() or 1)
    for d in ("work", "opt/tpi-app"):
        (part / d).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(part / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (part / MARK).write_text(_key() + "\n")
    shutil.rmtree(root, ignore_errors=True)
    part.rename(root)
    return root


if __name__ == "__main__":
    build()
