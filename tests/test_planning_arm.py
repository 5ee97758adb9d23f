"""An ARM board in the planner: named as the board and core it is, its slices timed
with its own kernels, and a hand-made profile of one (a Raspberry Pi 5 beside an
x86 master) read by the cost model and the solver as that device's real speed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.planning_helpers import shaped_config
from tpi.kernels import build as kbuild
from tpi.planning import device_probe
from tpi.planning.cost_model import Workload
from tpi.planning.footprint import Format
from tpi.planning.nodes import node_speed
from tpi.planning.profile import DeviceFacts, LinkFacts, NodeProfile, SliceProfile, slices_key
from tpi.planning.slice_probe import Setting, shape_key
from tpi.planning.solver import solve

# 4 layers, 12 query / 12 KV heads, 3072 MLP columns (24 blocks of 128).
CFG = shaped_config(layers=4, hidden=96, heads=12, kv=12, intermediate=3072, vocab=100)
SETTING = Setting(quant="int8")
WL = Workload(Format(quant="int8"), position=16, context=64)


def _facts(cpu: str, kernels: str) -> DeviceFacts:
    return DeviceFacts(
        host=cpu,
        cpu=cpu,
        cores=4,
        threads=4,
        cpu_limit=None,
        sustained=1.0,
        memory_total=8 << 30,
        memory_available=6 << 30,
        memory_limit=None,
        budget_bytes=None,
        rss_bytes=300 << 20,
        disk_read_bytes_per_s=None,
        disk_path=None,
        torch="2.13.0",
        tpi="0.1.0",
        measured_at="",
        probe_seconds=0.0,
        kernels=kernels,
    )


def _profile(name: str, facts: DeviceFacts, per_head_s: float, per_column_s: float) -> NodeProfile:
    """Slice timings as slice_probe records them: per layer, at 1 and 12 heads, 128
    and 3072 columns (prefill 4 times the decode time, 1 us per cached position)."""
    points = tuple(
        {
            "q": q,
            "kv": q,
            "mlp": cols,
            "attention_s": q * per_head_s,
            "attention_per_position_s": q * 1e-6,
            "mlp_s": cols * per_column_s,
            "attention_prefill_s": 4 * q * per_head_s,
            "mlp_prefill_s": 4 * cols * per_column_s,
        }
        for q, cols in ((1, 128), (12, 3072))
    )
    key = slices_key(shape_key(CFG), SETTING.key())
    link = LinkFacts(2e-4, 1e8, 1e-4, 5e-5) if name != "master" else LinkFacts()
    return NodeProfile(name, facts, {key: SliceProfile(SETTING.key(), points)}, link)


# The master an x86 mini-PC with AVX2; the worker a Raspberry Pi 5, whose int8
# slices take 3 times as long with its NEON dot-product kernels.
MASTER = _profile("master", _facts("Intel N100", "AVX2"), 1e-4, 1e-6)
PI5 = _profile(
    "tcp://pi5:5555",
    _facts("Raspberry Pi 5 Model B, Cortex-A76, aarch64", "NEON+dotprod"),
    3e-4,
    3e-6,
)


def test_a_pi5_profile_is_read_as_its_own_speed_by_the_cost_model():
    master, pi = node_speed(CFG, MASTER, SETTING), node_speed(CFG, PI5, SETTING)
    assert pi.resident.mlp(3072) == pytest.approx(3 * master.resident.mlp(3072))
    assert pi.resident.attention(12) == pytest.approx(3 * master.resident.attention(12))
    # Even shares: 6 heads and 1536 columns each. The Pi's own compute per token is
    # its 4 layers' phases at its timings and 2 message exchanges a layer at its link's
    # 0.1 ms: 4 x (6 x 0.3 ms + 1536 x 3 us + 2 x 0.1 ms) = 26.432 ms (position 16 is
    # the one timed: no per-position extra).
    plan = solve(CFG, [master, pi], WL)
    even = next(x for x in plan.candidates if x.label == "even shares, all nodes")
    by_node = {r.node: r for r in even.prediction.ranks}
    assert by_node[pi.name].compute_ms == pytest.approx(26.432, rel=1e-6)


def test_the_solver_gives_the_pi_the_smaller_share_and_beats_even_shares():
    nodes = [node_speed(CFG, MASTER, SETTING), node_speed(CFG, PI5, SETTING)]
    plan = solve(CFG, nodes, WL)
    assert plan.chosen.node_names == ("master", "tcp://pi5:5555")
    master_share, pi_share = plan.chosen.shares
    # A third of the master's speed, and its links cost: at most a third of the work.
    assert master_share >= 2 * pi_share > 0
    even = next(x for x in plan.candidates if x.label == "even shares, all nodes")
    assert even.prediction.ms_per_token > 1.2 * plan.chosen.prediction.ms_per_token
    # And it is predicted from the Pi's own timings: a Pi twice as fast shifts the split.
    faster = _profile(PI5.name, PI5.device, 1.5e-4, 1.5e-6)
    replan = solve(CFG, [nodes[0], node_speed(CFG, faster, SETTING)], WL)
    assert replan.chosen.shares[1] / sum(replan.chosen.shares) > pi_share / sum(plan.chosen.shares)


def test_an_arm_profile_says_which_board_core_and_kernels_it_was_timed_with(tmp_path, monkeypatch):
    """The device facts name an ARM board as it is, never by /proc/cpuinfo's "model
    name" (none on ARM kernels; the host's under emulation), and carry the kernels."""
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")
    ident = tmp_path / "sys/devices/system/cpu/cpu0/regs/identification"
    ident.mkdir(parents=True)
    (ident / "midr_el1").write_text("0x00000000414fd0b1\n")
    assert (
        device_probe.arm_cpu_name(tmp_path) == "Raspberry Pi 5 Model B Rev 1.0, Cortex-A76, aarch64"
    )
    (ident / "midr_el1").write_text("0x00000000410fd083\n")  # a Pi 4
    (tmp_path / "proc/device-tree/model").unlink()
    assert device_probe.arm_cpu_name(tmp_path) == "Cortex-A72, aarch64"
    assert device_probe.arm_cpu_name(Path("/nonexistent")) == "aarch64"
    # The kernels a profile was timed with, as an AArch64 machine reports them.
    monkeypatch.setattr(kbuild.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(kbuild, "_hwcaps", lambda: (kbuild.HWCAP_ASIMDDP, 0))
    assert kbuild.kernels_summary() == "NEON+dotprod"
    monkeypatch.setattr(kbuild, "_hwcaps", lambda: (0, 0))
    assert kbuild.kernels_summary() == "NEON"
    facts = dataclasses.replace(MASTER.device, kernels=kbuild.kernels_summary())
    assert DeviceFacts.from_dict(facts.to_dict()).kernels == "NEON"
