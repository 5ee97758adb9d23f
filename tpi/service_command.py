"""`tpi service`: the worker as a systemd service (install, status, uninstall)."""

from __future__ import annotations

import click


@click.group("service")
def service() -> None:
    """Run the worker as a systemd service: started at boot, restarted on failure.

    'tpi service install WORKER OPTIONS' is 'tpi worker --install-service WORKER OPTIONS'.
    """


@service.command(
    "install",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("worker_options", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def install_cmd(ctx: click.Context, worker_options: tuple[str, ...]) -> None:
    """Install, enable and start the worker service: WORKER_OPTIONS are those of
    'tpi worker' (e.g. --listen 0.0.0.0:5555 --secret-file ~/tpi-keys/secret), and
    --install-service=user|system picks the kind (default: system as root, else user)."""
    root = ctx.find_root()
    worker = root.command.get_command(root, "worker")
    if worker is None:
        raise click.ClickException("the worker is not installed with this tpi")
    with click.Context(worker, info_name="worker", parent=root) as sub:
        args = list(worker_options)
        if not any(a.startswith("--install-service") for a in args):
            args.insert(0, "--install-service")
        worker.parse_args(sub, args)
        worker.invoke(sub)


@service.command("status")
def status_cmd() -> None:
    """Whether the worker service runs, and its last log lines."""
    from tpi.service.systemd import status

    click.echo(status())


@service.command("uninstall")
def uninstall_cmd() -> None:
    """Stop and disable the worker service and remove its unit file (keeps the store)."""
    from tpi.service.systemd import uninstall

    uninstall(lambda m: click.echo(m, err=True))
