"""What HTTP costs: time to first token and tokens/s through `tpi serve`
(streaming /v1/completions, server-sent events) vs calling the engine directly,
same model, same prompts, one run.

Runs alternate (direct, HTTP, direct, ...) so machine noise hits both alike.
Each repeat uses a different prompt (so neither side reuses a cached prefix) and
greedy decoding of a fixed number of tokens; the direct side also detokenizes,
as the server does, so the difference is HTTP + queue + JSON/SSE only.

    python benchmarks/serve_overhead.py [--model DIR] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TPI_SECRET", "benchmark-only-secret")

from benchmarks.common import median, write_result  # noqa: E402

TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the "
    "steps and listening to the sea below, and on this night he noticed that"
)


def _prompt(r: int) -> str:
    return f"Story number {r + 1}. {TEXT}"


def _direct(loaded, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, decode_tokens_per_s, tokens) from the engine itself."""
    from tpi.master.generation import generate_tokens
    from tpi.master.sampling import SamplingParams
    from tpi.text.tokenizer import StreamDecoder

    loaded.engine.reset()
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    decoder = StreamDecoder(loaded.tokenizer)
    t0 = time.perf_counter()
    first = None
    n = 0
    for token in generate_tokens(
        loaded.engine, loaded.tokenizer.encode(prompt), params, loaded.tokenizer.eos_ids
    ):
        decoder.push(token)
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first), n


def _http(client, base: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """The same through a streaming /v1/completions request."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = None
    chunks = 0
    usage_tokens = None
    with client.stream("POST", base + "/v1/completions", json=body, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0].get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    n = usage_tokens if usage_tokens is not None else chunks
    return first - t0, (n - 1) / (end - first), n


@click.command()
@click.option("--model", default=None, help="Model dir (default: the embedded SmolLM2).")
@click.option("--new-tokens", default=64, show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option(
    "--threads",
    type=int,
    default=None,
    help="Torch threads for both sides (default: all cores). With all cores busy "
    "computing, the server's event loop and the client compete with torch for CPU.",
)
@click.option("--out", default=None, help="Output JSON path.")
def main(model, new_tokens, repeats, threads, out):
    import httpx
    import torch

    from tests.serve_helpers import free_port
    from tpi.master.loader import open_model

    if threads:
        torch.set_num_threads(threads)
    loaded = open_model(model, "fp32", quiet=True)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "tpi"), "serve", "--port", str(port)]
    if model:
        cmd += ["--model", model]
    if threads:
        cmd += ["--threads", str(threads)]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client() as client:
            for _ in range(600):
                try:
                    if client.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise click.ClickException("tpi serve exited during startup")
                time.sleep(0.2)
            _direct(loaded, "warm up", 4)
            _http(client, base, "warm up", 4)
            runs = {"direct": [], "http": []}
            for r in range(repeats):
                runs["direct"].append(_direct(loaded, _prompt(r), new_tokens))
                runs["http"].append(_http(client, base, _prompt(r), new_tokens))
                click.echo(f"repeat {r + 1}/{repeats}: {runs['direct'][-1]} {runs['http'][-1]}")
    finally:
        server.terminate()
        server.wait(30)
        loaded.close()
    summary = {}
    for side, xs in runs.items():
        summary[side] = {
            "ttft_ms": round(median([x[0] for x in xs]) * 1e3, 1),
            "decode_tokens_per_s": round(median([x[1] for x in xs]), 2),
            "tokens": [x[2] for x in xs],
        }
    d, h = summary["direct"], summary["http"]
    result = {
        "model": model or "embedded SmolLM2-135M-Instruct",
        "new_tokens": new_tokens,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        **summary,
        "ttft_overhead": round(h["ttft_ms"] / d["ttft_ms"] - 1, 4),
        "throughput_overhead": round(1 - h["decode_tokens_per_s"] / d["decode_tokens_per_s"], 4),
        "raw": runs,
    }
    name = "serve_overhead" + (f"_threads{threads}" if threads else "")
    path = write_result(name, result, out)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
