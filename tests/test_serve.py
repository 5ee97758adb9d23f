"""`tpi serve` with the official openai client, concurrency, disconnects, bad input."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from tests.serve_helpers import live_server
from tpi.cli import cli

QUESTION = "What is the capital of France?"


def _generate(model: Path | None, prompt: str, n: int, raw: bool = False) -> str:
    """`tpi generate` in-process; model None is the embedded default."""
    args = ["generate", *(["--model", str(model)] if model else []), "-t", "0", "-n", str(n)]
    args += [prompt, *(["--raw"] if raw else [])]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0
    return res.stdout[:-1]  # generate ends the answer with a newline


@pytest.fixture(scope="module")
def server(llama_dir):
    with live_server(["--model", str(llama_dir), "-t", "0", "--queue-size", "8"]) as base:
        yield base


def _client(base: str, key: str = "none"):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_chat_matches_tpi_generate(server, llama_dir):
    expected = _generate(llama_dir, QUESTION, 12)
    client = _client(server)
    msgs = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="x", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    pieces = []
    usage = None
    for chunk in client.chat.completions.create(
        model="x",
        messages=msgs,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
    assert len([p for p in pieces if p]) >= 2  # really streamed, not one blob
    assert "".join(pieces) == expected and usage.completion_tokens == 12


def test_completions_and_models(server, llama_dir):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [llama_dir.name]
    r = client.completions.create(model="x", prompt="Hello world", max_tokens=8, temperature=0)
    assert r.choices[0].text == _generate(llama_dir, "Hello world", 8, raw=True)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="x", prompt="Hello world", max_tokens=8, temperature=0, stream=True
        )
    )
    assert streamed == r.choices[0].text


def test_stop_sequences_cut_the_text(server, llama_dir):
    full = _client(server).completions.create(
        model="x", prompt="Hello world", max_tokens=16, temperature=0
    )
    text = full.choices[0].text
    stop = text[5:8]
    cut = _client(server).completions.create(
        model="x", prompt="Hello world", max_tokens=16, temperature=0, stop=[stop]
    )
    assert (
        cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    )


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ("{not json", 400, "not valid JSON"),
        ({}, 400, "messages"),
        ({"messages": "hi"}, 400, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            400,
            "temperature",
        ),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "context window"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
            400,
            "stop",
        ),
    ],
)
def test_bad_input_gets_openai_errors_and_the_server_stays_up(server, body, status, fragment):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(
        server + "/v1/chat/completions",
        content=content,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    assert httpx.get(server + "/health").status_code == 200


def test_unknown_route_is_an_openai_style_404(server):
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


@pytest.fixture(scope="module")
def smollm_server():
    """The embedded SmolLM2: slow enough per token (tens of ms) that queueing and
    disconnects are observed mid-generation, whatever the machine's load."""
    with live_server(["-t", "0", "--queue-size", "8"]) as base:
        yield base


def test_eight_concurrent_streams_run_together_each_as_alone_and_the_ninth_is_refused(
    smollm_server,
):
    """Eight streaming clients of the official openai client are generated in one
    batch (continuous batching), each getting exactly its answer alone (greedy);
    with --queue-size 8 a ninth request gets 429."""
    server = smollm_server
    prompts = [f"Write a short poem about the number {i}." for i in range(8)]
    expected = {p: _generate(None, p, 24) for p in prompts}
    results: dict[str, str] = {}

    def ask(p: str) -> None:
        stream = _client(server).chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": p}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        results[p] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    most_running = 0
    while time.monotonic() < deadline:  # all 8 admitted
        h = httpx.get(server + "/health").json()
        most_running = max(most_running, h["running"])
        if h["waiting"] + h["running"] == 8:
            break
        time.sleep(0.01)
    refused = httpx.post(
        server + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "one more"}], "max_tokens": 4},
    )
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline + 90:
        most_running = max(most_running, httpx.get(server + "/health").json()["running"])
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    assert results == expected  # each got its own full answer
    assert most_running >= 4  # they ran together, not one after another


def test_disconnect_mid_stream_frees_the_cluster(smollm_server):
    server = smollm_server
    body = {
        "messages": [{"role": "user", "content": "Tell a very long story"}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
            if got >= 4:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = httpx.get(server + "/health").json()
        if not h["busy"] and h["recent"] and h["recent"][-1]["finish_reason"] == "cancelled":
            break
        time.sleep(0.05)
    assert h["recent"][-1]["finish_reason"] == "cancelled"
    assert h["recent"][-1]["completion_tokens"] < 200
    r = httpx.post(
        server + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_api_key_is_required_except_for_health(llama_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    with live_server(["--model", str(llama_dir), "--api-key", f"@{key_file}"]) as base:
        assert httpx.get(base + "/health").status_code == 200
        assert httpx.get(base + "/v1/models").status_code == 401
        bad = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        assert _client(base, "s3cret").models.list().data


def test_cluster_behind_the_server(llama_dir, tmp_path):
    expected = _generate(llama_dir, QUESTION, 10)
    with live_server(
        ["--model", str(llama_dir), "-t", "0"],
        prefix=["cluster", "--workers", "2", "--dir", str(tmp_path)],
    ) as base:
        health = httpx.get(base + "/health").json()
        assert [r["rank"] for r in health["ranks"]] == [0, 1, 2] and health["status"] == "ok"
        r = _client(base).chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=10,
            temperature=0,
        )
        assert r.choices[0].message.content == expected


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_chat_page_streams_in_a_real_browser(server, tmp_path):
    exe = _chromium()
    if exe is None:
        if os.environ.get("TPI_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (TPI_REQUIRE_BROWSER) but not installed")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    shot = Path(os.environ.get("TPI_SCREENSHOT_DIR", tmp_path)) / "chat_page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=exe,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        page.goto(server + "/")
        page.fill("#input", QUESTION)
        # Record every length the answer passes through: streamed text grows in steps.
        page.evaluate(
            """() => {
              window.lengths = [];
              new MutationObserver(() => {
                const b = document.querySelector('.msg.assistant .body');
                if (b) window.lengths.push(b.textContent.length);
              }).observe(document.body, {subtree: true, childList: true, characterData: true});
            }"""
        )
        page.click("#send")
        answer = page.locator(".msg.assistant .body").first
        page.wait_for_selector(".msg.assistant .meta:not(:empty)", timeout=120000)
        lengths = page.evaluate("window.lengths")
        assert len({n for n in lengths if n > 0}) >= 3, lengths
        assert "tok/s" in page.locator(".msg.assistant .meta").first.text_content()
        assert answer.text_content()
        page.screenshot(path=str(shot))
        page.click("#reset")
        assert page.locator(".msg").count() == 0
        browser.close()
    assert shot.stat().st_size > 5000


def test_a_request_whose_kv_cache_can_never_fit_the_budget_is_refused_clearly(llama_dir):
    # 1000 bytes hold no sequence's cache (a cache starts at 256 positions).
    with live_server(["--model", str(llama_dir), "-t", "0", "--kv-budget", "1000"]) as base:
        r = httpx.post(
            base + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=60
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_budget_exceeded"
        assert "KV cache" in r.json()["error"]["message"]
        assert httpx.get(base + "/health").json()["status"] == "ok"  # nothing else broke


def test_metrics_in_prometheus_format_count_what_was_served(server):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, float]:
        r = httpx.get(server + "/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {
            (s.name + "".join(f"[{v}]" for v in s.labels.values())): s.value
            for fam in text_string_to_metric_families(r.text)
            for s in fam.samples
        }

    before = scrape()
    r = httpx.post(server + "/v1/completions", json={"prompt": "count me", "max_tokens": 5})
    assert r.status_code == 200
    after = scrape()
    assert after["tpi_generated_tokens_total"] - before.get("tpi_generated_tokens_total", 0) == 5
    done = "tpi_requests_total[length]"
    assert after[done] - before.get(done, 0) == 1
    assert after["tpi_time_to_first_token_seconds_count"] >= 1
    assert (
        after["tpi_inter_token_seconds_count"] - before.get("tpi_inter_token_seconds_count", 0) == 4
    )  # 5 tokens, 4 gaps
    assert after["tpi_batch_size"] == 0 and after["tpi_requests_waiting"] == 0
    assert after["tpi_cluster_failures_total"] == 0


def test_n_choices_are_generated_together_each_as_its_own_request(server):
    client = _client(server)
    msgs = [{"role": "user", "content": QUESTION}]

    def ask(**kw):
        return client.chat.completions.create(model="x", messages=msgs, max_tokens=10, **kw)

    one = ask(temperature=0).choices[0].message.content
    three = ask(temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in three.choices] == [one] * 3
    assert three.usage.completion_tokens == 30
    # Seeded: choice i samples with seed + i, exactly as a request with that seed.
    two = ask(temperature=1.0, seed=5, n=2)
    alone = [ask(temperature=1.0, seed=s).choices[0].message.content for s in (5, 6)]
    assert [c.message.content for c in two.choices] == alone
    streamed = ["", ""]
    for chunk in ask(temperature=1.0, seed=5, n=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == alone
