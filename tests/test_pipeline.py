"""Pipeline and hybrid (TP x PP) plans: stage layouts, stage-only shards, and the
same tokens and logits as a single node through real worker processes."""

from __future__ import annotations

import signal
import time

import pytest

from tests.cluster_helpers import addresses, cluster_model, local_workers
from tests.factories import load_reference, make_model
from tests.stepping import greedy, hf_step_logits, step_logits
from tpi.comm.links import ClusterError
from tpi.errors import ModelError
from tpi.master.engine import BatchRow, load_engine
from tpi.master.generation import generate_tokens
from tpi.master.loader import MemoryOptions, open_model, pipeline_layout
from tpi.master.sampling import Sampler, SamplingParams
from tpi.model.config import load_config
from tpi.model.partition import PartitionError
from tpi.model.pipeline_plan import parse_layout, plan_pipeline, pp_layout, stage_layers
from tpi.storage.manifest import read_manifest
from tpi.storage.split import read_split_index, split_model

PROMPT = list(range(5, 25))
FOLLOW = list(range(40, 52))
W = ["a:1", "b:2", "c:3"]


# --- plans ------------------------------------------------------------------------------


def test_a_layout_orders_workers_by_stage_and_names_them_by_index_or_address():
    lay = parse_layout("w2 , master | c:3,w1", W)
    assert lay.workers == ("b:2", "c:3", "a:1") and lay.sizes == (2, 2)
    assert lay.groups() == [(0, 1), (2, 3)]
    assert lay.describe() == "master,b:2 | c:3,a:1"
    assert pp_layout(2, W).sizes == (2, 2) and pp_layout(3, W).sizes == (2, 1, 1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("w1 | master,w2,w3", "first stage"),
        ("master,w1 | w2", "leaves out worker"),
        ("master,w1 | w1,w2,w3", "twice"),
        ("master,w9 | w1,w2,w3", "not w1..w3"),
        ("master || w1,w2,w3", "empty stage"),
    ],
)
def test_bad_layouts_are_refused_with_the_reason(text, message):
    with pytest.raises(PartitionError, match=message):
        parse_layout(text, W)


def test_stage_layers_are_contiguous_even_or_as_counted():
    assert stage_layers(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert stage_layers(6, 2, [1, 5]) == [(0, 1), (1, 6)]
    with pytest.raises(PartitionError, match="add up"):
        stage_layers(6, 2, [2, 2])
    with pytest.raises(PartitionError, match="2 counts for 3 stages"):
        stage_layers(6, 3, [3, 3])


def test_a_stage_is_cut_for_its_group_only(llama_dir):
    cfg = load_config(llama_dir)  # 3 layers, 8 heads, 2 KV heads
    p = plan_pipeline(cfg, [1, 3], [1, 2])
    assert [st.to_dict() for st in p.stages] == [
        {"layers": [0, 1], "ranks": [0]},
        {"layers": [1, 3], "ranks": [1, 2, 3]},
    ]
    master, *group = p.slices
    assert master.layers == (0, 1) and master.q_heads == (0, cfg.num_heads)
    assert [s.layers for s in group] == [(1, 3)] * 3
    # Three ranks over 2 KV heads: query heads are split, KV heads replicated.
    assert sum(s.n_q for s in group) == cfg.num_heads
    assert [s.rank for s in group] == [1, 2, 3]


def test_a_vocabulary_parallel_pipeline_deals_the_vocabulary_over_every_stage(llama_dir):
    cfg = load_config(llama_dir)
    p = plan_pipeline(cfg, [2, 1, 1], [1, 1, 1], vocab_parallel=True)
    rows = [rs.vocab for rs in p.slices]
    assert rows[0][0] == 0 and rows[-1][1] == cfg.vocab_size
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))  # contiguous
    assert all(b - a > 0 for a, b in rows)


def test_a_plan_value_is_a_layout_only_if_it_names_the_master_or_has_stages():
    from tpi.model.pipeline_plan import is_layout

    assert is_layout("master,w1 | w2") and is_layout("w1,master") and is_layout("master")
    assert not is_layout("auto") and not is_layout("even") and not is_layout("masterx,w1")


def test_a_silent_group_blames_the_rank_whose_partial_is_missing():
    from types import SimpleNamespace

    import torch

    from tpi.comm.reducer import Reducer
    from tpi.comm.wire import Phase
    from tpi.master.remote_stage import RemoteStage
    from tpi.model.partition import Stage

    links = [SimpleNamespace(rank=r, name=f"10.0.0.{r}:5555") for r in (2, 3)]
    reducer = Reducer(3, torch.float32)
    reducer.expect(7)
    hub = SimpleNamespace(reducer=reducer, members=links)
    stage = RemoteStage(1, Stage((3, 6), (2, 3)), links, broadcast=None, hub=hub)
    key = (7, 1, Phase.MLP, 0)
    reducer.own_zeros(key, (2,))
    reducer.add(1, key, torch.float32, torch.ones(2))  # rank 2's partial is in, rank 3's not
    err = stage.blame(5.0)
    assert err.rank == 3 and "10.0.0.3:5555" in str(err) and "layers 3-5" in str(err)
    assert stage.patience(5.0) == 5.0  # a group's partials come every phase
    solo = RemoteStage(2, Stage((6, 9), (4,)), [links[0]], broadcast=None, hub=None)
    assert solo.patience(5.0) == 5.0 * 2 * 3  # a stage of one says nothing until its output
    assert solo.blame(5.0).rank == 2  # its lead owes the output


def test_phi3_longrope_through_a_pipeline_runs_whole_passes(phi3_dir, workers):
    # LongRoPE picks its table by where a pass ends: no micro-batches through stages.
    expected_logits, expected_tokens = _expected(phi3_dir)
    with cluster_model(phi3_dir, addresses(workers)[:1], pp=2) as lm:
        assert not lm.engine.forward_pass.can_gpipe
        assert (step_logits(lm.engine, PROMPT, FOLLOW) - expected_logits).abs().max() <= 1e-4
        lm.engine.reset()
        assert greedy(lm.engine, PROMPT, 32) == expected_tokens


def test_a_pipeline_shard_holds_only_its_stages_layers(llama_dir, tmp_path):
    out = split_model(
        llama_dir, tmp_path / "pp", [1.0] * 3, stage_sizes=[2, 1], stage_layers=[2, 1]
    )
    index = read_split_index(out)
    assert index["stages"] == [
        {"layers": [0, 2], "ranks": [0, 1]},
        {"layers": [2, 3], "ranks": [2]},
    ]
    layer_files = {
        r: sorted(f for f in read_manifest(out / f"rank{r}")[0].files if f.startswith("layer_"))
        for r in range(3)
    }
    assert layer_files[0] == layer_files[1] == ["layer_000.safetensors", "layer_001.safetensors"]
    assert layer_files[2] == ["layer_002.safetensors"]


# --- real workers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """Six layers (enough for four stages), 8 query / 2 KV heads."""
    return make_model(tmp_path_factory.mktemp("deep_llama"), "llama", layers=6, tied=False)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with local_workers(3, tmp_path_factory.mktemp("pp_workers")) as lc:
        yield lc


def _expected(model_dir, steps: int = 32):
    single = load_engine(model_dir)
    logits = step_logits(single, PROMPT, FOLLOW)
    single.reset()
    return logits, greedy(single, PROMPT, steps)


PLANS = {
    "pp2": dict(pp=2, n=1),
    "pp3": dict(pp=3, n=2),
    "pp4": dict(pp=4, n=3),
    "tp2xpp2": dict(plan_mode="master,w1 | w2,w3", n=3),
    "uneven": dict(pp=3, stage_layers="1,4,1", n=2),
    "group_over_kv_heads": dict(plan_mode="master | w1,w2,w3", n=3),
    "window1": dict(pp=2, n=3, memory=MemoryOptions(window=1)),
    "int8": dict(plan_mode="master,w1 | w2,w3", quant="int8", n=3),
    "chunked_prefill": dict(plan_mode="master,w1 | w2,w3", prefill_chunks=3, n=3),
    "bf16_wire": dict(plan_mode="master,w1 | w2,w3", wire_dtype="bf16", n=3),
    "vocab_parallel": dict(plan_mode="master,w1 | w2,w3", vocab_parallel=True, n=3),
    "vocab_parallel_pp4": dict(pp=4, vocab_parallel=True, n=3),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_pipeline_plans_match_the_single_node(name, deep_llama, workers):
    kw = dict(PLANS[name])
    n = kw.pop("n")
    expected_logits, expected_tokens = _expected(deep_llama)
    rounded = {k: kw[k] for k in ("quant", "wire_dtype") if k in kw}
    if rounded:
        # int8 kernels return bf16, and a bf16 wire rounds partials, before their sum:
        # the reference is tensor parallelism over 2 ranks, which cuts every layer as
        # both 2-rank stages do (and is itself checked against one node elsewhere).
        with cluster_model(deep_llama, addresses(workers)[:1], **rounded) as one:
            expected_logits = step_logits(one.engine, PROMPT, FOLLOW)
            one.engine.reset()
            expected_tokens = greedy(one.engine, PROMPT, 32)
    with cluster_model(deep_llama, addresses(workers)[:n], **kw) as lm:
        assert lm.cluster.topology.later, "no pipeline was made"
        got = step_logits(lm.engine, PROMPT, FOLLOW)
        assert (got - expected_logits).abs().max() <= 1e-4
        lm.engine.reset()
        assert greedy(lm.engine, PROMPT, 32) == expected_tokens


def test_qwen2_through_a_hybrid_plan_matches_transformers(qwen2_dir, workers):
    expected_logits, expected_tokens = _expected(qwen2_dir)
    with cluster_model(qwen2_dir, addresses(workers), plan_mode="master,w1 | w2,w3") as lm:
        got = step_logits(lm.engine, PROMPT, FOLLOW)
        assert (got - expected_logits).abs().max() <= 1e-4
        oracle = hf_step_logits(load_reference(qwen2_dir), PROMPT, FOLLOW)
        assert (got - oracle).abs().max() <= 1e-4
        lm.engine.reset()
        assert greedy(lm.engine, PROMPT, 32) == expected_tokens


def test_a_batch_of_sequences_flows_through_every_stage(deep_llama, workers):
    prompts = [PROMPT, list(range(60, 67)), list(range(100, 113))]
    single = load_engine(deep_llama)
    want = []
    for p in prompts:
        single.reset()
        want.append(single.forward(p, 0))
    with cluster_model(deep_llama, addresses(workers), pp=3) as lm:
        rows = [BatchRow(slot, p, 0) for slot, p in enumerate(prompts)]
        got = lm.engine.step_logits(rows)
        for g, w in zip(got, want, strict=True):
            assert (g - w).abs().max() <= 1e-4
        # And a decode step of all three at their own positions.
        nxt = [int(g.argmax()) for g in got]
        sampler = Sampler(SamplingParams())
        step = [
            BatchRow(s, [t], len(p), sampler)
            for s, (t, p) in enumerate(zip(nxt, prompts, strict=True))
        ]
        tokens = lm.engine.step(step)
    for s, (t, p) in enumerate(zip(nxt, prompts, strict=True)):
        single.reset()
        single.forward(p, 0)
        assert tokens[s] == int(single.forward([t], len(p)).argmax())


def test_smollm2_through_a_hybrid_plan_keeps_its_greedy_tokens(smollm_dir, workers):
    prompt = list(range(1000, 1016))
    single = load_engine(smollm_dir)
    expected = step_logits(single, prompt, FOLLOW[:4])
    single.reset()
    tokens = greedy(single, prompt, 32)
    with cluster_model(smollm_dir, addresses(workers), plan_mode="master,w1 | w2,w3") as lm:
        assert (step_logits(lm.engine, prompt, FOLLOW[:4]) - expected).abs().max() <= 1e-4
        lm.engine.reset()
        assert greedy(lm.engine, prompt, 32) == tokens


def test_a_pipeline_over_curve_encrypted_links(deep_llama, tmp_path):
    from click.testing import CliRunner

    from tpi.cli import cli

    keys = tmp_path / "keys"
    assert CliRunner().invoke(cli, ["keygen", str(keys)]).exit_code == 0
    expected_logits, expected_tokens = _expected(deep_llama, 8)
    with (
        local_workers(2, tmp_path / "w", extra_args=["--curve", str(keys)]) as lc,
        cluster_model(
            deep_llama, addresses(lc), plan_mode="master | w1 | w2", curve_dir=str(keys)
        ) as lm,
    ):
        assert (step_logits(lm.engine, PROMPT, FOLLOW) - expected_logits).abs().max() <= 1e-4
        lm.engine.reset()
        assert greedy(lm.engine, PROMPT, 8) == expected_tokens


@pytest.mark.parametrize("victim", [1, 3])  # in the master's stage; alone in a later one
def test_a_killed_rank_in_any_stage_is_named_within_seconds(deep_llama, tmp_path, victim):
    with (
        local_workers(3, tmp_path) as lc,
        cluster_model(deep_llama, addresses(lc), plan_mode="master,w1 | w2 | w3") as lm,
    ):
        named = f"rank {victim} ({addresses(lc)[victim - 1]})"
        lm.engine.prefill(PROMPT)
        lc.signal_worker(victim, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ClusterError) as err:
            for i in range(50):
                lm.engine.forward([7], len(PROMPT) + i)
        took = time.monotonic() - t0
    assert named in str(err.value)
    assert took < 10, took


def test_pipeline_options_that_cannot_work_are_refused(deep_llama, workers):
    ws = addresses(workers)
    with pytest.raises(ModelError, match="--stage-layers needs a pipeline"):
        pipeline_layout(None, None, "3,3", ws)
    with pytest.raises(ModelError, match="either as --plan LAYOUT or as --pp"):
        pipeline_layout("master | w1,w2,w3", 2, None, ws)
    with pytest.raises(PartitionError, match="between 1 and 4"):
        pipeline_layout(None, 5, None, ws)
    with pytest.raises(PartitionError, match="positive integers"):
        open_model(str(deep_llama), "fp32", quiet=True, workers=ws, pp=2, stage_layers="0,6")


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_seeded_sampling_is_unchanged_by_a_pipeline(deep_llama, workers, vocab_parallel):
    # Seeded sampling draws its noise from seed and position: the same tokens (with
    # the head over every rank, top-p rounds ask the ranks of every stage for more).
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_new_tokens=12)
    single = load_engine(deep_llama)
    want = list(generate_tokens(single, PROMPT, params))
    with cluster_model(deep_llama, addresses(workers), pp=2, vocab_parallel=vocab_parallel) as lm:
        assert list(generate_tokens(lm.engine, PROMPT, params)) == want


def test_micro_batches_flow_through_the_stages_one_behind_the_other(
    deep_llama, workers, monkeypatch
):
    # GPipe: stage 1 gets piece k's input before the master has finished piece k+1
    # of stage 0 (which needs 2 x 3 allreduces with w1 through the router thread).
    import tpi.master.pipeline as pipeline

    events: list[tuple[str, int, int]] = []
    start, submit = pipeline.RemoteStage.start, pipeline._Router.submit

    def spy_start(self, h, plan, step, pieces=1):
        events.append(("stage", self.index, step))
        return start(self, h, plan, step, pieces)

    def spy_submit(self, step, h):
        events.append(("stage0 done", 0, step))
        return submit(self, step, h)

    monkeypatch.setattr(pipeline.RemoteStage, "start", spy_start)
    monkeypatch.setattr(pipeline._Router, "submit", spy_submit)
    # Hops through the master, where it starts every stage (direct hops: below).
    plan = "master,w1 | w2 | w3"
    with cluster_model(deep_llama, addresses(workers), plan_mode=plan, direct_hops=False) as lm:
        before = {r: s["steps"] for r, s in lm.cluster.stats().items()}
        lm.engine.prefill(PROMPT)  # 20 tokens: at least 3 micro-batches
        after = {r: s["steps"] for r, s in lm.cluster.stats().items()}
    steps = sorted({s for _, _, s in events})
    assert len(steps) >= 3
    assert all(after[r] - before[r] == len(steps) for r in after)  # one step per piece, every rank
    for k in range(len(steps) - 1):
        handed_on = events.index(("stage", 1, steps[k]))
        assert handed_on < events.index(("stage0 done", 0, steps[k + 1])), events
    # Every piece passes every later stage in order.
    for index in (1, 2):
        assert [s for e, i, s in events if e == "stage" and i == index] == steps


@pytest.mark.parametrize(
    "plan, nano, vocab_parallel",
    [
        ("master,w1 | w2,w3", None, False),
        ("master | w1 | w2 | w3", None, False),
        ("master,w1 | w2,w3", 2, False),
        # Prompt chunks before the last ask the head nothing: no final states are sent.
        ("master | w1 | w2,w3", None, True),
    ],
)
def test_continuous_batching_through_a_pipeline_gives_each_sequence_its_tokens(
    plan, nano, vocab_parallel, deep_llama, workers
):
    from tests.test_batching import PROMPTS, alone, batched, seqs_for

    sampled = [
        SamplingParams(max_new_tokens=24),
        SamplingParams(temperature=0.8, top_p=0.5, seed=7, max_new_tokens=24),
        SamplingParams(max_new_tokens=24),
        SamplingParams(temperature=1.0, top_k=5, seed=9, max_new_tokens=12),
    ]
    single = load_engine(deep_llama)
    expected = [alone(single, p, prm) for p, prm in zip(PROMPTS, sampled, strict=True)]
    with cluster_model(
        deep_llama, addresses(workers), plan_mode=plan, vocab_parallel=vocab_parallel
    ) as lm:
        if nano:  # batches cut into micro-batches that flow through the stages
            lm.engine.chunking.fixed_nano = nano
        seqs = seqs_for(sampled)
        batched(lm.engine, seqs, join_late={2: 4}, max_batch=4, prefill_chunk=8)
        assert [s.tokens for s in seqs] == expected


# --- direct hops ------------------------------------------------------------------------


def test_direct_hops_link_each_later_group_and_each_stage_to_the_next():
    from tpi.master.topology import direct_hop_pairs
    from tpi.model.partition import Stage

    # master,w1 | w2,w3 | w4 : 2 and 3 sum through 2; 2 hands on to 4.
    stages = [Stage((0, 2), (0, 1)), Stage((2, 4), (2, 3)), Stage((4, 6), (4,))]
    assert direct_hop_pairs(stages) == [(3, 2), (4, 2)]
    # master | w1 | w2 | w3: each stage's lead to the next stage's rank; stage 0 is
    # the master's, which reaches stage 1 over its own link.
    chain = [Stage((0, 1), (0,)), Stage((1, 2), (1,)), Stage((2, 3), (2,)), Stage((3, 4), (3,))]
    assert direct_hop_pairs(chain) == [(2, 1), (3, 2)]
    assert direct_hop_pairs(chain[:2]) == []  # two stages: nothing between workers


@pytest.mark.parametrize(
    "plan, stage_layers",
    [("master | w1 | w2", None), ("master,w1 | w2,w3", None), ("master | w1,w2 | w3", "1,4,1")],
)
def test_direct_hops_give_single_node_tokens_without_the_master_between_stages(
    plan, stage_layers, deep_llama, workers, monkeypatch
):
    import tpi.master.remote_stage as remote_stage

    expected_logits, expected_tokens = _expected(deep_llama)
    outputs = []
    output = remote_stage.RemoteStage.output

    def spy(self, link, msg, step, shape):
        outputs.append((link.rank, msg.data.stage))
        return output(self, link, msg, step, shape)

    monkeypatch.setattr(remote_stage.RemoteStage, "output", spy)
    ws = addresses(workers)[: plan.count("w")]
    with cluster_model(deep_llama, ws, plan_mode=plan, stage_layers=stage_layers) as lm:
        top = lm.cluster.topology
        assert top.direct and len(top.later) == 1 and top.stages == plan.count("|") + 1
        assert (step_logits(lm.engine, PROMPT, FOLLOW) - expected_logits).abs().max() <= 1e-4
        lm.engine.reset()
        assert greedy(lm.engine, PROMPT, 32) == expected_tokens
        # Only the last stage's lead ever answered the master; no group summed through it.
        last_lead = lm.cluster.index["stages"][-1]["ranks"][0]
        assert outputs and set(outputs) == {(last_lead, top.stages - 1)}
        assert top.relay_stats.count == 0


def test_a_worker_that_cannot_reach_another_falls_back_to_hops_through_the_master(
    deep_llama, workers, monkeypatch
):
    import json
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    ws = addresses(workers)[:2]
    routes = {ws[1]: {ws[0]: f"127.0.0.1:{closed.getsockname()[1]}"}}
    monkeypatch.setenv("TPI_PEER_ROUTES", json.dumps(routes))
    said = []
    _, expected_tokens = _expected(deep_llama, 16)
    import tpi.master.loader as loader

    monkeypatch.setattr(loader, "_err", said.append)
    try:
        lm = open_model(str(deep_llama), "fp32", workers=ws, plan_mode="master | w1 | w2")
        try:
            assert not lm.cluster.topology.direct
            assert greedy(lm.engine, PROMPT, 16) == expected_tokens
        finally:
            lm.close()
    finally:
        closed.close()
    lines = [m for m in said if "direct hops" in m]
    assert len(lines) == 1 and "rank 2" in lines[0] and "cannot reach rank 1" in lines[0]
    assert "through the master" in lines[0]


# --- the command line -------------------------------------------------------------------


def test_tpi_split_makes_a_pipeline_that_tpi_cluster_runs(deep_llama, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from tpi.cli import cli

    out = tmp_path / "pp"
    args = ["split", str(deep_llama), "--world", "3", "--stages", "1,2", "--stage-layers", "2,4"]
    r = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert read_split_index(out)["stages"] == [
        {"layers": [0, 2], "ranks": [0]},
        {"layers": [2, 6], "ranks": [1, 2]},
    ]
    bad = CliRunner().invoke(cli, [*args[:4], "--stages", "2,2", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "adds up to 4 ranks, not --world 3" in bad.output
    tpi = str(Path(sys.executable).parent / "tpi")
    run = [tpi, "cluster", "--workers", "2", "--dir", str(tmp_path / "c"), "generate"]
    run += ["-t", "0", "-n", "8", "--raw", "Hello world"]
    single = subprocess.run(
        [tpi, "generate", "--model", str(deep_llama), "-t", "0", "-n", "8", "--raw", "Hello world"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    for model_args in (
        ["--model", str(out)],
        ["--model", str(deep_llama), "--plan", "master | w1,w2"],
    ):
        got = subprocess.run(
            run[:-6] + model_args + run[-6:], capture_output=True, text=True, timeout=300
        )
        assert got.returncode == 0, got.stderr[-2000:]
        assert got.stdout == single.stdout


def test_the_cluster_view_shows_each_ranks_stage(deep_llama, tmp_path):
    import httpx

    from tests.serve_helpers import live_server

    prefix = ["cluster", "--workers", "2", "--dir", str(tmp_path / "c")]
    args = ["--model", str(deep_llama), "-t", "0", "--plan", "master | w1,w2"]
    with live_server(args, prefix=prefix) as base:
        nodes = httpx.get(base + "/cluster").json()["nodes"]
    assert [(n["first_layer"], n["layers"]) for n in nodes] == [(0, 3), (3, 3), (3, 3)]
    # Shares are of the whole model: the master holds half (its 3 layers whole), the
    # workers the other half (160 columns in blocks of 32: 3 and 2 blocks of 3 layers).
    assert [n["mlp_share"] for n in nodes] == [0.5, 0.3, 0.2]
