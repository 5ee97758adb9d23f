"""One request's answer (master/serve/responses.py) from events put by hand, and
what each failure means for the client (master/serve/errors.py): recoveries as SSE
comments, failures before and after the first text, a client that left."""

from __future__ import annotations

import asyncio
import json

import pytest

import tpi.master.serve.responses as responses
from tpi.comm.links import LinkLost
from tpi.errors import PromptError, TpiError
from tpi.master.kv_budget import KVBudgetError
from tpi.master.sampling import SamplingParams
from tpi.master.serve.errors import ApiError, generation_error
from tpi.master.serve.jobs import Job
from tpi.master.serve.model_holder import ModelDown
from tpi.master.serve.responses import CHAT, TEXT, Answer

LOST = LinkLost(2, "10.0.0.3:5555", "connection lost")


class Client:
    """The request as an answer sees it: only whether its client is still there."""

    def __init__(self, gone: bool = False) -> None:
        self.gone = gone

    async def is_disconnected(self) -> bool:
        return self.gone


def _answer(endpoint, events: list[tuple], n: int = 1, tokens: int = 2) -> Answer:
    """An answer of `n` jobs whose events (index, kind, value) are already queued."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    jobs = [Job([1, 2, 3], SamplingParams(), [], loop, queue, index=i) for i in range(n)]
    for job in jobs:
        job.stats.new_tokens = tokens
    for e in events:
        queue.put_nowait(e)
    return Answer(jobs, endpoint, "tiny")


async def _stream(answer: Answer, include_usage: bool = False) -> list[str]:
    response = await answer.stream(Client(), include_usage)
    return [part async for part in response.body_iterator]


def test_a_whole_answer_gathers_each_choice_and_skips_notices():
    async def run():
        events = [
            (1, "text", "B1"),
            (0, "text", "A1"),
            (0, "notice", "rank 2 lost; going on over 2 ranks"),
            (1, "text", "B2"),
            (1, "done", "stop"),
            (0, "done", "length"),
        ]
        answer = _answer(CHAT, events, n=2, tokens=3)
        body = await answer.whole(Client())
        return answer, body

    answer, body = asyncio.run(run())
    assert [c["message"] for c in body["choices"]] == [
        {"role": "assistant", "content": "A1"},
        {"role": "assistant", "content": "B1B2"},
    ]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    # One prompt, however many choices; every choice's tokens.
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert answer.cancel.is_set()  # the batch slots are freed


def test_a_failure_in_a_whole_answer_is_the_failures_status():
    async def run():
        answer = _answer(TEXT, [(0, "text", "partial"), (0, "error", LOST)])
        with pytest.raises(ApiError) as e:
            await answer.whole(Client())
        return answer, e.value

    answer, error = asyncio.run(run())
    assert error.status == 503 and error.code == "cluster_down"
    assert str(error) == f"the cluster is down: {LOST}"
    assert answer.cancel.is_set()


def test_a_stream_carries_recoveries_as_comments_and_a_cancelled_choice_as_stop():
    async def run():
        events = [
            (0, "notice", "rank 2 lost"),  # before any text: the stream waits on
            (0, "text", "Hel"),
            (0, "notice", "rank 1 lost"),
            (0, "text", "lo"),
            (0, "done", "cancelled"),
        ]
        answer = _answer(CHAT, events)
        return answer, await _stream(answer, include_usage=True)

    answer, parts = asyncio.run(run())
    assert parts[-1] == "data: [DONE]\n\n"
    assert ": tpi: rank 1 lost\n\n" in parts and ": tpi: rank 2 lost\n\n" not in parts
    chunks = [json.loads(p[len("data: ") :]) for p in parts if p.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert answer.cancel.is_set()


def test_a_failure_before_the_first_text_is_an_http_error_not_a_200_stream():
    async def run():
        answer = _answer(TEXT, [(0, "notice", "rank 2 lost"), (0, "error", LOST)])
        with pytest.raises(ApiError) as e:
            await answer.stream(Client(), False)
        return answer, e.value

    answer, error = asyncio.run(run())
    assert error.status == 503 and answer.cancel.is_set()


def test_a_failure_after_the_first_text_ends_the_stream_with_an_error_event():
    async def run():
        return await _stream(_answer(TEXT, [(0, "text", "Hi"), (0, "error", LOST)]))

    parts = asyncio.run(run())
    assert json.loads(parts[0][len("data: ") :])["choices"][0]["text"] == "Hi"
    assert json.loads(parts[-1][len("data: ") :]) == {
        "error": {
            "message": f"the cluster is down: {LOST}",
            "type": "server_error",
            "param": None,
            "code": "cluster_down",
        }
    }
    assert "data: [DONE]\n\n" not in parts


def test_a_client_that_left_cancels_its_jobs(monkeypatch):
    monkeypatch.setattr(responses, "DISCONNECT_CHECK_S", 0.0)

    async def run():
        whole = _answer(TEXT, [(0, "text", "never read")])
        streamed = _answer(CHAT, [])
        return (
            await whole.whole(Client(gone=True)),
            whole.cancel.is_set(),
            await streamed.stream(Client(gone=True), False),
            streamed.cancel.is_set(),
        )

    assert asyncio.run(run()) == (None, True, None, True)


@pytest.mark.parametrize(
    "error,status,code,message",
    [
        (LOST, 503, "cluster_down", f"the cluster is down: {LOST}"),
        (ModelDown("no workers"), 503, "cluster_down", "the cluster is down: no workers"),
        (KVBudgetError("needs 9 MB"), 400, "kv_budget_exceeded", "needs 9 MB"),
        (PromptError("too long"), 400, "context_length_exceeded", "too long"),
        (TpiError("shard gone"), 500, None, "shard gone"),
        (ValueError("a secret path /x"), 500, None, "internal error: ValueError"),
    ],
)
def test_what_a_failed_generation_means_for_the_client(error, status, code, message):
    e = generation_error(error)
    assert (e.status, e.code, str(e)) == (status, code, message)
    assert e.type == ("invalid_request_error" if status == 400 else "server_error")
    assert e.param == ("max_tokens" if code == "kv_budget_exceeded" else None)
