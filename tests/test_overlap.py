"""Overlapped (chunked) prefill: same logits, and communication really overlaps compute."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

import tpi.model.decoder
from tests.cluster_helpers import addresses, cluster_model, local_workers
from tests.factories import make_model
from tests.stepping import step_logits
from tpi.comm.wire import Kind, decode
from tpi.master.engine import load_engine
from tpi.master.loader import open_model
from tpi.model.decoder import LocalCollective
from tpi.runtime.prefill_chunking import PrefillChunking, choose_chunks
from tpi.storage.split import split_model

PROMPT = list(range(5, 69))  # 64 tokens: four chunks of 16
FOLLOW = [40, 41, 42]


def test_chunk_choice_follows_link_and_compute():
    # A fast link next to the compute: nothing to hide.
    assert choose_chunks(512, rtt_s=0.0002, token_phase_s=0.001) == 1
    # A short prompt is not worth cutting.
    assert choose_chunks(20, rtt_s=0.01, token_phase_s=0.001) == 1
    # Half the phase hides the round trip: two chunks.
    assert choose_chunks(512, rtt_s=0.010, token_phase_s=0.0001) == 2
    # Needs 3/4 of the phase: four chunks (the cap).
    assert choose_chunks(512, rtt_s=0.035, token_phase_s=0.0001) == 4
    # Cannot hide it at all: as many chunks as allowed, never chunks under 16 tokens.
    assert choose_chunks(48, rtt_s=1.0, token_phase_s=0.0001) == 3


def test_planner_learns_compute_speed_from_real_prefills():
    p = PrefillChunking(rtt_s=0.01, token_phase_s=1e-3)
    p.observe(tokens=100, phases=2, compute_s=0.002)  # 1e-5 s per token-phase
    assert p.token_phase_s == pytest.approx(0.5e-3 + 0.5e-5)
    p.observe(tokens=1, phases=2, compute_s=1.0)  # a decode step: ignored
    assert p.token_phase_s == pytest.approx(0.5e-3 + 0.5e-5)
    assert PrefillChunking(0.01, 1e-3, fixed=3).chunks(100) == 3


class RecordingCollective(LocalCollective):
    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, int]] = []

    def start(self, partial, layer, phase, pos):
        self.events.append(("start", layer, phase, pos))
        return (partial, layer, phase, pos)

    def wait(self, pending):
        self.events.append(("wait", *pending[1:]))
        return pending[0]


def test_each_chunks_allreduce_is_in_flight_while_the_next_chunk_computes(llama_dir):
    engine = load_engine(llama_dir)
    rec = RecordingCollective()
    engine.decoder.collective = rec
    engine.forward(PROMPT, 0)  # one chunk: start, then wait at once
    plain = list(rec.events)
    assert all(
        a[0] == "start" and b[0] == "wait" for a, b in zip(plain[::2], plain[1::2], strict=True)
    )
    rec.events.clear()
    engine.reset()
    engine.decoder.forward(torch.zeros(64, engine.cfg.hidden_size), 0, chunks=4)
    starts = [e for e in rec.events if e[0] == "start"]
    assert len(starts) == 2 * engine.cfg.num_layers * 4
    for layer in range(engine.cfg.num_layers):
        for phase in (0, 1):
            order = [e for e in rec.events if e[1:3] == (layer, phase)]
            # All four chunks start before the first of their sums is awaited.
            assert [e[0] for e in order] == ["start"] * 4 + ["wait"] * 4
            assert [e[3] for e in order[:4]] == [0, 16, 32, 48]


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen2_dir", "mistral_dir"])
def test_chunked_prefill_gives_the_plain_logits(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    plain = step_logits(load_engine(model), PROMPT, FOLLOW)
    split = split_model(model, tmp_path / "s", [1.0])
    for chunks in (2, 3, 4):
        lm = open_model(str(split), "fp32", quiet=True, prefill_chunks=chunks)
        try:
            got = step_logits(lm.engine, PROMPT, FOLLOW)
        finally:
            lm.close()
        assert (got - plain).abs().max() <= 1e-5, chunks


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    """A sliding attention window shorter than a chunk boundary's reach."""
    return make_model(tmp_path_factory.mktemp("mistral"), "mistral", sliding_window=20, seed=3)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with local_workers(2, tmp_path_factory.mktemp("ovworkers")) as lc:
        yield addresses(lc)


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_overlapped_prefill_on_a_cluster_gives_the_plain_logits(llama_dir, workers, vocab_parallel):
    plain = step_logits(load_engine(llama_dir), PROMPT, FOLLOW)
    layers = load_engine(llama_dir).cfg.num_layers
    with cluster_model(llama_dir, workers, prefill_chunks=4, vocab_parallel=vocab_parallel) as lm:
        got = step_logits(lm.engine, PROMPT, FOLLOW)
        stats = lm.cluster.stats()
        master_count = lm.cluster.topology.collective.stats.count
    assert (got - plain).abs().max() <= 1e-4
    embed = 1 if vocab_parallel else 0
    # The prefill: 2 allreduces per layer per chunk; then one per phase per token.
    want = (2 * layers * 4 + embed) + len(FOLLOW) * (2 * layers + embed)
    assert [s["allreduces"] for s in stats.values()] == [want] * 2
    assert master_count == want


def test_the_master_sends_a_chunks_sum_while_it_computes_the_next_chunk(
    llama_dir, workers, monkeypatch
):
    """Slow the master's compute of chunk 1 down by 0.5 s: the sum of chunk 0 of the
    same layer phase must leave during that time (the reducer thread sends it),
    not after the master is done computing."""
    sent_at: dict[tuple, float] = {}
    slow_done_at: list[float] = []
    real = tpi.model.decoder.attention_partial

    def slow_attention(h, w, layout, layer, step, eps, window):
        out = real(h, w, layout, layer, step, eps, window)
        first = step.seqs[0].pos
        if threading.current_thread() is threading.main_thread() and layer == 0 and first == 32:
            time.sleep(0.5)
            slow_done_at.append(time.perf_counter())
        return out

    with cluster_model(llama_dir, workers, prefill_chunks=2) as lm:
        for link in lm.cluster.links.links:
            original = link.send_data  # the allreduce's frames (over its data link)

            def spy(frames, *a, _orig=original, **kw):
                msg = decode(
                    [bytes(f) if not isinstance(f, bytes) else f for f in frames[:1]] + [b""]
                )
                if msg.kind == Kind.SUM:
                    d = msg.data
                    sent_at.setdefault((d.layer, d.phase, d.pos), time.perf_counter())
                return _orig(frames, *a, **kw)

            monkeypatch.setattr(link, "send_data", spy)
        monkeypatch.setattr(tpi.model.decoder, "attention_partial", slow_attention)
        lm.engine.forward(PROMPT, 0)
    assert slow_done_at, "the slowed chunk never ran"
    # Chunk 0 of layer 0's attention sum left before the master finished chunk 1.
    assert sent_at[(0, 0, 0)] < slow_done_at[0] - 0.2


STRESS_RUNS = 200


def test_overlapped_prefill_stress_one_thread_per_socket(llama_dir, workers, monkeypatch):
    """Hundreds of overlapped prefills over real sockets, with random delays
    injected into the master's compute of each chunk: every run gives the plain
    logits, and while a prefill overlaps, every link socket is used by the
    reducer thread alone (ZeroMQ sockets are not thread-safe)."""
    plain = load_engine(llama_dir).forward(PROMPT, 0)
    rng = torch.Generator().manual_seed(5)
    real = tpi.model.decoder.attention_partial

    def jittered(*args):
        time.sleep(float(torch.rand((), generator=rng)) * 0.002)
        return real(*args)

    monkeypatch.setattr(tpi.model.decoder, "attention_partial", jittered)
    misuse: list[str] = []
    with cluster_model(llama_dir, workers, prefill_chunks=4) as lm:
        collective = lm.cluster.topology.collective
        overlapping = threading.Event()
        for link in lm.cluster.links.links:
            for method in ("send_multipart", "recv_multipart"):
                original = getattr(link.sock, method)

                def watched(*a, _orig=original, _m=method, **kw):
                    who = threading.current_thread().name
                    if overlapping.is_set() and who != "tpi-star-reducer":
                        misuse.append(f"{_m} from {who}")
                    return _orig(*a, **kw)

                monkeypatch.setattr(link.sock, method, watched)
        real_pipelined = collective.pipelined

        @contextlib.contextmanager
        def marked():
            with real_pipelined():
                overlapping.set()  # the reducer thread runs from here ...
                try:
                    yield
                finally:
                    overlapping.clear()  # ... until it is joined, after this

        monkeypatch.setattr(collective, "pipelined", marked)
        worst = 0.0
        for _ in range(STRESS_RUNS):
            got = lm.engine.forward(PROMPT, 0)
            worst = max(worst, float((got - plain).abs().max()))
    assert misuse == []
    assert worst <= 1e-4
