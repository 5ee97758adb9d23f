"""Open what a master command needs: model directory, tokenizer, engine, and
(with --workers) the cluster session behind the engine."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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
from tpi.master.pipeline import PipelineDecoder
from tpi.master.planner import PlanRequest, place, plan_mode_for
from tpi.master.sampling import SamplingParams, defaults_from_generation_config
from tpi.master.vocab import WholeVocab
from tpi.model.config import load_config
from tpi.model.decoder import LocalCollective
from tpi.model.partition import parse_shares
from tpi.model.pipeline_plan import Layout, is_layout, parse_counts, parse_layout, pp_layout
from tpi.planning.solver import Plan
from tpi.progress import ProgressReporter
from tpi.quant.quantize import QuantSpec
from tpi.runtime.memory_budget import parse_size
from tpi.runtime.prefill_plan import PrefillPlanner
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
    cluster: ClusterSession | None,
    memory: MemoryOptions,
    echo,
) -> tuple[Engine, RankRuntime]:
    shard = RankShard(rank_dir)
    verify_once(shard.dir, shard.manifest, shard.manifest_sha256)
    # The embedding and LM head (or rank 0's vocabulary rows of them) stay
    # resident: the head is read in full for every token, so streaming it would
    # add its whole size in disk reads per token. They count in the master's
    # budget (head_bytes).
    head = shard.load_head(dtype)
    collective = cluster.collective if cluster is not None else LocalCollective()
    if cluster is not None and not cluster.collective.members:
        collective = LocalCollective()  # alone in the first stage of a pipeline
    runtime = build_rank(
        shard,
        dtype,
        collective,
        window=memory.window,
        budget_bytes=parse_size(memory.budget) if memory.budget else None,
        max_context=memory.max_context,
        head_bytes=head.nbytes(),
        echo=echo if memory.streaming else None,
    )
    cfg, partition = shard.manifest.config, shard.manifest.partition
    if partition.vocab_parallel and cluster is not None:
        sizes = [b - a for a, b in (rs.vocab for rs in partition.slices)]
        vocab = SpreadVocab(
            cfg,
            head,
            dtype,
            cluster.world_broadcast,
            cluster.world_collective,
            cluster.heads,
            sizes,
        )
    else:
        vocab = WholeVocab(cfg, head, dtype, cluster.broadcast if cluster is not None else None)
    decoder = runtime.decoder
    if cluster is not None and cluster.stage_drivers:
        decoder = PipelineDecoder(
            decoder,
            cluster.stage_drivers,
            cluster.inbox,
            cluster.timeout_s,
            cluster.final_broadcast,
        )
    return Engine(cfg, vocab, decoder), runtime


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


def plan_prefill(cluster: ClusterSession, engine: Engine, fixed: int | None) -> PrefillPlanner:
    """Measure the link and this node's compute; chunk prefills to overlap them."""
    cfg = engine.cfg
    rs = RankShard(cluster.rank_dir(0)).manifest.rank_slice
    hd, hidden = cfg.head_dim, cfg.hidden_size
    attn = hidden * (rs.n_q + 2 * rs.n_kv) * hd + rs.n_q * hd * hidden
    mlp = 3 * hidden * rs.n_mlp
    # Two FLOPs per weight and token, spread over the two phases of a layer.
    planner = PrefillPlanner.estimate(cluster.measure_rtt(), attn + mlp, hidden, fixed)
    cluster.echo(
        f"link round trip {1000 * planner.rtt_s:.2f} ms; prefill chunks "
        + (str(fixed) if fixed else f"automatic (e.g. {planner.chunks(512)} for 512 tokens)")
    )
    return planner


def open_model(
    model: str | None,
    dtype: str,
    quiet: bool = False,
    workers: list[str] | None = None,
    shares: str | None = None,
    wire_dtype: str = "fp32",
    timeout_s: float = 60.0,
    memory: MemoryOptions | None = None,
    secret_file: str | None = None,
    insecure: bool = False,
    curve_dir: str | None = None,
    data_link: bool = True,
    quant: str | None = None,
    group_size: int = 32,
    vocab_parallel: bool = False,
    prefill_chunks: int | None = None,
    plan_mode: str | None = None,
    pp: int | None = None,
    stage_layers: str | None = None,
) -> LoadedModel:
    """Resolve --model; with --plan auto, choose shares, windows and which workers
    take part (tpi.master.planner); with a stage layout (--plan "master,w1 | w2")
    or --pp, make a pipeline (tpi.model.pipeline_plan); split it if a cluster or
    the sliding window needs per-layer files; connect and load the workers; load
    rank 0."""
    memory = memory or MemoryOptions()
    echo = (lambda _m: None) if quiet else _err
    with ProgressReporter("converting") as progress:
        model_dir = resolve_model(model, echo, progress)
    t0 = time.perf_counter()
    torch_dtype = COMPUTE_DTYPES[dtype]
    workers = workers or []
    layout = pipeline_layout(plan_mode, pp, stage_layers, workers)
    if layout is not None:
        workers, plan_mode = list(layout.workers), "even"
    placed = None
    if workers and plan_mode_for(plan_mode, model_dir, shares, vocab_parallel) == "auto":
        placed = place(
            PlanRequest(
                model_dir=model_dir,
                workers=tuple(workers),
                dtype=dtype,
                quant=quant or "none",
                group_size=group_size,
                wire_dtype=wire_dtype,
                max_context=memory.max_context,
                master_budget=parse_size(memory.budget) if memory.budget else None,
            ),
            require_secret(secret_file, insecure, "the master"),
            CurveKeys.load(curve_dir, "master") if curve_dir else None,
            echo,
        )
        workers, shares = list(placed.workers), placed.shares
        if memory.window is None and placed.master_window is not None:
            memory = MemoryOptions(placed.master_window, memory.budget, memory.max_context)
    plan = placed.plan if placed is not None else None
    world = len(workers) + 1
    if is_split_dir(model_dir):
        split_dir = model_dir
        if shares:
            raise ModelError(
                "--shares applies when splitting a model; this directory is already split"
            )
        made_index = read_split_index(split_dir)
        made = QuantSpec.from_dict(made_index.get("quant")).mode
        if quant is not None and quant != made:
            raise ModelError(
                f"this directory was split with --quant {made}; --quant {quant} needs a new split"
            )
        if vocab_parallel and not made_index.get("vocab_parallel"):
            raise ModelError(
                "this directory was split without --vocab-parallel; split it again with it"
            )
        if layout is not None:
            raise ModelError(
                "this directory is already split (its stages, if any, are in its split.json): "
                "give the model itself to make a pipeline"
            )
    else:
        load_config(model_dir)  # the most telling error first (missing/unsupported model)
        spec = QuantSpec.for_split(quant or "none", group_size)
        if not workers and not memory.streaming and not spec.quantized:
            tokenizer = TextTokenizer(model_dir)
            engine = load_engine(model_dir, torch_dtype)
            return LoadedModel(model_dir, engine, tokenizer, time.perf_counter() - t0, plan=plan)
        with ProgressReporter("splitting") as progress:
            split_dir = ensure_split(
                model_dir,
                parse_shares(shares, world),
                echo,
                progress,
                quant=spec,
                vocab_parallel=vocab_parallel and world > 1,
                stage_sizes=list(layout.sizes) if layout is not None else None,
                stage_layers=parse_counts(stage_layers) if layout is not None else None,
            )
    index = read_split_index(split_dir)
    rank0 = split_dir / index["ranks"][0]["dir"]
    tokenizer = TextTokenizer(rank0)
    if index["world"] == 1:
        if workers:
            raise ClusterError(f"{split_dir} is split for one rank; it cannot use workers")
        engine, runtime = load_rank0(rank0, torch_dtype, None, memory, echo)
        if prefill_chunks:  # nothing to overlap alone; kept for checking the chunked math
            engine.planner = PrefillPlanner(0.0, 0.0, fixed=prefill_chunks)
        return LoadedModel(
            rank0, engine, tokenizer, time.perf_counter() - t0, runtime=runtime, plan=plan
        )
    secret = require_secret(secret_file, insecure, "the master")
    curve = CurveKeys.load(curve_dir, "master") if curve_dir else None
    with ProgressReporter("pushing shards") as progress:
        cluster = ClusterSession(
            split_dir,
            workers,
            dtype,
            wire_dtype,
            timeout_s,
            echo,
            progress,
            window=memory.window,
            windows=placed.worker_windows if placed is not None else None,
            max_context=memory.max_context,
            secret=secret,
            curve=curve,
            data_link=data_link,
        )
        cluster.start()
    try:
        engine, runtime = load_rank0(rank0, torch_dtype, cluster, memory, echo)
        engine.max_pass_tokens = max(1, MAX_FRAME_BYTES // (4 * engine.cfg.hidden_size))
        for info in cluster.worker_info.values():
            if isinstance(info.get("max_context"), int) and info["max_context"] > 0:
                engine.cap_context(info["max_context"])
        engine.planner = plan_prefill(cluster, engine, prefill_chunks)
    except BaseException:
        cluster.close("master failed to load")
        raise
    if not quiet:
        echo(f"cluster: master + {len(workers)} worker(s) ready ({', '.join(workers)})")
        if memory.streaming:
            for r, info in sorted(cluster.worker_info.items()):
                echo(f"rank {r}: {info.get('plan_text', '?')}")
    return LoadedModel(
        rank0, engine, tokenizer, time.perf_counter() - t0, cluster, runtime, plan=plan
    )


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
