"""The worker as a systemd service: the unit written from a worker's command line
(checked by systemd-analyze where it is installed, and run as the unit says), and
the systemctl calls that install, show and remove it. This machine runs no
systemd manager, so systemctl is a recording stand-in on PATH: what enabling
really does is systemd's, what is asked of it is tested here."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tpi.cli import cli
from tpi.comm.links import tcp_reachable
from tpi.service.unit import quote

SECRET = "service-test-secret-0123456789abcdef"


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A home, a keyring and a systemctl that records its calls."""
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    (home / "keys" / "secret").write_text(SECRET)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "tpi-worker.service: active"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("TPI_HOME", str(home / "tpi"))
    monkeypatch.chdir(home)
    return home, log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _install(*args: str):
    return CliRunner().invoke(cli, ["worker", *args])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_install_writes_the_workers_own_command_line_and_enables_it(machine):
    home, log = machine
    res = _install(
        "--install-service=user",
        "--listen",
        "0.0.0.0:5555",
        "--secret-file",
        "keys/secret",
        "--memory-budget",
        "2GB",
        "--no-accept-push",
    )
    assert res.exit_code == 0, res.output
    unit = home / ".config" / "systemd" / "user" / "tpi-worker.service"
    text = unit.read_text()
    exec_line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert f"--secret-file {home}/keys/secret" in exec_line  # absolute: a service starts elsewhere
    assert f"--store {home}/tpi/store" in exec_line
    assert "--memory-budget 2GB" in exec_line and "--no-accept-push" in exec_line
    assert "--install-service" not in exec_line
    assert SECRET not in text  # the secret stays in its file
    assert "Restart=on-failure" in text and f"Environment=TPI_HOME={home}/tpi" in text
    assert "WantedBy=default.target" in text
    assert _calls(log) == ["--user daemon-reload", "--user enable --now tpi-worker.service"]
    assert "installed and started" in res.stderr


def test_service_install_is_worker_install_service(machine):
    home, log = machine
    res = CliRunner().invoke(
        cli, ["service", "install", "--listen", "0.0.0.0:5555", "--secret-file", "keys/secret"]
    )
    assert res.exit_code == 0, res.output
    assert _calls(log)[-1].endswith("enable --now tpi-worker.service")
    status = CliRunner().invoke(cli, ["service", "status"])
    assert status.exit_code == 0 and "active" in status.output
    assert "status --no-pager --lines=10 tpi-worker.service" in _calls(log)[-1]
    gone = CliRunner().invoke(cli, ["service", "uninstall"])
    assert gone.exit_code == 0, gone.output
    assert "disable --now tpi-worker.service" in "\n".join(_calls(log))
    assert not list((home / ".config" / "systemd").rglob("tpi-worker.service"))
    again = CliRunner().invoke(cli, ["service", "status"])
    assert again.exit_code == 1 and "no tpi worker service installed" in again.output


def test_a_service_needs_the_secret_in_a_file_and_systemd(machine, monkeypatch):
    home, log = machine
    res = _install("--install-service", "--listen", "0.0.0.0:5555")  # TPI_SECRET only
    assert res.exit_code == 1 and "--secret-file" in res.output and "Traceback" not in res.output
    assert _calls(log) == []
    monkeypatch.setenv("PATH", "/nonexistent")
    res = _install(
        "--install-service=user", "--listen", "0.0.0.0:5555", "--secret-file", "keys/secret"
    )
    assert res.exit_code == 1 and "no systemctl" in res.output


def _exec_start(unit: Path) -> list[str]:
    line = next(ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart="))
    # systemd's quoting is the shell's for these words, with %% and $$ for % and $
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line[len("ExecStart=") :])]


@pytest.mark.parametrize("scope", ["user", "system"])
def test_the_unit_passes_systemd_analyze_verify(machine, scope, tmp_path, monkeypatch):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here: the unit cannot be verified")
    home, _ = machine
    monkeypatch.setattr("tpi.service.unit.SYSTEM_UNIT_DIR", tmp_path / "etc")  # not /etc
    res = _install(
        f"--install-service={scope}", "--listen", "0.0.0.0:5555", "--secret-file", "keys/secret"
    )
    assert res.exit_code == 0, res.output
    unit = (home / ".config/systemd/user" if scope == "user" else tmp_path / "etc") / (
        "tpi-worker.service"
    )
    runtime = tmp_path / "runtime"  # the user manager's, which verify wants to exist
    runtime.mkdir(mode=0o700)
    cmd = ["systemd-analyze", *(["--user"] if scope == "user" else []), "verify", str(unit)]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    # verify exits 0 on mere warnings (a misspelt setting): none may be printed either
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_the_units_command_line_runs_a_worker(machine, tmp_path):
    home, _ = machine
    port = _free_port()
    res = _install(
        "--install-service=user",
        "--listen",
        f"127.0.0.1:{port}",
        "--secret-file",
        "keys/secret",
        "--data-port",
        "off",
        "--threads",
        "1",
    )
    assert res.exit_code == 0, res.output
    argv = _exec_start(home / ".config" / "systemd" / "user" / "tpi-worker.service")
    env = {k: v for k, v in os.environ.items() if k != "TPI_SECRET"}  # only the file
    proc = subprocess.Popen(
        argv, env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not tcp_reachable(f"127.0.0.1:{port}") and time.monotonic() < deadline:
            assert proc.poll() is None, "the unit's command line did not start a worker"
            time.sleep(0.2)
        assert tcp_reachable(f"127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize(
    "arg, word",
    [
        ("plain", "plain"),
        ("with space", '"with space"'),
        ("50%", '"50%%"'),
        ("$HOME", '"$$HOME"'),
        ('a"b', '"a\\"b"'),
    ],
)
def test_words_are_quoted_as_systemd_reads_them(arg, word):
    assert quote(arg) == word
