"""The systemd unit that runs `tpi worker`: written from the worker's own command
line, with absolute paths (a service starts elsewhere, maybe as another user),
the secret named by file (never the secret itself), and a restart on failure."""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from tpi.errors import TpiError

UNIT_NAME = "tpi-worker.service"
SCOPES = ("user", "system")
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")


def default_scope() -> str:
    """A system service as root (starts at boot), else one of the user's own."""
    return "system" if os.geteuid() == 0 else "user"


def unit_path(scope: str) -> Path:
    if scope == "system":
        return SYSTEM_UNIT_DIR / UNIT_NAME
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "systemd" / "user" / UNIT_NAME


@dataclass(frozen=True)
class ServiceSpec:
    scope: str
    worker_args: list[str]  # after `tpi worker`
    environment: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable

    @property
    def exec_start(self) -> list[str]:
        return [self.python, "-m", "tpi.cli", "worker", *self.worker_args]


def _escape(text: str) -> str:
    # systemd expands %specifiers and $VARIABLES on these lines: both kept literal.
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")


def quote(arg: str) -> str:
    """One word of an ExecStart= or Environment= line, as systemd splits them."""
    escaped = _escape(arg)
    if escaped and not any(c.isspace() for c in arg) and escaped == arg:
        return arg
    return f'"{escaped}"'


def render(spec: ServiceSpec) -> str:
    """The unit file's text."""
    system = spec.scope == "system"
    lines = [
        "# Written by 'tpi worker --install-service'; 'tpi service uninstall' removes it.",
        "[Unit]",
        "Description=tpi worker (a share of every model a tpi master runs)",
    ]
    if system:  # the user manager has no network targets
        lines += ["After=network-online.target", "Wants=network-online.target"]
    lines += [
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(quote(a) for a in spec.exec_start),
    ]
    lines += [f"Environment={quote(f'{k}={v}')}" for k, v in sorted(spec.environment.items())]
    if system:
        lines.append(f"User={getpass.getuser()}")
    lines += [
        "Restart=on-failure",
        "RestartSec=5",
        "TimeoutStopSec=20",
        "NoNewPrivileges=yes",
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if system else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


# The worker's options that make no sense in a service, or are set here.
NOT_IN_SERVICE = {"install_service", "port_file", "parent_fd", "max_sessions"}
PATH_OPTIONS = {"store", "secret_file", "curve_dir"}


def worker_args(ctx: click.Context) -> list[str]:
    """The command line of `ctx` (a `tpi worker` invocation) as the service runs it:
    the options the user gave, with absolute paths."""
    args = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in NOT_IN_SERVICE:
            continue
        source = ctx.get_parameter_source(param.name)
        if source not in (
            click.core.ParameterSource.COMMANDLINE,
            click.core.ParameterSource.ENVIRONMENT,
        ):
            continue
        value = ctx.params[param.name]
        long = next(o for o in param.opts if o.startswith("--"))
        if param.is_flag:
            if value:
                args.append(long)
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
            continue
        if value is None:
            continue
        if param.name in PATH_OPTIONS:
            value = str(Path(value).expanduser().resolve())
        args += [long, str(value)]
    return args


def spec_for_worker(ctx: click.Context, scope: str) -> ServiceSpec:
    """The service of the `tpi worker` command line in `ctx`."""
    from tpi.paths import tpi_home

    if not ctx.params.get("secret_file") and not ctx.params.get("insecure"):
        raise TpiError(
            "a service reads the cluster's secret from a file: pass --secret-file FILE "
            "('tpi keygen DIR' makes DIR/secret); $TPI_SECRET does not reach a service"
        )
    args = worker_args(ctx)
    home = tpi_home().expanduser().resolve()
    if "--store" not in args:  # the service's home may differ: name the store outright
        args += ["--store", str(home / "store")]
    return ServiceSpec(scope, args, {"TPI_HOME": str(home), "PYTHONUNBUFFERED": "1"})
