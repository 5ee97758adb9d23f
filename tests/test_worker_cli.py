"""`tpi worker`'s command line (worker/cli.py, worker/options.py) in this process:
every bad argument is one line and a non-zero exit, found before the port is bound."""

from __future__ import annotations

import signal
import socket

import pytest
from click.testing import CliRunner

from tests.worker_helpers import SECRET
from tpi.cli import cli
from tpi.worker.options import WorkerOptions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["worker", *args], env=env)


def _one_line_error(result) -> str:
    """The one line that says what is wrong (click puts a usage hint above a bad
    option's)."""
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize(
    "args,env,says",
    [
        (["--listen", "nohost:port"], None, "bad address 'nohost:port': expected host:port"),
        (["--listen", "10.0.0.1:70000"], None, "bad address"),
        ([], {"TPI_SECRET": ""}, "the worker needs the cluster's shared secret: set TPI_SECRET"),
        (["--secret-file", "/nonexistent/secret"], None, "cannot read the secret file"),
        ([], {"TPI_SECRET": "short"}, "the shared secret is too short"),
        (["--data-port", "99999"], None, "'99999' is not a port number or 'off'"),
        (["--memory-budget", "lots"], None, "cannot read size 'lots'"),
        (["--curve", "/nonexistent/keys"], None, "cannot read CURVE keys in /nonexistent/keys"),
    ],
)
def test_a_bad_argument_is_one_line_before_anything_listens(args, env, says):
    port = _free_port()
    if "--listen" not in args:
        args = ["--listen", f"127.0.0.1:{port}", *args]
    assert says in _one_line_error(_worker(*args, env=env))
    with socket.socket() as s:  # nothing was left bound
        s.bind(("127.0.0.1", port))


def test_listen_is_required():
    result = _worker()
    assert result.exit_code == 2 and "Missing option '--listen'" in result.output


def test_the_port_file_names_the_bound_address(tmp_path, monkeypatch):
    # The command installs a SIGTERM handler for a real worker: put ours back after.
    monkeypatch.setattr(signal, "signal", lambda *_a: None)
    port_file = tmp_path / "port"
    result = _worker(
        "--listen", "127.0.0.1:0", "--store", str(tmp_path / "store"),
        "--port-file", str(port_file), "--data-port", "off", "--max-sessions", "0",
        env={"TPI_SECRET": SECRET.decode()},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    host, port = port_file.read_text().strip().removeprefix("tcp://").rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert (tmp_path / "store").is_dir()


def test_the_secret_never_shows_in_the_options():
    options = WorkerOptions(secret=SECRET)
    assert SECRET.decode() not in repr(options) and SECRET.decode() not in str(options)
