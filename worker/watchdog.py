"""Ends a worker whose main thread has stopped making progress, so its master
names it within seconds, as it names a dead one.

libzmq answers the link's heartbeats from its own I/O thread, so a worker whose
Python code is deadlocked, or stuck in a C call, still looks alive to the
master, which would wait for its partial sums until the step timeout. This
watchdog thread looks for signs of life every half second: a beat (the main
thread passes through its receive loop twice a second while it waits for
messages), CPU time, or bytes read from disk, by any thread but libzmq's, or
CPU time of a child process it waits for (the native kernels' compiler at a
first step, which may take longer than HANG_S on a busy machine). None for
HANG_S seconds means hung: it logs every thread's stack and exits, the
link drops, and the master reports the rank. (A C call stuck while holding the
GIL would starve this thread too; the C calls a worker makes, torch, zlib,
file and socket I/O, release it. faulthandler's C-level timer could catch that
case, but it would also fire on every worker resumed after SIGSTOP.)
"""

from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("tpi.worker")

HANG_S = 4.0
TICK_S = 0.5
FROZEN_TICK_S = 4 * TICK_S
EXIT_CODE = 3

_last_beat = time.monotonic()


def beat() -> None:
    """The main thread is alive (called from its receive loops)."""
    global _last_beat
    _last_beat = time.monotonic()


def _children_ticks(pid: str, depth: int = 3) -> int:
    """CPU ticks of the live descendants of `pid` (a compiler driver's own children
    do the work), `depth` generations deep."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile
            if depth > 1:
                total += _children_ticks(child, depth - 1)
    return total


def _activity(skip_tid: int) -> int:
    """CPU ticks plus bytes read, summed over this process's threads but libzmq's
    I/O threads (heartbeats) and the watchdog itself, plus the CPU ticks of the
    child processes it waits for."""
    total = _children_ticks("self")
    for task in Path("/proc/self/task").iterdir():
        try:
            if int(task.name) == skip_tid or (task / "comm").read_text().startswith("ZMQbg"):
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for line in (task / "io").read_text().splitlines():
                if line.startswith("rchar:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile, or no per-thread accounting
    return total


class Watchdog:
    """Watches while the daemon serves: `with Watchdog(): daemon.serve(...)`."""

    def __init__(self, hang_s: float = HANG_S) -> None:
        self.hang_s = hang_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tpi-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if Path("/proc/self/task").is_dir():
            beat()
            self._thread.start()
        else:
            log.warning("no /proc: a hung worker will be noticed only by the step timeout")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * TICK_S)

    def _watch(self) -> None:
        me = threading.get_native_id()
        last, changed = _activity(me), time.monotonic()
        while True:
            before = time.monotonic()
            if self._stop.wait(TICK_S):
                return
            now, seen = time.monotonic(), _activity(me)
            if seen != last or now - before > FROZEN_TICK_S:
                # Activity; or this tick itself lasted far too long: the whole
                # process was stopped (SIGSTOP, a suspended machine), not hung.
                last, changed = seen, now
            quiet = now - max(_last_beat, changed)
            if quiet > self.hang_s:
                log.error(
                    "the worker made no progress for %.1f s (hung); exiting so the master "
                    "notices (stacks follow)",
                    quiet,
                )
                faulthandler.dump_traceback(all_threads=True)
                os._exit(EXIT_CODE)
