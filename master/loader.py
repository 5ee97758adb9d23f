"""Open what a master command needs: model directory, tokenizer, engine, and
(with --workers) the cluster session behind the engine."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from master.cluster import ClusterSession
from master.engine import Engine, StepListener, load_engine
from master.sampling import SamplingParams, defaults_from_generation_config
from tpi.config import load_config
from tpi.decoder import Collective, Decoder, LocalCollective, ResidentLayers
from tpi.errors import ModelError
from tpi.loading import COMPUTE_DTYPES
from tpi.model_registry import resolve_model
from tpi.partition import parse_shares
from tpi.progress import ProgressReporter
from tpi.shard_reader import RankShard
from tpi.split import ensure_split, is_split_dir, read_split_index
from tpi.tokenizer import TextTokenizer


def _err(msg: str) -> None:
    click.echo(msg, err=True)


@dataclass
class LoadedModel:
    model_dir: Path  # where tokenizer and generation_config live
    engine: Engine
    tokenizer: TextTokenizer
    load_seconds: float
    cluster: ClusterSession | None = None

    def close(self, reason: str = "done") -> None:
        if self.cluster is not None:
            self.cluster.close(reason)
            self.cluster = None


def load_rank0_engine(
    rank_dir: Path, dtype: torch.dtype, collective: Collective, listener: StepListener | None
) -> Engine:
    shard = RankShard(rank_dir)
    cfg = shard.config
    head = shard.load_head(dtype)
    layers = [shard.load_layer(i, dtype) for i in range(cfg.num_layers)]
    decoder = Decoder(cfg, shard.manifest.rank_slice, ResidentLayers(layers), collective, dtype)
    return Engine(cfg, head, decoder, listener)


def open_model(
    model: str | None,
    dtype: str,
    quiet: bool = False,
    workers: list[str] | None = None,
    shares: str | None = None,
    wire_dtype: str = "fp32",
    timeout_s: float = 60.0,
) -> LoadedModel:
    """Resolve --model, and if workers are given, split, connect and load the cluster."""
    echo = (lambda _m: None) if quiet else _err
    with ProgressReporter("converting") as progress:
        model_dir = resolve_model(model, echo, progress)
    t0 = time.perf_counter()
    torch_dtype = COMPUTE_DTYPES[dtype]
    workers = workers or []
    world = len(workers) + 1
    if is_split_dir(model_dir):
        split_dir = model_dir
        if shares:
            raise ModelError(
                "--shares applies when splitting a model; this directory is already split"
            )
    else:
        load_config(model_dir)  # the most telling error first (missing/unsupported model)
        if not workers:
            tokenizer = TextTokenizer(model_dir)
            engine = load_engine(model_dir, torch_dtype)
            return LoadedModel(model_dir, engine, tokenizer, time.perf_counter() - t0)
        with ProgressReporter("splitting") as progress:
            split_dir = ensure_split(model_dir, parse_shares(shares, world), echo, progress)
    index = read_split_index(split_dir)
    rank0 = split_dir / index["ranks"][0]["dir"]
    tokenizer = TextTokenizer(rank0)
    if index["world"] == 1:
        engine = load_rank0_engine(rank0, torch_dtype, LocalCollective(), None)
        return LoadedModel(rank0, engine, tokenizer, time.perf_counter() - t0)
    with ProgressReporter("pushing shards") as progress:
        cluster = ClusterSession(split_dir, workers, dtype, wire_dtype, timeout_s, echo, progress)
        cluster.start()
    try:
        engine = load_rank0_engine(rank0, torch_dtype, cluster.collective, cluster.collective)
    except BaseException:
        cluster.close("master failed to load")
        raise
    if not quiet:
        echo(f"cluster: master + {len(workers)} worker(s) ready ({', '.join(workers)})")
    return LoadedModel(rank0, engine, tokenizer, time.perf_counter() - t0, cluster)


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
