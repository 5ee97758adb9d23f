"""Listening for workers' announcements (mDNS/DNS-SD)."""

from __future__ import annotations

import threading
import time

from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

from tpi.discovery.interfaces import lan_addresses
from tpi.discovery.record import SERVICE_TYPE, Advert, Sighting
from tpi.errors import TpiError

RESOLVE_TIMEOUT_MS = 1500  # per announcement not yet resolved from the cache


class DiscoveryError(TpiError):
    pass


class Browser:
    """Watches the network for workers from `start` to `close`; `sightings()` is
    what has been announced (and not withdrawn) so far. A master that serves for
    hours keeps one open, so workers that appear later are known at once."""

    def __init__(self, addresses: list[str] | None = None) -> None:
        self.addresses = lan_addresses() if addresses is None else list(addresses)
        if not self.addresses:
            raise DiscoveryError(
                "no network interface to look for workers on (only loopback is up): "
                "give their addresses with --workers HOST:PORT,..."
            )
        try:
            self._zc = Zeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        except OSError as e:
            raise DiscoveryError(
                f"cannot look for workers on the network (mDNS on {', '.join(self.addresses)}: "
                f"{e.strerror or e}); give their addresses with --workers HOST:PORT,..."
            ) from None
        self._names: dict[str, float] = {}  # instance name -> when first seen
        self._lock = threading.Lock()
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        self.started = time.monotonic()

    def _on_change(self, zeroconf, service_type, name, state_change) -> None:
        # Runs on zeroconf's event loop: note the name only, resolve elsewhere.
        with self._lock:
            if state_change is ServiceStateChange.Removed:
                self._names.pop(name, None)
            else:
                self._names.setdefault(name, time.monotonic())

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def sightings(self) -> list[Sighting]:
        """Every worker announced now, resolved to an address (those that cannot be
        resolved, or are not tpi workers, are left out)."""
        out = []
        for name in self.names():
            info = self._zc.get_service_info(SERVICE_TYPE, name, RESOLVE_TIMEOUT_MS)
            if info is None or info.port is None:
                continue
            hosts = info.parsed_addresses(IPVersion.V4Only)
            advert = Advert.from_properties(info.port, info.properties or {})
            if hosts and advert is not None:
                out.append(Sighting(name.removesuffix("." + SERVICE_TYPE), hosts[0], advert))
        return sorted(out, key=lambda s: (s.host, s.advert.port))

    def wait(self, seconds: float) -> None:
        """Let announcements arrive until `seconds` after the browser started."""
        remaining = self.started + seconds - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)

    def close(self) -> None:
        self._browser.cancel()
        self._zc.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def browse(seconds: float, addresses: list[str] | None = None) -> list[Sighting]:
    """The workers announced within `seconds`."""
    with Browser(addresses) as browser:
        browser.wait(seconds)
        return browser.sightings()
