"""`tpi perplexity`: how well a model (or a quantized split of it) predicts a text.

exp(mean negative log-likelihood of each token given the ones before it), in
windows of the context length when the text is longer. Handy to see what
--quant costs on your own text before choosing it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import torch

from tpi.cli_options import apply
from tpi.master.cli_options import ENGINE_OPTIONS, open_from_options


def negative_log_likelihoods(engine, ids: list[int], window: int) -> torch.Tensor:
    """-log p(ids[i] | ids[:i]) for i >= 1, in float64, window by window."""
    out = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        engine.reset()
        logits = engine.forward(chunk[:-1], 0, all_logits=True).double()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(chunk[1:])
        out.append(-logp[torch.arange(len(target)), target])
    return torch.cat(out)


def perplexity(engine, ids: list[int], window: int | None = None) -> float:
    window = min(window or engine.max_positions, engine.max_positions) - 1
    return math.exp(float(negative_log_likelihoods(engine, ids, window).mean()))


@click.command("perplexity")
@click.argument("text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@apply(ENGINE_OPTIONS)
@click.option(
    "--score-window",
    type=click.IntRange(min=2),
    default=None,
    help="Tokens of context per scoring window (default: the model's context).",
)
def perplexity_cmd(text_file: Path, score_window: int | None, **opts) -> None:
    """Perplexity of the model on TEXT_FILE (lower is better), as JSON.

    Compare e.g. '--quant none' with '--quant int8' and '--quant int4' on the same text."""
    loaded = open_from_options(opts)
    ids = loaded.tokenizer.encode(text_file.read_text())
    if len(ids) < 2:
        raise click.ClickException(f"{text_file} holds fewer than two tokens")
    ppl = perplexity(loaded.engine, ids, score_window)
    click.echo(json.dumps({"tokens": len(ids), "perplexity": round(ppl, 4)}))
