"""Choose a sliding window that fits a memory budget, and explain the choice.

need = baseline (this process before weights) + window x layer slot
       + KV cache for the planned context + head (master) + activations.
A cgroup memory limit, where one applies, is a budget too: a node under a
cap too small for its window refuses with "out of memory budget: need X,
have Y" instead of being killed by the OOM killer half-way through a token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tpi.errors import TpiError
from tpi.model.config import ModelConfig
from tpi.model.kv_cache import kv_bytes_per_position
from tpi.model.partition import RankSlice
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


def kv_cache_bytes(cfg: ModelConfig, rs: RankSlice, context: int, elem: int) -> int:
    return context * kv_bytes_per_position(cfg.num_layers, rs.n_kv, cfg.head_dim, elem)


ACTIVATION_BASE = 32 * 1024**2
MIN_FITTED_CONTEXT = 256  # a context shrunk to fit a budget is a multiple of this


def activation_bytes(cfg: ModelConfig, rs: RankSlice, context: int) -> int:
    """Rough peak of temporaries during a prefill of `context` tokens (fp32)."""
    return context * activation_bytes_per_position(cfg, rs) + ACTIVATION_BASE


def activation_bytes_per_position(cfg: ModelConfig, rs: RankSlice) -> int:
    width = max(cfg.hidden_size, (rs.n_q + 2 * rs.n_kv) * cfg.head_dim, 2 * rs.n_mlp)
    return 6 * width * 4


def effective_budget(budget_bytes: int | None) -> tuple[int | None, str]:
    """The smaller of the budget given and the cgroup limit, and where it comes from."""
    limit = memory_limit()
    if limit is not None and (budget_bytes is None or limit < budget_bytes):
        return limit, "cgroup memory limit"
    return budget_bytes, "--memory-budget"


def fit_context(
    *,
    context: int,
    per_position_bytes: int,
    fixed_bytes: int,
    layer_bytes: int,
    num_layers: int,
    budget_bytes: int | None,
) -> int:
    """`context`, or fewer tokens (a multiple of MIN_FITTED_CONTEXT) when the KV cache
    and activations reserved for it would leave the budget no room for a window of
    two layers (one, for a single-layer model). A 70B-shaped model keeps 0.64 MB of
    fp32 keys and values per token on one node: 4096 tokens alone are 2.7 GB. If not
    even MIN_FITTED_CONTEXT fits, `context` is returned and the plan names what is short."""
    if budget_bytes is None or per_position_bytes <= 0:
        return context
    room = budget_bytes - fixed_bytes - min(2, num_layers) * layer_bytes
    fits = room // per_position_bytes // MIN_FITTED_CONTEXT * MIN_FITTED_CONTEXT
    if fits >= context or fits < MIN_FITTED_CONTEXT:
        return context
    return int(fits)


@dataclass(frozen=True)
class WindowPlan:
    window: int
    num_layers: int
    layer_bytes: int
    staging_bytes: int
    kv_bytes: int
    head_bytes: int
    activation_bytes: int
    baseline_bytes: int
    budget_bytes: int | None
    budget_source: str

    @property
    def need_bytes(self) -> int:
        return (
            self.baseline_bytes
            + self.window * self.layer_bytes
            + self.staging_bytes
            + self.kv_bytes
            + self.head_bytes
            + self.activation_bytes
        )

    def describe(self) -> str:
        mode = (
            "all layers resident"
            if self.window >= self.num_layers
            else f"window {self.window} of {self.num_layers} layers"
        )
        parts = (
            f"{mode}: layers {format_size(self.window * self.layer_bytes + self.staging_bytes)}, "
            f"KV cache {format_size(self.kv_bytes)}, head {format_size(self.head_bytes)}, "
            f"activations ~{format_size(self.activation_bytes)}, runtime {format_size(self.baseline_bytes)}"
        )
        if self.budget_bytes is not None:
            parts += f"; need ~{format_size(self.need_bytes)} of {format_size(self.budget_bytes)} ({self.budget_source})"
        return parts

    def to_dict(self) -> dict:
        return {
            "window": self.window,
            "num_layers": self.num_layers,
            "layer_bytes": self.layer_bytes,
            "kv_bytes": self.kv_bytes,
            "head_bytes": self.head_bytes,
            "need_bytes": self.need_bytes,
            "budget_bytes": self.budget_bytes,
            "budget_source": self.budget_source,
        }


def plan_window(
    *,
    num_layers: int,
    layer_bytes: int,
    staging_bytes: int,
    kv_bytes: int,
    head_bytes: int,
    activation_bytes: int,
    baseline_bytes: int,
    window: int | None,
    budget_bytes: int | None,
) -> WindowPlan:
    """The window to use: as asked, else the largest that fits the budget (all if none).

    The effective budget is the smaller of the one given and the cgroup limit.
    """
    budget_bytes, source = effective_budget(budget_bytes)
    fixed = baseline_bytes + staging_bytes + kv_bytes + head_bytes + activation_bytes

    def plan(w: int) -> WindowPlan:
        return WindowPlan(
            w,
            num_layers,
            layer_bytes,
            staging_bytes,
            kv_bytes,
            head_bytes,
            activation_bytes,
            baseline_bytes,
            budget_bytes,
            source,
        )

    if window is None:
        if budget_bytes is None:
            return plan(num_layers)
        fits = (budget_bytes - fixed) // layer_bytes if layer_bytes else num_layers
        window = int(min(num_layers, fits))
        if window < 1:
            raise MemoryBudgetError(
                f"out of memory budget: need {format_size(fixed + layer_bytes)} for even one layer, "
                f"have {format_size(budget_bytes)} ({source})"
            )
        return plan(window)
    window = max(1, min(window, num_layers))
    p = plan(window)
    if budget_bytes is not None and p.need_bytes > budget_bytes:
        raise MemoryBudgetError(
            f"out of memory budget: need {format_size(p.need_bytes)} for window {window}, "
            f"have {format_size(budget_bytes)} ({source})"
        )
    return p
