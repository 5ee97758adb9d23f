"""The crc32 of shard files (the zlib / IEEE polynomial), as fast as this machine has it.

Every read of a shard file is checked against its crc32 (tpi.storage.read_check).
zlib's crc32 runs at 1.5-2.5 GB/s on the 2-core VM the benchmarks run on, about
the speed of its disk: streaming a 70B-shaped model, checking what was read took
as much CPU as the disk took time. ISA-L's (the `isal` package) computes the same
value with carry-less multiplication at ~8 GB/s there; zlib's is the fallback
where it is not installed. Both release the GIL on large buffers.
"""

from __future__ import annotations

import zlib

try:
    from isal.isal_zlib import crc32 as _fast_crc32
except ImportError:  # pragma: no cover - depends on the installation
    _fast_crc32 = None

IMPLEMENTATION = "isal" if _fast_crc32 is not None else "zlib"


def crc32(data, value: int = 0) -> int:
    """zlib.crc32(data, value), computed by the fastest implementation available."""
    if _fast_crc32 is not None:
        return _fast_crc32(data, value)
    return zlib.crc32(data, value)
