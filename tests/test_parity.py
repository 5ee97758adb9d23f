"""The engine against Hugging Face transformers on the same safetensors."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FAMILY_FIXTURES
from tests.factories import load_reference, make_model
from tests.stepping import greedy, hf_greedy_cached, hf_step_logits, step_logits
from tpi.master.engine import load_engine

PREFILL = 20
DECODE = 16


def _greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    if (getattr(model.config, "rope_parameters", None) or {}).get("rope_type") == "longrope":
        return hf_greedy_cached(model, prompt, steps)  # see its docstring
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "fixture", ["llama_dir", "qwen2_dir", "llama3_dir", *FAMILY_FIXTURES, "phi4_mini"]
)
def test_fp32_logits_and_greedy_tokens_match_transformers(fixture, request, tmp_path):
    if fixture == "phi4_mini":  # Phi-3 layout, rotating only 3/4 of each head
        model_dir = make_model(tmp_path / "m", "phi4mini", seed=17)
    else:
        model_dir = request.getfixturevalue(fixture)
    ref = load_reference(model_dir)
    engine = load_engine(model_dir)
    vocab = ref.config.vocab_size
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, vocab, (PREFILL,), generator=g).tolist()
    follow = torch.randint(3, vocab, (DECODE,), generator=g).tolist()

    diff = (step_logits(engine, prompt, follow) - hf_step_logits(ref, prompt, follow)).abs().max()
    assert diff <= 1e-4, f"max abs logit diff {diff}"

    engine.reset()
    assert greedy(engine, prompt, 32) == _greedy_reference(ref, prompt, 32)


def test_prefill_all_logits_match_transformers(llama_dir):
    ref = load_reference(llama_dir)
    engine = load_engine(llama_dir)
    ids = list(range(5, 45))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (engine.forward(ids, 0, all_logits=True) - expected).abs().max() <= 1e-4


def test_sharded_bf16_checkpoint_loads_and_matches(tmp_path):
    """bf16 weights on disk, split across several safetensors files with an index."""
    d = make_model(tmp_path / "m", "llama", dtype=torch.bfloat16, max_shard_size="100KB", seed=3)
    assert (d / "model.safetensors.index.json").is_file()
    ref = load_reference(d, torch.float32)  # same bf16 values, computed in fp32
    engine = load_engine(d)
    prompt = list(range(10, 30))
    assert greedy(engine, prompt, 32) == _greedy_reference(ref, prompt, 32)


def test_mistral_sliding_window_matches_transformers(tmp_path):
    """A window shorter than the sequence: masks must drop keys older than the window."""
    d = make_model(tmp_path / "m", "mistral", sliding_window=8, seed=4)
    ref = load_reference(d)
    engine = load_engine(d)
    prompt = list(range(5, 25))
    follow = list(range(40, 50))
    diff = (step_logits(engine, prompt, follow) - hf_step_logits(ref, prompt, follow)).abs().max()
    assert diff <= 1e-4


def test_bf16_is_no_less_accurate_than_transformers_bf16(llama_dir):
    """bf16 tolerance, justified: our bf16 logits may deviate from the fp32 truth
    by at most 1.5x what transformers' own bf16 path deviates (plus a small floor);
    a bf16 bug (e.g. a norm done in bf16) blows far past that."""
    prompt = list(range(7, 27))
    follow = list(range(50, 66))
    truth = hf_step_logits(load_reference(llama_dir, torch.float32), prompt, follow)
    hf_bf16 = hf_step_logits(load_reference(llama_dir, torch.bfloat16), prompt, follow)
    ours = step_logits(load_engine(llama_dir, torch.bfloat16), prompt, follow)
    hf_err = (hf_bf16 - truth).abs().max().item()
    our_err = (ours - truth).abs().max().item()
    assert our_err <= 1.5 * hf_err + 0.02, f"ours {our_err} vs transformers bf16 {hf_err}"
    # And bf16 is genuinely bf16 (not silently fp32): some error must exist.
    assert our_err > 0
