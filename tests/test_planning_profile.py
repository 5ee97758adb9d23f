"""Profiles: measured once per device identity, cached on disk (so they survive
restarts), measured again on request; slice timings come from the real layer
code; requests from a master are checked before anything is allocated."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import tpi.planning.device_probe as device_probe
from tests.planning_helpers import shaped_config
from tpi.cli import cli
from tpi.planning.device_probe import cache_path, device_facts, slice_profile
from tpi.planning.request import ProfileRequest, ProfileRequestError, answer
from tpi.planning.slice_probe import Setting, measure_point, probe_points

CFG = shaped_config(layers=4, hidden=64, heads=4, kv=2, intermediate=256, vocab=64)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TPI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _no_measuring(*_a, **_k):
    raise AssertionError("measured again instead of reading the cache")


def test_device_facts_are_cached_and_survive_a_restart(home, tmp_path, monkeypatch):
    first = device_facts(tmp_path / "store")
    assert 0.01 <= first.sustained <= 1.0 and first.disk_read_bytes_per_s > 0
    assert first.cores >= 1 and first.memory_total > first.memory_available > 0
    assert cache_path().is_file()
    monkeypatch.setattr(device_probe, "measure_sustained", _no_measuring)
    monkeypatch.setattr(device_probe, "measure_disk", _no_measuring)
    again = device_facts(tmp_path / "store")
    assert (again.sustained, again.measured_at) == (first.sustained, first.measured_at)
    # A new process (a restarted worker) reads the same file and measures nothing.
    code = (
        "import sys, torch, tpi.planning.device_probe as d\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "d.measure_sustained = d.measure_disk = lambda *a: sys.exit('measured again')\n"
        f"f = d.device_facts(__import__('pathlib').Path({str(tmp_path / 'store')!r}))\n"
        "print(f.sustained, f.measured_at)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        check=True,
    )
    assert out.stdout.split() == [str(first.sustained), first.measured_at]


def test_refresh_measures_again_and_a_new_identity_has_its_own_cache(home, tmp_path, monkeypatch):
    device_facts(tmp_path / "store")
    calls = []
    monkeypatch.setattr(device_probe, "measure_sustained", lambda: calls.append(1) or 0.5)
    assert device_facts(tmp_path / "store", refresh=True).sustained == 0.5 and calls
    threads = torch.get_num_threads()
    path = cache_path()
    try:
        torch.set_num_threads(threads + 1)
        assert cache_path() != path  # another thread count is another device identity
    finally:
        torch.set_num_threads(threads)


def test_the_budget_and_cgroup_limit_bound_what_a_node_plans_in(home, tmp_path):
    facts = device_facts(tmp_path / "store", budget_bytes=123 << 20)
    assert facts.capacity == (123 << 20, "--memory-budget")


def test_slice_timings_use_the_real_layers_and_are_cached(home, monkeypatch):
    points = probe_points(CFG, 2)
    assert points[0] == (2, 1, 128) and points[-1] == (4, 2, 256)
    prof = slice_profile(CFG, Setting(), points, head_rows=CFG.vocab_size)
    assert len(prof.points) == len(points) and prof.head["rows"] == CFG.vocab_size
    for p in prof.points:
        assert p["attention_s"] > 0 and p["mlp_s"] > 0 and p["attention_prefill_s"] > 0
    monkeypatch.setattr(device_probe, "measure_point", _no_measuring)
    monkeypatch.setattr(device_probe, "measure_head", _no_measuring)
    assert slice_profile(CFG, Setting(), points, head_rows=CFG.vocab_size) == prof


@pytest.mark.parametrize("quant", ["bf16", "int8", "int4"])
def test_every_weight_format_can_be_timed(quant):
    cfg = shaped_config(layers=2, hidden=128, heads=4, kv=2, intermediate=256, vocab=64)
    p = measure_point(cfg, Setting(quant=quant, resident=False), 2, 1, 128)
    assert p.attention_s > 0 and p.mlp_s > 0


def test_a_request_outside_the_model_is_refused():
    ok = ProfileRequest(CFG, (Setting(),), ((2, 1, 128),), CFG.vocab_size)
    again = ProfileRequest.from_body(json.loads(json.dumps(ok.to_body())))
    assert again == ok
    bad = ok.to_body() | {"points": [[99, 1, 128]]}
    with pytest.raises(ProfileRequestError, match="not in the model"):
        ProfileRequest.from_body(bad)
    with pytest.raises(ProfileRequestError, match="too many"):
        ProfileRequest.from_body(ok.to_body() | {"points": [[2, 1, 128]] * 100})
    with pytest.raises(ProfileRequestError, match="malformed"):
        ProfileRequest.from_body(ok.to_body() | {"settings": [{"dtype": "fp64"}]})


def test_an_answer_carries_the_device_and_the_asked_slices(home, tmp_path):
    req = ProfileRequest(CFG, (Setting(),), ((2, 1, 128),), None)
    got = answer(req, tmp_path / "store", None)
    assert got["device"]["disk_path"] == str(tmp_path / "store")
    (key,) = got["slices"]
    assert key.endswith("|fp32/none/resident") and len(got["slices"][key]["points"]) == 1


def test_tpi_probe_prints_the_profile(home, tmp_path):
    res = CliRunner().invoke(cli, ["probe", "--store", str(tmp_path / "s")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "sustained speed" in res.stdout and "cold reads under" in res.stdout
    res = CliRunner().invoke(cli, ["probe", "--json", "--store", str(tmp_path / "s")])
    data = json.loads(res.stdout)
    assert data["device"]["threads"] == torch.get_num_threads()


def test_a_cpu_quota_caps_the_sustained_share():
    import dataclasses

    from tpi.planning.nodes import sustained

    base = {
        "host": "h",
        "cpu": "c",
        "cores": 2,
        "threads": 1,
        "cpu_limit": 0.25,
        "sustained": 0.28,
        "memory_total": 1,
        "memory_available": 1,
        "memory_limit": None,
        "budget_bytes": None,
        "rss_bytes": 1,
        "disk_read_bytes_per_s": None,
        "disk_path": None,
        "torch": "t",
        "tpi": "v",
        "measured_at": "",
        "probe_seconds": 0.0,
    }
    from tpi.planning.profile import DeviceFacts

    d = DeviceFacts(**base)
    assert sustained(d) == 0.25  # measured a little high over a few 100 ms periods
    assert sustained(dataclasses.replace(d, cpu_limit=None)) == 0.28  # no quota: as measured
    assert sustained(dataclasses.replace(d, threads=2, cpu_limit=1.0)) == 0.28
    assert sustained(dataclasses.replace(d, threads=4, cpu_limit=1.0)) == 0.25
