"""The interactive loop of `tpi chat`."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager

import click

from tpi.comm.links import ClusterError
from tpi.errors import PromptError, TpiError
from tpi.master.chat_session import ChatSession
from tpi.master.generation import GenerationStats

HELP = (
    "commands: /reset (forget the conversation), /retry (reconnect and answer the last message "
    "again), /exit (or Ctrl-D), /help; Ctrl-C stops an answer"
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


def _answer(session: ChatSession, text: str) -> None:
    stats = GenerationStats()
    cancel = threading.Event()
    dropped = session.dropped_turns
    with _sigint_sets(cancel):
        for piece in session.ask(text, stats, cancel):
            click.echo(piece, nl=False)
    click.echo("")
    if session.dropped_turns > dropped:
        click.echo("(older turns were dropped to fit the context window)", err=True)
    click.echo(_stats_line(stats), err=True)


def run_repl(
    session: ChatSession,
    read_line: Callable[[str], str] = input,
    reconnect: Callable[[], object] | None = None,
) -> None:
    """`reconnect()` re-opens the model (and cluster) after a failure; returns the new engine."""
    click.echo(HELP, err=True)
    broken = False
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
        if text == "/help":
            click.echo(HELP, err=True)
            continue
        if text == "/reset":
            session.history.clear()
            if not broken:
                session.engine.reset()
            click.echo("(conversation cleared)", err=True)
            continue
        if text == "/retry":
            if reconnect is None:
                click.echo("nothing to reconnect: this chat runs on one machine", err=True)
                continue
            try:
                session.engine = reconnect()
            except TpiError as e:
                click.echo(f"error: still failing: {e}", err=True)
                continue
            broken = False
            click.echo("(reconnected)", err=True)
            if not session.failed_message:
                continue
            text = session.failed_message
        elif text.startswith("/"):
            click.echo(f"unknown command {text.split()[0]}; {HELP}", err=True)
            continue
        elif broken:
            click.echo(
                "the cluster is down; type /retry once the worker is back (the conversation is kept)",
                err=True,
            )
            continue
        try:
            _answer(session, text)
        except PromptError as e:
            click.echo(f"\nerror: {e}", err=True)
        except ClusterError as e:
            broken = True
            click.echo(f"\nerror: {e}", err=True)
            click.echo("(the conversation is kept; type /retry once the worker is back)", err=True)
