"""Loading a kernel library: built on first use (tpi.kernels.build), bound with
ctypes, and never the reason an operation fails (None: the caller uses torch)."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path

from tpi.kernels.build import build, enabled, log

_off = False


def set_enabled(flag: bool) -> None:
    """Turn every native kernel off (or back on) in this process: benchmarks time
    both side by side. Off from the start with TPI_KERNELS=0."""
    global _off
    _off = not flag


def disabled() -> bool:
    """Whether set_enabled(False) turned the kernels off in this process."""
    return _off


class NativeLibrary:
    """One C source's library, loaded once per process on first `get()`."""

    def __init__(self, source: Path, bind: Callable[[ctypes.CDLL], None]) -> None:
        self.source = source
        self.bind = bind  # declares the functions' argument and result types
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def get(self) -> ctypes.CDLL | None:
        if _off:
            return None
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                try:
                    self._lib = self._load() if enabled() else None
                except Exception as e:  # an unreadable $TPI_HOME, say: never fail an op
                    log.warning("native kernels unavailable (%s): torch's kernels are used", e)
                    self._lib = None
                self._tried = True
        return self._lib

    def forget(self) -> None:
        """Load again on the next `get()` (tests)."""
        with self._lock:
            self._lib, self._tried = None, False

    def _load(self) -> ctypes.CDLL | None:
        path = build(self.source)
        if path is None:
            return None
        # torch is imported first, so the library's OpenMP calls bind to torch's own
        # libgomp: one thread pool, sized by torch.set_num_threads.
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            log.warning("could not load %s (%s): torch's kernels are used", path, e)
            return None
        self.bind(lib)
        return lib
