"""A mixed-architecture cluster, emulated: an x86 master and an x86 worker with an
arm64 worker (tests/arm64_root.py: Debian arm64, Python 3.11, the registry's aarch64
torch, run under qemu-user as a Cortex-A76, a Raspberry Pi 5's core) give the same
greedy tokens as one x86 node, for fp32, int8 and int4 splits made on the master
and pushed to the ARM worker: what a split stores means the same on both CPUs,
each running its own kernels (built at first use on the ARM worker, as on a Pi)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch.nn.functional as F

from tests import arm64_root
from tests.cluster_helpers import addresses, cluster_model, local_workers
from tests.stepping import greedy, step_logits
from tpi.master.loader import open_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(arm64_root.missing() is not None, reason=str(arm64_root.missing())),
]

REPO = Path(__file__).resolve().parents[1]
PROMPT = list(range(5, 25))
STEPS = 6
CPU = "cortex-a76"  # qemu's model of the Raspberry Pi 5's core: NEON with dot products
START_TIMEOUT_S = 600  # importing torch under emulation takes ~20-60 s


@pytest.fixture(scope="module")
def root() -> Path:
    t0 = time.perf_counter()
    path = arm64_root.build()
    print(f"arm64 root ready in {time.perf_counter() - t0:.0f} s")
    return path


def _install_tpi(root: Path) -> None:
    """This checkout's tpi (master/ and worker/ as tpi.master, tpi.worker) into the root."""
    app = root / "opt" / "tpi-app"
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "tpi", app / "tpi", symlinks=False, ignore=ignore)


def _chroot(root: Path, argv: list[str], env: dict[str, str]) -> list[str]:
    """argv in the root, in a mount namespace of its own (its /proc and /dev go with it)."""
    setenv = [f"{k}={v}" for k, v in env.items()]
    script = (
        'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && '
        'exec chroot "$0" /usr/bin/env -i "$@"'
    )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        str(root),
        *setenv,
        *argv,
    ]


def _env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": "/opt/tpi-app:/" + arm64_root.SITE,
        "TPI_HOME": home,
        "TPI_SECRET": os.environ["TPI_SECRET"],
        "OMP_NUM_THREADS": "1",
        "QEMU_CPU": CPU,
    }


@contextmanager
def arm_worker(root: Path, name: str) -> Iterator[str]:
    """A worker in the arm64 root; yields its address."""
    work = root / "work" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inside = f"/work/{name}"
    env = {**os.environ, "QEMU_CPU": CPU}
    # The kernels compile at first use; here once before the cluster waits on them
    # (they stay in the root's TPI_HOME until the source changes).
    warm = "from tpi.kernels import decode_layer, f32_gemm; print(decode_layer.library() is not None, f32_gemm.LIBRARY.get() is not None)"
    t0 = time.perf_counter()
    done = subprocess.run(
        _chroot(root, ["python3", "-c", warm], _env("/work/home")),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        env=env,
    )
    assert done.stdout.split() == ["True", "True"], done.stderr[-3000:]
    print(f"ARM kernels built (or found) in {time.perf_counter() - t0:.0f} s")
    argv = [
        "python3",
        "-m",
        "tpi.worker",
        "--listen",
        "tcp://127.0.0.1:0",
        "--store",
        f"{inside}/store",
        "--port-file",
        f"{inside}/address",
        "--threads",
        "1",
    ]
    with open(work / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            _chroot(root, argv, _env("/work/home")),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        address = work / "address"
        while not (address.exists() and address.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "the ARM worker did not start: " + (work / "worker.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        yield address.read_text().strip()
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_x86_master_x86_worker_and_arm_worker_agree_with_one_x86_node(root, llama_dir, tmp_path):
    t0 = time.perf_counter()
    _install_tpi(root)
    with local_workers(1, tmp_path) as lc, arm_worker(root, "w-" + tmp_path.name) as arm:
        started = time.perf_counter()
        print(f"ARM worker up at {arm} after {started - t0:.0f} s")
        for quant in ("none", "int8", "int4"):
            one = open_model(str(llama_dir), "fp32", quiet=True, quant=quant)
            try:
                follow = greedy(one.engine, PROMPT, STEPS)
                want = step_logits(one.engine, PROMPT, follow)
            finally:
                one.close()
            q0 = time.perf_counter()
            with cluster_model(llama_dir, [*addresses(lc), arm], quant=quant) as lm:
                assert lm.cluster is not None and len(lm.cluster.links.links) == 2
                got = step_logits(lm.engine, PROMPT, follow)
            print(f"{quant}: {time.perf_counter() - q0:.0f} s on the mixed cluster")
            # Same greedy tokens: every step's argmax is the one x86 node's token.
            assert got.argmax(-1).tolist() == want.argmax(-1).tolist(), quant
            cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
            if quant == "none":  # float32 everywhere: sums in another order only
                assert (got - want).abs().max() <= 1e-4 * want.abs().max(), quant
            else:  # the ARM rank multiplies two int8 digits, x86's rounds x to bfloat16
                assert cos > 0.9995, (quant, cos)
    print(f"mixed cluster test: {time.perf_counter() - t0:.0f} s")
