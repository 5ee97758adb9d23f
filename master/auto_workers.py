"""--workers auto on the master's commands: the workers of this cluster found on
the network (tpi.discovery), looked for once per command, and (for `tpi serve`)
the ones that appear later, taken in between requests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import click

from tpi.discovery.browse import Browser, DiscoveryError
from tpi.discovery.find import (
    AUTO,
    AUTO_NEEDS_SECRET,
    auto_workers,
    describe_verdict,
    find_workers,
)

_KEY = "tpi.auto_workers"


def is_auto(workers: str | None) -> bool:
    return workers is not None and workers.strip().lower() == AUTO


def _say(message: str) -> None:
    click.echo(f"tpi: {message}", err=True)


@dataclass
class AutoWorkers:
    found: list[str]
    browser: Browser
    secret: bytes
    curve: object
    told: set[str] = field(default_factory=set)  # workers left alone, said once

    def newcomers(self, active: list[str]) -> list[str]:
        """Free workers of this cluster announced since, besides `active` (ours: they
        would answer busy)."""
        found = find_workers(self.secret, self.curve, 0, self.browser, skip=active)
        for f in found:
            if not f.verdict.usable and f.address not in self.told:
                self.told.add(f.address)
                _say(f"left alone: {f.address} ({describe_verdict(f.verdict)})")
        return [f.address for f in found if f.verdict.usable]


def discovered(secret_file: str | None, insecure: bool, curve_dir: str | None) -> list[str]:
    """The workers --workers auto stands for in this command (looked for the first time
    it is asked; the browser stays open until the command ends)."""
    from tpi.comm.auth import require_secret
    from tpi.comm.curve import CurveKeys

    ctx = click.get_current_context()
    state = ctx.meta.get(_KEY)
    if state is None:
        if insecure:  # before listening on the network at all
            raise DiscoveryError(AUTO_NEEDS_SECRET)
        secret = require_secret(secret_file, False, "the master")
        curve = CurveKeys.load(curve_dir, "master") if curve_dir else None
        browser = Browser()
        ctx.call_on_close(browser.close)
        found = auto_workers(secret, curve, _say, browser)
        state = ctx.meta[_KEY] = AutoWorkers(found, browser, secret, curve)
    return list(state.found)


def newcomers() -> Callable[[list[str]], list[str]] | None:
    """How this command finds workers that appear later (None: no --workers auto)."""
    state = click.get_current_context().meta.get(_KEY)
    return state.newcomers if state is not None else None
