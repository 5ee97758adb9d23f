"""The interactive loop of `tpi chat`."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager

import click

from master.chat_session import ChatSession
from master.generation import GenerationStats
from tpi.errors import PromptError

HELP = (
    "commands: /reset (forget the conversation), /exit (or Ctrl-D), /help; Ctrl-C stops an answer"
)


@contextmanager
def _sigint_sets(event: threading.Event):
    """While generating, Ctrl-C asks the answer to stop instead of killing tpi."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stats_line(stats: GenerationStats) -> str:
    reused = f", {stats.reused_tokens} reused" if stats.reused_tokens else ""
    return (
        f"[{stats.new_tokens} tokens, {stats.decode_tokens_per_second:.1f} tok/s; "
        f"prompt {stats.prompt_tokens} tokens{reused} in {stats.prefill_seconds:.2f} s"
        f"{'; stopped' if stats.stop_reason == 'cancelled' else ''}]"
    )


def run_repl(session: ChatSession, read_line: Callable[[str], str] = input) -> None:
    click.echo(HELP, err=True)
    while True:
        try:
            line = read_line("> ")
        except EOFError:
            click.echo("", err=True)
            return
        except KeyboardInterrupt:
            click.echo("\n(use /exit or Ctrl-D to quit)", err=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            click.echo("(conversation cleared)", err=True)
            continue
        if text == "/help":
            click.echo(HELP, err=True)
            continue
        if text.startswith("/"):
            click.echo(f"unknown command {text.split()[0]}; {HELP}", err=True)
            continue
        stats = GenerationStats()
        cancel = threading.Event()
        dropped = session.dropped_turns
        try:
            with _sigint_sets(cancel):
                for piece in session.ask(text, stats, cancel):
                    click.echo(piece, nl=False)
        except PromptError as e:
            click.echo(f"error: {e}", err=True)
            continue
        click.echo("")
        if session.dropped_turns > dropped:
            click.echo("(older turns were dropped to fit the context window)", err=True)
        click.echo(_stats_line(stats), err=True)
