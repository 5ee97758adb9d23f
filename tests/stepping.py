"""Driving an engine (ours or the transformers oracle) step by step, for comparisons."""

from __future__ import annotations

import torch


def step_logits(engine, prompt: list[int], follow: list[int]) -> torch.Tensor:
    """Our logits after the prompt and after each forced follow-up token."""
    rows = [engine.prefill(prompt)]
    for i, t in enumerate(follow):
        rows.append(engine.forward([t], len(prompt) + i))
    return torch.stack(rows)


def hf_step_logits(model, prompt: list[int], follow: list[int]) -> torch.Tensor:
    """The same from a transformers model (incremental, with its KV cache)."""
    rows = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        rows.append(out.logits[0, -1])
        cache = out.past_key_values
        for t in follow:
            out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[0, -1])
    return torch.stack(rows).float()


def greedy(engine, prompt: list[int], steps: int) -> list[int]:
    """Our greedy tokens: prefill, then `steps` argmax tokens (each fed back)."""
    logits, out = engine.prefill(prompt), []
    for i in range(steps):
        t = int(logits.argmax())
        out.append(t)
        logits = engine.forward([t], len(prompt) + i)
    return out


def hf_greedy_cached(model, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy tokens by its forward with a KV cache, token by token.

    For LongRoPE models this, not generate(), is the reference tpi follows: at the
    switch to the long factors generate() recomputes the whole cache
    (Phi3ForCausalLM.prepare_inputs_for_generation), tpi and the plain forward keep
    the keys cached before it (see tpi.model.rope)."""
    out = []
    with torch.no_grad():
        res = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            t = int(res.logits[0, -1].argmax())
            out.append(t)
            res = model(torch.tensor([[t]]), past_key_values=res.past_key_values, use_cache=True)
    return out
