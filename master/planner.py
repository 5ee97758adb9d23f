"""The master plans its cluster: profiles of every node (its own measured here,
the workers' through a probe session), then tpi.planning.solver.

Used by `tpi plan` (preview) and by every command with `--plan auto` (which
then splits the model with the chosen shares, leaves out the nodes the plan
drops and sends each worker its window).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.model.config import ModelConfig, load_config
from tpi.planning.cost_model import Workload
from tpi.planning.device_probe import device_facts, probe_budget, slice_profile
from tpi.planning.footprint import Format, head_bytes, layer_bytes
from tpi.planning.nodes import node_speed
from tpi.planning.profile import DeviceFacts, LinkFacts, NodeProfile, SliceProfile, slices_key
from tpi.planning.request import ProfileRequest
from tpi.planning.slice_probe import Setting, probe_points, shape_key
from tpi.planning.solver import Plan, solve
from tpi.runtime.memory_model import DEFAULT_MAX_CONTEXT

PLAN_MODES = ("auto", "even")
# ms/token is predicted for a decode this far into its context (prompt + half the answer).
DEFAULT_POSITION = 128


@dataclass(frozen=True)
class PlanRequest:
    model_dir: Path
    workers: tuple[str, ...]
    dtype: str = "fp32"
    quant: str = "none"
    group_size: int = 32
    wire_dtype: str = "fp32"
    max_context: int | None = None
    master_budget: int | None = None  # --memory-budget of the master
    prompt_tokens: int = 64
    position: int = DEFAULT_POSITION
    refresh: bool = False


def stored_dtype(model_dir: Path) -> str:
    """The float dtype of the checkpoint's layer weights (what a plain split keeps)."""
    from tpi.storage.tensor_file import SafetensorsFile

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for info in SafetensorsFile(path).tensors.values():
            if ".layers." in info.name and info.dtype.is_floating_point:
                return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
                    info.dtype, "fp32"
                )
    return "fp32"


def _settings(
    cfg: ModelConfig, req: PlanRequest, facts: DeviceFacts, fmt: Format
) -> tuple[Setting, ...]:
    """Resident timings always; a float model's streamed layout too where the node
    could not hold every layer of even half the model (it would stream)."""
    base = Setting(req.dtype, req.quant, req.group_size, resident=True)
    if req.quant in ("int8", "int4"):
        return (base,)
    from tpi.model.partition import plan_partition

    half = plan_partition(cfg, [1.0, 1.0]).slices[0]
    model = cfg.num_layers * layer_bytes(cfg, half, fmt).memory + head_bytes(cfg, fmt)
    if facts.capacity[0] >= model:
        return (base,)
    return (base, Setting(req.dtype, req.quant, req.group_size, resident=False))


def _node(name: str, answer: dict, link: LinkFacts) -> NodeProfile:
    return NodeProfile(
        name=name,
        device=DeviceFacts.from_dict(answer["device"]),
        slices={k: SliceProfile.from_dict(v) for k, v in answer.get("slices", {}).items()},
        link=link,
    )


def gather_profiles(
    req: PlanRequest,
    cfg: ModelConfig,
    fmt: Format,
    secret: bytes | None,
    curve=None,
    echo: Callable[[str], None] = print,
) -> list[NodeProfile]:
    """Every node's profile for this model: the master's first, then the workers'."""
    from tpi.master.probe import probe_workers
    from tpi.paths import tpi_home

    world = len(req.workers) + 1
    points = probe_points(cfg, world)
    echo("profiling this node (the master)...")
    facts = device_facts(tpi_home() / "splits", req.master_budget, req.refresh, echo)
    slices = {}
    for i, setting in enumerate(_settings(cfg, req, facts, fmt)):
        prof = slice_profile(
            cfg,
            setting,
            points,
            cfg.vocab_size if i == 0 else None,
            req.refresh,
            echo,
            probe_budget(facts),
        )
        slices[slices_key(shape_key(cfg), setting.key())] = prof
    nodes = [NodeProfile("master", facts, slices)]
    if not req.workers:
        return nodes

    def request_for(_rank: int) -> ProfileRequest:
        # Settings depend on the worker's memory, which only it knows: ask for
        # both layouts of a float model (cached after the first time).
        settings = (Setting(req.dtype, req.quant, req.group_size, True),)
        if req.quant not in ("int8", "int4"):
            settings += (Setting(req.dtype, req.quant, req.group_size, False),)
        return ProfileRequest(cfg, settings, tuple(points), None, req.refresh)

    for addr, (answer, link) in zip(
        req.workers, probe_workers(list(req.workers), request_for, secret, curve, echo), strict=True
    ):
        nodes.append(_node(addr, answer, link))
    return nodes


def workload(req: PlanRequest, cfg: ModelConfig, fmt: Format) -> Workload:
    context = min(cfg.max_position_embeddings, req.max_context or DEFAULT_MAX_CONTEXT)
    return Workload(
        fmt=fmt,
        position=req.position,
        prompt_tokens=req.prompt_tokens,
        context=context,
        wire_bytes=2 if req.wire_dtype in ("bf16", "fp16") else 4,
        context_fixed=req.max_context is not None,
    )


def make_plan(
    req: PlanRequest,
    secret: bytes | None,
    curve=None,
    echo: Callable[[str], None] = print,
) -> tuple[Plan, list[NodeProfile]]:
    cfg = load_config(req.model_dir)
    fmt = Format(req.dtype, req.quant, req.group_size, stored_dtype(req.model_dir))
    profiles = gather_profiles(req, cfg, fmt, secret, curve, echo)
    setting = Setting(req.dtype, req.quant, req.group_size, True)
    speeds = [node_speed(cfg, p, setting, master=i == 0) for i, p in enumerate(profiles)]
    return solve(cfg, speeds, workload(req, cfg, fmt)), profiles


# --plan's default when workers are given (without --shares, on a model tpi splits
# itself): "auto" only where benchmarks/planner.py shows it no slower than even shares.
DEFAULT_PLAN = "even"


def plan_mode_for(
    mode: str | None, model_dir: Path, shares: str | None, vocab_parallel: bool
) -> str:
    """'auto' or 'even' for this run; refuses combinations the planner cannot honour."""
    from tpi.errors import ModelError
    from tpi.storage.split import is_split_dir

    if mode is None:
        return "even" if shares or vocab_parallel or is_split_dir(model_dir) else DEFAULT_PLAN
    if mode == "auto":
        if is_split_dir(model_dir):
            raise ModelError(
                "--plan auto chooses the shares of a new split, and this directory is already "
                "split: give the model itself, or use --plan even"
            )
        if shares:
            raise ModelError(
                "--plan auto chooses the shares itself: drop --shares, or use --plan even"
            )
        if vocab_parallel:
            raise ModelError(
                "--plan auto does not plan a vocabulary-parallel head yet: use --plan even"
            )
    return mode


@dataclass(frozen=True)
class Placed:
    """A plan, as the loader applies it."""

    plan: Plan
    workers: tuple[str, ...]  # the workers that take part, in rank order
    shares: str  # --shares for the split
    worker_windows: dict[int, int | None]  # per worker rank: LOAD's window (None: all)
    master_window: int | None


def place(
    req: PlanRequest, secret: bytes | None, curve=None, echo: Callable[[str], None] = print
) -> Placed:
    """Plan, say what was chosen and why, and turn it into the loader's settings."""
    import math

    from tpi.planning.report import summary

    plan, _ = make_plan(req, secret, curve, echo)
    echo(summary(plan))
    for reason in plan.reasons[1:]:
        echo(f"  {reason}")
    layers = plan.placement.stages[0].layers[1]
    windows = [w if w < layers else None for w in plan.windows]
    g = math.gcd(*plan.chosen.shares)
    return Placed(
        plan=plan,
        workers=tuple(req.workers[i - 1] for i in plan.node_indices[1:]),
        shares=",".join(str(s // g) for s in plan.chosen.shares),
        worker_windows={r: windows[r] for r in range(1, len(windows))},
        master_window=windows[0],
    )
