"""The decode loop and chat session: prefix reuse, limits, stopping, history."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.factories import load_reference
from tests.stepping import greedy
from tpi.comm.links import ClusterError, LinkLost
from tpi.errors import PromptError
from tpi.master.chat_session import ChatSession
from tpi.master.engine import load_engine
from tpi.master.generation import GenerationStats, generate_tokens
from tpi.master.sampling import SamplingParams
from tpi.text.tokenizer import TextTokenizer

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


def test_prefix_reuse_gives_the_same_logits_as_a_fresh_run(llama_dir):
    engine = load_engine(llama_dir)
    a = list(range(10, 30))
    b = a + list(range(40, 50))
    engine.prefill(a)
    reused = engine.prefill(b)
    assert engine.last_reused == len(a)
    fresh = load_engine(llama_dir).prefill(b)
    assert torch.allclose(reused, fresh, atol=1e-5)
    # Diverging prompt: only the common prefix is kept.
    c = a[:5] + [99] * 10
    out = engine.prefill(c)
    assert engine.last_reused == 5
    assert torch.allclose(out, load_engine(llama_dir).prefill(c), atol=1e-5)


def test_generate_matches_reference_and_respects_limits(llama_dir):
    engine = load_engine(llama_dir)
    ref = load_reference(llama_dir)
    prompt = list(range(3, 13))
    stats = GenerationStats()
    got = list(generate_tokens(engine, prompt, GREEDY, frozenset(), stats))
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert got == expected
    assert stats.new_tokens == 8 and stats.stop_reason == "length" and stats.decode_steps == 7


def test_stop_token_ends_generation_and_is_not_yielded(llama_dir):
    engine = load_engine(llama_dir)
    prompt = list(range(3, 13))
    free = list(generate_tokens(engine, prompt, GREEDY))
    stop = free[3]
    stats = GenerationStats()
    got = list(generate_tokens(engine, prompt, GREEDY, {stop}, stats))
    assert got == free[: free.index(stop)]
    assert stats.stop_reason == "eos"


def test_cancel_stops_between_tokens(llama_dir):
    engine = load_engine(llama_dir)
    cancel = threading.Event()
    stats = GenerationStats()
    out = []
    for t in generate_tokens(
        engine, [5, 6, 7], SamplingParams(max_new_tokens=50), frozenset(), stats, cancel
    ):
        out.append(t)
        if len(out) == 3:
            cancel.set()
    assert len(out) == 3 and stats.stop_reason == "cancelled"


def test_cancel_set_before_the_answer_still_runs_the_prompt_and_gives_a_token(llama_dir):
    cancel = threading.Event()
    cancel.set()
    stats = GenerationStats()
    out = list(
        generate_tokens(load_engine(llama_dir), [5, 6, 7], GREEDY, frozenset(), stats, cancel)
    )
    assert len(out) == 1 and stats.stop_reason == "cancelled" and stats.decode_steps == 0


@pytest.mark.parametrize(("max_pass", "passes"), [(None, 1), (16, 3)])
def test_a_prompt_runs_whole_cut_only_by_the_largest_pass(llama_dir, max_pass, passes):
    prompt = list(range(3, 43))
    reference = load_engine(llama_dir)
    reference.max_pass_tokens = max_pass
    expected = greedy(reference, prompt, 6)
    engine = load_engine(llama_dir)
    engine.max_pass_tokens = max_pass
    gen = generate_tokens(engine, prompt, SamplingParams(max_new_tokens=6))
    first = next(gen)  # the token after the prompt comes with the prompt's last pass
    assert engine.steps == passes
    assert [first, *gen] == expected
    assert engine.steps == passes + 5


def _flaky(model_dir, fail_at: set[int]):
    """An engine whose passes number `fail_at` (counted from 1) lose a rank."""
    engine = load_engine(model_dir)
    step, calls = engine.step, []

    def flaky_step(rows):
        calls.append(rows)
        if len(calls) in fail_at:
            raise LinkLost(1, "a:1", "killed")
        return step(rows)

    engine.step = flaky_step
    return engine


def test_a_lost_rank_in_the_prompt_and_mid_answer_is_a_pause_with_the_same_tokens(llama_dir):
    params = SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_new_tokens=12)
    prompt = list(range(5, 25))
    expected = list(generate_tokens(load_engine(llama_dir), prompt, params))
    # The first engine fails in the prompt, the second at its third decode step.
    engines = [_flaky(llama_dir, {4}), load_engine(llama_dir)]
    stats = GenerationStats()
    got = generate_tokens(
        _flaky(llama_dir, {1}), prompt, params, stats=stats, recover=lambda e: engines.pop(0)
    )
    assert list(got) == expected
    assert not engines and stats.new_tokens == 12 and stats.decode_steps == 11


def test_a_cluster_that_keeps_failing_is_given_up(llama_dir):
    engine = _flaky(llama_dir, set(range(1, 100)))
    recovered = []

    def recover(e):
        recovered.append(e)
        return engine

    with pytest.raises(ClusterError, match="gave up after 8 recoveries"):
        list(generate_tokens(engine, [5, 6, 7], GREEDY, recover=recover))
    assert len(recovered) == 8


def test_prompt_errors(llama_dir):
    engine = load_engine(llama_dir)
    with pytest.raises(PromptError, match="empty"):
        list(generate_tokens(engine, [], GREEDY))
    with pytest.raises(PromptError, match="context window"):
        list(generate_tokens(engine, [5] * engine.max_positions, GREEDY))
    # Near the end of the context the budget shrinks instead of overflowing.
    out = list(
        generate_tokens(engine, [5] * (engine.max_positions - 3), SamplingParams(max_new_tokens=50))
    )
    assert len(out) == 3


def test_chat_session_keeps_history_and_reuses_the_cache(llama_dir):
    tok = TextTokenizer(llama_dir)
    session = ChatSession(load_engine(llama_dir), tok, GREEDY)
    s1, s2 = GenerationStats(), GenerationStats()
    first = "".join(session.ask("Hello world", s1))
    second = "".join(session.ask("What is the capital of France?", s2))
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first and session.history[3]["content"] == second
    # The second prompt starts with the whole first exchange, whose KV is reused.
    assert s2.reused_tokens >= s1.prompt_tokens
    # Same answer as a fresh session given the same history (reuse changes nothing).
    fresh = ChatSession(load_engine(llama_dir), tok, GREEDY, history=session.history[:2])
    assert "".join(fresh.ask("What is the capital of France?", GenerationStats())) == second
    session.reset()
    assert session.history == [] and session.engine.cached == []


def test_chat_session_drops_old_turns_to_fit_the_context(llama_dir):
    tok = TextTokenizer(llama_dir)
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    session = ChatSession(load_engine(llama_dir), tok, params)
    long_text = "Tensor parallelism splits every layer across devices. " * 4
    for _ in range(6):
        "".join(session.ask(long_text, GenerationStats()))
    assert session.dropped_turns > 0
    assert session.history[-2]["content"] == long_text
    with pytest.raises(PromptError):
        "".join(session.ask("word " * 400, GenerationStats()))
