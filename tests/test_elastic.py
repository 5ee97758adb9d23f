"""Elastic clusters: a generation survives the loss of workers (kill -9, SIGSTOP),
with the tokens an uninterrupted single-node run gives, and the cluster grows
back when a worker returns. Real worker processes on loopback."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.cluster_helpers import addresses, local_workers, wait_for
from tests.serve_helpers import live_server
from tests.stepping import greedy
from tpi.comm.links import ClusterError, LinkLost
from tpi.master.batching import Batcher, BatchSequence
from tpi.master.elastic import ElasticCluster
from tpi.master.engine import load_engine
from tpi.master.generation import generate_tokens
from tpi.master.loader import open_model
from tpi.master.sampling import SamplingParams

PROMPT = list(range(5, 25))
TPI = str(Path(sys.executable).parent / "tpi")


# --- the re-planning logic, with a fake opener ----------------------------------------


class FakeLoaded:
    def __init__(self, workers):
        self.workers = list(workers)
        self.cluster = object() if workers else None
        self.closed = False

    def close(self, reason="done"):
        self.closed = True
        self.cluster = None


def test_recover_leaves_out_the_lost_worker_and_any_that_fails_while_replanning():
    opened = []

    def opener(workers):
        opened.append(list(workers))
        if "b:2" in workers:  # b died too: the re-open that still lists it fails on it
            raise ClusterError("rank 2 (b:2) does not answer", "b:2")
        return FakeLoaded(workers)

    first = FakeLoaded(["a:1", "b:2", "c:3"])
    elastic = ElasticCluster(opener, first, ["a:1", "b:2", "c:3"])
    got = elastic.recover(LinkLost(1, "a:1", "killed", "during layer 3"))
    assert first.closed
    assert opened == [["b:2", "c:3"], ["c:3"]]
    assert got.workers == ["c:3"] and elastic.world == 2
    assert "rank 1 (a:1) stopped answering during layer 3" in elastic.recoveries[0].describe()
    assert "continuing on 2 rank(s)" in elastic.recoveries[0].describe()


def test_policy_fail_and_errors_without_a_worker_to_blame_are_not_recovered():
    loaded = FakeLoaded(["a:1"])
    fail = ElasticCluster(FakeLoaded, loaded, ["a:1"], policy="fail")
    with pytest.raises(LinkLost):
        fail.recover(LinkLost(1, "a:1", "killed"))
    cont = ElasticCluster(FakeLoaded, loaded, ["a:1"])
    with pytest.raises(ClusterError, match="wrong secret"):
        cont.recover(ClusterError("wrong secret"))
    assert not loaded.closed


def test_workers_discovered_later_join_at_a_grow_and_keep_their_order(monkeypatch):
    monkeypatch.setattr("tpi.master.elastic.tcp_reachable", lambda address: True)
    announced = [["b:2"], ["b:2"], ["b:2", "c:3"]]  # what the network shows at each grow
    asked = []

    def discover(active):
        asked.append(list(active))
        return [w for w in announced.pop(0) if w not in active]

    said = []
    first = FakeLoaded(["a:1"])
    elastic = ElasticCluster(FakeLoaded, first, ["a:1"], said.append, discover=discover)
    assert elastic.grow() and first.closed
    assert elastic.loaded.workers == ["a:1", "b:2"] and elastic.world == 3
    assert said == ["worker(s) b:2 joined: running on 3 ranks"]
    assert not elastic.grow()  # nobody new
    assert elastic.grow() and elastic.loaded.workers == ["a:1", "b:2", "c:3"]
    assert asked == [["a:1"], ["a:1", "b:2"], ["a:1", "b:2"]]  # ours are never checked
    alone = ElasticCluster(FakeLoaded, FakeLoaded([]), [], discover=lambda active: ["d:4"])
    assert alone.grow() and alone.loaded.workers == ["d:4"]  # a master that began alone


# --- real workers ----------------------------------------------------------------------


def _elastic(model_dir, workers, **kw):
    def opener(ws):
        return open_model(str(model_dir), "fp32", quiet=True, workers=ws, **kw)

    return ElasticCluster(opener, opener(workers), workers)


def _answer_with_kills(elastic, params, kills: dict, prompt=PROMPT) -> list[int]:
    """The tokens of one elastic answer; kills[i]() runs right after token i."""
    out = []
    tokens = generate_tokens(
        elastic.loaded.engine, prompt, params, recover=lambda e: elastic.recover(e).engine
    )
    for i, t in enumerate(tokens):
        out.append(t)
        if i in kills:
            kills[i]()
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_an_answer_survives_losing_both_workers_one_after_the_other(llama_dir, tmp_path, sig):
    expected = greedy(load_engine(llama_dir), PROMPT, 48)
    with local_workers(2, tmp_path) as lc:
        elastic = _elastic(llama_dir, addresses(lc))
        try:
            kills = {
                10: lambda: lc.signal_worker(2, sig),
                30: lambda: lc.signal_worker(1, sig),  # the master finishes alone
            }
            out = _answer_with_kills(elastic, SamplingParams(max_new_tokens=48), kills)
            assert out == expected
            assert [r.world for r in elastic.recoveries] == [2, 1]
        finally:
            elastic.loaded.close()
            for i in (1, 2):
                lc.signal_worker(i, signal.SIGCONT)


def test_seeded_top_p_sampling_survives_a_kill_with_identical_tokens(llama_dir, tmp_path):
    params = SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_new_tokens=40)
    expected = list(generate_tokens(load_engine(llama_dir), PROMPT, params))
    with local_workers(2, tmp_path) as lc:
        elastic = _elastic(llama_dir, addresses(lc), vocab_parallel=True)
        try:
            out = _answer_with_kills(
                elastic, params, {12: lambda: lc.signal_worker(1, signal.SIGKILL)}
            )
            assert out == expected and len(elastic.recoveries) == 1
        finally:
            elastic.loaded.close()


def test_a_worker_lost_during_prefill_and_a_batch_both_continue(llama_dir, tmp_path):
    """A batch of sequences, one still prefilling its prompt (in chunks) when a
    worker dies: every sequence ends with its single-node tokens."""
    prompts = [PROMPT, list(range(40, 140)), [3, 1, 4, 1, 5]]
    single = load_engine(llama_dir)
    expected = []
    for p in prompts:
        single.reset()
        expected.append(greedy(single, p, 24))
    with local_workers(2, tmp_path) as lc:
        elastic = _elastic(llama_dir, addresses(lc))
        try:
            b = Batcher(
                elastic.loaded.engine,
                max_batch=4,
                prefill_chunk=16,
                recover=lambda e: elastic.recover(e).engine,
            )
            seqs = [BatchSequence(p, SamplingParams(max_new_tokens=24)) for p in prompts]
            for s in seqs:
                b.submit(s)
            for _ in range(3):  # the long prompt is still being fed
                b.step()
            assert seqs[1].prefilling
            lc.signal_worker(2, signal.SIGKILL)
            while b.busy:
                b.step()
            assert [s.tokens for s in seqs] == expected
            assert b.recoveries == 1 and elastic.world == 2
        finally:
            elastic.loaded.close()


def test_a_restarted_worker_is_taken_back_at_the_next_request(llama_dir, tmp_path):
    with local_workers(2, tmp_path) as lc:
        elastic = _elastic(llama_dir, addresses(lc))
        try:
            lc.signal_worker(2, signal.SIGKILL)
            with pytest.raises(ClusterError) as lost:
                greedy(elastic.loaded.engine, PROMPT, 8)
            elastic.recover(lost.value)
            assert elastic.world == 2
            assert not elastic.grow()  # nothing answers at the lost address yet
            lc.restart(2)
            assert elastic.grow()
            assert elastic.world == 3 and elastic.loaded.cluster.world == 3
            assert greedy(elastic.loaded.engine, PROMPT, 16) == greedy(
                load_engine(llama_dir), PROMPT, 16
            )
        finally:
            elastic.loaded.close()


# --- the commands, as users run them --------------------------------------------------


@pytest.mark.slow  # 200 SmolLM2 tokens on 3 ranks, twice: minutes on 2 shared cores
@pytest.mark.parametrize(
    "plan", [[], ["--plan", "master | w1 | w2"]], ids=["tensor-parallel", "pipeline"]
)
def test_tpi_generate_streams_on_through_a_kill(tmp_path, smollm_dir, plan):
    """The CLI, streaming a 200-token greedy answer of SmolLM2 from master + 2
    workers: one worker is killed mid-answer; the answer completes and equals a
    single-node run's, and stderr says what happened. (A pipeline re-plans over
    the survivors as tensor parallelism: its layout names the lost worker.)"""
    alone = subprocess.run(
        [TPI, "generate", "-t", "0", "-n", "200", "--raw", "Once upon a time"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert alone.returncode == 0
    with local_workers(2, tmp_path / "w") as lc:
        cmd = [TPI, "generate", "-t", "0", "-n", "200", "--raw"]
        cmd += ["--workers", ",".join(addresses(lc)), *plan, "Once upon a time"]
        # Unbuffered: communicate() reads the pipe itself, past any reader's buffer.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        try:
            first = b""
            while len(first) < 40:  # the answer has begun
                piece = proc.stdout.read(40 - len(first))
                assert piece, "the answer never began"
                first += piece
            lc.signal_worker(1, signal.SIGKILL)
            rest, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err.decode()[-2000:]
        assert (first + rest).decode() == alone.stdout
        assert "continuing on 2 rank(s)" in err.decode()


@pytest.mark.slow
def test_a_streamed_chat_completion_survives_a_kill(tmp_path, smollm_dir):
    from openai import OpenAI

    msgs = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
    with live_server(["-t", "0"]) as alone_base:
        alone = OpenAI(base_url=alone_base + "/v1", api_key="x", max_retries=0)
        expected = (
            alone.chat.completions.create(model="m", messages=msgs, max_tokens=200, temperature=0)
            .choices[0]
            .message.content
        )
    with (
        local_workers(2, tmp_path / "w") as lc,
        live_server(["-t", "0", "--workers", ",".join(addresses(lc))]) as base,
    ):
        client = OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)
        text, killed = "", False
        for chunk in client.chat.completions.create(
            model="m", messages=msgs, max_tokens=200, temperature=0, stream=True
        ):
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            if not killed and len(text) > 40:
                lc.signal_worker(2, signal.SIGKILL)
                killed = True
        assert killed and text == expected
        health = httpx.get(base + "/health").json()
        assert health["world"] == 2 and len(health["recoveries"]) == 1
        metrics = httpx.get(base + "/metrics").text
        assert "tpi_cluster_recoveries_total 1.0" in metrics
        # The worker comes back: the next request runs on all three ranks again.
        lc.restart(2)
        assert wait_for(lambda: httpx.get(base + "/health").json()["world"] == 3, 30, poll=0.05)
        again = (
            client.chat.completions.create(model="m", messages=msgs, max_tokens=20, temperature=0)
            .choices[0]
            .message.content
        )
        assert expected.startswith(again)


def test_a_worker_lost_while_its_new_shard_is_pushed_leaves_the_master_alone(
    llama_dir, tmp_path, monkeypatch
):
    """Worker 2 dies mid-answer; during the recovery, worker 1 dies while the master
    pushes it its shard of the smaller world: the master finishes alone, with the
    single-node tokens."""
    from tpi.master.cluster import ClusterSession

    expected = greedy(load_engine(llama_dir), PROMPT, 24)
    with local_workers(2, tmp_path) as lc:
        elastic = _elastic(llama_dir, addresses(lc))
        real_push = ClusterSession._push
        pushes = []

        def push_then_die(self, partials):
            pushes.append(sorted(partials))
            lc.signal_worker(1, signal.SIGKILL)  # gone while its chunks are on the way
            return real_push(self, partials)

        try:

            def kill():
                monkeypatch.setattr(ClusterSession, "_push", push_then_die)
                lc.signal_worker(2, signal.SIGKILL)

            out = _answer_with_kills(elastic, SamplingParams(max_new_tokens=24), {5: kill})
            assert out == expected
            assert pushes == [[1]] and elastic.world == 1
        finally:
            elastic.loaded.close()


def test_a_split_for_one_world_cannot_be_replanned_and_says_so(llama_dir, tmp_path):
    # A master serving a pre-made split (as the docker cluster does) has no source to
    # re-split from: the loss is reported first, then why it cannot be survived.
    from tpi.storage.split import split_model

    split = split_model(llama_dir, tmp_path / "split", [1, 1, 1])
    with local_workers(2, tmp_path / "w") as lc:
        elastic = _elastic(split, addresses(lc))
        kills = {2: lambda: lc.signal_worker(1, signal.SIGKILL)}
        with pytest.raises(ClusterError) as err:
            _answer_with_kills(elastic, SamplingParams(max_new_tokens=16), kills)
        message = str(err.value)
        killed = addresses(lc)[0]  # worker 1 (1-based), rank 1
        assert re.search(
            rf"rank 1 \({killed}\) .*cannot continue on the survivors: .*3 ranks", message
        )
        assert err.value.address == killed
        assert elastic.loaded.cluster is None  # the broken session was closed


def test_prestaged_shards_make_a_recovery_push_nothing(llama_dir, tmp_path):
    from tpi.master.elastic import prestage

    expected = greedy(load_engine(llama_dir), PROMPT, 16)
    with local_workers(2, tmp_path) as lc:
        workers = addresses(lc)

        def opener(ws):
            return open_model(str(llama_dir), "fp32", quiet=True, workers=ws)

        prestage(opener, workers)
        elastic = ElasticCluster(opener, opener(workers), workers)
        try:
            # Worker 2 becomes rank 1 of the smaller world.
            kills = {4: lambda: lc.signal_worker(1, signal.SIGKILL)}
            out = _answer_with_kills(elastic, SamplingParams(max_new_tokens=16), kills)
            assert out == expected and elastic.world == 2
            assert elastic.loaded.cluster.pushed_bytes == 0  # its shard was there
        finally:
            elastic.loaded.close()
