"""`tpi cluster` and `tpi worker` as a user runs them: real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

TPI = str(Path(sys.executable).parent / "tpi")


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TPI, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def _tpi_workers(base) -> set[int]:
    """Local worker processes whose files are under `base` (the cluster's --dir):
    other test runs on the same machine start workers of their own."""
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "-m" in cmd and "tpi.worker" in cmd and any(str(base) in a for a in cmd):
            out.add(p.pid)
    return out


def test_cluster_generate_equals_single_node_and_cleans_up(llama_dir, tmp_path):
    before = _tpi_workers(tmp_path)
    single = _run(["generate", "--model", str(llama_dir), "-t", "0", "-n", "10", "Hello world"])
    clustered = _run(
        [
            "cluster",
            "--workers",
            "2",
            "--dir",
            str(tmp_path),
            "generate",
            "--model",
            str(llama_dir),
            "-t",
            "0",
            "-n",
            "10",
            "Hello world",
        ]
    )
    assert single.returncode == 0 and clustered.returncode == 0, clustered.stderr
    assert clustered.stdout == single.stdout
    assert "master + 2 worker(s) ready" in clustered.stderr
    assert _tpi_workers(tmp_path) == before  # every worker it started is gone


def test_cluster_stops_its_workers_on_ctrl_c(tmp_path):
    before = _tpi_workers(tmp_path)
    proc = subprocess.Popen(
        [TPI, "cluster", "--workers", "2", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("workers: 127.0.0.1:")
    assert len(_tpi_workers(tmp_path) - before) == 2
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _tpi_workers(tmp_path) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _tpi_workers(tmp_path) == before


def test_worker_port_in_use_is_a_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        res = _run(["worker", "--listen", f"127.0.0.1:{s.getsockname()[1]}"], timeout=60)
    finally:
        s.close()
    assert res.returncode != 0
    assert "port is in use" in res.stderr and "Traceback" not in res.stderr


def test_worker_requires_listen_address():
    res = _run(["worker"], timeout=60)
    assert res.returncode == 2 and "--listen" in res.stderr
