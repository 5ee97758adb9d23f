"""A worker announcing itself (mDNS/DNS-SD) while it runs, and saying goodbye
when it stops."""

from __future__ import annotations

import logging
import secrets
import socket
import threading

from zeroconf import IPVersion, NonUniqueNameException, ServiceInfo, Zeroconf

from tpi.discovery.record import SERVICE_TYPE, Advert

log = logging.getLogger("tpi.worker")

INSTANCE_MAX_BYTES = 63  # a DNS label


def instance_name(port: int) -> str:
    """'tpi worker on HOST port N': what `tpi workers` shows a person (unique per
    device and port; a clash is renamed by the responder)."""
    host = socket.gethostname().split(".")[0] or "device"
    label = f"tpi worker on {host} port {port}"
    return label.encode()[:INSTANCE_MAX_BYTES].decode("utf-8", "ignore")


class Announcer:
    """Publishes `advert` on `addresses` (this device's own, never loopback) from a
    background thread: registering probes the network for about a second and a
    half, which a worker should not wait for before it listens."""

    def __init__(self, advert: Advert, addresses: list[str]) -> None:
        self.advert = advert
        self.addresses = list(addresses)
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._register, name="tpi-announce", daemon=True)
        self.registered = threading.Event()

    def start(self) -> Announcer:
        self._thread.start()
        return self

    def _register(self) -> None:
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance_name(self.advert.port)}.{SERVICE_TYPE}",
            port=self.advert.port,
            properties=self.advert.properties(),
            # A host name of its own: two workers on one device name (namespaces,
            # containers) must not answer for each other's address.
            server=f"tpi-{secrets.token_hex(4)}.local.",
            addresses=[socket.inet_aton(a) for a in self.addresses],
        )
        try:
            zc = Zeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        except OSError as e:
            log.warning("not announced on the network (mDNS: %s)", e.strerror or e)
            return
        try:
            zc.register_service(info, allow_name_change=True)
        except (OSError, NonUniqueNameException) as e:
            log.warning("not announced on the network (mDNS: %s)", e)
            zc.close()
            return
        with self._lock:
            if self._stopped:  # stopped while registering: say goodbye at once
                zc.unregister_service(info)
                zc.close()
                return
            self._zc, self._info = zc, info
        self.registered.set()
        log.info("announced on %s as %r", ", ".join(self.addresses), info.name)

    def stop(self) -> None:
        """Withdraw the announcement (a goodbye, so masters forget it at once)."""
        with self._lock:
            self._stopped = True
            zc, info, self._zc = self._zc, self._info, None
        if zc is not None and info is not None:
            try:
                zc.unregister_service(info)
            finally:
                zc.close()
