"""`tpi generate`, `tpi chat` and `tpi cluster`: the master's commands."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import click

MODEL_HELP = (
    "Model: a Hugging Face checkpoint directory, a directory made by 'tpi split', a .gguf file "
    "(converted once), or the name of a cached model (see 'tpi models'). "
    "Default: the embedded SmolLM2-135M-Instruct."
)


def _option_list(max_new_default: int) -> list:
    return [
        click.option("--model", "-m", default=None, metavar="PATH|NAME", help=MODEL_HELP),
        click.option(
            "--workers",
            "-w",
            default=None,
            metavar="HOST:PORT,...",
            help="Worker daemons to run the model with (rank 1, 2, ... in this order). "
            "None: this machine alone.",
        ),
        click.option(
            "--shares",
            default=None,
            metavar="A,B,...",
            help="Relative share of each rank, master first (e.g. 2,1,1 gives the master "
            "half the heads and MLP columns). Default: even.",
        ),
        click.option(
            "--wire-dtype",
            type=click.Choice(["fp32", "bf16", "fp16"]),
            default="fp32",
            show_default=True,
            help="Precision of partial sums on the network (bf16/fp16 halve "
            "the bytes; sums are still done in fp32).",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=1),
            default=60.0,
            show_default=True,
            help="Seconds to wait for a worker's reply within a step before giving up "
            "(dead or frozen workers are detected within ~5 s regardless).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["fp32", "bf16"]),
            default="fp32",
            show_default=True,
            help="Compute dtype (bf16 halves memory, at some accuracy cost).",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            help="Torch compute threads on this machine (default: all cores).",
        ),
        click.option(
            "--temperature",
            "-t",
            type=float,
            default=None,
            help="Sampling temperature; 0 = greedy. Default: the model's generation_config, "
            "else greedy.",
        ),
        click.option(
            "--top-k",
            type=int,
            default=None,
            help="Sample only among the k most likely tokens (0 = off).",
        ),
        click.option(
            "--top-p",
            type=float,
            default=None,
            help="Nucleus sampling: smallest set with this probability mass (1 = off).",
        ),
        click.option(
            "--seed", type=int, default=None, help="Random seed, for reproducible sampling."
        ),
        click.option(
            "--max-new-tokens",
            "-n",
            type=click.IntRange(min=1),
            default=max_new_default,
            show_default=True,
            help="Stop after this many generated tokens.",
        ),
    ]


def model_options(max_new_default: int):
    def decorate(f):
        for opt in reversed(_option_list(max_new_default)):
            f = opt(f)
        return f

    return decorate


def _workers(value: str | None) -> list[str]:
    """--workers, or the local workers of an enclosing `tpi cluster`."""
    if value:
        return [w.strip() for w in value.split(",") if w.strip()]
    ctx = click.get_current_context()
    return list((ctx.obj or {}).get("cluster_workers", []))


def _open(model, dtype, workers, shares, wire_dtype, timeout, threads):
    from master.loader import open_model

    ctx = click.get_current_context()
    shares = shares or (ctx.obj or {}).get("cluster_shares")
    threads = threads or (ctx.obj or {}).get("cluster_threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    loaded = open_model(
        model,
        dtype,
        workers=_workers(workers),
        shares=shares,
        wire_dtype=wire_dtype,
        timeout_s=timeout,
    )
    ctx.call_on_close(loaded.close)
    return loaded


@click.command()
@click.argument("prompt")
@model_options(max_new_default=256)
@click.option(
    "--raw",
    is_flag=True,
    help="Send PROMPT as-is instead of wrapping it in the model's chat template.",
)
@click.option("--system", default=None, help="System prompt (chat template only).")
@click.option("--stats", is_flag=True, help="Print token counts and speed to stderr at the end.")
def generate(
    prompt,
    model,
    workers,
    shares,
    wire_dtype,
    timeout,
    dtype,
    threads,
    temperature,
    top_k,
    top_p,
    seed,
    max_new_tokens,
    raw,
    system,
    stats,
):
    """Generate a reply to PROMPT and stream it to stdout ('-' reads PROMPT from stdin).

    Instruction models get PROMPT wrapped in their chat template; use --raw for
    plain text completion. With --workers the model runs tensor-parallel across
    this machine and the worker daemons.
    """
    from master.generation import GenerationStats, generate_tokens
    from master.loader import sampling_params
    from tpi.errors import PromptError
    from tpi.tokenizer import StreamDecoder

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise PromptError("the prompt is empty")
    loaded = _open(model, dtype, workers, shares, wire_dtype, timeout, threads)
    params = sampling_params(loaded.model_dir, temperature, top_k, top_p, seed, max_new_tokens)
    tok = loaded.tokenizer
    if raw or tok.chat_template is None:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tok.encode_chat(messages)
    st = GenerationStats()
    decoder = StreamDecoder(tok)
    for token in generate_tokens(loaded.engine, ids, params, tok.eos_ids, st, threading.Event()):
        click.echo(decoder.push(token), nl=False)
    click.echo(decoder.flush())
    if stats:
        click.echo(
            f"prompt {st.prompt_tokens} tokens in {st.prefill_seconds:.2f} s; "
            f"{st.new_tokens} new tokens, {st.decode_tokens_per_second:.1f} tok/s ({st.stop_reason})",
            err=True,
        )


@click.command()
@model_options(max_new_default=512)
@click.option("--system", default=None, help="System prompt for the whole conversation.")
def chat(
    model,
    workers,
    shares,
    wire_dtype,
    timeout,
    dtype,
    threads,
    temperature,
    top_k,
    top_p,
    seed,
    max_new_tokens,
    system,
):
    """Chat with the model in the terminal (history kept across turns).

    Type a message and press Enter. /reset forgets the conversation, /exit or
    Ctrl-D quits, Ctrl-C stops the current answer. Tokens/s are shown after each
    answer; the KV cache of earlier turns is reused, so only new text is processed.
    """
    from master.chat_repl import run_repl
    from master.chat_session import ChatSession
    from master.loader import sampling_params

    loaded = _open(model, dtype, workers, shares, wire_dtype, timeout, threads)
    params = sampling_params(loaded.model_dir, temperature, top_k, top_p, seed, max_new_tokens)
    click.echo(f"model: {loaded.model_dir} (loaded in {loaded.load_seconds:.1f} s)", err=True)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    session = ChatSession(loaded.engine, loaded.tokenizer, params, system_prompt=system)
    run_repl(session)


@click.group(invoke_without_command=True)
@click.option(
    "--workers",
    "count",
    type=click.IntRange(min=1, max=64),
    default=2,
    show_default=True,
    help="Number of local worker processes (the master is one more rank).",
)
@click.option(
    "--shares", default=None, metavar="A,B,...", help="Relative share of each rank, master first."
)
@click.option(
    "--dir",
    "base_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the workers keep their stores and logs (default $TPI_HOME/cluster); "
    "shards pushed once are reused by later runs.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads per process (default: the machine's cores divided among master and workers).",
)
@click.pass_context
def cluster(ctx, count, shares, base_dir, threads):
    """Start N local worker daemons on loopback and run a master command against them.

    Examples: 'tpi cluster --workers 3 generate "Hi"', 'tpi cluster --workers 2 chat'.
    Without a command, the workers run until Ctrl-C and their addresses are printed
    (for a master started elsewhere). Every process started is stopped on exit.
    """
    from master.local_cluster import LocalCluster
    from tpi.paths import tpi_home

    threads = threads or max(1, (os.cpu_count() or 1) // (count + 1))
    local = LocalCluster(count, base_dir or tpi_home() / "cluster", threads)
    addresses = local.start()
    ctx.call_on_close(local.stop)
    ctx.obj = {"cluster_workers": addresses, "cluster_shares": shares, "cluster_threads": threads}
    if ctx.invoked_subcommand is None:
        click.echo("workers: " + ",".join(addresses))
        click.echo("press Ctrl-C to stop them", err=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            click.echo("stopping workers", err=True)


cluster.add_command(generate)
cluster.add_command(chat)
