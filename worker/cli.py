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
    from tpi.paths import tpi_home
    from tpi.runtime.memory_budget import parse_size
    from tpi.storage.atomic import atomic_write_text
    from tpi.system.lifeline import watch_parent
    from tpi.worker.daemon import WorkerDaemon
    from tpi.worker.options import WorkerOptions
    from tpi.worker.watchdog import Watchdog

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s tpi-worker %(message)s",
        datefmt="%H:%M:%S",
    )
    if threads:
        import torch

        torch.set_num_threads(threads)
    address = normalize_address(listen, default_host="127.0.0.1", allow_any_port=True)
    secret = require_secret(secret_file, insecure, "the worker")
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
    daemon = WorkerDaemon(address, store or tpi_home() / "store", curve=curve, options=options)
    if port_file:
        atomic_write_text(port_file, daemon.address + "\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if parent_fd is not None:

        def parent_gone() -> None:
            logging.getLogger("tpi.worker").warning("the process that started me is gone: stopping")
            stop.set()
            # A session in progress ends when its master's link drops; never linger.
            threading.Timer(PARENT_GONE_EXIT_S, os._exit, (0,)).start()

        watch_parent(parent_fd, parent_gone)
    try:
        with Watchdog():
            daemon.serve(stop, max_sessions)
    except KeyboardInterrupt:
        click.echo("worker stopped", err=True)


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
