"""Progress bars on stderr for long work (conversion, splitting, shard transfer)."""

from __future__ import annotations

import sys

import click


class ProgressReporter:
    """A `progress(done, total, item)` callback that draws a bar on stderr.

    The bar is created on the first call, when the total is known. click hides
    it (prints the label once) when stderr is not a terminal.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar = None
        self._done = 0

    def __call__(self, done: int, total: int, item: str = "") -> None:
        if self._bar is None:
            self._bar = click.progressbar(
                length=total, label=self.label, file=sys.stderr, show_pos=True
            )
            self._bar.__enter__()
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
