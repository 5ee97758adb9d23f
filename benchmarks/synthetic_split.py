"""A synthetic int4 (or int8) model written straight into a split (no checkpoint on disk), for
benchmarks whose models are too big to exist as a checkpoint here: the model card
(config.json and a small real tokenizer: the benchmarks feed random token ids) and
the split, through tpi.storage.direct_split like any split."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import click


def model_card(work: Path, name: str, raw: dict) -> Path:
    """WORK/card-NAME: config.json and a tokenizer, made once."""
    from tests.factories import make_tokenizer

    card = work / f"card-{name}"
    if not (card / "tokenizer.json").is_file():
        card.mkdir(parents=True, exist_ok=True)
        (card / "config.json").write_text(json.dumps(raw, indent=1))
        make_tokenizer(card)
    return card


def write_synthetic_split(
    out: Path,
    raw: dict,
    partition: Callable,
    *,
    card: Path,
    model_id: str,
    seed: int,
    what: str,
    quant: str = "int4",
) -> Path:
    """The model of HF config `raw` in int4 (groups of 32; or per-row int8 with
    `quant="int8"`), random with `seed`, as the split `partition(cfg)` makes, at
    OUT (kept if already complete)."""
    import torch

    from tpi.model.config import parse_config
    from tpi.progress import ProgressReporter
    from tpi.quant.quantize import QuantSpec
    from tpi.sources.synthetic import LAYOUT, SyntheticInt4Model, SyntheticInt8Model
    from tpi.storage.direct_split import write_split

    cfg = parse_config(raw)
    if quant not in ("int4", "int8"):
        raise click.UsageError(f"synthetic splits are int4 or int8, not {quant!r}")
    kind = SyntheticInt8Model if quant == "int8" else SyntheticInt4Model
    model = kind(cfg, seed=seed)
    t0 = time.perf_counter()
    with ProgressReporter(f"writing {what}") as progress:
        write_split(
            out,
            cfg,
            partition(cfg),
            model.layer,
            model.head,
            model_id=model_id,
            dtype=torch.float32,
            quant=QuantSpec("int8") if quant == "int8" else QuantSpec("int4", 32, LAYOUT.name),
            master_dir=card,
            progress=progress,
        )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    click.echo(f"split {out}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", err=True)
    return out
