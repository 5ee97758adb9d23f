"""One cluster, one generation at a time: requests wait in order in a bounded
queue; a dedicated thread owns the engine so the web server stays responsive."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tpi.master.engine import Engine
from tpi.master.generation import GenerationStats, generate_tokens
from tpi.master.sampling import SamplingParams
from tpi.master.serve.stop_strings import StopMatcher
from tpi.text.tokenizer import StreamDecoder, TextTokenizer


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

    def __init__(
        self,
        engine: Engine,
        tokenizer: TextTokenizer,
        capacity: int,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.on_error = on_error
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

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancel.is_set():  # the client left while waiting
                self._finished(job, "cancelled")
                continue
            self.busy = True
            job.started = time.perf_counter()
            reason = "error"
            try:
                reason = self._generate(job)
            except BaseException as e:  # reported to the request, never kills the thread
                job.emit("error", e)
                if self.on_error:
                    self.on_error(e)
            finally:
                self.busy = False
                self._finished(job, reason)

    def _generate(self, job: Job) -> str:
        decoder = StreamDecoder(self.tokenizer)
        stop = StopMatcher(job.stops)
        reason = "length"
        for token in generate_tokens(
            self.engine, job.prompt_ids, job.params, self.tokenizer.eos_ids, job.stats, job.cancel
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
