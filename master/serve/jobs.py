"""Many generations at once: admitted requests join the running batch between
forward passes (continuous batching, tpi.master.batching); a dedicated thread
owns the model (engine, cluster session and its sockets) and steps the batch,
so the web server stays responsive.

That thread also reconnects a failed cluster before the next job (a job queued
before a failure gets 503 cluster_down, not a run on a closed session) and,
while idle, checks the links every IDLE_CHECK_S so /health notices a worker
that died between requests."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tpi.comm.links import ClusterError
from tpi.master.batching import Batcher
from tpi.master.engine import Engine
from tpi.master.sampling import SamplingParams
from tpi.master.sequence import BatchSequence, GenerationStats
from tpi.master.serve.metrics import ServeMetrics
from tpi.master.serve.model_holder import ModelHolder
from tpi.master.serve.stop_strings import StopMatcher
from tpi.text.tokenizer import StreamDecoder

IDLE_CHECK_S = 1.0


class QueueFull(Exception):
    """More requests than --queue-size are already admitted."""


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats = field(default_factory=GenerationStats)
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    # Which choice of its request this job is (OpenAI's n): the n jobs of one
    # request share `events` and `cancel`, and events carry this index.
    index: int = 0

    def emit(self, kind: str, value: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))


@dataclass
class BatchSettings:
    max_batch: int = 8  # sequences in one forward pass
    prefill_chunk: int = 128  # prompt tokens per pass while others decode (0: whole prompt)
    kv_budget_bytes: int | None = None  # KV cache all running sequences may use
    kv_bytes_per_position: int | None = None  # of the fullest rank (None: this node's)


class _Running:
    """A job's side of its sequence: text out as tokens come, stop strings checked."""

    def __init__(self, job: Job, tokenizer, metrics: ServeMetrics) -> None:
        self.job = job
        self.decoder = StreamDecoder(tokenizer)
        self.stop = StopMatcher(job.stops)
        self.metrics = metrics
        self.last = 0.0

    def on_token(self, token: int) -> bool:
        now = time.perf_counter()
        if self.last:
            self.metrics.inter_token.observe(now - self.last)
        else:
            self.metrics.ttft.observe(now - self.job.submitted)
        self.last = now
        self.metrics.tokens.inc()
        text = self.stop.push(self.decoder.push(token))
        if text:
            self.job.emit("text", text)
        return not self.stop.stopped

    def finish(self, stop_reason: str) -> str:
        if not self.stop.stopped and stop_reason != "error":
            tail = self.stop.push(self.decoder.flush()) + self.stop.flush()
            if tail:
                self.job.emit("text", tail)
        if self.stop.stopped:
            return "stop"
        return {"eos": "stop", "cancelled": "cancelled"}.get(stop_reason, "length")


class GenerationQueue:
    """Events a job receives, in order, each tagged with the job's index:
    ("text", str)*, then ("done", finish_reason) or ("error", exception)."""

    def __init__(
        self, holder: ModelHolder, capacity: int, settings: BatchSettings | None = None
    ) -> None:
        self.holder = holder
        self.tokenizer = holder.loaded.tokenizer
        self.capacity = capacity  # requests admitted at once: running + waiting
        self.settings = settings or BatchSettings()
        self._admitted = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._batcher: Batcher | None = None
        self._jobs: dict[int, tuple[Job, _Running, BatchSequence]] = {}
        self._closed = False
        self.recent: deque[dict] = deque(maxlen=5)  # last finished jobs, for /health
        self.metrics = ServeMetrics()
        self.metrics.gauges(
            waiting=lambda: self.waiting,
            running=lambda: self.running,
            kv_bytes=lambda: self._batcher.kv_in_use if self._batcher is not None else 0,
            allreduce=self._allreduce_totals,
            failures=lambda: holder.failures,
            recoveries=lambda: holder.recoveries,
        )
        # Run on this thread between passes (the cluster view samples every rank here).
        self.between_passes: list = []
        self._thread = threading.Thread(target=self._run, name="tpi-generation", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    @property
    def running(self) -> int:
        b = self._batcher
        return len(b.running) if b is not None else 0

    @property
    def waiting(self) -> int:
        b = self._batcher
        return self._queue.qsize() + (len(b.waiting) if b is not None else 0)

    def _allreduce_totals(self) -> tuple[float, float]:
        cluster = self.holder.loaded.cluster
        if cluster is None:
            return 0.0, 0.0
        stats = cluster.topology.collective.stats
        return float(stats.count), float(stats.seconds)

    def submit(self, *jobs: Job) -> None:
        """Admit these jobs (a request's n choices) together, or none of them."""
        with self._lock:
            if self._admitted + len(jobs) > self.capacity:
                raise QueueFull
            self._admitted += len(jobs)
        for job in jobs:
            self._queue.put_nowait(job)

    def _finished(self, job: Job, reason: str) -> None:
        with self._lock:
            self._admitted -= 1
        self.recent.append({"finish_reason": reason, "completion_tokens": job.stats.new_tokens})
        self.metrics.requests.labels(reason).inc()

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)

    # --- the generation thread ------------------------------------------------------

    def _take_new(self) -> None:
        """Move submitted jobs into the batch; wait for one while nothing runs."""
        block = not self._jobs
        while True:
            try:
                job = self._queue.get(timeout=IDLE_CHECK_S) if block else self._queue.get_nowait()
            except queue.Empty:
                if block:
                    self.holder.check()
                    self.holder.grow()  # a request boundary: take back returning workers
                    continue
                return
            if job is None:
                self._closed = True
                return
            block = False
            self._join(job)

    def _batcher_for(self, engine: Engine) -> Batcher:
        if self._batcher is None or self._batcher.engine is not engine:
            s = self.settings
            recover = self._recover if self.holder.elastic is not None else None
            self._batcher = Batcher(
                engine,
                s.max_batch,
                s.prefill_chunk,
                s.kv_budget_bytes,
                s.kv_bytes_per_position,
                recover=recover,
            )
        return self._batcher

    def _recover(self, e: ClusterError) -> Engine:
        """A rank was lost mid-batch: re-plan over the survivors; running requests
        are told (a streamed answer carries it as an SSE comment) and go on."""
        engine = self.holder.recover(e)
        events = self.holder.elastic.recoveries
        note = events[-1].describe() if events else str(e)
        for job, _run, seq in self._jobs.values():
            if not seq.done.is_set():
                job.emit("notice", note)
        return engine

    def _join(self, job: Job) -> None:
        if job.cancel.is_set():  # the client left while waiting
            self._finished(job, "cancelled")
            return
        job.started = time.perf_counter()
        try:
            batcher = self._batcher_for(self.holder.ensure().engine)  # reconnects a failed cluster
            run = _Running(job, self.tokenizer, self.metrics)
            seq = BatchSequence(
                job.prompt_ids,
                job.params,
                frozenset(self.tokenizer.eos_ids),
                run.on_token,
                job.cancel,
                job.stats,
            )
            batcher.submit(seq)
        except BaseException as e:  # reported to the request, never kills the thread
            self._finished(job, "error")
            job.emit("error", e)
            return
        self._jobs[id(seq)] = (job, run, seq)

    def _settle(self) -> None:
        """Tell every job whose sequence ended how it ended."""
        for key, (job, run, seq) in list(self._jobs.items()):
            if not seq.done.is_set():
                continue
            del self._jobs[key]
            error = seq.error
            reason = "error" if error is not None else run.finish(seq.stats.stop_reason)
            # Counted as finished before the client hears of it: a client that asks
            # again at once finds its place free (no 429) and /health up to date.
            self._finished(job, reason)
            if error is not None:
                job.emit("error", error)
            else:
                job.emit("done", reason)

    def _run(self) -> None:
        while not self._closed:
            self._take_new()
            batcher = self._batcher
            if batcher is None or not batcher.busy:
                continue
            try:
                batcher.step()
                self.metrics.steps.inc()
                for hook in self.between_passes:
                    hook()
            except BaseException as e:  # every running sequence got the error
                if isinstance(e, ClusterError):
                    self.holder.failed(e)
                    self._batcher = None
                    for _job, _run, seq in self._jobs.values():
                        if not seq.done.is_set():  # waiting ones: the cluster is gone too
                            seq.error = e
                            seq.done.set()
            self._settle()
