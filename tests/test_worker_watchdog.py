"""The hang watchdog (worker/watchdog.py) in this process, with short periods and
its exit replaced: it fires on a silent main thread, and not while the thread
beats or computes. (A hung worker process named by its master: test_hardening.py.)"""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest

import tpi.worker.watchdog as watchdog

HANG_S = 0.4


@pytest.fixture
def exits(monkeypatch) -> SimpleNamespace:
    """The exit codes the watchdog asked for (instead of ending this process), and
    an event set at the first."""
    seen = SimpleNamespace(codes=[], fired=threading.Event())

    def _exit(code: int) -> None:
        seen.codes.append(code)
        seen.fired.set()

    monkeypatch.setattr(watchdog, "TICK_S", 0.02)
    monkeypatch.setattr(watchdog, "os", SimpleNamespace(_exit=_exit))
    return seen


def test_a_main_thread_that_stops_beating_is_declared_hung(exits, caplog):
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="tpi.worker"), watchdog.Watchdog(HANG_S):
        assert exits.fired.wait(10 * HANG_S)
    took = time.monotonic() - t0
    assert exits.codes[0] == watchdog.EXIT_CODE
    assert HANG_S <= took < 5 * HANG_S
    assert "no progress for" in caplog.text and "hung" in caplog.text


def test_a_beating_main_thread_is_left_alone(exits):
    with watchdog.Watchdog(HANG_S):
        end = time.monotonic() + 2 * HANG_S
        while time.monotonic() < end:
            watchdog.beat()
            time.sleep(0.02)
    assert exits.codes == []


def test_a_main_thread_busy_computing_without_beating_is_not_hung(exits):
    with watchdog.Watchdog(HANG_S):
        end = time.monotonic() + 2 * HANG_S
        x = 0
        while time.monotonic() < end:  # CPU time is a sign of life (a long matmul)
            x += 1
    assert exits.codes == []


def test_the_watchdog_stops_with_its_block(exits):
    with watchdog.Watchdog(HANG_S) as dog:
        pass
    assert not dog._thread.is_alive()
    assert not exits.fired.wait(2 * HANG_S)


def test_activity_counts_cpu_and_reads_but_not_the_skipped_thread(tmp_path):
    me = threading.get_native_id()
    (tmp_path / "f").write_bytes(b"x" * (1 << 20))
    before = watchdog._activity(skip_tid=-1)
    (tmp_path / "f").read_bytes()
    assert watchdog._activity(skip_tid=-1) - before >= 1 << 20  # bytes read count
    before = watchdog._activity(skip_tid=me)
    (tmp_path / "f").read_bytes()
    assert watchdog._activity(skip_tid=me) - before < 1 << 20  # the skipped thread's do not


def test_a_main_thread_waiting_for_a_busy_child_process_is_not_hung(exits):
    # The native kernels' first build waits for a compiler for seconds: its CPU time
    # is the worker's progress.
    import subprocess
    import sys

    burn = f"import time\nend = time.monotonic() + {3 * HANG_S}\nwhile time.monotonic() < end: pass"
    with watchdog.Watchdog(HANG_S):
        subprocess.run([sys.executable, "-c", burn], check=True, timeout=30)
    assert exits.codes == []


def test_a_main_thread_waiting_for_an_idle_child_process_is_hung(exits):
    import subprocess
    import sys

    with watchdog.Watchdog(HANG_S):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert exits.fired.wait(10 * HANG_S)
        finally:
            child.kill()
            child.wait()
