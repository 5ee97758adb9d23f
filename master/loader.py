"""Open what a master command needs: model directory, tokenizer, engine."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import click

from master.engine import Engine, load_engine
from master.sampling import SamplingParams, defaults_from_generation_config
from tpi.config import load_config
from tpi.loading import COMPUTE_DTYPES
from tpi.model_registry import resolve_model
from tpi.progress import ProgressReporter
from tpi.tokenizer import TextTokenizer


def _err(msg: str) -> None:
    click.echo(msg, err=True)


@dataclass
class LoadedModel:
    model_dir: Path
    engine: Engine
    tokenizer: TextTokenizer
    load_seconds: float


def open_model(model: str | None, dtype: str, quiet: bool = False) -> LoadedModel:
    echo = (lambda _m: None) if quiet else _err
    with ProgressReporter("converting") as progress:
        model_dir = resolve_model(model, echo, progress)
    t0 = time.perf_counter()
    load_config(model_dir)  # the most telling error first (missing/unsupported model)
    tokenizer = TextTokenizer(model_dir)
    engine = load_engine(model_dir, COMPUTE_DTYPES[dtype])
    return LoadedModel(model_dir, engine, tokenizer, time.perf_counter() - t0)


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
