"""`tpi plan`: preview where the model would go on these workers, and why."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tpi import cli_options as opt
from tpi.master import cli_options as master_opt


@click.command()
@opt.model(master_opt.MODEL_HELP)
@master_opt.workers("Worker daemons that could take part (rank 1, 2, ... in this order).")
@opt.compute_dtype("Compute dtype the run would use.")
@opt.quant("none", "Weight format the run would split the model in.")
@opt.group_size()
@opt.wire_dtype("Precision of partial sums on the network.")
@opt.max_context(
    "Tokens of context the KV cache would be planned for (default: the model's, at most 4096)."
)
@opt.memory_budget("Memory this machine (the master) may use, e.g. 2GB.")
@master_opt.prompt_tokens("Prompt length the time to first token is predicted for.")
@click.option(
    "--position",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Decode position ms/token is predicted at (tokens already in the cache).",
)
@click.option(
    "--refresh-profiles",
    is_flag=True,
    help="Measure every node again instead of using its cached profile.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and every profile) as JSON.")
@opt.threads("Torch threads on this machine (a profile is per thread count).")
@opt.secret_file("File holding the cluster's shared secret (else $TPI_SECRET); workers require it.")
@opt.insecure("Talk to workers without a shared secret (they must allow it).")
@opt.curve("Encrypt all traffic with CurveZMQ, using keys from 'tpi keygen DIR'.")
def plan(
    model,
    workers,
    dtype,
    quant,
    group_size,
    wire_dtype,
    max_context,
    memory_budget,
    prompt_tokens,
    position,
    refresh_profiles,
    as_json,
    threads,
    secret_file,
    insecure,
    curve_dir,
):
    """Show how '--plan auto' would place the model on these workers: every candidate
    (each set of nodes with its best shares, and even shares over all of them) with its
    predicted ms/token, time to first token and memory per node, the chosen one, and why.

    Every node is measured first (the master here; each worker through a short session
    that asks for no shard): CPU speed, memory and limits, disk, its own layer slices,
    and the link's round trip and bandwidth. Profiles are cached ($TPI_HOME/profiles on
    each node), so only the first plan takes long.
    """
    from tpi.comm.auth import require_secret
    from tpi.comm.curve import CurveKeys
    from tpi.master.planner import PlanRequest, make_plan
    from tpi.runtime.memory_budget import parse_size

    parent = click.get_current_context().obj or {}  # set by an enclosing `tpi cluster`
    worker_list = master_opt.worker_list(workers, secret_file, insecure, curve_dir)
    master_opt.use_threads(threads)
    budget = memory_budget or parent.get("cluster_memory_budget")
    req = PlanRequest(
        model_dir=_model_to_place(model),
        workers=tuple(worker_list),
        dtype=dtype,
        quant=quant,
        group_size=int(group_size),
        wire_dtype=wire_dtype,
        max_context=max_context,
        master_budget=parse_size(budget) if budget else None,
        prompt_tokens=prompt_tokens,
        position=position,
        refresh=refresh_profiles,
    )
    secret = require_secret(secret_file, insecure, "the master") if worker_list else None
    curve = CurveKeys.load(curve_dir, "master") if curve_dir else None
    result, profiles = make_plan(req, secret, curve, _say)
    _show(result, profiles, as_json)


def _say(message: str) -> None:
    click.echo(message, err=True)


def _model_to_place(model: str | None) -> Path:
    """The model --model names (converted once if need be); never a split, whose shares
    are already chosen."""
    from tpi.progress import ProgressReporter
    from tpi.sources.model_registry import resolve_model
    from tpi.storage.split import is_split_dir

    with ProgressReporter("converting") as progress:
        model_dir = resolve_model(model, _say, progress)
    if is_split_dir(model_dir):
        raise click.UsageError(
            "tpi plan chooses the shares of a new split: give the model itself, not a split"
        )
    return model_dir


def _show(result, profiles: list, as_json: bool) -> None:
    """The plan and every node's profile: as JSON, or as text for a reader."""
    from tpi.planning.report import describe_plan, describe_profile

    if as_json:
        out = {"plan": result.to_dict(), "profiles": [p.to_dict() for p in profiles]}
        click.echo(json.dumps(out, indent=2))
        return
    for p in profiles:
        click.echo(describe_profile(p))
    click.echo("")
    click.echo(describe_plan(result))
