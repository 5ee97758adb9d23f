"""`tpi worker`: the per-device daemon."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import click

from tpi import cli_options as opt

PARENT_GONE_EXIT_S = 5.0


@click.command()
@click.option(
    "--listen",
    "-l",
    required=True,
    metavar="tcp://HOST:PORT",
    help="Address to listen on for a master, e.g. tcp://192.168.1.20:5555 "
    "(host:port works too; port 0 picks a free port).",
)
@opt.store(
    "Directory of shards: pushed ones are kept here; a rank directory from "
    "'tpi split' copied here is used as is. Default: $TPI_HOME/store."
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the bound address to this file once listening (for scripts).",
)
@click.option(
    "--data-port",
    default=None,
    metavar="PORT|off",
    help="Port for the direct data link a master sends the allreduces over (plain TCP, "
    "beside the ZeroMQ control port; 0 picks a free one; 'off': everything over the control "
    "port). Default: the --listen port + 1 (any free port when that is 0). Not used with --curve.",
)
@click.option(
    "--accept-push/--no-accept-push",
    default=True,
    show_default=True,
    help="Accept shards pushed by a master (off: only use shards already in --store).",
)
@opt.threads()
@click.option(
    "--max-sessions",
    type=int,
    default=None,
    hidden=True,
    help="Exit after this many sessions (tests).",
)
@opt.window(
    "Layers of this device's slice kept in memory (the rest stream from --store). "
    "Default: what the master asks, else all."
)
@opt.memory_budget(
    "Memory this device may use, e.g. 2GB: picks the largest window that fits "
    "(a cgroup memory limit counts too)."
)
@opt.max_context(
    "Tokens of context the KV cache is sized for (default: as the master asks; this "
    "device's own limit wins)."
)
@opt.secret_file(
    "File holding the cluster's shared secret (else $TPI_SECRET); masters must prove it."
)
@opt.insecure("Accept any master without a shared secret (only on a network you trust).")
@opt.curve("Encrypt and authenticate all traffic with CurveZMQ, using keys from 'tpi keygen DIR'.")
@click.option(
    "--parent-fd",
    type=int,
    default=None,
    hidden=True,
    help="Stop when this pipe closes (tpi cluster: workers die with their master).",
)
@click.option(
    "--announce/--no-announce",
    default=True,
    show_default=True,
    help="Announce this worker on the local network (mDNS, service _tpi._tcp) so that "
    "masters find it with '--workers auto': its ports, protocol version and a device "
    "summary (cores, memory, free disk), never the secret or its models. Never on "
    "loopback, never with --insecure.",
)
@click.option(
    "--install-service",
    type=click.Choice(["auto", "user", "system"]),
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[user|system]",
    help="Instead of running now, install this command line as a systemd service "
    "(system as root, else the user's own; or say which), enabled, started, restarted on "
    "failure. The secret must come from --secret-file. Then 'tpi service status' or "
    "'tpi service uninstall'.",
)
@click.option("--quiet", "-q", is_flag=True, help="Log only warnings and errors.")
def worker(
    listen,
    store,
    port_file,
    data_port,
    accept_push,
    threads,
    max_sessions,
    window,
    memory_budget,
    max_context,
    secret_file,
    insecure,
    curve_dir,
    parent_fd,
    announce,
    install_service,
    quiet,
):
    """Run the worker daemon: wait for a master, serve its session, wait again.

    The master connects with 'tpi chat --workers HOST:PORT,...'. A worker serves
    one master at a time (others are told it is busy), receives its shard from
    the master the first time (resumable, sha256-verified, reused afterwards) and
    returns to waiting when the master leaves or disappears.
    """
    from tpi.comm.auth import require_secret
    from tpi.comm.curve import CurveKeys
    from tpi.comm.links import normalize_address
    from tpi.kernels.warm import build_all
    from tpi.paths import tpi_home
    from tpi.runtime.memory_budget import parse_size
    from tpi.storage.atomic import atomic_write_text
    from tpi.worker.announce import start_announcing
    from tpi.worker.daemon import WorkerDaemon
    from tpi.worker.options import WorkerOptions
    from tpi.worker.watchdog import Watchdog

    address = normalize_address(listen, default_host="127.0.0.1", allow_any_port=True)
    secret = require_secret(secret_file, insecure, "the worker")
    if install_service:  # checked what it could; the service runs the rest
        return _install_service(install_service)
    _setup(quiet, threads)
    if insecure:
        logging.getLogger("tpi.worker").warning(
            "running --insecure: any master on the network may connect"
        )
    curve = CurveKeys.load(curve_dir, "worker") if curve_dir else None
    options = WorkerOptions(
        data_port=_data_port(data_port, address),
        accept_push=accept_push,
        window=window,
        budget_bytes=parse_size(memory_budget) if memory_budget else None,
        max_context=max_context,
        secret=secret,
    )
    build_all(logging.getLogger("tpi.worker").info)  # before listening: see tpi.kernels.warm
    store = store or tpi_home() / "store"
    daemon = WorkerDaemon(address, store, curve=curve, options=options)
    announcer = start_announcing(daemon, store) if announce else None
    if port_file:
        atomic_write_text(port_file, daemon.address + "\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if parent_fd is not None:
        _stop_with_parent(parent_fd, stop)
    try:
        with Watchdog():
            daemon.serve(stop, max_sessions)
    except KeyboardInterrupt:
        click.echo("worker stopped", err=True)
    finally:
        if announcer is not None:
            announcer.stop()


def _stop_with_parent(parent_fd: int, stop: threading.Event) -> None:
    from tpi.system.lifeline import watch_parent

    def parent_gone() -> None:
        logging.getLogger("tpi.worker").warning("the process that started me is gone: stopping")
        stop.set()
        # A session in progress ends when its master's link drops; never linger.
        threading.Timer(PARENT_GONE_EXIT_S, os._exit, (0,)).start()

    watch_parent(parent_fd, parent_gone)


def _setup(quiet: bool, threads: int | None) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s tpi-worker %(message)s",
        datefmt="%H:%M:%S",
    )
    if threads:
        import torch

        torch.set_num_threads(threads)


def _install_service(scope: str) -> None:
    from tpi.service.systemd import install
    from tpi.service.unit import default_scope, spec_for_worker

    spec = spec_for_worker(
        click.get_current_context(), default_scope() if scope == "auto" else scope
    )
    install(spec, lambda m: click.echo(m, err=True))


def _data_port(text: str | None, address: str) -> int | None:
    """--data-port as a port number (0: any free one), or None for 'off'."""
    if text is None:
        port = int(address.rpartition(":")[2])
        return port + 1 if 0 < port < 65535 else 0
    if text.strip().lower() == "off":
        return None
    if not text.strip().isdigit() or int(text) > 65535:
        raise click.BadParameter(
            f"{text!r} is not a port number or 'off'", param_hint="--data-port"
        )
    return int(text)
