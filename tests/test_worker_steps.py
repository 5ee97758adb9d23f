"""A worker rank's steps (worker/steps.py) and its channel to the master
(worker/master_channel.py), in-process: the master's messages are built by hand,
the worker's answers are read off a fake socket. No process, no port."""

from __future__ import annotations

import pytest
import torch

from tpi.comm.links import Inbound
from tpi.comm.star_worker import StarWorker
from tpi.comm.wire import (
    HeadHeader,
    HiddenHeader,
    Kind,
    Message,
    Phase,
    ProtocolError,
    StepHeader,
    SumHeader,
    decode,
    encode_control,
    encode_data,
    ids_payload,
    payload_tensor,
    tensor_payload,
)
from tpi.model.batch import BatchStep
from tpi.model.vocab_head import HeadRequest
from tpi.model.want import Want
from tpi.runtime.rank_runtime import build_rank
from tpi.runtime.vocab_parallel import HeadService
from tpi.storage.shard_reader import RankShard
from tpi.storage.split import split_model
from tpi.worker.master_channel import MasterChannel, SessionEnded
from tpi.worker.rank_loader import LoadedRank
from tpi.worker.steps import RankSteps

SESSION = 4242
PEER = b"master"


def _msg(frames: list) -> Message:
    return decode(
        [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]
    )


class SummingChannel:
    """The master as a StarWorker sees it: each PARTIAL is answered with a SUM of
    the same values (the master's own share zeros), HEADs and HIDDENs are kept,
    and `next` hands out what the test queued."""

    session = SESSION

    def __init__(self, queued: list[Message] | None = None) -> None:
        self.sent: list[Message] = []
        self.queued = list(queued or [])

    def send(self, frames: list) -> None:
        self.sent.append(_msg(frames))

    def send_data(self, frames: list) -> None:
        self.sent.append(_msg(frames))

    def wait_sum(self, expected: SumHeader) -> Message:
        partial = self.sent[-1]
        assert partial.kind == Kind.PARTIAL and partial.data == expected
        h = partial.data
        total = SumHeader(h.session, h.step, h.pos, h.layer, h.phase, h.dtype, h.shape)
        return _msg([encode_data(Kind.SUM, total), bytes(partial.payload)])

    def next(self, timeout_s) -> Message:
        return self.queued.pop(0)

    def kinds(self, kind: Kind) -> list:
        return [m.data for m in self.sent if m.kind == kind]


def _rank(split, rank: int, channel) -> LoadedRank:
    shard = RankShard(split / f"rank{rank}")
    m = shard.manifest
    index, stage = m.partition.stage_of(rank)
    solo = stage is not None and len(stage.ranks) == 1
    collective = StarWorker(channel, SESSION, torch.float32, solo=solo)
    head = None
    if shard.has_head:
        head = HeadService(shard.config, shard.load_head(torch.float32), collective)
    runtime = build_rank(shard, torch.float32, collective, max_context=64)
    hands_on = index if stage is not None and index > 0 and stage.lead == rank else None
    last = m.partition.stages is None or index == len(m.partition.stages) - 1
    return LoadedRank(runtime, collective, head, 0.0, hands_on, index, last, stage and stage.layers)


def _step(step: int, h: torch.Tensor, plan: BatchStep, chunks: int = 1) -> Message:
    header = StepHeader(SESSION, step, plan.first_pos, chunks, h.dtype, tuple(h.shape))
    header.batch = tuple(plan.to_ints())
    return _msg([encode_data(Kind.STEP, header), tensor_payload(h)])


def _tokens(step: int, ids: list[int], plan: BatchStep, want: Want) -> Message:
    body = {"session": SESSION, "step": step, "batch": plan.to_ints(), "chunks": 1}
    return _msg(
        [encode_control(Kind.STEP_TOKENS, {**body, "head": want.to_wire()}), ids_payload(ids)]
    )


@pytest.fixture(scope="module")
def splits(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    return {
        "tp": split_model(llama_dir, root / "tp", [1.0, 1.0]),
        "vocab": split_model(llama_dir, root / "vocab", [1.0, 1.0], vocab_parallel=True),
        "pp": split_model(llama_dir, root / "pp", [1.0, 1.0], stage_sizes=[1, 1]),
    }


def test_a_step_runs_every_layer_with_two_allreduces_keyed_by_its_step(splits):
    channel = SummingChannel()
    loaded = _rank(splits["tp"], 1, channel)
    steps = RankSteps(channel, loaded, serve_between=None)
    cfg = loaded.runtime.decoder.cfg
    h = torch.randn(3, cfg.hidden_size)
    steps.step(_step(7, h, BatchStep.single(0, 3)))
    keys = [(p.step, p.layer, p.phase, p.pos) for p in channel.kinds(Kind.PARTIAL)]
    assert keys == [(7, layer, phase, 0) for layer in range(cfg.num_layers) for phase in (0, 1)]
    assert (loaded.collective.step, steps.steps) == (7, 1)
    steps.step(_step(8, h[:1], BatchStep.single(3, 1)))  # the next token, at position 3
    # A sum is told apart by its step and its piece's first row (0: the pass is one piece).
    assert {(p.step, p.pos) for p in channel.kinds(Kind.PARTIAL)[2 * cfg.num_layers :]} == {(8, 0)}
    assert loaded.runtime.decoder.caches.get(0).capacity >= 4  # reserved through position 3
    assert not channel.kinds(Kind.HIDDEN)  # not a pipeline stage's lead


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: _step(1, torch.zeros(2, d + 1), BatchStep.single(0, 2)), "malformed STEP"),
        (lambda d: _step(1, torch.zeros(2, d), BatchStep.single(0, 3)), "malformed batch step"),
    ],
)
def test_a_step_no_master_sends_is_refused(splits, make, message):
    channel = SummingChannel()
    loaded = _rank(splits["tp"], 1, channel)
    steps = RankSteps(channel, loaded, serve_between=None)
    with pytest.raises(ProtocolError, match=message):
        steps.step(make(loaded.runtime.decoder.cfg.hidden_size))
    assert channel.sent == []  # refused before anything was computed or sent


def test_a_later_stage_of_one_sends_only_its_output(splits):
    channel = SummingChannel()
    loaded = _rank(splits["pp"], 1, channel)
    steps = RankSteps(channel, loaded, serve_between=None)
    h = torch.randn(2, loaded.runtime.decoder.cfg.hidden_size)
    steps.step(_step(5, h, BatchStep.single(0, 2)))
    assert [m.kind for m in channel.sent] == [Kind.HIDDEN]
    out = channel.sent[0].data
    assert isinstance(out, HiddenHeader) and (out.step, out.stage, out.shape) == (
        5,
        1,
        (2, h.shape[1]),
    )


def test_a_vocabulary_parallel_rank_embeds_runs_and_answers_each_row(splits):
    channel = SummingChannel()
    loaded = _rank(splits["vocab"], 1, channel)
    steps = RankSteps(channel, loaded, serve_between=None)
    with pytest.raises(ProtocolError, match="vocabulary-parallel"):
        steps.step(
            _step(1, torch.zeros(1, loaded.runtime.decoder.cfg.hidden_size), BatchStep.single(0, 1))
        )
    want = Want.choose([1, 3], [HeadRequest(), HeadRequest(temperature=0.8, noise_seed=9)])
    steps.step_tokens(_tokens(3, [5, 6, 7, 8], BatchStep.single(0, 4), want))
    phases = [p.phase for p in channel.kinds(Kind.PARTIAL)]
    assert phases[0] == Phase.EMBED and len(phases) == 1 + 2 * loaded.runtime.decoder.cfg.num_layers
    heads = channel.kinds(Kind.HEAD)
    assert all(isinstance(h, HeadHeader) for h in heads)
    assert [(h.step, h.row, h.round) for h in heads] == [(3, 1, 0), (3, 3, 0)]
    steps.head_more(
        _msg(
            [
                encode_control(
                    Kind.HEAD_MORE,
                    {"session": SESSION, "step": 3, "row": 3, "round": 1, "count": 200},
                )
            ]
        )
    )
    assert channel.kinds(Kind.HEAD)[-1].round == 1
    with pytest.raises(ProtocolError, match="did not sample"):
        steps.head_more(
            _msg(
                [
                    encode_control(
                        Kind.HEAD_MORE,
                        {"session": SESSION, "step": 2, "row": 3, "round": 1, "count": 9},
                    )
                ]
            )
        )
    with pytest.raises(ProtocolError, match="rows the step does not have"):
        steps.step_tokens(_tokens(4, [5], BatchStep.single(4, 1), Want.logits([1])))


def test_a_later_vocab_parallel_stage_serves_requests_while_it_waits_for_its_input(
    llama_dir, tmp_path
):
    split = split_model(
        llama_dir, tmp_path / "vp", [1.0, 1.0], vocab_parallel=True, stage_sizes=[1, 1]
    )
    served = []
    channel = SummingChannel()
    loaded = _rank(split, 1, channel)
    steps = RankSteps(channel, loaded, serve_between=served.append)
    d = loaded.runtime.decoder.cfg.hidden_size
    stats = _msg([encode_control(Kind.STATS_REQUEST, {"session": SESSION})])
    channel.queued = [stats, _step(6, torch.randn(2, d), BatchStep.single(0, 2))]
    steps.step_tokens(_tokens(6, [5, 9], BatchStep.single(0, 2), Want.logits()))
    assert [m.kind for m in served] == [Kind.STATS_REQUEST]
    assert [m.kind for m in channel.sent] == [Kind.PARTIAL, Kind.HIDDEN, Kind.HEAD]
    channel.queued = [_step(7, torch.randn(3, d), BatchStep.single(2, 3))]  # not its step's shape
    with pytest.raises(ProtocolError, match="STEP of step 7"):
        steps.step_tokens(_tokens(7, [5, 9], BatchStep.single(2, 2), Want.nothing()))


# --- the master channel -------------------------------------------------------------------------


class Drained(Exception):
    """The test's queued messages are all taken: the loop would wait for more."""


class FakeEndpoint:
    """The worker's ROUTER socket: inbound messages queued by the test, sends kept."""

    def __init__(self, inbound: list[Inbound]) -> None:
        self.inbound = list(inbound)
        self.sent: list[tuple[bytes, Message]] = []
        self.closed_fds: set[int] = set()

    def recv(self, timeout_s: float) -> Inbound | None:
        if not self.inbound:
            raise Drained
        return self.inbound.pop(0)

    def send(self, peer: bytes, frames: list) -> bool:
        self.sent.append((peer, _msg(frames)))
        return True


def _in(frames: list, peer: bytes = PEER) -> Inbound:
    return Inbound(
        peer, 3, [f if isinstance(f, bytes) else bytes(memoryview(f).cast("B")) for f in frames]
    )


def _sum(step: int, layer: int, phase: int, t: torch.Tensor, session: int = SESSION) -> Inbound:
    h = SumHeader(session, step, 0, layer, phase, t.dtype, tuple(t.shape))
    return _in([encode_data(Kind.SUM, h), tensor_payload(t)])


def _control(kind: Kind, session: int = SESSION, peer: bytes = PEER, **body) -> Inbound:
    return _in([encode_control(kind, {"session": session, **body})], peer)


def _channel(*inbound: Inbound) -> tuple[MasterChannel, FakeEndpoint]:
    endpoint = FakeEndpoint(list(inbound))
    hello = Inbound(PEER, 3, [])
    return MasterChannel(endpoint, hello, SESSION, 1), endpoint


def test_waiting_for_a_sum_keeps_requests_drops_stale_sums_and_answers_pings():
    t = torch.arange(4.0).view(1, 4)
    channel, endpoint = _channel(
        _control(Kind.STATS_REQUEST),
        _sum(2, 0, 1, t * 0),  # a stale sum of the step before
        _control(Kind.PING),
        _sum(3, 0, 0, t, session=99),  # another session's: dropped
        _sum(3, 0, 0, t),
    )
    expected = SumHeader(SESSION, 3, 0, 0, 0, torch.float32, (1, 4))
    got = channel.wait_sum(expected)
    assert torch.equal(payload_tensor(got.payload, got.data), t)
    assert [m.kind for _, m in endpoint.sent] == [Kind.PONG]
    assert channel.next(0.1).kind == Kind.STATS_REQUEST  # kept for after the step


def test_a_wrong_sum_or_an_end_ends_the_session():
    expected = SumHeader(SESSION, 3, 0, 5, 0, torch.float32, (1, 4))
    channel, _ = _channel(_sum(3, 6, 0, torch.ones(1, 4)))  # a later layer: out of order
    with pytest.raises(SessionEnded, match="expected"):
        channel.wait_sum(expected)
    channel, _ = _channel(_control(Kind.END, reason="bye"))
    with pytest.raises(SessionEnded, match="master ended the session \\(bye\\)"):
        channel.wait_sum(expected)


def test_a_strangers_hello_is_told_the_worker_is_busy():
    hello = {
        "rank": 1,
        "world": 2,
        "manifest": "x",
        "tpi_version": "0",
        "nonce": "00" * 16,
        "auth": "none",
    }
    channel, endpoint = _channel(
        _control(Kind.HELLO, session=5, peer=b"stranger", **hello), _control(Kind.PING)
    )
    with pytest.raises(Drained):  # both handled here: nothing reached the session loop
        channel.next(None)
    peers = [(peer, m.kind) for peer, m in endpoint.sent]
    assert (b"stranger", Kind.REFUSE) in peers and (PEER, Kind.PONG) in peers
    refusal = next(m for peer, m in endpoint.sent if peer == b"stranger")
    assert refusal.body["reason"].startswith("busy: serving another master")
