"""Batched decode and continuous batching: every sequence of a batch gets what it
gets alone (tokens, logits, seeded samples), on one node and on a cluster."""

from __future__ import annotations

import pytest
import torch

from tests.cluster_helpers import addresses, cluster_model, local_workers
from tpi.master.batching import Batcher, BatchSequence
from tpi.master.engine import BatchRow, load_engine
from tpi.master.generation import generate_tokens
from tpi.master.kv_budget import KVBudgetError
from tpi.master.loader import MemoryOptions
from tpi.master.sampling import Sampler, SamplingParams
from tpi.model.batch import BatchStep, BatchStepError, Segment

STEPS = 32
# Different lengths, so sequences sit at different positions in every step.
PROMPTS = [list(range(5, 8)), list(range(30, 47)), list(range(60, 100)), [9, 3, 9, 3, 2]]
GREEDY = SamplingParams(max_new_tokens=STEPS)


def alone(engine, prompt, params) -> list[int]:
    engine.reset()
    return list(generate_tokens(engine, prompt, params))


def batched(engine, seqs: list[BatchSequence], join_late: dict[int, int] | None = None, **kw):
    """Run `seqs` through a Batcher; join_late[i] = the step at which seq i is submitted."""
    join_late = join_late or {}
    b = Batcher(engine, **kw)
    for i, s in enumerate(seqs):
        if i not in join_late:
            b.submit(s)
    step = 0
    while b.busy or any(k >= step for k in join_late.values()):
        for i, at in join_late.items():
            if at == step:
                b.submit(seqs[i])
        b.step()
        step += 1
        assert step < 10 * STEPS * len(seqs), "the batch never finished"
    return b


def seqs_for(params_list) -> list[BatchSequence]:
    return [BatchSequence(list(p), params) for p, params in zip(PROMPTS, params_list, strict=True)]


def test_plan_cuts_and_checks():
    plan = BatchStep(tuple(Segment(i, 10 + i, 1) for i in range(8)))
    assert [(p.start, p.end) for p in plan.pieces(2)] == [(0, 4), (4, 8)]
    one = BatchStep.single(7, 10)
    assert [(p.segments[0].pos, p.segments[0].length) for p in one.pieces(3)] == [
        (7, 4),
        (11, 3),
        (14, 3),
    ]
    mixed = BatchStep((Segment(0, 0, 100), Segment(1, 5, 1), Segment(2, 9, 1)), release=(4,))
    assert BatchStep.from_ints(mixed.to_ints(), 102) == mixed
    assert [len(p.segments) for p in mixed.pieces(2)] == [1, 2]  # never an empty piece
    for bad, rows in ([0, 0, 5, 0], 0), ([0, 0, 5, 3], 4), ([1], 3), ([0, 5000, 0, 1], 1):
        with pytest.raises(BatchStepError):
            BatchStep.from_ints(bad, rows)


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen2_dir", "smollm_dir"])
def test_every_sequence_of_a_batch_gets_its_greedy_tokens_alone(fixture, request):
    engine = load_engine(request.getfixturevalue(fixture))
    params = [
        SamplingParams(max_new_tokens=10),  # leaves early
        GREEDY,
        GREEDY,
        GREEDY,
    ]
    expected = [alone(engine, p, prm) for p, prm in zip(PROMPTS, params, strict=True)]
    engine.reset()
    seqs = seqs_for(params)
    # Sequence 3 joins mid-batch; prompts are fed in chunks of 8 mixed into decode steps.
    b = batched(engine, seqs, join_late={3: 6}, max_batch=4, prefill_chunk=8)
    assert [s.tokens for s in seqs] == expected
    assert all(s.stats.stop_reason == "length" for s in seqs)
    assert b.steps < sum(len(t) for t in expected)  # steps were shared


def test_batched_logits_are_the_logits_alone(llama_dir):
    engine = load_engine(llama_dir)
    alone_rows = []
    for p in PROMPTS:
        engine.reset()
        alone_rows.append(
            [engine.prefill(p)] + [engine.forward([7 + i], len(p) + i) for i in range(4)]
        )
    engine.reset()
    got = [engine.step_logits([BatchRow(i, p, 0) for i, p in enumerate(PROMPTS)])]
    for i in range(4):
        got.append(
            engine.step_logits([BatchRow(k, [7 + i], len(p) + i) for k, p in enumerate(PROMPTS)])
        )
    for k in range(len(PROMPTS)):
        mine = torch.stack([g[k] for g in got])
        assert (mine - torch.stack(alone_rows[k])).abs().max() <= 1e-4


def test_seeded_sampling_in_a_batch_matches_alone(llama_dir):
    engine = load_engine(llama_dir)
    params = [
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=s, max_new_tokens=STEPS)
        for s in (1, 2, 3, 4)
    ]
    expected = [alone(engine, p, prm) for p, prm in zip(PROMPTS, params, strict=True)]
    engine.reset()
    seqs = seqs_for(params)
    batched(engine, seqs, max_batch=4, prefill_chunk=16)
    assert [s.tokens for s in seqs] == expected


def test_stop_tokens_cancel_and_slot_reuse(llama_dir):
    engine = load_engine(llama_dir)
    ref = alone(engine, PROMPTS[1], GREEDY)
    engine.reset()
    stop = ref[5]
    seqs = [
        BatchSequence(PROMPTS[1], GREEDY, stop_ids=frozenset({stop})),
        BatchSequence(PROMPTS[2], GREEDY),
        BatchSequence(PROMPTS[0], GREEDY),
    ]
    b = Batcher(engine, max_batch=2, prefill_chunk=0)
    for s in seqs:
        b.submit(s)
    b.step()
    assert len(b.running) == 2 and len(b.waiting) == 1  # max batch 2: the third waits
    seqs[1].cancel.set()  # a client that left: its slot goes to the waiting one
    b.step()
    assert seqs[1].stats.stop_reason == "cancelled" and seqs[2] in b.running
    while b.busy:
        b.step()
    assert seqs[0].tokens == ref[: ref.index(stop)] and seqs[0].stats.stop_reason == "eos"
    assert seqs[2].tokens == alone(load_engine(llama_dir), PROMPTS[0], GREEDY)


def test_kv_budget_admits_what_fits_and_refuses_what_never_can(llama_dir):
    engine = load_engine(llama_dir)
    per_pos = engine.decoder.caches.bytes_per_position
    # Room for two sequences' worst case (256 positions each), not three.
    b = Batcher(engine, max_batch=4, kv_budget_bytes=2 * 256 * per_pos + per_pos)
    seqs = [BatchSequence(p, SamplingParams(max_new_tokens=8)) for p in PROMPTS[:3]]
    for s in seqs:
        b.submit(s)
    b.step()
    assert len(b.running) == 2 and len(b.waiting) == 1
    assert b.kv_in_use <= b.kv_budget_bytes
    while b.busy:
        b.step()
        assert b.kv_in_use <= b.kv_budget_bytes
    assert all(s.stats.stop_reason == "length" for s in seqs)
    small = Batcher(engine, max_batch=4, kv_budget_bytes=200 * per_pos)
    with pytest.raises(KVBudgetError):  # even alone it may need 256 positions
        small.submit(BatchSequence(PROMPTS[0], SamplingParams(max_new_tokens=8)))


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with local_workers(2, tmp_path_factory.mktemp("batch-workers")) as lc:
        yield addresses(lc)


CLUSTER_CASES = {
    "resident": {},
    "window1-int8": {"quant": "int8", "memory": MemoryOptions(window=1)},
    "vocab-parallel": {"vocab_parallel": True},
    "bf16-wire-nano": {"wire_dtype": "bf16", "prefill_chunks": 2},
}


@pytest.mark.parametrize("case", list(CLUSTER_CASES))
def test_world_3_batches_give_each_sequence_its_tokens_alone(case, llama_dir, workers):
    kw = CLUSTER_CASES[case]
    sampled = [
        GREEDY,
        SamplingParams(temperature=0.8, top_p=0.5, seed=7, max_new_tokens=STEPS),
        GREEDY,
        SamplingParams(temperature=1.0, top_k=5, seed=9, max_new_tokens=12),
    ]
    with cluster_model(llama_dir, workers, **kw) as lm:
        expected = [alone(lm.engine, p, prm) for p, prm in zip(PROMPTS, sampled, strict=True)]
        lm.engine.reset()
        if case.endswith("nano"):
            lm.engine.chunking.fixed_nano = 2  # batches cut into two overlapping nano-batches
        seqs = seqs_for(sampled)
        batched(lm.engine, seqs, join_late={2: 4}, max_batch=4, prefill_chunk=8)
        assert [s.tokens for s in seqs] == expected
        # Workers freed the caches of sequences that ended (released with later steps).
        stats = lm.cluster.stats()
        assert all(s["steps"] > 0 for s in stats.values())


def test_a_released_slot_is_fresh_on_every_rank(llama_dir, workers):
    with cluster_model(llama_dir, workers) as lm:
        e = lm.engine
        expected = alone(e, PROMPTS[2], GREEDY)
        e.reset()
        sampler = Sampler(GREEDY)
        e.step([BatchRow(3, PROMPTS[1], 0, sampler)])
        e.free(3)
        # Slot 3 again, a new sequence from position 0: no trace of the old one.
        seq = BatchSequence(PROMPTS[2], GREEDY)
        b = Batcher(e, max_batch=4)
        b._free = [3]
        b.submit(seq)
        while b.busy:
            b.step()
        assert seq.tokens == expected


def test_generate_prompts_file_answers_each_line_as_alone(llama_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from tpi.cli import cli

    prompts = ["hello there", "a b c d e f g", "x"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")
    base = ["generate", "--model", str(llama_dir), "-t", "0", "-n", "8", "--raw"]
    alone_text = []
    for p in prompts:
        res = CliRunner().invoke(cli, [*base, p], catch_exceptions=False)
        assert res.exit_code == 0
        alone_text.append(res.stdout[:-1])
    res = CliRunner().invoke(cli, [*base, "--prompts-file", str(f), "--max-batch", "2", "--stats"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == prompts
    assert [x["text"] for x in lines] == alone_text
    assert "tok/s together" in res.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    res = CliRunner().invoke(cli, [*base, "--prompts-file", str(empty)])
    assert res.exit_code != 0 and "holds no prompt" in res.output


def test_one_node_int8_window_1_batches_give_each_sequence_its_tokens_alone(llama_dir):
    from tpi.master.loader import open_model

    lm = open_model(str(llama_dir), "fp32", quiet=True, quant="int8", memory=MemoryOptions(1))
    try:
        assert lm.runtime.memory.window == 1
        expected = [alone(lm.engine, p, GREEDY) for p in PROMPTS]
        lm.engine.reset()
        seqs = seqs_for([GREEDY] * len(PROMPTS))
        batched(lm.engine, seqs, join_late={1: 3}, max_batch=4, prefill_chunk=8)
        assert [s.tokens for s in seqs] == expected
    finally:
        lm.close()
