"""Single-node speed: tpi vs transformers on the same weights and prompt, one run.

Runs are interleaved (tpi, transformers, tpi, ...) so machine noise hits both
alike; medians and ratios go to benchmarks/results/single_node.json.

    python benchmarks/single_node.py [--model DIR] [--dtype fp32|bf16]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import median, write_result  # noqa: E402


def _tpi_run(engine, prompt: list[int], new: int) -> tuple[float, float]:
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)
    t1 = time.perf_counter()
    for i in range(new):
        logits = engine.forward([int(logits.argmax())], len(prompt) + i)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _hf_run(model, prompt: list[int], new: int) -> tuple[float, float]:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True)
        t1 = time.perf_counter()
        cache = out.past_key_values
        for _ in range(new):
            tok = out.logits[:, -1:].argmax(-1)
            out = model(tok, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


@click.command()
@click.option(
    "--model", default=None, help="Model dir (default: the embedded SmolLM2-135M-Instruct)."
)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32")
@click.option("--prompt-tokens", default=128, show_default=True)
@click.option("--new-tokens", default=64, show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--out", default=None, help="Output JSON path.")
def main(model, dtype, prompt_tokens, new_tokens, repeats, out):
    import warnings

    from transformers import AutoModelForCausalLM

    from tpi.dtypes import COMPUTE_DTYPES
    from tpi.master.engine import load_engine
    from tpi.sources.model_registry import resolve_model

    warnings.filterwarnings("ignore")
    model_dir = resolve_model(model, lambda m: click.echo(m, err=True))
    torch_dtype = COMPUTE_DTYPES[dtype]
    engine = load_engine(model_dir, torch_dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, engine.cfg.vocab_size, (prompt_tokens,), generator=g).tolist()
    _tpi_run(engine, prompt[:16], 4)  # warm-up both
    _hf_run(hf, prompt[:16], 4)
    runs = {"tpi": [], "transformers": []}
    for r in range(repeats):
        runs["tpi"].append(_tpi_run(engine, prompt, new_tokens))
        runs["transformers"].append(_hf_run(hf, prompt, new_tokens))
        click.echo(
            f"repeat {r + 1}/{repeats}: tpi {runs['tpi'][-1]}, hf {runs['transformers'][-1]}",
            err=True,
        )
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "prefill_tokens_per_s": round(prompt_tokens / median([p for p, _ in rs]), 1),
            "decode_ms_per_token": round(1000 * median([d for _, d in rs]) / new_tokens, 2),
        }
    ratio = {
        "decode_ms_tpi_over_transformers": round(
            summary["tpi"]["decode_ms_per_token"] / summary["transformers"]["decode_ms_per_token"],
            3,
        ),
        "prefill_speed_tpi_over_transformers": round(
            summary["tpi"]["prefill_tokens_per_s"]
            / summary["transformers"]["prefill_tokens_per_s"],
            3,
        ),
    }
    path = write_result(
        f"single_node_{dtype}",
        {
            "model": str(model_dir),
            "dtype": dtype,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "results": summary,
            "ratios": ratio,
            "target": "tpi decode within 1.2x of transformers (ratio <= 1.2)",
        },
        out,
    )
    click.echo(f"{summary}\n{ratio}\nwrote {path}")


if __name__ == "__main__":
    main()
