"""Discovery end to end, on a LAN of network namespaces this test makes
(tests/netns.py: a bridge and three hosts, multicast on; nothing announced or
heard on the machine's own interfaces). Two workers of this cluster and one of
another announce themselves; a master on the third host finds them within 5 s,
uses only its own with --workers auto, and generates the tokens a single machine
does; `tpi serve --workers auto` takes in a worker started after it, before a
later request; and announcing opens no port beyond mDNS's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import netns

pytestmark = pytest.mark.slow

FOREIGN_SECRET = "a-secret-of-another-cluster-0123456789"
PROMPT = "Once upon a time"
TOKENS = "8"
STARTUP_S = 90


@pytest.fixture(scope="module")
def hosts():
    why = netns.why_not()
    if why:
        pytest.skip(f"no network namespaces here: {why}")
    with netns.lan(3) as made:
        yield made


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


@dataclass(frozen=True)
class Started:
    address: str
    pid: int


@contextmanager
def worker(host: netns.Host, port: int, base: Path, *args: str, **env) -> Iterator[Started]:
    """`tpi worker` on `host`, listening on every interface there, once it is ready."""
    log = base / f"worker-{host.netns}-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "tpi.cli",
        "worker",
        "--listen",
        f"tcp://0.0.0.0:{port}",
        "--store",
        str(base / f"store-{host.netns}-{port}"),
        "--threads",
        "1",
        *args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            host.command(cmd), stdout=out, stderr=out, env=_env(**env), start_new_session=True
        )
    try:
        deadline = time.monotonic() + STARTUP_S
        ready = b"listening on" if "--no-announce" in args else b"announced on"
        while ready not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the worker did not log {ready!r}"
            time.sleep(0.2)
        yield Started(f"{host.address}:{port}", proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tpi_on(host: netns.Host, *args: str, timeout: float = 300, **env):
    return subprocess.run(
        host.command([sys.executable, "-m", "tpi.cli", *args]),
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def python_on(host: netns.Host, code: str, timeout: float = 60) -> str:
    done = subprocess.run(
        host.command([sys.executable, "-c", code]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def lan_workers(hosts, tmp_path_factory):
    """Ours on hosts 0 and 1; another cluster's on host 0 (port 5557)."""
    base = tmp_path_factory.mktemp("lan")
    secret_file = base / "foreign-secret"
    secret_file.write_text(FOREIGN_SECRET)
    with (
        worker(hosts[0], 5555, base) as a,
        worker(hosts[1], 5555, base) as b,
        worker(hosts[0], 5557, base, "--secret-file", str(secret_file)) as foreign,
    ):
        yield (a.address, b.address), foreign.address, base


def test_a_master_finds_its_workers_within_5_s_and_leaves_a_foreign_one_alone(hosts, lan_workers):
    (a, b), foreign, _ = lan_workers
    code = (
        "import time, json\n"
        "from tpi.discovery.browse import Browser\n"
        "from tpi.discovery.record import SERVICE_TYPE\n"
        "t0 = time.monotonic(); seen = {}\n"
        "with Browser() as br:\n"
        "    while len(seen) < 3 and time.monotonic() - t0 < 10:\n"
        "        for s in br.sightings(): seen.setdefault(s.address, time.monotonic() - t0)\n"
        "        time.sleep(0.05)\n"
        "    txt = [{k.decode(): (v or b'').decode() for k, v in\n"
        "            br._zc.get_service_info(SERVICE_TYPE, n).properties.items()}\n"
        "           for n in br.names()]\n"
        "print(json.dumps({'seen': seen, 'txt': txt}))\n"
    )
    out = json.loads(python_on(hosts[2], code))
    seen = out["seen"]
    assert set(seen) == {a, b, foreign}
    assert max(seen.values()) < 5.0, seen  # every worker known within 5 s
    for record in out["txt"]:  # what anyone on the network reads: no secret, no model
        assert set(record) == {"proto", "tpi", "curve", "cores", "mem", "disk", "data"}
        assert not any(
            os.environ["TPI_SECRET"] in v or FOREIGN_SECRET in v for v in record.values()
        )
    listed = tpi_on(hosts[2], "workers", "--json", "--wait", "5")
    assert listed.returncode == 0, listed.stderr
    rows = {r["address"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert {a: True, b: True, foreign: False} == {k: r["usable"] for k, r in rows.items()}
    assert rows[foreign]["secret"] == "foreign" and rows[a]["secret"] == "same"
    assert rows[a]["cores"] > 0 and rows[a]["memory_bytes"] > 0
    table = tpi_on(hosts[2], "workers", "--wait", "3")
    assert "another cluster's worker" in table.stdout and "2 usable" in table.stdout


def test_generate_with_workers_auto_gives_the_single_machine_tokens(hosts, lan_workers, llama_dir):
    (a, b), foreign, _ = lan_workers
    args = ["generate", "--raw", "-n", TOKENS, PROMPT, "--model", str(llama_dir)]
    alone = tpi_on(hosts[2], *args)
    assert alone.returncode == 0, alone.stderr
    auto = tpi_on(hosts[2], *args, "--workers", "auto")
    assert auto.returncode == 0, auto.stderr
    assert f"found 2 worker(s) of this cluster on the network: {a}, {b}" in auto.stderr
    assert f"left alone: {foreign}" in auto.stderr
    assert auto.stdout == alone.stdout


def _completion(host: netns.Host, url: str) -> str:
    code = (
        "import json, urllib.request\n"
        f"body = json.dumps({{'prompt': {PROMPT!r}, 'max_tokens': {TOKENS}, "
        "'temperature': 0}).encode()\n"
        f"req = urllib.request.Request({url!r} + '/v1/completions', body, "
        "{'Content-Type': 'application/json'})\n"
        "print(json.load(urllib.request.urlopen(req, timeout=120))['choices'][0]['text'], end='')\n"
    )
    return python_on(host, code, timeout=180)


def _ranks(host: netns.Host, url: str) -> int:
    code = (
        "import json, urllib.request\n"
        f"print(len(json.load(urllib.request.urlopen({url!r} + '/health', timeout=10))['ranks']))\n"
    )
    return int(python_on(host, code))


def test_serve_takes_in_a_worker_that_appears_later(hosts, lan_workers, llama_dir):
    (a, b), _, base = lan_workers
    master = hosts[2]
    alone = tpi_on(master, "generate", "--raw", "-n", TOKENS, PROMPT, "--model", str(llama_dir))
    url = f"http://{master.address}:8000"
    log = base / "serve.log"
    cmd = ["serve", "--workers", "auto", "--model", str(llama_dir), "--host", master.address]
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            master.command([sys.executable, "-m", "tpi.cli", *cmd]),
            stdout=out,
            stderr=out,
            env=_env(),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_S
        while b"serving " not in log.read_bytes():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        assert _ranks(master, url) == 3
        assert _completion(master, url) + "\n" == alone.stdout
        with worker(hosts[1], 5559, base) as late:
            deadline = time.monotonic() + 60
            while _ranks(master, url) != 4:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
            assert f"worker(s) {late.address} joined: running on 4 ranks" in log.read_text()
            assert _completion(master, url) + "\n" == alone.stdout
    finally:
        serve.terminate()
        serve.wait(30)


def _sockets(host: netns.Host, pid: int) -> set[tuple[str, str]]:
    out = subprocess.run(
        host.command(["ss", "-H", "-a", "-n", "-t", "-u", "-p"]), capture_output=True, text=True
    ).stdout
    found = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            proto, _, _, _, local = line.split()[:5]
            found.add((proto, local.rpartition(":")[2]))
    return found


def test_announcing_opens_no_port_but_mdns(hosts, tmp_path):
    secret = tmp_path / "s"
    secret.write_text("x" * 32)
    got = {}
    for flag in ("--announce", "--no-announce"):
        with worker(hosts[1], 5561, tmp_path, flag, "--secret-file", str(secret)) as w:
            got[flag] = _sockets(hosts[1], w.pid)
    extra = got["--announce"] - got["--no-announce"]
    assert {p for proto, p in got["--announce"] if proto == "tcp"} == {"5561", "5562"}
    assert extra and extra <= {("udp", "5353")}, extra  # mDNS answers questions, nothing else
