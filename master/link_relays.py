"""The emulated links of `tpi cluster`: every byte between two devices crosses a
relay (tpi.emulation.link_shaper) with the link's latency and bandwidth.

- The master's control and data links to each worker: that worker's link.
- The direct links between workers (a pipeline's hops): the slower of the two
  workers' links, so a far device costs every link to it.

One relay process per distinct link setting, in front of every port one device
reaches another by. The workers' addresses become their relays' (what the master
connects to), and TPI_PEER_ROUTES tells the master, and through it the workers,
where each data port is reached from where (tpi.master.direct_hops).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tpi.comm.links import ClusterError
from tpi.emulation.link_shaper import LinkSpec, start_process
from tpi.errors import TpiError
from tpi.master.direct_hops import ROUTES_ENV


class Worker(Protocol):
    index: int
    address: str
    data_port: int | None


def _shaped(spec: LinkSpec | None) -> bool:
    return spec is not None and (spec.latency_s > 0 or bool(spec.rate_bps))


def pair_link(a: LinkSpec | None, b: LinkSpec | None) -> LinkSpec | None:
    """The emulated link between two workers: the slower of their links."""
    specs = [s for s in (a, b) if s is not None]
    if not specs:
        return None
    rates = [s.rate_bps for s in specs if s.rate_bps]
    return LinkSpec(max(s.latency_s for s in specs), min(rates) if rates else None)


class LinkRelays:
    def __init__(self, base_dir: Path, lifeline: Callable[[], int], timeout_s: float) -> None:
        self.base_dir = base_dir
        self.lifeline = lifeline  # a new lifeline's read end for each relay process
        self.timeout_s = timeout_s
        self.procs: list = []
        self.specs: dict[str, LinkSpec] = {}  # every relay's address and its link
        self.routes: dict[str, dict[str, str]] = {}  # TPI_PEER_ROUTES
        self.notes: list[str] = []
        self._old_env: str | None = None
        self._set_env = False

    def start(self, workers: list[Worker], link_of: Callable[[int], LinkSpec | None]) -> None:
        """Relay every link that is emulated; the workers' addresses become their
        relays'."""
        control: dict[LinkSpec, list[Worker]] = {}
        for w in workers:
            if _shaped(spec := link_of(w.index)):
                control.setdefault(spec, []).append(w)
        if not control:
            return
        targets = {spec: {w.address for w in ws} for spec, ws in control.items()}
        wanted: list[tuple[Worker | None, Worker, LinkSpec]] = []  # (from, to, link)
        for w in workers:
            for other in [None, *workers]:
                if other is w:
                    continue
                spec = (
                    link_of(w.index)
                    if other is None
                    else pair_link(link_of(other.index), link_of(w.index))
                )
                if _shaped(spec):
                    targets.setdefault(spec, set()).add(f"127.0.0.1:{w.data_port}")
                    wanted.append((other, w, spec))
        mappings = self._relay(targets)
        final = {w.index: w.address for w in workers}
        for spec, members in control.items():
            for w in members:
                final[w.index] = mappings[spec][w.address]
            self._note(spec, members, len(workers))
        for src, dst, spec in wanted:
            name = "master" if src is None else final[src.index]
            self.routes.setdefault(name, {})[final[dst.index]] = mappings[spec][
                f"127.0.0.1:{dst.data_port}"
            ]
        for w in workers:
            w.address = final[w.index]
        self._old_env, self._set_env = os.environ.get(ROUTES_ENV), True
        os.environ[ROUTES_ENV] = json.dumps(self.routes)

    def _relay(self, targets: dict[LinkSpec, set[str]]) -> dict[LinkSpec, dict[str, str]]:
        """Start one relay process per link setting; returns {target: relay address}."""
        mappings = {}
        for k, (spec, wanted) in enumerate(targets.items()):
            suffix = "" if k == 0 else f"-{k}"
            with open(self.base_dir / f"shaper{suffix}.log", "ab") as log:
                try:
                    proc, mappings[spec] = start_process(
                        sorted(wanted),
                        spec,
                        self.base_dir / f"shaper{suffix}.json",
                        log,
                        self.timeout_s,
                        parent_fd=self.lifeline(),
                    )
                except TpiError as e:
                    raise ClusterError(f"{e} (see shaper{suffix}.log)") from None
            self.procs.append(proc)
            self.specs.update({relay: spec for relay in mappings[spec].values()})
        return mappings

    def _note(self, spec: LinkSpec, members: list[Worker], count: int) -> None:
        who = (
            "" if len(members) == count else f" (worker {', '.join(str(w.index) for w in members)})"
        )
        self.notes.append(
            f"links{who}: {spec.describe()} (user-space relay; round trip = 2 x latency)"
        )

    def forget(self) -> None:
        """The relays are stopped: TPI_PEER_ROUTES as it was before."""
        if not self._set_env:
            return
        if self._old_env is None:
            os.environ.pop(ROUTES_ENV, None)
        else:
            os.environ[ROUTES_ENV] = self._old_env
        self._set_env = False
