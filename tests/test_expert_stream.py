"""Expert-aware streaming: with the sliding window a rank reads from disk only the
experts its tokens pick (plus a few cached per layer). Bytes are counted, not timed:
the expected count comes from transformers' own router decisions."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from tests.cluster_helpers import addresses, cluster_model, local_workers
from tests.factories import load_reference
from tests.stepping import hf_step_logits, step_logits
from tpi.master.loader import MemoryOptions, load_rank0
from tpi.model.config import load_config
from tpi.quant.quantize import QuantSpec
from tpi.storage.expert_file import ExpertFileLayout, experts_file
from tpi.storage.manifest import read_manifest
from tpi.storage.read_check import CorruptShard
from tpi.storage.split import split_model

PROMPT = list(range(5, 25))
FOLLOW = [40, 77, 13, 201, 95, 150, 9, 260]


@pytest.fixture(scope="module")
def int4_split(qwen3_moe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-int4")
    return split_model(qwen3_moe_dir, root / "s", [1.0], quant=QuantSpec.for_split("int4"))


@pytest.fixture(scope="module")
def fp32_split(qwen3_moe_dir, tmp_path_factory):
    return split_model(qwen3_moe_dir, tmp_path_factory.mktemp("moe-fp32") / "s", [1.0])


def _load(split_dir, window=None, rank: int = 0):
    return load_rank0(
        split_dir / f"rank{rank}",
        torch.float32,
        None,
        MemoryOptions(window=window, max_context=128),
        lambda _m: None,
    )


def _picks(model_dir, tokens: list[int]) -> list[torch.Tensor]:
    """transformers' top-k experts of every position, per MoE layer (T, k)."""
    ref = load_reference(model_dir)
    cfg = load_config(model_dir)
    with torch.no_grad():
        out = ref(torch.tensor([tokens]), output_router_logits=True)
    return [torch.topk(r, cfg.experts_per_token, dim=-1).indices for r in out.router_logits]


def _simulate(picks, passes, held: range, slots: int) -> tuple[int, int]:
    """(experts read, cache hits) of a rank holding `held`, with `slots` slots per
    layer, over passes of rows [a, b), as tpi.runtime.expert_stream keeps them: a
    pass whose picks fit the slots reads its missing ones at once, evicting the
    least recently used experts it does not pick; a larger pass (a prompt) reads
    them one by one in ascending order, evicting the least recently used. A rank
    with a slot for every expert it holds reads them all once, at load."""
    reads = hits = 0
    preload = slots >= len(held)
    for layer_picks in picks:
        cache: OrderedDict[int, None] = OrderedDict((e, None) for e in held if preload)
        reads += len(cache)
        for a, b in passes:
            mine = [e for e in sorted(set(layer_picks[a:b].flatten().tolist())) if e in held]
            if len(mine) <= slots:
                missing = [e for e in mine if e not in cache]
                for _ in missing:
                    if len(cache) + len(missing) > slots:
                        del cache[next(e for e in cache if e not in mine)]
            for e in mine:
                if e in cache:
                    hits += 1
                    cache.move_to_end(e)
                    continue
                reads += 1
                if len(cache) == slots:
                    cache.popitem(last=False)
                cache[e] = None
    return reads, hits


def _passes() -> list[tuple[int, int]]:
    n = len(PROMPT)
    return [(0, n)] + [(n + i, n + i + 1) for i in range(len(FOLLOW))]


def test_experts_live_in_their_own_file_one_span_each(int4_split, qwen3_moe_dir):
    cfg = load_config(qwen3_moe_dir)
    m, _ = read_manifest(int4_split / "rank0")
    moe = [i for i in range(cfg.num_layers) if cfg.layer_is_moe(i)]
    assert moe == [0, 2]  # layer 1 is dense (mlp_only_layers)
    assert sorted(n for n in m.files if n.startswith("experts_")) == [experts_file(i) for i in moe]
    lay = ExpertFileLayout.of(int4_split / "rank0" / experts_file(0))
    assert sorted(lay.experts) == list(range(cfg.num_experts))
    spans = sorted((s.begin, s.end) for s in lay.experts.values())
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # back to back
    assert {s.nbytes for s in lay.experts.values()} == {spans[0][1] - spans[0][0]}
    assert all(s.crc is not None for s in lay.experts.values())
    assert all(
        name.endswith((".q4", ".sz")) for s in lay.experts.values() for name, *_ in s.tensors
    )


def test_a_streamed_token_reads_only_the_experts_it_picks(fp32_split, qwen3_moe_dir):
    """Window 1: the exact expert reads of every pass (transformers' routing on the
    same weights), every layer file once per pass, and nothing else."""
    cfg = load_config(qwen3_moe_dir)
    engine, runtime = _load(fp32_split, window=1)
    stats, store = runtime.layers.stats, runtime.layers.experts
    assert store is not None and store.per_layer == cfg.experts_per_token == 3
    try:
        step_logits(engine, PROMPT, FOLLOW)
    finally:
        runtime.close()
    span = ExpertFileLayout.of(fp32_split / "rank0" / experts_file(0)).experts[0].nbytes
    picks = _picks(qwen3_moe_dir, PROMPT + FOLLOW)
    reads, hits = _simulate(picks, _passes(), range(cfg.num_experts), 3)
    assert (stats.experts_loaded, stats.expert_hits) == (reads, hits)
    assert stats.expert_bytes_read == reads * span
    # A decode token reads at most its 3 picks in each of the 2 MoE layers, of 8.
    decode_reads, _ = _simulate(
        [p[len(PROMPT) :] for p in picks],
        [(i, i + 1) for i in range(len(FOLLOW))],
        range(cfg.num_experts),
        3,
    )
    assert decode_reads <= len(FOLLOW) * 2 * 3 < len(FOLLOW) * 2 * cfg.num_experts
    # The rest of bytes_read is the layer files, once per pass and layer (plus at
    # most the next layer, prefetched by the window).
    layer_bytes = [lay.data_bytes for lay in runtime.layers.layouts]
    dense = stats.bytes_read - stats.expert_bytes_read
    assert (
        len(_passes()) * sum(layer_bytes)
        <= dense
        <= len(_passes()) * sum(layer_bytes) + max(layer_bytes)
    )


def test_streamed_int4_experts_give_the_resident_logits(int4_split):
    resident, rt_all = _load(int4_split)
    want = step_logits(resident, PROMPT, FOLLOW)
    rt_all.close()
    assert rt_all.layers.stats.experts_loaded == 2 * 8  # all, once, at load
    engine, runtime = _load(int4_split, window=1)
    try:
        got = step_logits(engine, PROMPT, FOLLOW)
        loaded = runtime.layers.stats.experts_loaded
    finally:
        runtime.close()
    assert torch.equal(got, want)  # the same int4 weights, streamed or resident
    assert 0 < loaded <= len(_passes()) * 2 * 8


def test_a_budget_too_small_for_every_layers_picks_cuts_the_expert_slots(
    int4_split, qwen3_moe_dir, monkeypatch
):
    """A small device with many MoE layers cannot cache a token's picks in every
    layer: the slots per layer are cut to what the budget leaves beside a window of
    two layers. The arithmetic, then a store with one slot per layer (3 picks per
    token): the picks are read one by one, as the per-layer cache dictates, and the
    logits are the resident ones."""
    from tpi.runtime import memory_model
    from tpi.runtime.sliding_window import StreamLayout
    from tpi.storage.shard_reader import RankShard

    experts = StreamLayout.of(RankShard(int4_split / "rank0"), torch.float32).experts
    ex = memory_model.ExpertSizes(
        experts.held_per_layer(), 3, experts.moe_layers(), slot_bytes=1000, staging_bytes=0
    )
    assert ex.moe_layers == 2
    staging = 7 + ex.cache_bytes(3)  # 7: the layers' own staging
    fit = memory_model.fit_expert_slots
    kw = dict(other=50_000, note=None)
    assert fit(ex, 3, staging, budget=None, **kw) == (3, staging)
    assert fit(ex, 3, staging, budget=50_007 + 6000, **kw) == (3, staging)  # 2 x 3 fit
    said = []
    kw["note"] = said.append
    assert fit(ex, 3, staging, budget=50_007 + 5999, **kw) == (2, 7 + 4000)
    assert "2 expert slot(s) per MoE layer" in said[0]
    assert fit(ex, 3, staging, budget=10, **kw) == (1, 7 + 2000)  # never below one

    resident, rt_all = _load(int4_split)
    want = step_logits(resident, PROMPT, FOLLOW)
    rt_all.close()
    monkeypatch.setattr(memory_model, "_expert_slots", lambda *_a: 1)
    engine, runtime = _load(int4_split, window=1)
    try:
        got = step_logits(engine, PROMPT, FOLLOW)
        stats = runtime.layers.stats
    finally:
        runtime.close()
    assert torch.equal(got, want)
    cfg = load_config(qwen3_moe_dir)
    reads, hits = _simulate(
        _picks(qwen3_moe_dir, PROMPT + FOLLOW), _passes(), range(cfg.num_experts), 1
    )
    assert (stats.experts_loaded, stats.expert_hits) == (reads, hits)


def test_a_shrinking_budget_takes_expert_slots_away_one_by_one(int4_split, monkeypatch):
    """Loading under ever smaller budgets (the process's own memory held fixed):
    first a token's 3 picks per layer, then fewer, down to one slot per layer, and
    then a clear refusal; a cut store still gives the resident logits."""
    from tpi.runtime import rank_runtime
    from tpi.runtime.memory_budget import MemoryBudgetError
    from tpi.runtime.sliding_window import StreamLayout
    from tpi.storage.shard_reader import RankShard

    monkeypatch.setattr(rank_runtime, "rss_bytes", lambda: 64 << 20)
    layout = StreamLayout.of(RankShard(int4_split / "rank0"), torch.float32)
    step = layout.experts.slot_bytes  # a third of one slot in each of the 2 MoE layers
    resident, rt_all = _load(int4_split)
    want = step_logits(resident, PROMPT, FOLLOW)
    rt_all.close()

    def slots_at(budget: int):
        try:
            engine, runtime = load_rank0(
                int4_split / "rank0",
                torch.float32,
                None,
                MemoryOptions(window=1, budget=str(budget), max_context=128),
                lambda _m: None,
            )
        except MemoryBudgetError as e:
            return str(e)
        return engine, runtime

    engine, runtime = slots_at(1 << 40)
    assert runtime.layers.experts.per_layer == 3
    budget = runtime.memory.need_bytes + step  # the least that holds 3 slots, and a bit
    runtime.close()
    seen = []
    for _ in range(50):  # bounded: the budget falls by `step` each time
        got = slots_at(budget)
        if isinstance(got, str):
            assert "out of memory budget" in got
            break
        engine, runtime = got
        per_layer = runtime.layers.experts.per_layer
        if per_layer == 2 and 2 not in seen:
            try:
                assert torch.equal(step_logits(engine, PROMPT, FOLLOW), want)
            finally:
                runtime.close()
        else:
            runtime.close()
        seen.append(per_layer)
        budget -= step
    else:
        pytest.fail("no budget was too small")
    assert seen[0] == 3 and seen[-1] == 1
    assert seen == sorted(seen, reverse=True)  # never more slots for less memory
    assert {3, 2, 1} <= set(seen)


@pytest.mark.parametrize("how", ["columns", "experts"])
def test_world3_ranks_read_only_their_share_of_the_picked_experts(qwen3_moe_dir, tmp_path, how):
    """World 3, shares 2,1,1, window 1. Columns (the default): every rank holds a
    slice of each of the 8 experts and reads the slices of the experts picked.
    Whole experts (4, 2, 2): each rank reads the picked experts it holds (ranks 1
    and 2 have a slot for each of their 2 experts: they read them once, at load).
    Each as its own per-layer cache dictates; the logits stay transformers'."""
    split = split_model(qwen3_moe_dir, tmp_path / "s", [2.0, 1.0, 1.0], moe_split=how)
    picks = _picks(qwen3_moe_dir, PROMPT + FOLLOW)
    want = hf_step_logits(load_reference(qwen3_moe_dir), PROMPT, FOLLOW)
    span = {r: ExpertFileLayout.of(split / f"rank{r}" / experts_file(0)).experts for r in range(3)}
    with (
        local_workers(2, tmp_path / "w") as lc,
        cluster_model(split, addresses(lc), memory=MemoryOptions(window=1, max_context=128)) as lm,
    ):
        assert (step_logits(lm.engine, PROMPT, FOLLOW) - want).abs().max() <= 1e-4
        per_rank = {0: lm.runtime.layers.stats.to_dict(), **lm.cluster.stats()}
    held_by = [sorted(span[r]) for r in range(3)]
    if how == "experts":
        assert held_by == [[0, 1, 2, 3], [4, 5], [6, 7]]
    else:
        assert held_by == [list(range(8))] * 3
    for r in range(3):
        held = range(min(span[r]), max(span[r]) + 1)
        reads, hits = _simulate(picks, _passes(), held, min(3, len(held)))
        nbytes = next(iter(span[r].values())).nbytes
        got = per_rank[r]
        assert (got.get("experts_loaded", 0), got.get("expert_hits", 0)) == (reads, hits), r
        assert got.get("expert_bytes_read", 0) == reads * nbytes


def test_a_corrupt_expert_is_named_when_it_is_read(qwen3_moe_dir, tmp_path):
    split = split_model(qwen3_moe_dir, tmp_path / "s", [1.0])
    path = split / "rank0" / experts_file(2)
    lay = ExpertFileLayout.of(path)
    engine, runtime = _load(split, window=1)
    try:
        picks = _picks(qwen3_moe_dir, PROMPT)[1]  # layer 2's picks for the prompt
        victim = int(picks[0, 0])
        data = bytearray(path.read_bytes())
        data[lay.experts[victim].begin + 5] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptShard, match=r"experts_002\.safetensors is corrupt"):
            engine.prefill(PROMPT)
    finally:
        runtime.close()
