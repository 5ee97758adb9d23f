"""`tpi serve`: the OpenAI-compatible server and chat page."""

from __future__ import annotations

import click

from tpi.cli_options import apply
from tpi.master import cli_options as master_opt


@click.command()
@apply(master_opt.ENGINE_OPTIONS + master_opt.sampling_options(max_new_default=512))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 makes the server reachable from the LAN).",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port."
)
@click.option(
    "--api-key",
    default=None,
    metavar="KEY|@FILE",
    help="Require 'Authorization: Bearer KEY' on every route but /health and the page "
    "(or set TPI_API_KEY; @FILE reads the key from a file).",
)
@click.option(
    "--queue-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Requests admitted at once, running or waiting; more get HTTP 429.",
)
@master_opt.max_batch(
    "Requests generated together, in the same forward passes (a pass reads the "
    "weights once for all of them). 1: one at a time."
)
@master_opt.prefill_chunk(
    128,
    "Prompt tokens fed per pass while other requests decode, so a long new prompt "
    "does not stall running streams (0: a prompt runs whole).",
)
@click.option(
    "--kv-budget",
    default=None,
    metavar="SIZE",
    help="KV-cache memory all running requests may use on each node (e.g. 512MB). A "
    "request waits until its worst case fits; one that never can gets HTTP 400. "
    "Default: with a memory budget (--memory-budget, a cgroup limit), the KV cache it "
    "planned; else no limit beyond --max-batch.",
)
@click.option(
    "--max-request-size",
    default="2MB",
    show_default=True,
    metavar="SIZE",
    help="Largest request body accepted (413 above it, before it is read whole).",
)
@click.option(
    "--model-name",
    default=None,
    help="Model id reported by /v1/models (default: the directory name).",
)
def serve(
    host,
    port,
    api_key,
    queue_size,
    max_batch,
    prefill_chunk,
    kv_budget,
    max_request_size,
    model_name,
    **opts,
):
    """Serve the model over HTTP: OpenAI API (/v1/chat/completions, /v1/completions,
    /v1/models), /health, and a chat page at /.

    Up to --max-batch requests generate together (continuous batching: they join
    and leave between forward passes); more wait in order, up to --queue-size. Works with the official openai
    client: base_url=http://HOST:PORT/v1.
    """
    import uvicorn

    from tpi.master.serve.api_key import api_key_from
    from tpi.master.serve.app import create_app
    from tpi.master.serve.jobs import BatchSettings
    from tpi.master.serve.listen import bind_listener
    from tpi.master.serve.model_holder import ModelHolder
    from tpi.runtime.memory_budget import parse_size

    # A bad size or key file fails before binding and loading.
    max_request_size = parse_size(max_request_size)
    kv_budget = parse_size(kv_budget) if kv_budget else None
    api_key = api_key_from(api_key)
    listener = bind_listener(host, port)  # before loading: a busy port fails at once
    port = listener.getsockname()[1]
    loaded, elastic = master_opt.open_elastic(
        opts, echo=lambda m: click.echo(f"tpi: {m}", err=True)
    )
    defaults = master_opt.sampling_from_options(loaded, opts)
    name = model_name or loaded.model_dir.name
    if name.startswith("rank"):  # a split's rank0 directory: name it after the split
        name = loaded.model_dir.parent.name
    ctx = click.get_current_context()

    def reopen():
        # Runs in the generation thread: click's current context is thread-local.
        with ctx.scope(cleanup=False):
            return master_opt.open_from_options(opts)

    reopen = reopen if loaded.cluster is not None else None
    memory = loaded.runtime.memory if loaded.runtime is not None else None
    if kv_budget is None and memory is not None and memory.budget_bytes is not None:
        # A memory budget reserved one context's KV cache on every rank: a batch
        # shares that reservation (its sequences' positions add up to at most it).
        kv_budget = memory.kv_bytes
    # A budget is per node: positions are charged at the largest rank's bytes.
    per_position = _largest_kv_bytes_per_position(loaded)
    app = create_app(
        ModelHolder(loaded, reopen, elastic=elastic),
        name,
        defaults,
        api_key,
        queue_size,
        max_request_size,
        BatchSettings(max_batch, prefill_chunk, kv_budget, per_position),
    )
    click.echo(f"serving {name} on http://{host}:{port} (chat page at /, API at /v1)", err=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[listener])


def _largest_kv_bytes_per_position(loaded) -> int:
    """KV bytes per position of the rank that holds the most KV heads (uneven shares
    give some ranks more): what a position costs on the fullest node."""
    per = [loaded.engine.decoder.caches.bytes_per_position]
    cluster = loaded.cluster
    for info in cluster.worker_info.values() if cluster is not None else ():
        memory, context = info.get("memory") or {}, info.get("max_context")
        if isinstance(context, int) and context > 0 and isinstance(memory.get("kv_bytes"), int):
            per.append(memory["kv_bytes"] // context)
    return max(per)
