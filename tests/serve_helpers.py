"""`tpi serve` for tests: a live process, or its app in this process (TestClient)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

TPI = str(Path(sys.executable).parent / "tpi")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextmanager
def live_server(
    args: list[str], prefix: list[str] | None = None, startup_s: float = 120
) -> Iterator[str]:
    """Run `tpi [prefix] serve ARGS` on a free port; yield its base URL."""
    port = free_port()
    cmd = [TPI, *(prefix or []), "serve", "--port", str(port), *args]
    log = open(Path(os.environ["TPI_HOME"]) / f"serve-{port}.log", "w+b")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=log, env=dict(os.environ), start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"serve exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code in (200, 503):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not start")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def tiny_holder(model_dir: Path, reopen=None):
    """A ModelHolder of `model_dir` loaded in this process (no cluster)."""
    from tpi.master.engine import load_engine
    from tpi.master.loader import LoadedModel
    from tpi.master.serve.model_holder import ModelHolder
    from tpi.text.tokenizer import TextTokenizer

    loaded = LoadedModel(model_dir, load_engine(model_dir), TextTokenizer(model_dir), 0.0)
    return ModelHolder(loaded, reopen, retry_interval=0.0 if reopen else 5.0)


@contextmanager
def app_client(model_dir: Path, holder=None, max_new_tokens: int = 4, **kwargs):
    """FastAPI's TestClient on `tpi serve`'s app over `model_dir`, in this process:
    greedy, `max_new_tokens` by default; `kwargs` go to create_app."""
    from fastapi.testclient import TestClient

    from tpi.master.sampling import SamplingParams
    from tpi.master.serve.app import create_app

    holder = holder or tiny_holder(model_dir)
    app = create_app(holder, "tiny", SamplingParams(max_new_tokens=max_new_tokens), **kwargs)
    with TestClient(app) as client:
        yield client
