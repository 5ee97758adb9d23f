"""What a master asks a node to measure (PROFILE_REQUEST) and the answer
(PROFILE), as JSON bodies, checked before anything is allocated for them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tpi.errors import TpiError
from tpi.model.config import ModelConfig
from tpi.planning.device_probe import device_facts, probe_budget, slice_profile
from tpi.planning.footprint import ELEM
from tpi.planning.slice_probe import MAX_POINTS, Setting

# HELLO's manifest for a session that only measures (no shard is asked for).
PROBE_MANIFEST = "probe"
MAX_REQUEST_POINTS = 2 * MAX_POINTS


class ProfileRequestError(TpiError):
    pass


@dataclass(frozen=True)
class ProfileRequest:
    """Measure the device; with a model, also these slices of it in these settings."""

    model: ModelConfig | None = None
    settings: tuple[Setting, ...] = ()
    points: tuple[tuple[int, int, int], ...] = ()
    head_rows: int | None = None  # time an LM head of this many rows (the master's)
    refresh: bool = False

    def to_body(self) -> dict:
        return {
            "model": self.model.to_dict() if self.model else None,
            "settings": [s.to_dict() for s in self.settings],
            "points": [list(p) for p in self.points],
            "head_rows": self.head_rows,
            "refresh": self.refresh,
        }

    @classmethod
    def from_body(cls, body: dict) -> ProfileRequest:
        try:
            model = ModelConfig.from_dict(body["model"]) if body.get("model") else None
            settings = tuple(Setting.from_dict(s) for s in body.get("settings") or ())
            points = tuple(tuple(int(v) for v in p) for p in body.get("points") or ())
            head_rows = body.get("head_rows")
            head_rows = int(head_rows) if head_rows is not None else None
        except (KeyError, TypeError, ValueError, TpiError) as e:
            raise ProfileRequestError(f"malformed profile request: {e}") from None
        if len(points) > MAX_REQUEST_POINTS or len(settings) > 4:
            raise ProfileRequestError("profile request asks for too many measurements")
        if model is not None:
            for q, kv, mlp in points:
                if not (
                    len((q, kv, mlp)) == 3
                    and 1 <= q <= model.num_heads
                    and 1 <= kv <= model.num_kv_heads
                    and 1 <= mlp <= model.intermediate_size
                ):
                    raise ProfileRequestError(
                        f"profile request: slice {q, kv, mlp} is not in the model"
                    )
            if head_rows is not None and not 1 <= head_rows <= model.vocab_size:
                raise ProfileRequestError("profile request: head rows outside the vocabulary")
        return cls(model, settings, points, head_rows, bool(body.get("refresh", False)))


def check_fits(req: ProfileRequest, available: int) -> None:
    """Refuse to time slices that would not fit here at all (the probe holds at
    least one layer slice and, for the head, the whole table)."""
    if req.model is None:
        return
    cfg = req.model
    per_param = max(ELEM[s.dtype] for s in req.settings) if req.settings else 4
    biggest = max(
        ((q + 2 * kv) * cfg.head_dim * cfg.hidden_size * 2 + 3 * mlp * cfg.hidden_size)
        for q, kv, mlp in req.points or [(1, 1, 1)]
    )
    head = (req.head_rows or 0) * cfg.hidden_size * 2
    need = (biggest + head) * per_param * 2
    if need > available:
        raise ProfileRequestError(
            f"cannot time these slices here: they need ~{need >> 20} MiB, {available >> 20} MiB is free"
        )


def answer(
    req: ProfileRequest,
    store: Path | None,
    budget_bytes: int | None,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """The PROFILE body's `profile`: device facts and the asked slice timings."""
    from tpi.planning.profile import slices_key
    from tpi.planning.slice_probe import shape_key

    facts = device_facts(store, budget_bytes, req.refresh, echo)
    check_fits(req, facts.memory_available)
    slices = {}
    if req.model is not None:
        for i, setting in enumerate(req.settings):
            prof = slice_profile(
                req.model,
                setting,
                list(req.points),
                head_rows=req.head_rows if i == 0 else None,
                refresh=req.refresh,
                echo=echo,
                probe_bytes=probe_budget(facts),
            )
            slices[slices_key(shape_key(req.model), setting.key())] = prof.to_dict()
    return {"device": facts.to_dict(), "slices": slices}
