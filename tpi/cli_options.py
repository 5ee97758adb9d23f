"""Command-line options that more than one command takes, declared once.

Each is a factory returning a click decorator; where a command means the option
a little differently (a worker's --window is a device limit, the master's a
plan for every rank), it passes its own help text, never its own declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

QUANT_MODES = ["none", "bf16", "int8", "int4"]


def apply(options: list[Callable]) -> Callable:
    """Apply a list of option decorators in the order listed (first = first in --help)."""

    def decorate(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorate


def model(help: str) -> Callable:
    """--model, and --yes: a model named ORG/NAME that is not in the cache yet is
    downloaded once the user agrees, at a terminal or by --yes."""
    option = click.option("--model", "-m", default=None, metavar="PATH|NAME", help=help)
    return lambda f: option(assume_yes()(f))


def _set_assume_yes(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    from tpi.sources import consent

    consent.assume_yes(value)
    return value


def assume_yes() -> Callable:
    return click.option(
        "--yes",
        "-y",
        is_flag=True,
        expose_value=False,
        callback=_set_assume_yes,
        help="Download a model named ORG/NAME that is not in the cache without asking "
        "(otherwise tpi asks at a terminal, and refuses elsewhere).",
    )


def compute_dtype(help: str) -> Callable:
    return click.option(
        "--dtype",
        type=click.Choice(["fp32", "bf16"]),
        default="fp32",
        show_default=True,
        help=help,
    )


def wire_dtype(help: str) -> Callable:
    return click.option(
        "--wire-dtype",
        type=click.Choice(["fp32", "bf16", "fp16"]),
        default="fp32",
        show_default=True,
        help=help,
    )


def pp(help: str) -> Callable:
    return click.option("--pp", type=click.IntRange(min=1), default=None, metavar="N", help=help)


def stage_layers(help: str) -> Callable:
    return click.option("--stage-layers", default=None, metavar="N,N,...", help=help)


def store(help: str) -> Callable:
    return click.option(
        "--store", type=click.Path(file_okay=False, path_type=Path), default=None, help=help
    )


def shares(help: str | None = None) -> Callable:
    return click.option(
        "--shares",
        default=None,
        metavar="A,B,...",
        help=help
        or "Relative share of each rank, master first (e.g. 2,1,1 gives the master half the "
        "heads and MLP columns). Default: even.",
    )


def quant(default: str | None, help: str) -> Callable:
    return click.option(
        "--quant",
        type=click.Choice(QUANT_MODES),
        default=default,
        show_default=default is not None,
        help=help,
    )


def group_size() -> Callable:
    return click.option(
        "--group-size",
        type=click.Choice(["32", "64", "128"]),
        default="32",
        show_default=True,
        help="With --quant int4: weights per scale/zero group (smaller = more accurate, "
        "slightly bigger).",
    )


def vocab_parallel(help: str) -> Callable:
    return click.option("--vocab-parallel", is_flag=True, help=help)


def threads(help: str = "Torch compute threads (default: all cores).") -> Callable:
    return click.option("--threads", type=click.IntRange(min=1), default=None, help=help)


def window(help: str) -> Callable:
    return click.option("--window", type=click.IntRange(min=1), default=None, help=help)


def memory_budget(help: str) -> Callable:
    return click.option("--memory-budget", default=None, metavar="SIZE", help=help)


def max_context(help: str) -> Callable:
    return click.option("--max-context", type=click.IntRange(min=16), default=None, help=help)


def secret_file(help: str) -> Callable:
    return click.option("--secret-file", default=None, metavar="FILE", help=help)


def insecure(help: str) -> Callable:
    return click.option("--insecure", is_flag=True, help=help)


def curve(help: str) -> Callable:
    return click.option("--curve", "curve_dir", default=None, metavar="DIR", help=help)
