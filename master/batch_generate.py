"""`tpi generate --prompts-file`: many prompts through one batch, offline.

Every prompt is a sequence of the continuous batcher (tpi.master.batching), so
the weights are read once per step for all of them; each answer is the one the
prompt gets alone. Answers are written as JSON lines, in the order of the file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from tpi.errors import PromptError
from tpi.master.batching import Batcher, BatchSequence
from tpi.master.sampling import SamplingParams
from tpi.text.tokenizer import StreamDecoder


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read prompts from {path}: {e}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise PromptError(f"{path} holds no prompt (one per line)")
    return prompts


def run_prompts(
    loaded,
    prompts: list[str],
    to_ids: Callable[[str], list[int]],
    params: SamplingParams,
    max_batch: int,
    write: Callable[[str], None],
    recover: Callable | None = None,
) -> dict:
    """Generate every prompt's answer in batches of `max_batch`; write one JSON line
    per answer (in the file's order); return the aggregate figures."""
    tok = loaded.tokenizer
    seqs = [BatchSequence(to_ids(p), params, frozenset(tok.eos_ids)) for p in prompts]
    batcher = Batcher(loaded.engine, max_batch=max_batch, recover=recover)
    for s in seqs:
        batcher.submit(s)
    t0 = time.perf_counter()
    written = 0
    while batcher.busy:
        batcher.step()
        while written < len(seqs) and seqs[written].done.is_set():  # in order, as they end
            s = seqs[written]
            decoder = StreamDecoder(tok)
            text = "".join(decoder.push(t) for t in s.tokens) + decoder.flush()
            st = s.stats
            line = {
                "index": written,
                "prompt": prompts[written],
                "text": text,
                "finish_reason": st.stop_reason,
                "prompt_tokens": st.prompt_tokens,
                "completion_tokens": st.new_tokens,
                "ttft_s": round(st.prefill_seconds, 3),
                "tokens_per_second": round(st.decode_tokens_per_second, 2),
            }
            write(json.dumps(line, ensure_ascii=False))
            written += 1
    wall = time.perf_counter() - t0
    total = sum(s.stats.new_tokens for s in seqs)
    return {
        "prompts": len(seqs),
        "new_tokens": total,
        "seconds": round(wall, 3),
        "aggregate_tokens_per_second": round(total / wall, 2) if wall > 0 else 0.0,
        "steps": batcher.steps,
    }
