"""`tpi serve`'s app in this process (master/serve/app.py, endpoints.py, errors.py,
limits.py): FastAPI's TestClient over a tiny model. What test_serve.py checks
against a live server (the openai client's view, concurrency, disconnects) is
not repeated here; this is the HTTP contract of each route and refusal."""

from __future__ import annotations

import json

import pytest

from tests.serve_helpers import app_client, tiny_holder
from tpi.errors import TpiError
from tpi.master.sampling import SamplingParams
from tpi.master.serve.endpoints import DEFAULT_MAX_TOKENS, ServerState
from tpi.master.serve.jobs import BatchSettings
from tpi.master.serve.protocol import CompletionRequest

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(tiny_llama_dir, plain_torch):
    with app_client(
        tiny_llama_dir, capacity=2, max_request_bytes=4000, batching=BatchSettings(max_batch=3)
    ) as c:
        yield c


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def _events(r) -> list[str]:
    """The SSE data lines of a streamed answer."""
    return [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]


def test_models_and_the_chat_page(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_a_completion_answers_in_openai_shape_and_health_remembers_it(client):
    r = client.post(TEXT, json={"prompt": "Hello world", "max_tokens": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["text"]
    assert choice["finish_reason"] == "length"
    prompt_tokens = len(client.app.state.tpi.tokenizer.encode("Hello world"))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 3,
        "total_tokens": prompt_tokens + 3,
    }
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    assert health["ranks"] == [{"rank": 0, "address": "local", "state": "ok"}]
    assert (health["busy"], health["running"], health["waiting"]) == (False, 0, 0)
    assert health["max_batch"] == 3
    assert health["recent"][-1] == {"finish_reason": "length", "completion_tokens": 3}


def test_a_streamed_chat_opens_with_the_role_and_ends_with_done(client):
    r = client.post(
        CHAT,
        json={
            "messages": USER,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    data = _events(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last_choice = chunks[-2]["choices"][0]
    assert last_choice["delta"] == {} and last_choice["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    whole = client.post(CHAT, json={"messages": USER, "max_tokens": 3}).json()
    assert text == whole["choices"][0]["message"]["content"]


def test_a_developer_message_is_a_system_message(client):
    def prompt_tokens(role: str) -> int:
        msgs = [{"role": role, "content": "Be brief."}, *USER]
        r = client.post(CHAT, json={"messages": msgs, "max_tokens": 1})
        return r.json()["usage"]["prompt_tokens"]

    assert prompt_tokens("developer") == prompt_tokens("system") != prompt_tokens("user")


def test_n_choices_beyond_the_queue_are_refused_whole_and_admit_nothing(client):
    err = _error(client.post(TEXT, json={"prompt": "hi", "max_tokens": 1, "n": 3}), 429)
    assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
    r = client.post(TEXT, json={"prompt": "hi", "max_tokens": 1, "n": 2})  # capacity 2: all free
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_an_empty_prompt_and_a_prompt_list_are_refused_naming_the_field(client):
    err = _error(client.post(TEXT, json={"prompt": "", "max_tokens": 1}), 400)
    assert err["message"] == "the prompt is empty" and err["param"] == "prompt"
    err = _error(client.post(TEXT, json={"prompt": ["a", "b"], "max_tokens": 1}), 400)
    assert (
        err["message"] == "prompt lists must hold exactly one prompt" and err["param"] == "prompt"
    )
    assert client.post(TEXT, json={"prompt": ["a"], "max_tokens": 1}).status_code == 200


def test_a_prompt_too_long_is_refused_by_its_tokens_or_before_tokenizing(client):
    err = _error(client.post(TEXT, json={"prompt": "zq" * 100}), 400)
    assert err["code"] == "context_length_exceeded"
    assert err["message"] == "the prompt has 200 tokens; the context window is 128"
    chars = 128 * client.app.state.tpi.tokenizer.max_token_chars + 1
    err = _error(client.post(TEXT, json={"prompt": "z" * chars}), 400)
    assert err["message"] == (
        f"the prompt has {chars} characters, more than a context window of 128 tokens can hold"
    )


@pytest.mark.parametrize(
    "body,param,says",
    [
        ({"messages": USER, "n": 17}, "n", "less than or equal to 16"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content", "lone surrogate"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'system'"),
        ({"messages": USER, "top_p": 0}, "top_p", "greater than 0"),
        ({"messages": USER, "seed": 2**64}, "seed", "less than"),
        ({"messages": []}, "messages", "at least 1"),
    ],
)  # fmt: skip
def test_invalid_fields_are_named_in_the_message_and_param(client, body, param, says):
    raw = json.dumps(body, ensure_ascii=True)  # lone surrogates as \ud800 escapes
    r = client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    err = _error(r, 400)
    assert (
        err["param"] == param and err["message"].startswith(f"{param}: ") and says in err["message"]
    )
    assert err["type"] == "invalid_request_error"


def test_a_wrong_method_is_an_openai_style_error(client):
    err = _error(client.get(TEXT), 405)
    assert err["message"] == "Method Not Allowed"


def test_a_body_over_the_limit_is_413_whether_announced_or_streamed(client):
    big = json.dumps({"prompt": "a" * 5000}).encode()
    err = _error(client.post(TEXT, content=big, headers={"content-type": "application/json"}), 413)
    assert err == {
        "message": "request body larger than 4000 bytes",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }

    def chunked():  # no Content-Length: counted as it comes
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = client.post(TEXT, content=chunked(), headers={"content-type": "application/json"})
    assert _error(r, 413)["code"] == "request_too_large"


def test_the_body_limit_comes_before_the_api_key(tiny_llama_dir, plain_torch):
    with app_client(tiny_llama_dir, api_key="k", max_request_bytes=100) as c:
        assert c.post(TEXT, content=b"x" * 200).status_code == 413  # no key, but too big
        assert c.post(TEXT, content=b"x" * 50).status_code == 401
        r = c.post(
            TEXT, json={"prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer k"}
        )
        assert r.status_code == 200


def test_a_failed_model_answers_503_and_health_says_down(tiny_llama_dir, plain_torch):
    holder = tiny_holder(tiny_llama_dir)
    with app_client(tiny_llama_dir, holder=holder) as c:
        holder.failed(TpiError("rank 1 (10.0.0.2:5555) stopped answering"))
        err = _error(c.post(TEXT, json={"prompt": "hi"}), 503)
        assert err["code"] == "cluster_down" and err["type"] == "server_error"
        assert err["message"] == "the cluster is down: rank 1 (10.0.0.2:5555) stopped answering"
        health = c.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "down"
        assert health.json()["error"] == "rank 1 (10.0.0.2:5555) stopped answering"


def test_request_sampling_overrides_the_command_line_field_by_field():
    defaults = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=64)
    state = ServerState(None, "m", defaults, None)

    def sampling(**fields) -> SamplingParams:
        return state.sampling(CompletionRequest(prompt="x", **fields))

    assert sampling() == SamplingParams(0.7, 40, 0.9, None, 64)
    got = sampling(temperature=0, top_p=0.5, seed=3, max_tokens=5)
    assert got == SamplingParams(0.0, 40, 0.5, 3, 5)  # 0 is a value, not "unset"
    assert sampling(max_tokens=5, max_completion_tokens=7).max_new_tokens == 7
    state.defaults = SamplingParams(max_new_tokens=0)
    assert sampling().max_new_tokens == DEFAULT_MAX_TOKENS


def test_the_generation_thread_ends_with_the_app(tiny_llama_dir, plain_torch):
    with app_client(tiny_llama_dir) as c:
        thread = c.app.state.generation._thread
        assert thread.is_alive()
    thread.join(5)  # the app's lifespan closed the queue
    assert not thread.is_alive()
