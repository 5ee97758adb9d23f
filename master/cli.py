"""`tpi generate`, `tpi chat` and `tpi cluster`: the master's commands."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import click

from tpi import cli_options as opt
from tpi.cli_options import apply
from tpi.master import cli_options as master_opt


@click.command()
@click.argument("prompt", required=False)
@apply(master_opt.ENGINE_OPTIONS + master_opt.sampling_options(max_new_default=256))
@click.option(
    "--prompts-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Answer every line of this file (one prompt per line) instead of PROMPT, "
    "generated together in batches; prints one JSON line per answer, in order.",
)
@master_opt.max_batch("With --prompts-file: prompts generated together.")
@click.option(
    "--raw",
    is_flag=True,
    help="Send PROMPT as-is instead of wrapping it in the model's chat template.",
)
@click.option("--system", default=None, help="System prompt (chat template only).")
@click.option("--stats", is_flag=True, help="Print token counts and speed to stderr at the end.")
def generate(prompt, prompts_file, max_batch, raw, system, stats, **opts):
    """Generate a reply to PROMPT and stream it to stdout ('-' reads PROMPT from stdin),
    or to every line of --prompts-file (batched, JSON lines out).

    Instruction models get PROMPT wrapped in their chat template; use --raw for
    plain text completion. With --workers the model runs tensor-parallel across
    this machine and the worker daemons.
    """
    from tpi.errors import PromptError
    from tpi.master.generation import GenerationStats, generate_tokens
    from tpi.text.prompts import conversation_ids, with_system
    from tpi.text.tokenizer import StreamDecoder

    if prompts_file is not None and prompt is not None:
        raise click.UsageError("give PROMPT or --prompts-file, not both")
    if prompts_file is None and prompt is None:
        raise click.UsageError("missing PROMPT (or --prompts-file)")
    if prompts_file is not None:
        from tpi.master.batch_generate import read_prompts

        prompts = read_prompts(prompts_file)  # before loading: a bad file fails at once
    elif prompt == "-":
        prompt = sys.stdin.read()
    if prompts_file is None and not prompt.strip():
        raise PromptError("the prompt is empty")
    loaded, elastic = master_opt.open_elastic(opts)
    params = master_opt.sampling_from_options(loaded, opts)
    tok = loaded.tokenizer
    # A lost worker is a pause: the answer goes on over the survivors (tpi.master.elastic).
    recover = (lambda e: elastic.recover(e).engine) if elastic is not None else None

    def to_ids(text: str) -> list[int]:
        if raw or tok.chat_template is None:  # nothing to wrap it in: plain completion
            return tok.encode(text)
        return conversation_ids(tok, with_system(system, [{"role": "user", "content": text}]))

    if prompts_file is not None:
        from tpi.master.batch_generate import run_prompts

        summary = run_prompts(loaded, prompts, to_ids, params, max_batch, click.echo, recover)
        if stats:
            click.echo(
                f"{summary['prompts']} prompts, {summary['new_tokens']} new tokens in "
                f"{summary['seconds']:.2f} s: {summary['aggregate_tokens_per_second']:.1f} tok/s "
                f"together ({summary['steps']} batched steps)",
                err=True,
            )
        return
    ids = to_ids(prompt)
    st = GenerationStats()
    decoder = StreamDecoder(tok)
    tokens = generate_tokens(
        loaded.engine, ids, params, tok.eos_ids, st, threading.Event(), recover=recover
    )
    for token in tokens:
        click.echo(decoder.push(token), nl=False)
    click.echo(decoder.flush())
    if stats:
        click.echo(
            f"prompt {st.prompt_tokens} tokens in {st.prefill_seconds:.2f} s; "
            f"{st.new_tokens} new tokens, {st.decode_tokens_per_second:.1f} tok/s ({st.stop_reason})",
            err=True,
        )


@click.command()
@apply(master_opt.ENGINE_OPTIONS + master_opt.sampling_options(max_new_default=512))
@click.option("--system", default=None, help="System prompt for the whole conversation.")
def chat(system, **opts):
    """Chat with the model in the terminal (history kept across turns).

    Type a message and press Enter. /reset forgets the conversation, /exit or
    Ctrl-D quits, Ctrl-C stops the current answer. Tokens/s are shown after each
    answer; the KV cache of earlier turns is reused, so only new text is processed.
    """
    from tpi.master.chat_repl import run_repl
    from tpi.master.chat_session import ChatSession

    loaded, elastic = master_opt.open_elastic(opts)
    params = master_opt.sampling_from_options(loaded, opts)
    click.echo(f"model: {loaded.model_dir} (loaded in {loaded.load_seconds:.1f} s)", err=True)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    session = ChatSession(loaded.engine, loaded.tokenizer, params, system_prompt=system)
    if elastic is not None:  # a lost worker is a pause, not a failed answer
        session.recover = lambda e: elastic.recover(e).engine
    current = [loaded]

    def reconnect():
        # End what is left of the broken session, then connect afresh (workers
        # that are back get a new session; their shards are still in place).
        if elastic is not None:
            current[0] = elastic.loaded
        current[0].close("reconnecting")
        current[0] = master_opt.open_from_options(opts)
        if elastic is not None:  # every configured worker again
            elastic.loaded, elastic.active = current[0], list(elastic.configured)
        return current[0].engine

    run_repl(session, reconnect=reconnect if loaded.cluster is not None else None)


@click.group(invoke_without_command=True)
@click.option(
    "--workers",
    "count",
    type=click.IntRange(min=0, max=64),
    default=2,
    show_default=True,
    help="Number of local worker processes (the master is one more rank; 0: the master "
    "alone, under its emulated caps).",
)
@opt.shares()
@click.option(
    "--dir",
    "base_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the workers keep their stores and logs (default $TPI_HOME/cluster); "
    "shards pushed once are reused by later runs.",
)
@opt.threads(
    "Torch threads per process (default: the machine's cores divided among master and workers)."
)
@click.option(
    "--mem-limit",
    default=None,
    metavar="SIZE[,SIZE...]",
    help="Emulated device memory, per rank (master included), e.g. 4GB: a cgroup cap where the "
    "kernel allows it, and always the memory budget each rank plans its window in. A list "
    "gives each rank its own, master first (e.g. 2GB,1GB,512MB; 'none': no cap).",
)
@click.option(
    "--cpus",
    default=None,
    metavar="CORES[,CORES...]",
    help="Emulated device CPU (cgroup CPU quota, e.g. 0.5 = half a core): one value caps every "
    "worker (the master, with --workers 0); a list caps every rank, master first (e.g. "
    "1.0,0.5,0.25; 'none': no cap).",
)
@click.option(
    "--link-latency",
    default=None,
    metavar="DURATION[,...]",
    help="Emulated one-way link latency between master and each worker, e.g. 5ms; a list "
    "gives each worker its own (e.g. 0ms,0ms,10ms).",
)
@click.option(
    "--link-bandwidth",
    default=None,
    metavar="RATE[,...]",
    help="Emulated link bandwidth in each direction, e.g. 100mbit, 1gbit; a list gives each "
    "worker its own ('none': unlimited).",
)
@master_opt.plan_mode('Placement for the command run (see its --plan), e.g. "master,w1 | w2,w3".')
@opt.pp("Pipeline stages for the command run (see its --pp).")
@click.pass_context
def cluster(
    ctx,
    count,
    shares,
    base_dir,
    threads,
    mem_limit,
    cpus,
    link_latency,
    link_bandwidth,
    plan_mode,
    pp,
):
    """Start N local worker daemons on loopback and run a master command against them.

    Examples: 'tpi cluster --workers 3 generate "Hi"', 'tpi cluster --workers 2 chat',
    'tpi cluster --workers 3 --mem-limit 2GB --link-latency 5ms --link-bandwidth 100mbit bench'.
    Without a command, the workers run until Ctrl-C and their addresses are printed
    (for a master started elsewhere). Every process started is stopped on exit.
    """
    from tpi.master.local_cluster import DeviceLimits, LocalCluster, link_from_flags
    from tpi.paths import tpi_home
    from tpi.runtime.memory_budget import parse_size

    threads = threads or max(1, (os.cpu_count() or 1) // (count + 1))
    if not os.environ.get("TPI_SECRET"):
        # A fresh secret for this run's local workers (inherited through the
        # environment, never on a command line where `ps` would show it).
        from tpi.comm.auth import new_secret

        os.environ["TPI_SECRET"] = new_secret()
    mems = per_rank(mem_limit, count + 1, parse_size, "--mem-limit", single_for_all=True)
    cores = per_rank(cpus, count + 1, _cores, "--cpus", single_for_all=False)
    lats = per_rank(link_latency, count, str, "--link-latency", single_for_all=True)
    rates = per_rank(link_bandwidth, count, str, "--link-bandwidth", single_for_all=True)
    limits = DeviceLimits(mems[-1], cores[-1]) if count else DeviceLimits()
    local = LocalCluster(
        count,
        base_dir or tpi_home() / "cluster",
        threads,
        limits=limits,
        worker_limits=[DeviceLimits(mems[i], cores[i]) for i in range(1, count + 1)],
        master_limits=DeviceLimits(mems[0], cores[0]),
        worker_links=[link_from_flags(lats[i], rates[i]) for i in range(count)],
    )
    mem_limit = str(mems[0]) if mems[0] is not None else None  # the master's budget
    addresses = local.start()
    ctx.call_on_close(local.stop)
    if ctx.invoked_subcommand is not None:
        local.cap_master()  # --mem-limit is per rank, the master's included
    for note in local.notes:
        click.echo(f"emulation: {note}", err=True)
    ctx.obj = {
        "cluster_workers": addresses,
        "cluster_shares": shares,
        "cluster_threads": threads,
        "cluster_memory_budget": mem_limit,
        "cluster_plan": plan_mode,
        "cluster_pp": pp,
    }
    if ctx.invoked_subcommand is None:
        click.echo("workers: " + ",".join(addresses))
        click.echo("press Ctrl-C to stop them", err=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            click.echo("stopping workers", err=True)


def _cores(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number of cores") from None
    if value < 0.01:
        raise click.BadParameter("a CPU cap must be at least 0.01 cores")
    return value


def per_rank(text: str | None, count: int, parse, flag: str, single_for_all: bool) -> list:
    """A per-rank flag: one value (for every rank, or -- `single_for_all` False -- for
    every rank but the master, the first) or a comma list of exactly `count` ('none'
    for no value)."""
    if text is None:
        return [None] * count
    parts = [p.strip() for p in str(text).split(",")]
    values = [None if p.lower() == "none" else parse(p) for p in parts]
    if len(values) == 1:
        if single_for_all or count == 1:  # (with no workers, the one value is the master's)
            return values * count
        return [None, *values * (count - 1)]
    if len(values) != count:
        raise click.BadParameter(f"{flag} lists {len(values)} values; give 1 or {count}")
    return values


cluster.add_command(generate)
cluster.add_command(chat)


def _add_late_commands() -> None:
    from tpi.master.bench import bench
    from tpi.master.plan_command import plan
    from tpi.master.serve.command import serve

    cluster.add_command(bench)
    cluster.add_command(serve)
    cluster.add_command(plan)


_add_late_commands()
