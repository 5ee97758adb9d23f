"""Planning a real local cluster: probe sessions, link measurements, `tpi plan`,
and a placement the solver chose (uneven shares, a streamed worker) running with
the single node's tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import tpi.master.planner as planner
from tests.cluster_helpers import addresses, local_workers
from tests.serve_helpers import live_server
from tests.stepping import greedy
from tpi.cli import cli
from tpi.emulation.link_shaper import LinkSpec
from tpi.errors import ModelError
from tpi.master.engine import load_engine
from tpi.master.loader import open_model
from tpi.master.local_cluster import LocalCluster
from tpi.master.probe import ProbeSession, probe_workers
from tpi.model.config import load_config
from tpi.model.partition import RankSlice
from tpi.planning.footprint import Format, head_bytes, plan_memory
from tpi.planning.request import ProfileRequest

PROMPT = list(range(5, 25))


def test_a_probe_session_needs_no_shard_and_measures_the_link(tmp_path):
    # A worker that takes no pushes still answers a probe (it asks for no shard).
    lc = LocalCluster(
        1, tmp_path, threads=1, extra_args=["--no-accept-push"], link=LinkSpec(0.005, 8e6)
    )
    addrs = lc.start()
    try:
        session = ProbeSession(addresses=addrs, secret=None, echo=lambda _m: None)
        import os

        session.secret = os.environ["TPI_SECRET"].encode()
        session.start()
        try:
            link = session.measure_link(1)
            profile = session.profile(1, ProfileRequest())
        finally:
            session.close()
        assert 0.010 <= link.rtt_s <= 0.030  # 5 ms each way
        assert 0.7e6 <= link.bytes_per_s <= 1.3e6  # 8 Mbit/s = 1 MB/s
        # What a message exchange costs each side's CPU (the PONG carries the worker's clock).
        assert 0 < link.worker_cpu_s < 0.01 and 0 < link.master_cpu_s < 0.01
        assert profile["device"]["threads"] == 1 and profile["slices"] == {}
        assert lc.workers[0].proc.poll() is None
    finally:
        lc.stop()


def test_a_probe_times_the_links_between_workers_too(tmp_path):
    """Home networks are not uniform: the probe links every pair of workers and each
    times its links while the others echo; a far worker is far from every other."""
    import os

    links = [LinkSpec(0.002), LinkSpec(0.002), LinkSpec(0.015)]
    lc = LocalCluster(3, tmp_path, threads=1, worker_links=links)
    addrs = lc.start()
    try:
        session = ProbeSession(
            addresses=addrs, secret=os.environ["TPI_SECRET"].encode(), echo=lambda _m: None
        )
        session.start()
        try:
            rtts = session.peer_round_trips(pings=3)
        finally:
            session.close()
    finally:
        lc.stop()
    assert set(rtts) == {(a, b) for a in (1, 2, 3) for b in (1, 2, 3) if a != b}
    assert rtts[(1, 2)] == rtts[(2, 1)] and rtts[(1, 3)] == rtts[(3, 1)]
    assert 2 * 0.002 <= rtts[(1, 2)] < 2 * 0.015  # both near: the slower of two 2 ms links
    assert rtts[(1, 3)] >= 2 * 0.015 and rtts[(2, 3)] >= 2 * 0.015  # the far one's 15 ms


def test_tpi_plan_shows_the_candidates_and_why(llama_dir, tmp_path):
    res = CliRunner().invoke(
        cli,
        ["cluster", "--workers", "2", "--dir", str(tmp_path), "plan", "--model", str(llama_dir)],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert out.count("link from the master: round trip") == 2  # both workers profiled
    for want in ("master alone", "even shares, all nodes", "chosen:", "why:", "ms/token"):
        assert want in out
    res = CliRunner().invoke(
        cli,
        [
            "cluster",
            "--workers",
            "1",
            "--dir",
            str(tmp_path),
            "plan",
            "--json",
            "--model",
            str(llama_dir),
        ],
    )
    import json

    data = json.loads(res.stdout)
    assert len(data["profiles"]) == 2 and data["plan"]["chosen"]["prediction"]["ms_per_token"] > 0


def test_a_placement_the_solver_chose_runs_with_single_node_parity(
    llama_dir, tmp_path, monkeypatch
):
    """Emulate a master with room for only the smallest slice (and no disk to stream
    from) and a worker that cannot hold even its smallest slice whole: the solver
    must use the worker, give the master the least and the worker a window, and
    the run's greedy tokens are the single node's."""
    cfg = load_config(llama_dir)
    context = min(cfg.max_position_embeddings, 4096)
    real = planner.node_speed

    def need(s, rank, head):
        # Master: the smallest slice of two ranks; worker: the rest of the layer.
        rs = RankSlice(rank=rank, q_heads=(0, 4), kv_heads=(0, 1), mlp=(0, 32))
        if rank:
            rs = RankSlice(rank=rank, q_heads=(4, 8), kv_heads=(1, 2), mlp=(32, 160))
        return plan_memory(
            cfg,
            rs,
            Format(),
            context=context,
            baseline_bytes=s.baseline_bytes,
            head=head,
            capacity=None,
            fit_context_to_capacity=False,
        ).total

    def emulated(cfg_, profile, setting, **kw):
        s = real(cfg_, profile, setting, **kw)
        if profile.name == "master":
            head = head_bytes(cfg, Format())
            cap = need(s, 0, head) + 1
            return dataclasses.replace(
                s, capacity=cap, capacity_source="emulated", disk_bytes_per_s=None
            )
        return dataclasses.replace(s, capacity=need(s, 1, 0) - 1, capacity_source="emulated")

    monkeypatch.setattr(planner, "node_speed", emulated)
    expected = greedy(load_engine(llama_dir), PROMPT, 8)
    with local_workers(1, tmp_path) as lc:
        loaded = open_model(
            str(llama_dir), "fp32", quiet=True, workers=addresses(lc), plan_mode="auto"
        )
        try:
            plan = loaded.plan
            assert plan is not None and len(plan.chosen.node_names) == 2
            assert plan.chosen.shares[0] == 1 and plan.chosen.shares[1] > 1  # the master least
            assert plan.windows[1] < cfg.num_layers  # the worker streams
            assert loaded.cluster.worker_info[1]["memory"]["window"] == plan.windows[1]
            assert greedy(loaded.engine, PROMPT, 8) == expected
        finally:
            loaded.close()


def test_plan_auto_refuses_what_it_cannot_plan(llama_dir, tmp_path):
    with pytest.raises(ModelError, match="drop --shares"):
        open_model(
            str(llama_dir),
            "fp32",
            quiet=True,
            workers=["127.0.0.1:1"],
            shares="2,1",
            plan_mode="auto",
        )
    with pytest.raises(ModelError, match="vocabulary-parallel"):
        open_model(
            str(llama_dir),
            "fp32",
            quiet=True,
            workers=["127.0.0.1:1"],
            vocab_parallel=True,
            plan_mode="auto",
        )


def test_health_reports_the_chosen_plan(llama_dir, tmp_path):
    prefix = ["cluster", "--workers", "1", "--dir", str(tmp_path), "--plan", "auto"]
    with live_server(["--model", str(llama_dir), "-t", "0"], prefix=prefix) as base:
        body = httpx.get(base + "/health").json()
    plan = body["plan"]
    assert plan["nodes"][0] == "master" and plan["predicted"]["ms_per_token"] > 0
    assert plan["reasons"] and len(plan["shares"]) == len(plan["nodes"])


def test_workers_report_their_profile_to_a_loaded_session(llama_dir, tmp_path):
    with local_workers(1, tmp_path) as lc:
        got = probe_workers(
            addresses(lc), lambda _r: ProfileRequest(), _secret(), echo=lambda _m: None
        )
    ((profile, link),) = got
    assert profile["device"]["cores"] >= 1 and link.rtt_s > 0


def _secret() -> bytes:
    import os

    return os.environ["TPI_SECRET"].encode()


def test_the_chat_page_shows_the_cluster_in_a_real_browser(llama_dir, tmp_path):
    """Every node with its share, memory and round trip, and after a question, a live
    breakdown of each rank's time per pass (headless Chromium, as the chat page test)."""
    import os
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("TPI_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (TPI_REQUIRE_BROWSER) but not installed")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    shot = Path(os.environ.get("TPI_SCREENSHOT_DIR", tmp_path)) / "cluster_view.png"
    prefix = ["cluster", "--workers", "2", "--dir", str(tmp_path / "c"), "--link-latency", "1ms"]
    args = ["--model", str(llama_dir), "-t", "0", "--shares", "2,1,1", "--max-new-tokens", "200"]
    with live_server(args, prefix=prefix) as base:
        view = httpx.get(base + "/cluster").json()
        assert [n["rank"] for n in view["nodes"]] == [0, 1, 2]
        assert view["nodes"][0]["mlp_share"] > view["nodes"][1]["mlp_share"]  # 2:1:1
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=exe,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(base + "/")
            page.wait_for_function("document.querySelectorAll('#cl-nodes .node').length === 3")
            first = page.locator("#cl-nodes .node").first.text_content()
            # 2:1:1 of 5 blocks of 32 MLP columns: 3, 1, 1.
            assert "master" in first and "share 60%" in first and "all 3 layers held" in first
            assert "round trip" in page.locator("#cl-nodes .node").nth(1).text_content()
            page.fill("#input", "Tell me a long story")
            page.click("#send")
            # Live numbers for every rank, drawn as bars of compute / waiting / disk.
            page.wait_for_function(
                "document.querySelectorAll('#cl-nodes .label.live').length === 3", timeout=120000
            )
            widths = page.evaluate(
                "[...document.querySelectorAll('.time .compute')].map(e => parseFloat(e.style.width))"
            )
            assert len(widths) == 3 and all(w > 0 for w in widths)
            assert "ms round trip" in page.locator("#cl-nodes .node").nth(2).text_content()
            page.wait_for_selector(".msg.assistant .meta:not(:empty)", timeout=120000)
            page.screenshot(path=str(shot))
            browser.close()
    assert shot.stat().st_size > 5000
