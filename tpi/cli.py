"""The `tpi` command: a click group.

Commands of the master and worker packages are found through the
"tpi.commands" entry points (see pyproject.toml) and imported only when run, so
the shared library never depends on them and `tpi --help` starts instantly.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points

import click

from tpi import __version__
from tpi import cli_options as opt
from tpi.errors import TpiError


def _debug() -> bool:
    return os.environ.get("TPI_DEBUG", "") not in ("", "0")


class TpiGroup(click.Group):
    def _plugins(self) -> dict:
        return {ep.name: ep for ep in entry_points(group="tpi.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is None and (ep := self._plugins().get(name)) is not None:
            cmd = ep.load()
        return cmd

    def invoke(self, ctx: click.Context):
        # One line and a non-zero exit for anything that goes wrong; tracebacks
        # are for developers (TPI_DEBUG=1).
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except TpiError as e:
            if _debug():
                raise
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as e:
            if _debug():
                raise
            raise click.ClickException(
                f"internal error: {type(e).__name__}: {e} (set TPI_DEBUG=1 for a traceback)"
            ) from None


@click.group(
    cls=TpiGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="tpi")
def cli() -> None:
    """Run LLMs tensor-parallel across several small machines.

    Quick start: `tpi chat` talks to the embedded SmolLM2-135M-Instruct model.
    """


def echo_err(message: str) -> None:
    click.echo(message, err=True)


@cli.command("convert-gguf")
@click.argument("gguf_file", type=click.Path(dir_okay=False, path_type=str))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Storage dtype of the dequantized weights (fp32 keeps them exact).",
)
@click.option(
    "--keep-quant",
    is_flag=True,
    help="Store Q4_0/Q4_1 matmul weights as 4-bit integers (about 1/7 of fp32's bytes); they "
    "read back as the same floats and go unchanged into '--quant int4' splits (groups of 32). "
    "tpi reads such a directory; transformers does not.",
)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it already holds files.")
def convert_gguf_cmd(
    gguf_file: str, out_dir: str, dtype: str, keep_quant: bool, force: bool
) -> None:
    """Convert a Llama-family GGUF file into a Hugging Face checkpoint directory.

    Writes config.json, safetensors weights, tokenizer.json, tokenizer_config.json
    (with the chat template) and generation_config.json. Quantized blocks are
    dequantized (or, with --keep-quant, 4-bit ones kept); attention rows are put
    back into Hugging Face order.
    """
    from pathlib import Path

    from tpi.progress import ProgressReporter
    from tpi.sources.gguf_convert import convert_gguf

    with ProgressReporter("converting") as progress:
        convert_gguf(
            Path(gguf_file),
            Path(out_dir),
            dtype=dtype,
            overwrite=force,
            progress=progress,
            keep_quant=keep_quant,
        )
    click.echo(f"wrote {out_dir}")


@cli.command("split")
@click.argument("model", required=False, default=None)
@opt.assume_yes()
@click.option(
    "--world",
    "-N",
    type=click.IntRange(min=1),
    required=True,
    help="Number of ranks (master + workers).",
)
@opt.shares()
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=str),
    required=True,
    help="Output directory: one rankN/ subdirectory per rank plus split.json.",
)
@click.option(
    "--dtype",
    type=click.Choice(["keep", "fp32", "bf16", "fp16"]),
    default="keep",
    show_default=True,
    help="Storage dtype of the shards (keep = as in the checkpoint).",
)
@opt.quant(
    "none",
    "Weight-only quantization of the matmul weights: int8 per output channel, int4 in groups "
    "(see --group-size); bf16 halves them. Norms, biases and the KV cache stay float.",
)
@opt.group_size()
@opt.vocab_parallel(
    "Give every rank its vocabulary rows of the embedding and LM head (by the same shares) "
    "instead of all of them to rank 0."
)
@opt.pp(
    "Pipeline stages: the ranks in order, cut into N groups of (nearly) equal size; "
    "each rank's shard then holds only its stage's layers."
)
@click.option(
    "--stages",
    default=None,
    metavar="N,N,...",
    help="Ranks per pipeline stage, in order (e.g. 3,1: master and workers 1-2, then worker 3 "
    "alone); instead of --pp.",
)
@opt.stage_layers("Layers per pipeline stage (default: as even as the layer count allows).")
@click.option("--force", is_flag=True, help="Replace --out if it already holds files.")
def split_cmd(
    model: str | None,
    world: int,
    shares: str | None,
    out: str,
    dtype: str,
    quant: str,
    group_size: str,
    vocab_parallel: bool,
    pp: int | None,
    stages: str | None,
    stage_layers: str | None,
    force: bool,
) -> None:
    """Cut a model into one shard directory per rank.

    MODEL is what --model accepts elsewhere: a Hugging Face checkpoint directory,
    a .gguf file, a cached model name or ORG/NAME on the hub; omitted, the embedded
    default model.

    Each rank gets one safetensors file per layer holding only its slice
    (attention heads by KV group, MLP columns) and a manifest with sha256 of every
    file; rank 0 also gets the embedding, final norm, LM head and tokenizer.
    Copy rankN/ to worker N (or let the master push it). Streams layer by layer.
    With --pp or --stages, a pipeline: the master then runs it with --workers in
    rank order (the stages are in split.json).
    """
    from pathlib import Path

    from tpi.model.partition import parse_shares
    from tpi.model.pipeline_plan import parse_counts, pp_layout

    sizes = None
    if pp is not None and stages is not None:
        raise click.UsageError("give --pp or --stages, not both")
    if pp is not None:
        sizes = list(pp_layout(pp, ["w"] * (world - 1)).sizes)
    elif stages is not None:
        sizes = parse_counts(stages, "--stages")
        if sum(sizes) != world:
            raise click.UsageError(
                f"--stages {stages} adds up to {sum(sizes)} ranks, not --world {world}"
            )
    elif stage_layers:
        raise click.UsageError("--stage-layers needs --pp or --stages")
    from tpi.progress import ProgressReporter
    from tpi.quant.quantize import QuantSpec
    from tpi.sources.model_registry import resolve_model
    from tpi.storage.split import split_model

    spec = QuantSpec.for_split(quant, int(group_size))
    with ProgressReporter("converting") as progress:
        model_dir = resolve_model(model, echo_err, progress)
    with ProgressReporter("splitting") as progress:
        split_model(
            model_dir,
            Path(out),
            parse_shares(shares, world),
            dtype,
            progress,
            force,
            quant=spec,
            vocab_parallel=vocab_parallel,
            stage_sizes=sizes,
            stage_layers=parse_counts(stage_layers) if sizes is not None else None,
        )
    click.echo(f"wrote {out}")


@cli.command("keygen")
@click.argument("directory", type=click.Path(file_okay=False, path_type=str))
@click.option("--force", is_flag=True, help="Replace keys already in DIRECTORY.")
def keygen_cmd(directory: str, force: bool) -> None:
    """Make a cluster keyring: the shared secret and CurveZMQ key pairs.

    Copy DIRECTORY to every device (it holds secrets: keep it private), then run
    workers with '--secret-file DIRECTORY/secret --curve DIRECTORY' and the master
    with the same two flags.
    """
    from tpi.comm.curve import keygen

    d = keygen(directory, force)
    click.echo(f"wrote {d}: secret, master/worker CURVE keys, authorized/ (master public key)")
    click.echo(f"use: --secret-file {d}/secret --curve {d}   (on the master and on every worker)")


@cli.command("probe")
@opt.model(
    "Also time this node's layer slices of this model (as 'tpi plan' would ask). "
    "Default: only the device (CPU, memory, disk)."
)
@opt.compute_dtype("Compute dtype of the timed slices.")
@opt.quant("none", "Weight format of the timed slices.")
@opt.group_size()
@click.option(
    "--world",
    type=click.IntRange(min=1, max=64),
    default=4,
    show_default=True,
    help="Time the slice sizes clusters of up to this many ranks would give this node.",
)
@opt.store(
    "Directory whose disk's read speed is measured (a worker's --store). Default: $TPI_HOME/splits."
)
@opt.threads("Torch threads to time with (a profile is per thread count).")
@opt.memory_budget("This node's --memory-budget, if it runs with one (it plans within it).")
@click.option("--refresh", is_flag=True, help="Measure again instead of using the cached profile.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def probe_cmd(
    model, dtype, quant, group_size, world, store, threads, memory_budget, refresh, as_json
) -> None:
    """Measure this node and print its profile: cores, CPU quota and sustained speed,
    memory and its limits, the disk's cold read speed, and (with --model) how long its
    layer slices take per phase.

    Measurements are cached in $TPI_HOME/profiles per device (host, CPU, threads, CPU
    quota); they survive restarts and are what 'tpi plan' and '--plan auto' use.
    Memory is read afresh every time.
    """
    import json as json_mod
    from pathlib import Path

    import torch

    from tpi.paths import tpi_home
    from tpi.planning.device_probe import device_facts, slice_profile
    from tpi.planning.profile import NodeProfile, slices_key
    from tpi.planning.report import describe_profile
    from tpi.planning.slice_probe import Setting, probe_points, shape_key
    from tpi.runtime.memory_budget import parse_size

    if threads:
        torch.set_num_threads(threads)
    say = (lambda _m: None) if as_json else echo_err
    budget = parse_size(memory_budget) if memory_budget else None
    facts = device_facts(Path(store) if store else tpi_home() / "splits", budget, refresh, say)
    slices = {}
    if model is not None:
        from tpi.model.config import load_config
        from tpi.progress import ProgressReporter
        from tpi.sources.model_registry import resolve_model

        with ProgressReporter("converting") as progress:
            model_dir = resolve_model(model, say, progress)
        cfg = load_config(model_dir)
        setting = Setting(dtype, quant, int(group_size), True)
        prof = slice_profile(cfg, setting, probe_points(cfg, world), cfg.vocab_size, refresh, say)
        slices[slices_key(shape_key(cfg), setting.key())] = prof
    node = NodeProfile("this node", facts, slices)
    click.echo(json_mod.dumps(node.to_dict(), indent=2) if as_json else describe_profile(node))


def _add_commands() -> None:
    # Commands of the shared library, in modules of their own (imported at once:
    # they import nothing heavy until run).
    from tpi.model_commands import COMMANDS as MODEL_COMMANDS
    from tpi.service_command import service
    from tpi.workers_command import workers

    for command in (*MODEL_COMMANDS, service, workers):
        cli.add_command(command)


_add_commands()


def main() -> None:
    cli(prog_name="tpi")


if __name__ == "__main__":
    sys.exit(main())
