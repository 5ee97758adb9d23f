"""Tensor parallelism across real worker processes on loopback."""

from __future__ import annotations

import pytest

from tests.cluster_helpers import addresses, cluster_model, local_workers
from tests.factories import load_reference
from tests.stepping import greedy, hf_step_logits, step_logits
from tpi.comm.links import ClusterError
from tpi.master.engine import load_engine

PROMPT = list(range(5, 25))
FOLLOW = list(range(40, 56))


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Four worker daemons, shared by the tests (each session uses the first k)."""
    with local_workers(4, tmp_path_factory.mktemp("workers")) as lc:
        yield addresses(lc)


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen2_dir"])
@pytest.mark.parametrize("shares", ["1,1", "1,1,1", "1,1,1,1", "2,1,1"])
def test_cluster_matches_single_node_and_transformers(fixture, shares, workers, request):
    model_dir = request.getfixturevalue(fixture)
    world = len(shares.split(","))
    single = load_engine(model_dir)
    expected_logits = step_logits(single, PROMPT, FOLLOW)
    single.reset()
    expected_tokens = greedy(single, PROMPT, 32)
    with cluster_model(model_dir, workers[: world - 1], shares=shares) as lm:
        got = step_logits(lm.engine, PROMPT, FOLLOW)
        assert (got - expected_logits).abs().max() <= 1e-4
        assert (got - hf_step_logits(load_reference(model_dir), PROMPT, FOLLOW)).abs().max() <= 1e-4
        lm.engine.reset()
        assert greedy(lm.engine, PROMPT, 32) == expected_tokens


def test_exactly_two_allreduces_per_layer_per_forward(llama_dir, workers):
    layers = load_engine(llama_dir).cfg.num_layers
    with cluster_model(llama_dir, workers[:2]) as lm:
        lm.engine.prefill(PROMPT)  # one prefill block = one forward pass
        c = lm.cluster.topology.collective
        assert c.stats.count == 2 * layers
        for i in range(5):
            lm.engine.forward([7], len(PROMPT) + i)
        assert c.stats.count == 2 * layers * 6
        worker_stats = lm.cluster.stats()
        assert all(s["allreduces"] == 2 * layers * 6 for s in worker_stats.values())
        # Per decode token each worker sends one hidden-size vector per allreduce.
        hidden = lm.engine.cfg.hidden_size
        sent = worker_stats[1]["bytes_sent"]
        assert sent == 2 * layers * (len(PROMPT) + 5) * hidden * 4


def test_bf16_wire_halves_bytes_and_stays_close(llama_dir, workers):
    with cluster_model(llama_dir, workers[:1]) as fp32:
        ref = step_logits(fp32.engine, PROMPT, FOLLOW[:4])
        fp32_bytes = fp32.cluster.stats()[1]["bytes_sent"]
    with cluster_model(llama_dir, workers[:1], wire_dtype="bf16") as bf16:
        got = step_logits(bf16.engine, PROMPT, FOLLOW[:4])
        bf16_bytes = bf16.cluster.stats()[1]["bytes_sent"]
    assert bf16_bytes * 2 == fp32_bytes
    diff = (got - ref).abs().max().item()
    assert 0 < diff < 0.05 * ref.abs().max().item()


def test_shard_is_pushed_once_then_reused(llama_dir, tmp_path):
    with local_workers(1, tmp_path / "w") as lc:
        with cluster_model(llama_dir, addresses(lc)) as first:
            assert first.cluster.pushed_bytes > 0
        with cluster_model(llama_dir, addresses(lc)) as second:
            assert second.cluster.pushed_bytes == 0
            assert greedy(second.engine, PROMPT, 4) == greedy(load_engine(llama_dir), PROMPT, 4)


def test_protocol_version_mismatch_is_refused_and_names_the_rank(llama_dir, workers, monkeypatch):
    import tpi.comm.wire

    monkeypatch.setattr(tpi.comm.wire, "PROTOCOL_VERSION", 99)
    with (
        pytest.raises(
            ClusterError, match=r"rank 1 \(127\.0\.0\.1:\d+\) refused: protocol version 99"
        ),
        cluster_model(llama_dir, workers[:1]),
    ):
        pass


def test_worker_without_the_shard_and_no_push_refuses(llama_dir, tmp_path):
    with (
        local_workers(2, tmp_path / "w", extra_args=["--no-accept-push"]) as lc,
        pytest.raises(ClusterError, match=r"rank \d \(.*\) refused: no shard with manifest"),
        cluster_model(llama_dir, addresses(lc)),
    ):
        pass


def test_tampered_shard_is_rejected_by_the_worker(llama_dir, tmp_path, monkeypatch):
    from tpi.storage.split import split_model

    split = split_model(llama_dir, tmp_path / "split", [1, 1])
    layer = split / "rank1" / "layer_001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    with (
        local_workers(1, tmp_path / "w") as lc,
        pytest.raises(ClusterError, match=r"rank 1 .* rejected its shard: .*layer_001.*corrupt"),
        cluster_model(split, addresses(lc)),
    ):
        pass


def test_busy_worker_refuses_a_second_master(llama_dir, workers):
    with (
        cluster_model(llama_dir, workers[:1]),
        pytest.raises(ClusterError, match="refused: busy"),
        cluster_model(llama_dir, workers[:1]),
    ):
        pass


def test_worker_returns_to_waiting_when_the_master_vanishes(llama_dir, workers):
    with cluster_model(llama_dir, workers[:1]) as lm:
        lm.engine.prefill(PROMPT)
        # Vanish without END: drop the sockets as a crashed master would.
        lm.cluster.links.close()
        lm.cluster = None
    with cluster_model(llama_dir, workers[:1]) as again:  # served, not "busy"
        assert greedy(again.engine, PROMPT, 3) == greedy(load_engine(llama_dir), PROMPT, 3)


def test_unreachable_worker_is_reported(llama_dir, monkeypatch):
    import socket

    import tpi.master.cluster

    monkeypatch.setattr(tpi.master.cluster, "CONNECT_TIMEOUT_S", 2.0)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with (
        pytest.raises(ClusterError, match=rf"rank 1 \(127\.0\.0\.1:{port}\) does not answer"),
        cluster_model(llama_dir, [f"127.0.0.1:{port}"]),
    ):
        pass


def test_wrong_number_of_workers_for_a_split(llama_dir, tmp_path, workers):
    from tpi.storage.split import split_model

    split = split_model(llama_dir, tmp_path / "split", [1, 1, 1])
    with (
        pytest.raises(ClusterError, match="split is for 3 ranks"),
        cluster_model(split, workers[:1]),
    ):
        pass
