"""The server's generation thread (master/serve/jobs.py) driven directly, without
HTTP: the events a job receives, stop strings and cancellation as the batch sees
them, and what a failed model or cluster does to the jobs and to the holder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.serve_helpers import tiny_holder
from tpi.master.sampling import SamplingParams
from tpi.master.serve.jobs import GenerationQueue, Job

WAIT_S = 20.0  # a bound, never reached when all is well


@pytest.fixture
def queue(tiny_llama_dir, torch_kernels) -> Iterator[GenerationQueue]:
    q = GenerationQueue(tiny_holder(tiny_llama_dir), capacity=4)
    yield q
    q.close()
    q._thread.join(5)
    assert not q._thread.is_alive()


def _prompt(q: GenerationQueue) -> list[int]:
    return q.tokenizer.encode("The quick brown fox")


async def _run(q: GenerationQueue, n: int, stops=(), cancel_after_text: bool = False, **params):
    """Submit `n` jobs of one request; returns their events, in order, and the jobs."""
    loop = asyncio.get_running_loop()
    events, seen = asyncio.Queue(), []
    jobs = [
        Job(_prompt(q), SamplingParams(**params), list(stops), loop, events, index=i)
        for i in range(n)
    ]
    q.submit(*jobs)
    ended = 0
    while ended < n:
        event = await asyncio.wait_for(events.get(), WAIT_S)
        seen.append(event)
        if event[1] == "text" and cancel_after_text:
            jobs[0].cancel.set()
        ended += event[1] in ("done", "error")
    return seen, jobs


def _text(events, index: int = 0) -> str:
    return "".join(v for i, kind, v in events if i == index and kind == "text")


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
