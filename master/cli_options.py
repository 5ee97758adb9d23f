"""Options of the master's commands (generate, chat, bench, serve, perplexity, plan,
cluster), each declared once; a command that means one a little differently passes its
own help text."""

from __future__ import annotations

from collections.abc import Callable

import click

from tpi import cli_options as opt

MODEL_HELP = (
    "Model: a Hugging Face checkpoint directory, a directory made by 'tpi split', a .gguf file "
    "(converted once), the name of a cached model (see 'tpi models'), or ORG/NAME[@REVISION] "
    "(or ORG/NAME/FILE.gguf) on the Hugging Face hub, downloaded on first use ('tpi pull'). "
    "Default: the embedded SmolLM2-135M-Instruct."
)


class PlanType(click.ParamType):
    """--plan: 'auto', 'even', or a pipeline layout ("master,w1 | w2,w3")."""

    name = "plan"

    def convert(self, value, param, ctx):
        from tpi.model.pipeline_plan import is_layout

        if value in ("auto", "even") or is_layout(value):
            return value
        self.fail(
            f"{value!r} is not auto, even or a stage layout such as 'master,w1 | w2'", param, ctx
        )


AUTO_HELP = (
    " auto: every worker of this cluster (proving its secret) found on the local network "
    "within a few seconds ($TPI_DISCOVERY_SECONDS, default 3); 'tpi workers' shows them."
)


def workers(help: str) -> Callable:
    return click.option(
        "--workers", "-w", default=None, metavar="HOST:PORT,...|auto", help=help + AUTO_HELP
    )


def plan_mode(help: str) -> Callable:
    return click.option(
        "--plan", "plan_mode", type=PlanType(), default=None, metavar="auto|even|LAYOUT", help=help
    )


def prompt_tokens(help: str) -> Callable:
    return click.option(
        "--prompt-tokens", type=click.IntRange(min=1), default=64, show_default=True, help=help
    )


def max_batch(help: str) -> Callable:
    return click.option(
        "--max-batch", type=click.IntRange(min=1), default=8, show_default=True, help=help
    )


def prefill_chunk(default: int, help: str) -> Callable:
    return click.option(
        "--prefill-chunk",
        type=click.IntRange(min=0),
        default=default,
        show_default=True,
        help=help,
    )


ENGINE_OPTIONS = [
    opt.model(MODEL_HELP),
    workers(
        "Worker daemons to run the model with (rank 1, 2, ... in this order). None: this machine alone."
    ),
    opt.shares(),
    plan_mode(
        "How the model is placed on the workers. auto: measure every node (profiles "
        "cached in $TPI_HOME/profiles), then choose each rank's share, its window and which "
        "devices take part, for the lowest predicted ms/token within every node's memory "
        "('tpi plan' shows the candidates and why). even: every worker, --shares (default "
        'even), tensor parallel. LAYOUT: pipeline stages, e.g. "master,w1 | w2,w3": each '
        "group runs its range of layers tensor-parallel, the stages one after the other "
        "(w1, w2, ... are --workers in order; the master is in the first stage). "
        "Default: even (and always with --shares or a model split beforehand)."
    ),
    opt.pp(
        "Pipeline stages: the master and --workers, in order, cut into N groups of "
        "(nearly) equal size, each running its range of layers tensor-parallel "
        "(--pp 2 with 3 workers: master,w1 | w2,w3). Default: 1 (tensor parallel only)."
    ),
    opt.stage_layers(
        "Layers per pipeline stage, in order (e.g. 10,20 for a faster second stage). "
        "Default: as even as the layer count allows."
    ),
    opt.wire_dtype(
        "Precision of partial sums on the network (bf16/fp16 halve the bytes; sums are still done in fp32)."
    ),
    click.option(
        "--timeout",
        type=click.FloatRange(min=1),
        default=60.0,
        show_default=True,
        help="Seconds to wait for a worker's reply within a step before giving up "
        "(dead or frozen workers are detected within ~5 s regardless).",
    ),
    opt.compute_dtype("Compute dtype (bf16 halves memory, at some accuracy cost)."),
    opt.quant(
        None,
        "Weight-only quantization of the matmul weights (made once by an automatic split): "
        "int8 and int4 read and move a half and a quarter of bf16's bytes per token. "
        "Default: none, or whatever a pre-split --model was made with.",
    ),
    opt.group_size(),
    opt.vocab_parallel(
        "Split the embedding and LM head by vocabulary rows across all ranks (less memory and "
        "head compute on the master; only token ids and a few candidates per token cross the "
        "wire, at the cost of one more allreduce per token)."
    ),
    click.option(
        "--prefill-chunks",
        type=click.IntRange(min=1, max=64),
        default=None,
        help="Cut a long prompt into this many chunks so each chunk's allreduces travel while "
        "the next chunk computes (overlapped prefill). Default: chosen from the measured link "
        "round trip and compute speed (1 = no overlap).",
    ),
    opt.threads("Torch compute threads on this machine (default: all cores)."),
    opt.window(
        "Sliding window: layers of each rank's slice kept in memory; the rest stream from disk "
        "while earlier layers compute. Default: all layers resident."
    ),
    opt.memory_budget(
        "Memory this machine may use, e.g. 2GB: picks the largest window that fits next to the "
        "KV cache, activations and (on the master) embedding/LM head, and says what it picked."
    ),
    opt.secret_file(
        "File holding the cluster's shared secret (else $TPI_SECRET); workers require it."
    ),
    opt.insecure("Talk to workers without a shared secret (they must allow it)."),
    opt.curve(
        "Encrypt all traffic with CurveZMQ, using keys from 'tpi keygen DIR' (workers need --curve too)."
    ),
    click.option(
        "--data-link/--no-data-link",
        default=True,
        show_default=True,
        envvar="TPI_DATA_LINK",
        help="Send the allreduces' partial sums over a direct TCP connection to each worker "
        "(its control port + 1 unless it says otherwise), 0.1-0.2 ms a round trip faster "
        "than ZeroMQ; a worker that offers none, or --curve, keeps them on the control link. "
        "Also TPI_DATA_LINK=0.",
    ),
    click.option(
        "--direct-hops/--no-direct-hops",
        default=True,
        show_default=True,
        envvar="TPI_DIRECT_HOPS",
        help="In a pipeline, let each stage hand its output straight to the next stage's "
        "workers (and a later group sum its partials through its own lead) over "
        "authenticated worker-to-worker links: a token crosses each stage boundary once, "
        "not twice through the master. Off (or a pair of workers that cannot reach each "
        "other, or --curve): every hop goes through the master. Also TPI_DIRECT_HOPS=0.",
    ),
    opt.max_context(
        "Tokens of context the KV cache is sized for and capped at (default: the model's, at most "
        "4096 when memory is planned: a window, a budget or a cgroup limit)."
    ),
    click.option(
        "--on-worker-loss",
        type=click.Choice(["continue", "fail"]),
        default="continue",
        show_default=True,
        help="When a worker is lost mid-answer: 'continue' re-plans over the ranks still "
        "alive (the master alone if need be), replays the answer so far and goes on (a "
        "pause, not an error; the same tokens); 'fail' stops with an error naming it.",
    ),
    click.option(
        "--prestage",
        is_flag=True,
        help="Before starting, give every worker the shard it would need if one other "
        "worker were lost (one extra session per worker), so that recovery needs no "
        "push. Costs each worker the disk of up to two shards of the smaller world.",
    ),
]


def sampling_options(max_new_default: int) -> list:
    return [
        click.option(
            "--temperature",
            "-t",
            type=float,
            default=None,
            help="Sampling temperature; 0 = greedy. Default: the model's generation_config, else greedy.",
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


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed", "max_new_tokens")


def worker_list(
    workers: str | None,
    secret_file: str | None = None,
    insecure: bool = False,
    curve_dir: str | None = None,
) -> list[str]:
    """--workers as a list ('auto': those found on the network, tpi.master.auto_workers),
    else the workers of an enclosing `tpi cluster`."""
    from tpi.master.auto_workers import discovered, is_auto

    parent = click.get_current_context().obj or {}  # set by an enclosing `tpi cluster`
    if is_auto(workers):
        return discovered(secret_file, insecure, curve_dir)
    if workers:
        return [w.strip() for w in workers.split(",") if w.strip()]
    return list(parent.get("cluster_workers", []))


def use_threads(threads: int | None) -> None:
    """Torch's compute threads: --threads, else an enclosing `tpi cluster`'s share of the
    cores, else torch's default (all of them)."""
    parent = click.get_current_context().obj or {}
    threads = threads or parent.get("cluster_threads")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _shares_for(shares: str | None, configured: list[str], workers: list[str]) -> str | None:
    """--shares for a subset of the configured workers (after a loss): the master's
    share and those of the workers still there, in order."""
    if not shares or workers == configured:
        return shares
    parts = [p.strip() for p in shares.split(",")]
    if len(parts) != len(configured) + 1:
        return shares  # let open_model name the mismatch
    keep = [parts[0]] + [parts[i + 1] for i, w in enumerate(configured) if w in workers]
    return ",".join(keep)


def open_from_options(opts: dict, workers: list[str] | None = None):
    """Load the model (and cluster) the engine options describe; closed with the command.
    `workers` overrides the configured workers (a recovery's survivors)."""
    from tpi.master.loader import MemoryOptions, open_model
    from tpi.model.pipeline_plan import is_layout

    ctx = click.get_current_context()
    parent = ctx.obj or {}  # set by an enclosing `tpi cluster`
    configured = _configured(opts)
    active = configured if workers is None else workers
    replanned = list(active) != configured
    pipelined = is_layout(opts["plan_mode"] or parent.get("cluster_plan"))
    use_threads(opts["threads"])
    loaded = open_model(
        opts["model"],
        opts["dtype"],
        workers=list(active),
        shares=_shares_for(opts["shares"] or parent.get("cluster_shares"), configured, active),
        wire_dtype=opts["wire_dtype"],
        timeout_s=opts["timeout"],
        secret_file=opts["secret_file"],
        insecure=opts["insecure"],
        curve_dir=opts["curve_dir"],
        data_link=opts["data_link"],
        direct_hops=opts["direct_hops"],
        quant=opts["quant"],
        group_size=int(opts["group_size"]),
        vocab_parallel=opts["vocab_parallel"],
        prefill_chunks=opts["prefill_chunks"],
        # A re-plan over a recovery's survivors is tensor parallel: a pipeline's
        # layout names workers that are gone.
        plan_mode=None
        if replanned and pipelined
        else opts["plan_mode"] or parent.get("cluster_plan"),
        pp=None if replanned else opts["pp"] or parent.get("cluster_pp"),
        stage_layers=None if replanned else opts["stage_layers"],
        memory=MemoryOptions(
            opts["window"],
            opts["memory_budget"] or parent.get("cluster_memory_budget"),
            opts["max_context"],
        ),
        quiet=workers is not None,  # a re-plan says one line of its own
    )
    ctx.call_on_close(loaded.close)
    return loaded


def open_elastic(opts: dict, echo=None):
    """The model, and (for a cluster) an ElasticCluster that re-plans it over the
    survivors when a worker is lost (None for one machine)."""
    from tpi.master.auto_workers import newcomers
    from tpi.master.elastic import ElasticCluster, prestage

    ctx = click.get_current_context()
    say = echo or (lambda m: click.echo(f"tpi: {m}", err=True))

    def opener(workers: list[str]):
        # May run in another thread (tpi serve): click's current context is thread-local.
        with ctx.scope(cleanup=False):
            return open_from_options(opts, workers)

    configured = _configured(opts)
    if opts.get("prestage") and configured:
        say(f"pre-staged the shards a recovery would need in {prestage(opener, configured):.1f} s")
    loaded = open_from_options(opts)
    discover = newcomers()  # --workers auto: workers that appear later join too
    if loaded.cluster is None and discover is None:
        return loaded, None
    policy = opts["on_worker_loss"]
    return loaded, ElasticCluster(opener, loaded, configured, say, policy, discover)


def _configured(opts: dict) -> list[str]:
    return worker_list(opts["workers"], opts["secret_file"], opts["insecure"], opts["curve_dir"])


def sampling_from_options(loaded, opts: dict):
    from tpi.master.loader import sampling_params

    return sampling_params(
        loaded.model_dir,
        opts["temperature"],
        opts["top_k"],
        opts["top_p"],
        opts["seed"],
        opts["max_new_tokens"],
    )
