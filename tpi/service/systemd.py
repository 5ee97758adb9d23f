"""Installing, inspecting and removing the worker's unit with systemctl."""

from __future__ import annotations

import getpass
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tpi.errors import TpiError
from tpi.service.unit import SCOPES, UNIT_NAME, ServiceSpec, render, unit_path
from tpi.storage.atomic import atomic_write_text

Run = Callable[..., subprocess.CompletedProcess]
LINGER_DIR = Path("/var/lib/systemd/linger")


def _systemctl(scope: str, *args: str, run: Run = subprocess.run, check: bool = True):
    if shutil.which("systemctl") is None:
        raise TpiError(
            "systemd is not available here (no systemctl): start 'tpi worker' another way "
            "(your init system, or a terminal)"
        )
    cmd = ["systemctl", *(["--user"] if scope == "user" else []), *args]
    done = run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise TpiError(f"'{' '.join(cmd)}' failed: {why[0]}")
    return done


def install(spec: ServiceSpec, echo: Callable[[str], None], run: Run = subprocess.run) -> Path:
    """Write the unit, enable it and start it now; returns the unit file."""
    if spec.scope not in SCOPES:
        raise TpiError(f"a service is 'user' or 'system', not {spec.scope!r}")
    path = unit_path(spec.scope)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, render(spec))
    except OSError as e:
        hint = " (a system service needs root; --install-service=user makes your own)"
        raise TpiError(
            f"cannot write {path}: {e.strerror or e}" + (hint if spec.scope == "system" else "")
        ) from None
    _systemctl(spec.scope, "daemon-reload", run=run)
    _systemctl(spec.scope, "enable", "--now", UNIT_NAME, run=run)
    echo(f"installed and started {path} (restarts on failure, starts at boot)")
    if spec.scope == "user" and not (LINGER_DIR / getpass.getuser()).exists():
        echo(
            "a user service runs while you are logged in; to start it at boot without a "
            f"login: loginctl enable-linger {getpass.getuser()}"
        )
    echo(
        f"see it with 'tpi service status'; logs: journalctl {_journal_flag(spec.scope)}-u tpi-worker"
    )
    return path


def _journal_flag(scope: str) -> str:
    return "--user " if scope == "user" else ""


def installed_scopes() -> list[str]:
    return [s for s in SCOPES if unit_path(s).is_file()]


def status(run: Run = subprocess.run) -> str:
    """`systemctl status` of every installed unit (active or not, recent log lines)."""
    scopes = installed_scopes()
    if not scopes:
        raise TpiError("no tpi worker service installed ('tpi worker --install-service' makes one)")
    out = []
    for scope in scopes:
        done = _systemctl(
            scope, "status", "--no-pager", "--lines=10", UNIT_NAME, run=run, check=False
        )
        out.append(f"{scope} service {unit_path(scope)}:\n{(done.stdout or done.stderr).rstrip()}")
    return "\n\n".join(out)


def uninstall(echo: Callable[[str], None], run: Run = subprocess.run) -> None:
    """Stop and disable every installed unit, and remove its file."""
    scopes = installed_scopes()
    if not scopes:
        raise TpiError("no tpi worker service installed")
    for scope in scopes:
        _systemctl(scope, "disable", "--now", UNIT_NAME, run=run, check=False)
        unit_path(scope).unlink()
        _systemctl(scope, "daemon-reload", run=run)
        echo(f"stopped, disabled and removed {unit_path(scope)}")
