"""Child processes that die with their parent, however the parent ends.

The parent keeps the write end of a pipe and hands the read end to the child;
the kernel closes the write end when the parent exits for any reason (a
signal, SIGKILL, a crash), so the child's read returns end-of-file and it stops
itself. Used for the local workers and the link shaper of `tpi cluster`, which
must never be left running, re-parented to init, after their master is gone.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from typing import IO


def lifeline() -> tuple[int, int]:
    """(read end for the child, write end the parent keeps; neither inherited by
    other children: pass the read end with Popen(pass_fds=...))."""
    return os.pipe()


def spawn(
    cmd: list[str], log: IO[bytes] | int, parent_fd: int | None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `cmd` with its output to `log` (a file or subprocess.DEVNULL), holding
    `parent_fd` (the read end of a lifeline, closed here once passed on). In a session
    of its own: Ctrl-C in the terminal reaches only the parent, which then stops the
    child itself."""
    try:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            pass_fds=(parent_fd,) if parent_fd is not None else (),
        )
    finally:
        if parent_fd is not None:
            os.close(parent_fd)


def watch_parent(fd: int, on_parent_gone: Callable[[], None]) -> threading.Thread:
    """In the child: call `on_parent_gone` once the parent's end of the lifeline closes."""

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass  # the parent never writes; anything read is ignored
        except OSError:
            pass
        on_parent_gone()

    thread = threading.Thread(target=watch, name="tpi-lifeline", daemon=True)
    thread.start()
    return thread
