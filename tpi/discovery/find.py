"""`--workers auto` and `tpi workers`: the workers announced on the network, each
checked for the cluster's secret (tpi.discovery.check)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tpi.comm.curve import CurveKeys
from tpi.comm.wire import PROTOCOL_VERSION
from tpi.discovery.browse import Browser, DiscoveryError
from tpi.discovery.check import Verdict, check_all
from tpi.discovery.record import Sighting

AUTO = "auto"
WAIT_ENV = "TPI_DISCOVERY_SECONDS"
DEFAULT_WAIT_S = 3.0
AUTO_NEEDS_SECRET = (
    "--workers auto uses only workers that prove the cluster's secret: set TPI_SECRET or "
    "pass --secret-file (it does not work with --insecure)"
)  # mDNS answers come within a fraction of a second; re-asks at 1 s and 3 s


def wait_seconds() -> float:
    """How long to listen for announcements ($TPI_DISCOVERY_SECONDS, default 3)."""
    try:
        return max(0.5, float(os.environ.get(WAIT_ENV) or DEFAULT_WAIT_S))
    except ValueError:
        return DEFAULT_WAIT_S


@dataclass(frozen=True)
class Found:
    sighting: Sighting
    verdict: Verdict

    @property
    def address(self) -> str:
        return self.sighting.address


def _precheck(s: Sighting, curve: CurveKeys | None) -> Verdict | None:
    """What the announcement alone says is wrong (no need to ask the worker)."""
    if s.advert.protocol != PROTOCOL_VERSION:
        note = (
            f"speaks protocol {s.advert.protocol}, this tpi {PROTOCOL_VERSION} (upgrade one side)"
        )
        return Verdict(True, "unknown", "?", note)
    if s.advert.curve and curve is None:
        return Verdict(True, "unknown", "?", "it requires CurveZMQ: give --curve DIR")
    return None


def examine(
    sightings: Iterable[Sighting], secret: bytes | None, curve: CurveKeys | None
) -> list[Found]:
    early = [(s, _precheck(s, curve)) for s in sightings]
    checked = check_all({s.address for s, v in early if v is None}, secret, curve)
    return [Found(s, v or checked[s.address]) for s, v in early]


def find_workers(
    secret: bytes | None,
    curve: CurveKeys | None = None,
    seconds: float | None = None,
    browser: Browser | None = None,
    skip: Iterable[str] = (),
) -> list[Found]:
    """Workers announced (within `seconds` of the browser's start), checked; those in
    `skip` (already ours: they would answer busy) are left out."""
    own = browser is None
    browser = browser or Browser()
    try:
        browser.wait(wait_seconds() if seconds is None else seconds)
        skip = set(skip)
        return examine([s for s in browser.sightings() if s.address not in skip], secret, curve)
    finally:
        if own:
            browser.close()


def usable_addresses(found: list[Found], echo: Callable[[str], None]) -> list[str]:
    """The addresses of free workers of this cluster; one line for each left alone."""
    for f in found:
        if not f.verdict.usable:
            echo(f"left alone: {f.address} ({describe_verdict(f.verdict)})")
    return [f.address for f in found if f.verdict.usable]


def describe_verdict(v: Verdict) -> str:
    if not v.reachable:
        return "unreachable: " + v.note
    if v.secret == "foreign":
        return "another cluster's worker (a different secret)"
    if v.state == "busy":
        return "busy: " + v.note.removeprefix("busy: ")
    if v.usable:
        return "free, same secret"
    return v.note or f"secret {v.secret}, {v.state}"


def auto_workers(
    secret: bytes | None,
    curve: CurveKeys | None,
    echo: Callable[[str], None],
    browser: Browser | None = None,
) -> list[str]:
    """--workers auto: every free worker of this cluster announced within the wait
    (sorted by address: ranks in a stable order); one line on what was found."""
    if secret is None:
        raise DiscoveryError(AUTO_NEEDS_SECRET)
    seconds = wait_seconds()
    usable = usable_addresses(find_workers(secret, curve, seconds, browser), echo)
    if usable:
        echo(f"found {len(usable)} worker(s) of this cluster on the network: {', '.join(usable)}")
    else:
        echo(
            f"found no worker of this cluster on the network within {seconds:g} s: "
            "running on this machine alone"
        )
    return sorted(usable, key=_address_order)


def _address_order(address: str) -> tuple:
    host, _, port = address.rpartition(":")
    parts = host.split(".")
    return (tuple(int(p) if p.isdigit() else 0 for p in parts), int(port))
