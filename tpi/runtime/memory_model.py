"""The one memory model of a rank: from its sizes, the context and the window it plans.

need = baseline + window x layer slot + staging (+ cached experts)
       + KV cache for the context + head + activations

Two callers give it the sizes, and both call `choose_rank_memory`:
- the runtime (tpi.runtime.rank_runtime.build_rank) measures them: the shard's
  StreamLayout (slot, staging, experts), the head it loaded, and its baseline;
- the planner (tpi.planning.footprint) computes them from shapes, for shares nobody
  has split yet, to predict the window each rank will choose.
So a window the planner predicts is one the runtime accepts, given the same sizes
(tests/test_memory_model.py checks both against real splits).

Baseline: the memory of the rank's process that is neither weights nor KV cache nor
activations (Python, torch, the session, the master's tokenizer). The runtime
measures it at load: its RSS, freed heap returned to the OS first, minus the head
and layers it already holds. The planner cannot measure that process at that point:
what it has is the node's profile (tpi.planning.device_probe), whose `rss_bytes` is
the same process (the master itself; a worker's daemon) measured earlier, before it
connected for the run, verified a shard or (the master) loaded the tokenizer. So the
planner's baseline is the profile's plus what a process was measured to gain between
the two points (`expected_baseline`), a margin that errs on the side of a smaller
window: a streaming rank reads every layer per token whatever its window, so a few
layers less cost little, and a window refused at load costs the run. Measured under
`tpi cluster --workers 3 --mem-limit 700MB` with SmolLM2: the master's baseline at
load 35-41 MiB above its profile (its tokenizer alone 29-41 MiB; 58-70 MiB before
freed heap was returned), a worker's 9-21 MiB. Allowed: 48 MiB on every rank, and
a KiB per vocabulary entry for the master's tokenizer (96 MiB for SmolLM2).

A context is shrunk to fit (when none was asked for) so that the window asked for,
or two layers, still fits beside its KV cache: then a runtime whose measured
baseline is below the planner's margin gets at least the planned context, and the
planned window still fits.

Everything here is arithmetic on the sizes given; the budget is given too (the
runtime resolves its cgroup limit, tpi.runtime.memory_budget.effective_budget; the
planner passes a node's capacity).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tpi.model.config import ModelConfig
from tpi.model.kv_cache import kv_bytes_per_position
from tpi.model.partition import RankSlice
from tpi.runtime.memory_budget import MemoryBudgetError, format_size

DEFAULT_MAX_CONTEXT = 4096  # when memory is planned: the KV cache is reserved for this
ACTIVATION_BASE = 32 * 1024**2
MIN_FITTED_CONTEXT = 256  # a context shrunk to fit a budget is a multiple of this
LOAD_GROWTH_BYTES = 48 << 20  # a process from its profile to its load (see above)
TOKENIZER_BYTES_PER_ENTRY = 1024  # the master's tokenizer: SmolLM2's took 600-860

Note = Callable[[str], None]


def kv_cache_bytes(cfg: ModelConfig, rs: RankSlice, context: int, elem: int) -> int:
    return context * kv_bytes_per_position(cfg.num_layers, rs.n_kv, cfg.head_dim, elem)


def activation_bytes(cfg: ModelConfig, rs: RankSlice, context: int) -> int:
    """Rough peak of temporaries during a prefill of `context` tokens (fp32)."""
    return context * activation_bytes_per_position(cfg, rs) + ACTIVATION_BASE


def activation_bytes_per_position(cfg: ModelConfig, rs: RankSlice) -> int:
    width = max(cfg.hidden_size, (rs.n_q + 2 * rs.n_kv) * cfg.head_dim, 2 * rs.n_mlp)
    return 6 * width * 4


def context_limit(cfg: ModelConfig, max_context: int | None, planned: bool) -> int:
    """Tokens the KV cache is sized for and capped at: as asked; else the model's
    own limit, at most DEFAULT_MAX_CONTEXT when memory is planned (a window, a
    budget or a cgroup limit), since the plan reserves the KV cache in full."""
    if max_context:
        return min(cfg.max_position_embeddings, max_context)
    if planned:
        return min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    return cfg.max_position_embeddings


def expected_baseline(profiled_rss: int, vocab_size: int, master: bool) -> int:
    """The baseline a rank will measure at load, from its process's RSS in its profile."""
    tokenizer = vocab_size * TOKENIZER_BYTES_PER_ENTRY if master else 0
    return profiled_rss + LOAD_GROWTH_BYTES + tokenizer


@dataclass(frozen=True)
class ExpertSizes:
    """A mixture of experts' streamed experts on one rank (tpi.runtime.expert_stream)."""

    held: int  # experts this rank holds in a MoE layer
    picks: int  # experts one token picks in a layer (top k)
    moe_layers: int
    slot_bytes: int
    staging_bytes: int

    def cache_bytes(self, per_layer: int) -> int:
        """Memory for `per_layer` slots in every MoE layer, plus the staging buffer."""
        return self.moe_layers * per_layer * self.slot_bytes + self.staging_bytes


@dataclass(frozen=True)
class RankSizes:
    """What a rank's memory is made of, in bytes."""

    num_layers: int
    layer_bytes: int  # one window slot
    staging_bytes: int  # the layers' conversion buffer (0: read straight into slots)
    head_bytes: int  # embedding, final norm, LM head (or this rank's rows of them)
    baseline_bytes: int
    kv_per_position: int  # keys and values of one token, all layers
    activation_per_position: int
    experts: ExpertSizes | None = None

    def kv_bytes(self, context: int) -> int:
        return context * self.kv_per_position

    def activation_bytes(self, context: int) -> int:
        return context * self.activation_per_position + ACTIVATION_BASE


def fit_context(
    *,
    context: int,
    per_position_bytes: int,
    fixed_bytes: int,
    layer_bytes: int,
    num_layers: int,
    budget_bytes: int | None,
    window: int | None = None,
) -> int:
    """`context`, or fewer tokens (a multiple of MIN_FITTED_CONTEXT) when the KV cache
    and activations reserved for it would leave the budget no room for `window`
    layers (two when none is asked for; one, for a single-layer model). A 70B-shaped
    model keeps 0.64 MB of fp32 keys and values per token on one node: 4096 tokens
    alone are 2.7 GB. If not even MIN_FITTED_CONTEXT fits, `context` is returned and
    the plan names what is short."""
    if budget_bytes is None or per_position_bytes <= 0:
        return context
    room = budget_bytes - fixed_bytes - min(window or 2, num_layers) * layer_bytes
    fits = room // per_position_bytes // MIN_FITTED_CONTEXT * MIN_FITTED_CONTEXT
    if fits >= context or fits < MIN_FITTED_CONTEXT:
        return context
    return int(fits)


@dataclass(frozen=True)
class WindowChoice:
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


def choose_window(
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
    budget_source: str = "--memory-budget",
) -> WindowChoice:
    """The window to use: as asked (refused if over the budget), else the largest
    that fits the budget (all layers without one)."""
    fixed = baseline_bytes + staging_bytes + kv_bytes + head_bytes + activation_bytes

    def choice(w: int) -> WindowChoice:
        return WindowChoice(
            w,
            num_layers,
            layer_bytes,
            staging_bytes,
            kv_bytes,
            head_bytes,
            activation_bytes,
            baseline_bytes,
            budget_bytes,
            budget_source,
        )

    if window is None:
        if budget_bytes is None:
            return choice(num_layers)
        fits = (budget_bytes - fixed) // layer_bytes if layer_bytes else num_layers
        window = int(min(num_layers, fits))
        if window < 1:
            raise MemoryBudgetError(
                f"out of memory budget: need {format_size(fixed + layer_bytes)} for even one layer, "
                f"have {format_size(budget_bytes)} ({budget_source})"
            )
        return choice(window)
    window = max(1, min(window, num_layers))
    p = choice(window)
    if budget_bytes is not None and p.need_bytes > budget_bytes:
        raise MemoryBudgetError(
            f"out of memory budget: need {format_size(p.need_bytes)} for window {window}, "
            f"have {format_size(budget_bytes)} ({budget_source})"
        )
    return p


@dataclass(frozen=True)
class RankMemory:
    """A rank's memory: its window (and what it needs), context and expert slots."""

    window: WindowChoice
    context: int  # tokens the KV cache is reserved for
    expert_slots: int | None  # per MoE layer (None: a dense model)


def choose_rank_memory(
    sizes: RankSizes,
    *,
    context: int,
    fit: bool,
    window: int | None,
    budget_bytes: int | None,
    budget_source: str = "--memory-budget",
    note: Note | None = None,
) -> RankMemory:
    """The context (`context`, shrunk to fit the budget if `fit`), the expert slots
    and the window (as asked, else the largest that fits) of a rank; raises
    MemoryBudgetError if the window asked for, or a single layer, does not fit."""
    context, slots, staging = _context_and_experts(sizes, context, fit, window, budget_bytes, note)
    choice = choose_window(
        num_layers=sizes.num_layers,
        layer_bytes=sizes.layer_bytes,
        staging_bytes=staging,
        kv_bytes=sizes.kv_bytes(context),
        head_bytes=sizes.head_bytes,
        activation_bytes=sizes.activation_bytes(context),
        baseline_bytes=sizes.baseline_bytes,
        window=window,
        budget_bytes=budget_bytes,
        budget_source=budget_source,
    )
    return RankMemory(choice, context, slots)


def need_at_window(
    sizes: RankSizes, *, context: int, fit: bool, window: int, budget_bytes: int | None
) -> RankMemory:
    """What a rank given `window` plans under `budget_bytes`, over budget or not (a
    placement's predicted memory, shown beside the node's capacity). A window of
    every layer is not asked for (the loader leaves the choice to the rank)."""
    w = max(1, min(window, sizes.num_layers))
    asked = w if w < sizes.num_layers else None
    context, slots, staging = _context_and_experts(sizes, context, fit, asked, budget_bytes)
    choice = WindowChoice(
        w,
        sizes.num_layers,
        sizes.layer_bytes,
        staging,
        sizes.kv_bytes(context),
        sizes.head_bytes,
        sizes.activation_bytes(context),
        sizes.baseline_bytes,
        budget_bytes,
        "capacity",
    )
    return RankMemory(choice, context, slots)


def _context_and_experts(
    sizes: RankSizes,
    context: int,
    fit: bool,
    window: int | None,
    budget: int | None,
    note: Note | None = None,
) -> tuple[int, int | None, int]:
    """(context, expert slots per MoE layer, staging with the expert cache): a
    context first, cached experts second."""
    ex = sizes.experts
    slots = _expert_slots(ex, window, sizes.num_layers) if ex is not None else None
    staging = sizes.staging_bytes + (ex.cache_bytes(slots) if ex is not None else 0)
    if fit:
        context = _fitted_context(sizes, context, staging, slots, window, budget, note)
    if ex is None:
        return context, None, staging
    if window is None:
        # Under a budget: every expert held if all of it fits, else the token's few.
        whole = sizes.staging_bytes + ex.cache_bytes(ex.held)
        need = _need(sizes, sizes.num_layers, whole, context)
        if budget is None or need <= budget:
            slots, staging = ex.held, whole
    if slots < ex.held:
        other = _need(sizes, min(window or 2, sizes.num_layers), 0, context)
        slots, staging = fit_expert_slots(ex, slots, staging, budget=budget, other=other, note=note)
    return context, slots, staging


def _need(sizes: RankSizes, window: int, staging: int, context: int) -> int:
    return (
        sizes.baseline_bytes
        + window * sizes.layer_bytes
        + staging
        + sizes.kv_bytes(context)
        + sizes.head_bytes
        + sizes.activation_bytes(context)
    )


def _fitted_context(
    sizes: RankSizes,
    context: int,
    staging: int,
    slots: int | None,
    window: int | None,
    budget: int | None,
    note: Note | None,
) -> int:
    """A big model's KV cache for the default context may not fit a small device:
    then the context shrinks to what leaves room for the window, and says so."""

    def fit(with_staging: int) -> int:
        return fit_context(
            context=context,
            per_position_bytes=sizes.kv_per_position + sizes.activation_per_position,
            fixed_bytes=sizes.baseline_bytes + with_staging + sizes.head_bytes + ACTIVATION_BASE,
            layer_bytes=sizes.layer_bytes,
            num_layers=sizes.num_layers,
            budget_bytes=budget,
            window=window,
        )

    fitted = fit(staging)
    ex = sizes.experts
    if ex is not None and fitted == context and slots > 1:
        # Not even a short context fits beside a token's picks cached in every
        # layer: fit it beside one slot per layer, which fit_expert_slots then
        # grows into what is left (a context first, cached experts second).
        fitted = fit(staging - ex.cache_bytes(slots) + ex.cache_bytes(1))
    if fitted < context and note is not None:
        note(
            f"context limited to {fitted} tokens so the KV cache fits the "
            f"memory budget with a window (--max-context sets it)"
        )
    return fitted


def _expert_slots(ex: ExpertSizes, window: int | None, num_layers: int) -> int:
    """Expert slots per MoE layer: every held expert with a window of every layer;
    else the experts one token picks in a layer (its top k, as far as this rank
    holds them), so the next token finds those it picks again. Without a window,
    every expert is then held if the budget (or no budget) allows."""
    if window is not None and window >= num_layers:
        return ex.held
    return min(ex.held, max(1, ex.picks))


def fit_expert_slots(
    ex: ExpertSizes,
    slots: int,
    staging: int,
    *,
    budget: int | None,
    other: int,
    note: Note | None = None,
) -> tuple[int, int]:
    """Streamed experts' slots per MoE layer, cut (down to one) so that a window of
    two layers (or the one asked for) still fits the budget: on a small device with
    many MoE layers a token's picks in every layer may not all stay cached. Fewer
    slots than a token picks mean those picks are read one by one, and fewer hits;
    returns (slots, staging with that cache). `other`: the plan's bytes besides
    `staging`."""
    if budget is None:
        return slots, staging
    room = budget - other - (staging - ex.cache_bytes(slots))
    fit = max(1, (room - ex.staging_bytes) // max(1, ex.moe_layers * ex.slot_bytes))
    if fit >= slots:
        return slots, staging
    if note is not None:
        note(
            f"{fit} expert slot(s) per MoE layer fit the memory budget (of the "
            f"{slots} a token picks): more of its experts are read from disk"
        )
    return fit, staging - ex.cache_bytes(slots) + ex.cache_bytes(fit)
