"""One cluster, one generation at a time: requests wait in order in a bounded
queue; a dedicated thread owns the model (engine, cluster session and its
sockets) so the web server stays responsive.

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
from tpi.master.engine import Engine
from tpi.master.generation import GenerationStats, generate_tokens
from tpi.master.sampling import SamplingParams
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

    def emit(self, kind: str, value: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class GenerationQueue:
    """Events a job receives, in order: ("text", str)*, then ("done", finish_reason)
    or ("error", exception)."""

    def __init__(self, holder: ModelHolder, capacity: int) -> None:
        self.holder = holder
        self.tokenizer = holder.loaded.tokenizer
        self.capacity = capacity  # requests admitted at once: running + waiting
        self._admitted = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self.busy = False
        self.recent: deque[dict] = deque(maxlen=5)  # last finished jobs, for /health
        self._thread = threading.Thread(target=self._run, name="tpi-generation", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._admitted >= self.capacity:
                raise QueueFull
            self._admitted += 1
        self._queue.put_nowait(job)

    def _finished(self, job: Job, reason: str) -> None:
        with self._lock:
            self._admitted -= 1
        self.recent.append({"finish_reason": reason, "completion_tokens": job.stats.new_tokens})

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)

    def _next(self) -> Job | None:
        while True:
            try:
                return self._queue.get(timeout=IDLE_CHECK_S)
            except queue.Empty:
                self.holder.check()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            if job.cancel.is_set():  # the client left while waiting
                self._finished(job, "cancelled")
                continue
            self.busy = True
            job.started = time.perf_counter()
            reason = "error"
            try:
                engine = self.holder.ensure().engine  # reconnects a failed cluster
                reason = self._generate(engine, job)
            except BaseException as e:  # reported to the request, never kills the thread
                job.emit("error", e)
                if isinstance(e, ClusterError):
                    self.holder.failed(e)
            finally:
                self.busy = False
                self._finished(job, reason)

    def _generate(self, engine: Engine, job: Job) -> str:
        decoder = StreamDecoder(self.tokenizer)
        stop = StopMatcher(job.stops)
        reason = "length"
        for token in generate_tokens(
            engine, job.prompt_ids, job.params, self.tokenizer.eos_ids, job.stats, job.cancel
        ):
            text = stop.push(decoder.push(token))
            if text:
                job.emit("text", text)
            if stop.stopped:
                reason = "stop"
                break
        else:
            reason = "stop" if job.stats.stop_reason == "eos" else "length"
        if not stop.stopped:
            tail = stop.push(decoder.flush()) + stop.flush()
            if tail:
                job.emit("text", tail)
            if stop.stopped:
                reason = "stop"
        if job.stats.stop_reason == "cancelled":
            reason = "cancelled"
        job.emit("done", reason)
        return reason
