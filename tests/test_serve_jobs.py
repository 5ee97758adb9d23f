"""The server's generation thread (master/serve/jobs.py) driven directly, without
HTTP: the events a job receives, stop strings and cancellation as the batch sees
them, and what a failed model or cluster does to the jobs and to the holder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.serve_helpers import tiny_holder
from tpi.comm.links import LinkLost
from tpi.master.sampling import SamplingParams
from tpi.master.serve.jobs import GenerationQueue, Job
from tpi.master.serve.model_holder import ModelDown

WAIT_S = 20.0  # a bound, never reached when all is well


@pytest.fixture
def queue(tiny_llama_dir, plain_torch) -> Iterator[GenerationQueue]:
    q = GenerationQueue(tiny_holder(tiny_llama_dir), capacity=4)
    yield q
    q.close()
    q._thread.join(5)
    assert not q._thread.is_alive()


def _prompt(q: GenerationQueue) -> list[int]:
    return q.tokenizer.encode("The quick brown fox")


class LeavesAtFirstText(Job):
    """A client that leaves as its first text arrives (set on the generation thread,
    so the very next pass sees it)."""

    def emit(self, kind: str, value=None) -> None:
        if kind == "text":
            self.cancel.set()
        super().emit(kind, value)


async def _run(q: GenerationQueue, n: int, stops=(), job=Job, **params):
    """Submit `n` jobs of one request; returns their events, in order, and the jobs."""
    loop = asyncio.get_running_loop()
    events, seen = asyncio.Queue(), []
    jobs = [
        job(_prompt(q), SamplingParams(**params), list(stops), loop, events, index=i)
        for i in range(n)
    ]
    q.submit(*jobs)
    ended = 0
    while ended < n:
        event = await asyncio.wait_for(events.get(), WAIT_S)
        seen.append(event)
        ended += event[1] in ("done", "error")
    return seen, jobs


def _text(events, index: int = 0) -> str:
    return "".join(v for i, kind, v in events if i == index and kind == "text")


def test_a_job_gets_its_text_then_done_and_the_server_remembers_it(queue):
    events, [job] = asyncio.run(_run(queue, 1, max_new_tokens=5))
    kinds = [kind for _i, kind, _v in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"text"}
    assert events[-1][2] == "length" and job.stats.new_tokens == 5 and _text(events)
    assert list(queue.recent)[-1] == {"finish_reason": "length", "completion_tokens": 5}
    assert not queue.busy and queue.waiting == 0 and queue.running == 0


def test_a_stop_string_cuts_the_text_and_ends_the_generation_there(queue):
    full_events, _ = asyncio.run(_run(queue, 1, max_new_tokens=12))
    full = _text(full_events)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    events, [job] = asyncio.run(_run(queue, 1, stops=[stop], max_new_tokens=12))
    assert _text(events) == full[: full.index(stop)] and events[-1][1:] == ("done", "stop")
    assert job.stats.new_tokens < 12  # stopped, not generated to the end and trimmed


def test_a_cancelled_job_ends_cancelled_and_frees_its_place(queue):
    events, [job] = asyncio.run(_run(queue, 1, job=LeavesAtFirstText, max_new_tokens=100))
    assert events[-1][1:] == ("done", "cancelled") and job.stats.new_tokens <= 2
    assert list(queue.recent)[-1]["finish_reason"] == "cancelled"

    async def cancelled_before_it_ran() -> None:
        loop = asyncio.get_running_loop()
        gone = Job(_prompt(queue), SamplingParams(max_new_tokens=4), [], loop)
        gone.cancel.set()
        queue.submit(gone)
        for _ in range(int(WAIT_S / 0.01)):
            if queue.recent[-1]["completion_tokens"] == 0:
                break
            await asyncio.sleep(0.01)
        assert gone.events.empty()  # nobody is listening for it any more

    asyncio.run(cancelled_before_it_ran())
    assert list(queue.recent)[-1] == {"finish_reason": "cancelled", "completion_tokens": 0}
    # Every place was given back: a request filling the whole queue is admitted.
    events, _ = asyncio.run(_run(queue, queue.capacity, max_new_tokens=1))
    assert [v for _i, kind, v in events if kind == "done"] == ["length"] * queue.capacity


def test_a_job_for_a_model_that_is_down_gets_the_reason(queue):
    queue.holder.failed(RuntimeError("rank 2 is gone"))
    events, _ = asyncio.run(_run(queue, 1, max_new_tokens=3))
    [(_i, kind, error)] = events
    assert kind == "error" and isinstance(error, ModelDown) and str(error) == "rank 2 is gone"
    assert list(queue.recent)[-1]["finish_reason"] == "error"


def test_a_cluster_lost_during_a_pass_fails_every_job_then_reconnects(tiny_llama_dir, plain_torch):
    fresh = tiny_holder(tiny_llama_dir).loaded
    holder = tiny_holder(tiny_llama_dir, reopen=lambda: fresh)
    q = GenerationQueue(holder, capacity=4)
    lost = LinkLost(1, "10.0.0.2:5555", "connection lost")

    def lose_once() -> None:  # where the cluster view asks every rank for its counters
        if q.running < 2:
            return  # the second choice may join a pass later
        q.between_passes.remove(lose_once)
        raise lost

    q.between_passes.append(lose_once)
    try:
        events, _ = asyncio.run(_run(q, 2, max_new_tokens=8))
        errors = [v for _i, kind, v in events if kind == "error"]
        assert errors == [lost, lost]  # both choices told, neither left waiting
        assert holder.error == str(lost) and holder.failures == 1
        # The next job reconnects first (reopen), then runs on the new model.
        events, _ = asyncio.run(_run(q, 1, max_new_tokens=2))
        assert events[-1][1:] == ("done", "length")
        assert holder.error is None and holder.recoveries == 1 and holder.loaded is fresh
    finally:
        q.close()
        q._thread.join(5)


class Probe(Job):
    """A job that notes what the server has recorded when it tells its client the end."""

    queue: GenerationQueue | None = None
    at_end: list | None = None

    def emit(self, kind: str, value=None) -> None:
        if kind in ("done", "error"):
            self.at_end = list(self.queue.recent)
        super().emit(kind, value)


@pytest.mark.parametrize("down", [False, True])
def test_a_job_is_counted_finished_before_its_client_hears_the_end(queue, down):
    if down:
        queue.holder.failed(RuntimeError("rank 2 is gone"))

    async def one() -> Probe:
        job = Probe(
            _prompt(queue), SamplingParams(max_new_tokens=2), [], asyncio.get_running_loop()
        )
        job.queue = queue
        queue.submit(job)
        while (await asyncio.wait_for(job.events.get(), WAIT_S))[1] not in ("done", "error"):
            pass
        return job

    job = asyncio.run(one())
    # Else a client asking again at once could find its own place still taken (429).
    assert job.at_end[-1]["finish_reason"] == ("error" if down else "length")
