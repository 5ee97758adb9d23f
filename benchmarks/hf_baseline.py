"""transformers baselines, one per process (so peak RSS is its own):
full model resident, or accelerate disk offload under a memory limit.

Prints one JSON line: ms/token, TTFT, peak RSS.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@click.command()
@click.argument("model_dir")
@click.option("--mode", type=click.Choice(["full", "offload"]), required=True)
@click.option(
    "--max-memory", default=None, help="CPU memory for accelerate (offload mode), e.g. 3GiB."
)
@click.option("--prompt-tokens", default=16)
@click.option("--new-tokens", default=3)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="bf16")
def main(model_dir, mode, max_memory, prompt_tokens, new_tokens, dtype):
    from transformers import AutoModelForCausalLM

    from tpi.system.process_memory import peak_rss_bytes

    warnings.filterwarnings("ignore")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=Path(model_dir).parent) as offload:
        kwargs = {"dtype": torch_dtype}
        if mode == "offload":
            kwargs.update(device_map="auto", max_memory={"cpu": max_memory}, offload_folder=offload)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
        load_s = time.perf_counter() - t0
        vocab = model.config.vocab_size
        ids = torch.randint(
            10, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            t1 = time.perf_counter()
            out = model(ids, use_cache=True)
            ttft = time.perf_counter() - t1
            cache = out.past_key_values
            t2 = time.perf_counter()
            for _ in range(new_tokens):
                tok = out.logits[:, -1:].argmax(-1)
                out = model(tok, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            decode = time.perf_counter() - t2
    print(
        json.dumps(
            {
                "mode": mode,
                "max_memory": max_memory,
                "load_seconds": round(load_s, 2),
                "ttft_ms": round(1000 * ttft, 1),
                "decode_ms_per_token": round(1000 * decode / new_tokens, 1),
                "peak_rss_bytes": peak_rss_bytes(),
            }
        )
    )


if __name__ == "__main__":
    main()
