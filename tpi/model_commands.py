"""`tpi pull`, `tpi models`, `tpi rm`: the model cache ($TPI_HOME/models)."""

from __future__ import annotations

import click


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.command("pull")
@click.argument("name", metavar="ORG/NAME[@REVISION]")
def pull_cmd(name: str) -> None:
    """Download a model from the Hugging Face hub into the cache.

    NAME is ORG/NAME (a checkpoint: config, tokenizer and safetensors weights, nothing
    else), ORG/NAME@REVISION (a branch, tag or commit), or ORG/NAME/FILE.gguf (one GGUF
    file, converted once). An interrupted pull resumes where it stopped; every file is
    checked against the checksum the hub publishes. Pulling again updates the copy if
    the revision moved. HF_TOKEN: an access token for gated or private models;
    HF_ENDPOINT: a mirror. Then: '--model ORG/NAME' on any command.
    """
    from tpi.sources.hub_pull import pull
    from tpi.sources.hub_ref import parse_hub_ref

    ref = parse_hub_ref(name)
    path = pull(ref, _say)
    click.echo(f"{ref}: {path}")


@click.command("models")
def models_cmd() -> None:
    """List the models in the cache ($TPI_HOME/models) with their sizes."""
    from tpi.paths import models_dir
    from tpi.sources.default_model import DEFAULT_MODEL_NAME, find_embedded_gguf
    from tpi.sources.model_registry import cached_models, unfinished_pulls

    found = cached_models()
    click.echo(f"cache: {models_dir()}")
    if not found:
        click.echo("no models yet ('tpi pull ORG/NAME' downloads one)")
    width = max([len(m.name) for m in found] + [20])
    for m in found:
        tag = "  (default)" if m.name == DEFAULT_MODEL_NAME else ""
        click.echo(f"{m.name:{width}s} {m.size_bytes / 1e6:10.1f} MB  {m.path}{tag}")
    for name, size in unfinished_pulls():
        click.echo(f"unfinished download: {name} ({size / 1e6:.1f} MB so far; pull it again)")
    if DEFAULT_MODEL_NAME not in {m.name for m in found}:
        state = (
            "installed, converts on first use"
            if find_embedded_gguf()
            else "not installed, installs on first use"
        )
        click.echo(f"default {DEFAULT_MODEL_NAME}: {state}")


@click.command("rm")
@click.argument("name")
def rm_cmd(name: str) -> None:
    """Delete a model from the cache (its name as 'tpi models' shows it), and any
    unfinished download of it."""
    from tpi.sources.model_registry import remove_model

    path, freed = remove_model(name)
    click.echo(f"removed {path} ({freed / 1e6:.1f} MB freed)")


COMMANDS = (pull_cmd, models_cmd, rm_cmd)
