"""A mixed-architecture cluster, emulated: an x86 master and an x86 worker with an
arm64 worker (tests/arm64_root.py: Debian arm64, Python 3.11, the registry's aarch64
torch, run under qemu-user as a Cortex-A76, a Raspberry Pi 5's core) give the same
greedy tokens as one x86 node, for fp32, int8 and int4 splits made on the master
and pushed to the ARM worker: what a split stores means the same on both CPUs,
each running its own kernels (built at first use on the ARM worker, as on a Pi)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
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
STEPS = 8
MARGIN = 0.5  # logits; the ARM rank moves them by ~1% of the largest (~0.2)
CPU = "cortex-a76"  # qemu's model of the Raspberry Pi 5's core: NEON with dot products
START_TIMEOUT_S = 600  # importing torch under emulation takes ~20-60 s


@pytest.fixture(scope="module")
def root() -> Path:
    t0 = time.perf_counter()
    path = arm64_root.build()
    print(f"arm64 root ready in {time.perf_counter() - t0:.0f} s")
    return path


def _install_tpi(root: Path) -> None:
    """This checkout's tpi into the root, as pip installs it (its commands are entry
    points: they need the package's metadata)."""
    app = root / "opt" / "tpi-app"
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(app),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


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
    # The worker builds its kernels before it listens (tpi.kernels.warm); here once
    # first, timed on its own (they stay in the root's TPI_HOME until the source changes).
    # ... and what a device profile will say of this node (tpi.planning.device_probe).
    warm = (
        "import json; from tpi.kernels.warm import build_all;"
        " from tpi.planning.device_probe import identity;"
        " print(build_all(lambda _m: None), json.dumps(identity()))"
    )
    t0 = time.perf_counter()
    done = subprocess.run(
        _chroot(root, ["python3", "-c", warm], _env("/work/home")),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        env=env,
    )
    ready, _, ident = done.stdout.partition(" ")
    assert ready == "True", done.stderr[-3000:]
    ident = json.loads(ident)
    # Profiles see the device as it is: the core its ID register names, its kernels.
    assert ident["cpu"] == "Cortex-A76, aarch64" and ident["kernels"] == "NEON+dotprod", ident
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()


def test_x86_master_x86_worker_and_arm_worker_agree_with_one_x86_node(root, smollm_dir, tmp_path):
    """SmolLM2, 3 ranks, on a prompt whose greedy tokens win by a clear margin at every
    step in each format (checked: agreement within a margin smaller than int4's
    noise would be luck; a random model's margins are that small). The same split on
    an all-x86 cluster is the reference for the logits: identical shards, only the
    ARM rank's kernels differ."""
    from tpi.text.tokenizer import TextTokenizer

    prompt = TextTokenizer(smollm_dir).encode_chat(
        [{"role": "user", "content": "Name the largest planet in the solar system."}]
    )
    t0 = time.perf_counter()
    _install_tpi(root)
    with local_workers(2, tmp_path) as lc, arm_worker(root, "w-" + tmp_path.name) as arm:
        print(f"ARM worker up at {arm} after {time.perf_counter() - t0:.0f} s")
        x86 = addresses(lc)
        for quant in ("none", "int8", "int4"):
            one = open_model(str(smollm_dir), "fp32", quiet=True, quant=quant)
            try:
                follow = greedy(one.engine, prompt, STEPS)
                top = step_logits(one.engine, prompt, follow).topk(2, dim=-1).values
            finally:
                one.close()
            assert (top[:STEPS, 0] - top[:STEPS, 1]).min() > MARGIN, quant
            with cluster_model(smollm_dir, x86, quant=quant) as lm:
                want = step_logits(lm.engine, prompt, follow)
            q0 = time.perf_counter()
            with cluster_model(smollm_dir, [x86[0], arm], quant=quant) as lm:
                assert lm.cluster is not None and len(lm.cluster.links.links) == 2
                got = step_logits(lm.engine, prompt, follow)
            print(f"{quant}: {time.perf_counter() - q0:.0f} s on the mixed cluster")
            # The same greedy tokens as one x86 node: each step's argmax is its token.
            assert got.argmax(-1).tolist()[:STEPS] == follow, quant
            err = ((got - want).abs().max() / want.abs().max()).item()
            cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
            print(f"{quant}: logits against the x86 cluster: max error {err:.2e}, cosine {cos:.6f}")
            if quant == "none":  # float32 everywhere: sums in another order only
                assert err <= 1e-4, quant
            else:  # the ARM rank multiplies two int8 digits, x86's rounds x to bfloat16
                assert cos > 0.9995, (quant, cos)
    print(f"mixed cluster test: {time.perf_counter() - t0:.0f} s")
