"""A newcomer's path, timed: from a fresh clone to the first answer of a cluster of
two devices that find each other (--workers auto).

The two devices are network namespaces on this machine joined by a bridge in a
namespace of its own (tests/netns.py), so discovery runs over a real (virtual)
LAN and never on the machine's own interfaces. They share this machine's disk, so
one clone and one ./install.sh serve both; each keeps a cache ($TPI_HOME) of its
own, empty at the start, as on a new device. The model is the embedded default
(no model hub is reachable here): its GGUF is converted on first use, split for
two ranks, and the worker's shard pushed, all inside the first answer's time.

Every step is a command a person types; each is timed, and the total written to
benchmarks/results/newcomer.json. Run as root (namespaces), under the machine lock:
    flock /tmp/tpi-bench.lock .venv/bin/python -m benchmarks.newcomer
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import click

from benchmarks.common import write_result
from tests import netns

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


def _timed(what: str, cmd: list[str], cwd: Path, env: dict, log) -> float:
    click.echo("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise click.ClickException(f"{what} failed (exit {done.returncode}); see the log")
    click.echo(f"  {what}: {seconds:.1f} s")
    return seconds


@click.command()
@click.option("--repo", default=str(REPO), show_default=True, help="What to clone.")
@click.option("--keep", is_flag=True, help="Keep the clone (and its .venv) afterwards.")
def main(repo: str, keep: bool) -> None:
    why = netns.why_not()
    if why:
        raise click.ClickException(f"no network namespaces: {why}")
    work = Path(tempfile.mkdtemp(prefix="tpi-newcomer-"))
    log = open(work / "log.txt", "w")  # noqa: SIM115
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPI_", "PYTHON", "VIRTUAL"))}
    steps: dict[str, float] = {}
    try:
        clone = work / "tpi"
        steps["git clone"] = _timed(
            "clone", ["git", "clone", "-q", repo, str(clone)], work, env, log
        )
        steps["./install.sh"] = _timed("install", ["./install.sh"], clone, env, log)
        tpi = [".venv/bin/tpi"]
        steps["tpi keygen"] = _timed("keygen", [*tpi, "keygen", "keys"], clone, env, log)
        secret = ["--secret-file", "keys/secret"]
        with netns.lan(2) as (device1, device2):
            env1 = {**env, "TPI_HOME": str(work / "home1")}
            env2 = {**env, "TPI_HOME": str(work / "home2")}
            worker_cmd = device1.command(
                [*tpi, "worker", "--listen", "0.0.0.0:5555", *secret, "--threads", "1"]
            )
            t0 = time.perf_counter()
            wlog = open(work / "worker.log", "w+")  # noqa: SIM115
            worker = subprocess.Popen(worker_cmd, cwd=clone, env=env1, stdout=wlog, stderr=wlog)
            try:
                ask = [*tpi, "generate", "--workers", "auto", *secret, "--threads", "1", QUESTION]
                steps["tpi worker (announced)"] = _wait_for(wlog, "announced on", t0, worker)
                steps["tpi generate --workers auto"] = _answer(device2.command(ask), clone, env2)
            finally:
                worker.terminate()
                worker.wait(30)
        total = sum(steps.values())
        click.echo(f"{len(steps)} commands, {total:.0f} s from clone to the first answer")
        write_result(
            "newcomer",
            {
                "steps_seconds": {k: round(v, 1) for k, v in steps.items()},
                "commands_typed": len(steps),
                "total_seconds": round(total, 1),
                "devices": "2 network namespaces on one machine, one shared clone and install",
                "model": "embedded SmolLM2-135M-Instruct (converted, split and pushed on first use)",
                "load_average_at_start": os.getloadavg(),
            },
        )
    finally:
        log.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _wait_for(log, text: str, t0: float, proc: subprocess.Popen) -> float:
    while True:
        log.seek(0)
        if text in log.read():
            seconds = time.perf_counter() - t0
            click.echo(f"  worker announced: {seconds:.1f} s")
            return seconds
        if proc.poll() is not None or time.perf_counter() - t0 > 300:
            log.seek(0)
            raise click.ClickException(f"the worker did not announce itself:\n{log.read()[-2000:]}")
        time.sleep(0.2)


def _answer(cmd: list[str], cwd: Path, env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or "found 1 worker(s)" not in done.stderr:
        raise click.ClickException(f"no answer over the cluster:\n{done.stderr[-2000:]}")
    click.echo(f"  answer: {done.stdout.strip()[:80]!r}: {seconds:.1f} s")
    return seconds


if __name__ == "__main__":
    main()
