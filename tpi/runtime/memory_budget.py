"""A memory budget: sizes as people write them, and the limit a rank plans in.

A cgroup memory limit, where one applies, is a budget too: a node under a cap
too small for its window refuses with "out of memory budget: need X, have Y"
instead of being killed by the OOM killer half-way through a token. What a rank
needs within its budget is tpi.runtime.memory_model.
"""

from __future__ import annotations

import re

from tpi.errors import TpiError
from tpi.system.cgroup_limits import memory_limit

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "T": 10**12,
    "TB": 10**12,
    "TIB": 1024**4,
}


class MemoryBudgetError(TpiError):
    pass


def parse_size(text: str) -> int:
    """'2GB', '1.5GiB', '512M', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise MemoryBudgetError(f"cannot read size {text!r} (use e.g. 2GB, 1.5GiB, 512MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def effective_budget(budget_bytes: int | None) -> tuple[int | None, str]:
    """The smaller of the budget given and the cgroup limit, and where it comes from."""
    limit = memory_limit()
    if limit is not None and (budget_bytes is None or limit < budget_bytes):
        return limit, "cgroup memory limit"
    return budget_bytes, "--memory-budget"
