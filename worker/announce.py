"""Announcing this worker on the local network while it runs (tpi.discovery), so
that masters find it with --workers auto. Only where other devices can reach it,
and never a worker without a secret: discovery must not advertise a door that
opens without one."""

from __future__ import annotations

import logging
from pathlib import Path

from tpi import __version__
from tpi.comm.links import display_address
from tpi.comm.wire import PROTOCOL_VERSION
from tpi.discovery.announce import Announcer
from tpi.discovery.device_summary import device_summary
from tpi.discovery.interfaces import announce_addresses
from tpi.discovery.record import Advert
from tpi.worker.daemon import WorkerDaemon

log = logging.getLogger("tpi.worker")


def start_announcing(daemon: WorkerDaemon, store: Path) -> Announcer | None:
    """The announcement of `daemon` (stopped with it), or None where it makes none."""
    host, _, port = display_address(daemon.address).rpartition(":")
    addresses = announce_addresses(host.strip("[]"))
    if not addresses:
        log.info("not announced on the network: %s is not reachable from other devices", host)
        return None
    if daemon.options.secret is None:
        log.warning(
            "not announced on the network: a worker without a secret (--insecure) "
            "is reached by its address only"
        )
        return None
    listener = daemon.data_listener
    advert = Advert(
        int(port),
        PROTOCOL_VERSION,
        __version__,
        listener.port if listener is not None else None,
        daemon.curve is not None,
        device_summary(store, daemon.options.budget_bytes),
    )
    return Announcer(advert, addresses).start()
