"""Open what a master command needs: model directory, tokenizer, engine, and
(with --workers) the cluster session behind the engine.

`open_model` runs five steps, each returning a value the next one takes:

1. resolve: --model to a local model directory (converted, or the embedded default);
2. place: which workers take part, their shares and windows (--plan auto asks
   tpi.master.planner), or the pipeline stages asked for (`Placement`);
3. split: per-rank shard directories for that placement (cached), or none when
   the master alone holds an unsplit checkpoint in memory;
4. connect: the session with the workers, shards pushed and loaded, and the
   cluster's Topology (tpi.master.cluster);
5. load: rank 0's slice, its head and the Forward for the layout, as an Engine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from tpi.comm.auth import require_secret
from tpi.comm.curve import CurveKeys
from tpi.comm.links import ClusterError
from tpi.comm.wire import MAX_FRAME_BYTES
from tpi.dtypes import COMPUTE_DTYPES
from tpi.errors import ModelError
from tpi.master.cluster import ClusterSession
from tpi.master.engine import Engine, load_engine
from tpi.master.forward import LocalForward, TensorParallelForward
from tpi.master.pipeline import PipelineForward
from tpi.master.planner import PlanRequest, plan_mode_for
from tpi.master.planner import place as choose_placement
from tpi.master.sampling import SamplingParams, defaults_from_generation_config
from tpi.master.topology import Topology
from tpi.master.vocab import WholeVocab
from tpi.model.config import load_config
from tpi.model.decoder import LocalCollective
from tpi.model.partition import parse_shares
from tpi.model.pipeline_plan import Layout, is_layout, parse_counts, parse_layout, pp_layout
from tpi.planning.solver import Plan
from tpi.progress import ProgressReporter
from tpi.quant.quantize import QuantSpec
from tpi.runtime.memory_budget import parse_size
from tpi.runtime.prefill_chunking import PrefillChunking
from tpi.runtime.rank_runtime import RankRuntime, build_rank
from tpi.runtime.vocab_parallel import SpreadVocab
from tpi.sources.model_registry import resolve_model
from tpi.storage.shard_reader import RankShard
from tpi.storage.shard_verify import verify_once
from tpi.storage.split import ensure_split, is_split_dir, read_split_index
from tpi.text.tokenizer import TextTokenizer


def _err(msg: str) -> None:
    click.echo(msg, err=True)


@dataclass(frozen=True)
class MemoryOptions:
    window: int | None = None  # layers resident per rank (None: all, or what the budget allows)
    budget: str | None = None  # --memory-budget of this machine, e.g. "2GB"
    max_context: int | None = None  # tokens the KV cache is planned (and capped) for

    @property
    def streaming(self) -> bool:
        return self.window is not None or self.budget is not None or self.max_context is not None


@dataclass
class LoadedModel:
    model_dir: Path  # where tokenizer and generation_config live
    engine: Engine
    tokenizer: TextTokenizer
    load_seconds: float
    cluster: ClusterSession | None = None
    runtime: RankRuntime | None = None  # rank 0's scheduler (None: plain in-memory load)
    plan: Plan | None = None  # the placement --plan auto chose (None: as given)

    def close(self, reason: str = "done") -> None:
        if self.cluster is not None:
            self.cluster.close(reason)
            self.cluster = None
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None


def load_rank0(
    rank_dir: Path,
    dtype: torch.dtype,
    topology: Topology | None,
    memory: MemoryOptions,
    echo,
) -> tuple[Engine, RankRuntime]:
    """Rank 0's slice, its embedding and LM head (or its vocabulary rows of them),
    and the Forward that runs a pass over the cluster `topology` (None: alone)."""
    shard = RankShard(rank_dir)
    verify_once(shard.dir, shard.manifest, shard.manifest_sha256)
    # The embedding and LM head (or rank 0's vocabulary rows of them) stay
    # resident: the head is read in full for every token, so streaming it would
    # add its whole size in disk reads per token. They count in the master's
    # budget (head_bytes).
    head = shard.load_head(dtype)
    runtime = build_rank(
        shard,
        dtype,
        topology.rank0_collective() if topology is not None else LocalCollective(),
        window=memory.window,
        budget_bytes=parse_size(memory.budget) if memory.budget else None,
        max_context=memory.max_context,
        head_bytes=head.nbytes(),
        echo=echo if memory.streaming else None,
    )
    cfg, partition = shard.manifest.config, shard.manifest.partition
    if topology is None:
        vocab = WholeVocab(cfg, head, dtype)
        return Engine(cfg, vocab, LocalForward(vocab, runtime.decoder)), runtime
    if partition.vocab_parallel:
        sizes = [b - a for a, b in (rs.vocab for rs in partition.slices)]
        world = topology.world
        vocab = SpreadVocab(
            cfg, head, dtype, world.broadcast, world.collective, topology.heads, sizes
        )
    else:
        vocab = WholeVocab(cfg, head, dtype)
    forward = TensorParallelForward(vocab, runtime.decoder, topology)
    if topology.later:
        forward = PipelineForward(forward)
    return Engine(cfg, vocab, forward), runtime


def pipeline_layout(
    plan_mode: str | None,
    pp: int | None,
    stage_layers: str | None,
    workers: list[str],
) -> Layout | None:
    """The pipeline asked for by --plan LAYOUT or --pp N (None: tensor parallel)."""
    if is_layout(plan_mode):
        if pp is not None:
            raise ModelError("give the stages either as --plan LAYOUT or as --pp, not both")
        layout = parse_layout(plan_mode, workers)
    elif pp is not None and pp > 1:
        if plan_mode == "auto":
            raise ModelError("--plan auto does not plan pipelines yet: use --pp with --plan even")
        layout = pp_layout(pp, workers)
    else:
        if stage_layers:
            raise ModelError("--stage-layers needs a pipeline (--pp N or --plan LAYOUT)")
        return None
    return layout


def choose_prefill_chunking(
    cluster: ClusterSession, engine: Engine, fixed: int | None
) -> PrefillChunking:
    """Measure the link and this node's compute; chunk prefills to overlap them."""
    cfg = engine.cfg
    rs = RankShard(cluster.rank_dir(0)).manifest.rank_slice
    hd, hidden = cfg.head_dim, cfg.hidden_size
    attn = hidden * (rs.n_q + 2 * rs.n_kv) * hd + rs.n_q * hd * hidden
    mlp = 3 * hidden * rs.n_mlp
    # Two FLOPs per weight and token, spread over the two phases of a layer.
    chunking = PrefillChunking.estimate(cluster.measure_rtt(), attn + mlp, hidden, fixed)
    cluster.echo(
        f"link round trip {1000 * chunking.rtt_s:.2f} ms; prefill chunks "
        + (str(fixed) if fixed else f"automatic (e.g. {chunking.chunks(512)} for 512 tokens)")
    )
    return chunking


@dataclass(frozen=True)
class OpenRequest:
    """Everything a master command asks of the model it opens (its CLI options)."""

    model: str | None
    dtype: str = "fp32"
    quiet: bool = False
    workers: list[str] | None = None
    shares: str | None = None
    wire_dtype: str = "fp32"
    timeout_s: float = 60.0
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    secret_file: str | None = None
    insecure: bool = False
    curve_dir: str | None = None
    data_link: bool = True
    direct_hops: bool = True  # a pipeline's later stages hand outputs on among themselves
    quant: str | None = None
    group_size: int = 32
    vocab_parallel: bool = False
    prefill_chunks: int | None = None
    plan_mode: str | None = None
    pp: int | None = None
    stage_layers: str | None = None

    def echo(self, message: str) -> None:
        if not self.quiet:
            _err(message)

    def secret(self) -> bytes | None:
        return require_secret(self.secret_file, self.insecure, "the master")

    def curve(self) -> CurveKeys | None:
        return CurveKeys.load(self.curve_dir, "master") if self.curve_dir else None


@dataclass(frozen=True)
class Placement:
    """Which workers take part and how the model is laid out over them."""

    workers: list[str]
    shares: str | None
    layout: Layout | None  # pipeline stages (None: one tensor-parallel group)
    memory: MemoryOptions  # rank 0's, with the window a plan chose for it
    worker_windows: dict[int, int | None] | None = None  # per worker rank, from a plan
    plan: Plan | None = None  # what --plan auto chose (None: as given)

    @property
    def world(self) -> int:
        return len(self.workers) + 1


def resolve(req: OpenRequest) -> Path:
    """Step 1: the local model directory for --model (converting it if needed)."""
    with ProgressReporter("converting") as progress:
        return resolve_model(req.model, req.echo, progress)


def place(req: OpenRequest, model_dir: Path) -> Placement:
    """Step 2: the workers, shares and windows: as given, as a pipeline layout
    asks, or as --plan auto chooses from measured profiles."""
    workers = list(req.workers or [])
    memory, shares, plan_mode = req.memory, req.shares, req.plan_mode
    layout = pipeline_layout(plan_mode, req.pp, req.stage_layers, workers)
    if layout is not None:
        workers, plan_mode = list(layout.workers), "even"
    if not workers or plan_mode_for(plan_mode, model_dir, shares, req.vocab_parallel) != "auto":
        return Placement(workers, shares, layout, memory)
    placed = choose_placement(
        PlanRequest(
            model_dir=model_dir,
            workers=tuple(workers),
            dtype=req.dtype,
            quant=req.quant or "none",
            group_size=req.group_size,
            wire_dtype=req.wire_dtype,
            max_context=memory.max_context,
            master_budget=parse_size(memory.budget) if memory.budget else None,
        ),
        req.secret(),
        req.curve(),
        req.echo,
    )
    if memory.window is None and placed.master_window is not None:
        memory = MemoryOptions(placed.master_window, memory.budget, memory.max_context)
    return Placement(
        list(placed.workers), placed.shares, None, memory, placed.worker_windows, placed.plan
    )


def _check_made_split(req: OpenRequest, split_dir: Path, placement: Placement) -> None:
    """A directory already split must be what the options ask for."""
    if placement.shares:
        raise ModelError("--shares applies when splitting a model; this directory is already split")
    made_index = read_split_index(split_dir)
    made = QuantSpec.from_dict(made_index.get("quant")).mode
    if req.quant is not None and req.quant != made:
        raise ModelError(
            f"this directory was split with --quant {made}; --quant {req.quant} needs a new split"
        )
    if req.vocab_parallel and not made_index.get("vocab_parallel"):
        raise ModelError(
            "this directory was split without --vocab-parallel; split it again with it"
        )
    if placement.layout is not None:
        raise ModelError(
            "this directory is already split (its stages, if any, are in its split.json): "
            "give the model itself to make a pipeline"
        )


def split(req: OpenRequest, model_dir: Path, placement: Placement) -> Path | None:
    """Step 3: the split directory for this placement (made once, then cached), or
    None when the master alone holds the unsplit checkpoint in memory."""
    if is_split_dir(model_dir):
        _check_made_split(req, model_dir, placement)
        return model_dir
    load_config(model_dir)  # the most telling error first (missing/unsupported model)
    spec = QuantSpec.for_split(req.quant or "none", req.group_size)
    if not placement.workers and not placement.memory.streaming and not spec.quantized:
        return None
    layout = placement.layout
    with ProgressReporter("splitting") as progress:
        return ensure_split(
            model_dir,
            parse_shares(placement.shares, placement.world),
            req.echo,
            progress,
            quant=spec,
            vocab_parallel=req.vocab_parallel and placement.world > 1,
            stage_sizes=list(layout.sizes) if layout is not None else None,
            stage_layers=parse_counts(req.stage_layers) if layout is not None else None,
        )


def connect(req: OpenRequest, split_dir: Path, placement: Placement) -> ClusterSession:
    """Step 4: a session with every worker, its shard pushed where missing and
    loaded; its Topology says how each step runs over them."""
    with ProgressReporter("pushing shards") as progress:
        cluster = ClusterSession(
            addresses=placement.workers,
            timeout_s=req.timeout_s,
            echo=req.echo,
            secret=req.secret(),
            curve=req.curve(),
            split_dir=split_dir,
            dtype=req.dtype,
            wire_dtype=req.wire_dtype,
            progress=progress,
            window=placement.memory.window,
            windows=placement.worker_windows,
            max_context=placement.memory.max_context,
            data_link=req.data_link,
            direct_hops=req.direct_hops,
        )
        cluster.start()
    return cluster


def load(
    req: OpenRequest, rank0: Path, placement: Placement, cluster: ClusterSession | None
) -> tuple[Engine, RankRuntime]:
    """Step 5: rank 0 as an Engine; with workers, capped to the smallest context
    any rank holds and with prefill chunks that overlap the link."""
    torch_dtype = COMPUTE_DTYPES[req.dtype]
    topology = cluster.topology if cluster is not None else None
    engine, runtime = load_rank0(rank0, torch_dtype, topology, placement.memory, req.echo)
    if cluster is None:
        if req.prefill_chunks:  # nothing to overlap alone; kept for checking the chunked math
            engine.chunking = PrefillChunking(0.0, 0.0, fixed=req.prefill_chunks)
        return engine, runtime
    engine.max_pass_tokens = max(1, MAX_FRAME_BYTES // (4 * engine.cfg.hidden_size))
    for info in cluster.worker_info.values():
        if isinstance(info.get("max_context"), int) and info["max_context"] > 0:
            engine.cap_context(info["max_context"])
    engine.chunking = choose_prefill_chunking(cluster, engine, req.prefill_chunks)
    return engine, runtime


def open_model(model: str | None, dtype: str = "fp32", **options) -> LoadedModel:
    """Open --model for a master command (options: the fields of OpenRequest):
    resolve, place, split, connect, load (see the module docstring)."""
    req = OpenRequest(model, dtype, **options)
    model_dir = resolve(req)
    t0 = time.perf_counter()
    placement = place(req, model_dir)
    split_dir = split(req, model_dir, placement)
    if split_dir is None:
        engine = load_engine(model_dir, COMPUTE_DTYPES[req.dtype])
        return LoadedModel(
            model_dir,
            engine,
            TextTokenizer(model_dir),
            time.perf_counter() - t0,
            plan=placement.plan,
        )
    index = read_split_index(split_dir)
    rank0 = split_dir / index["ranks"][0]["dir"]
    tokenizer = TextTokenizer(rank0)
    if index["world"] == 1 and placement.workers:
        raise ClusterError(f"{split_dir} is split for one rank; it cannot use workers")
    cluster = connect(req, split_dir, placement) if index["world"] > 1 else None
    try:
        engine, runtime = load(req, rank0, placement, cluster)
    except BaseException:
        if cluster is not None:
            cluster.close("master failed to load")
        raise
    if cluster is not None:
        req.echo(
            f"cluster: master + {len(placement.workers)} worker(s) ready ({', '.join(placement.workers)})"
        )
        if placement.memory.streaming:
            for r, info in sorted(cluster.worker_info.items()):
                req.echo(f"rank {r}: {info.get('memory_text', '?')}")
    seconds = time.perf_counter() - t0
    return LoadedModel(rank0, engine, tokenizer, seconds, cluster, runtime, plan=placement.plan)


def sampling_params(
    model_dir: Path,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    max_new_tokens: int,
) -> SamplingParams:
    """Flags override the model's generation_config.json, which overrides greedy."""
    gen_path = model_dir / "generation_config.json"
    try:
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    except (OSError, ValueError):
        gen = {}
    base = defaults_from_generation_config(gen if isinstance(gen, dict) else {})
    params = SamplingParams(
        temperature=temperature if temperature is not None else base.get("temperature", 0.0),
        top_k=top_k if top_k is not None else base.get("top_k", 0),
        top_p=top_p if top_p is not None else base.get("top_p", 1.0),
        seed=seed,
        max_new_tokens=max_new_tokens,
    )
    try:
        params.validate()
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return params
