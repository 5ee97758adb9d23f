"""May a command download a model it was named but does not have? It asks on a
terminal, unless --yes already said so; with neither (a script, a service) it
does not, and says how to."""

from __future__ import annotations

import sys

_assume_yes = False


def assume_yes(value: bool = True) -> None:
    """--yes: download without asking (set by the option, for this process)."""
    global _assume_yes
    _assume_yes = value


def can_ask() -> bool:
    """Whether `granted` could say yes: --yes, or a person at a terminal."""
    return _assume_yes or (sys.stdin.isatty() and sys.stderr.isatty())


def granted(question: str) -> bool:
    if _assume_yes:
        return True
    if not can_ask():
        return False
    import click

    return click.confirm(question, default=False, err=True)
