"""Make freed tensor memory go back to the OS, so RSS reports what is held.

glibc serves large allocations with mmap only up to a threshold that grows
every time such a block is freed; after a few layers stream through, new layer
buffers come from the heap instead, and freed heap memory is kept by the
process. Pinning the threshold and trimming after releases keeps RSS honest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim  # noqa: B018  (glibc only)
        lib.mallopt  # noqa: B018
        return lib
    except (OSError, AttributeError):
        return None


@functools.cache
def pin_mmap_threshold() -> bool:
    """Serve allocations >= 1 MiB by mmap for good (returned to the OS on free)."""
    lib = _libc()
    return bool(lib and lib.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_freed_memory() -> None:
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
