"""The server's API key (master/serve/api_key.py): the middleware on a minimal app,
and where the key comes from. (A live server with a key: test_serve.py.)"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tpi.cli import cli
from tpi.errors import TpiError
from tpi.master.serve.api_key import ApiKeyCheck, api_key_from


@pytest.fixture(scope="module")
def client():
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"ok": True}

    @app.get("/")
    def page():
        return {"page": True}

    app.add_middleware(ApiKeyCheck, api_key="s3cret")
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("header", ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"])
def test_the_key_is_taken_after_any_spelling_of_bearer(client, header):
    r = client.get("/v1/models", headers={"Authorization": header})
    assert r.status_code == 200 and r.json() == {"ok": True}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"},
     {"Authorization": "Bearer s3cret2"}, {"Authorization": "Bearer "}],
)  # fmt: skip
def test_anything_but_the_key_is_an_openai_style_401(client, headers):
    r = client.get("/v1/models", headers=headers)
    assert r.status_code == 401
    assert r.json() == {
        "error": {
            "message": "invalid or missing API key",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_the_chat_page_needs_no_key(client):
    assert client.get("/").json() == {"page": True}


def test_the_key_comes_from_the_option_else_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TPI_API_KEY", "from-env")
    assert api_key_from("given") == "given"
    assert api_key_from(None) == "from-env"
    (tmp_path / "key").write_text("  from-file \n")
    assert api_key_from(f"@{tmp_path / 'key'}") == "from-file"
    monkeypatch.setenv("TPI_API_KEY", f"@{tmp_path / 'key'}")
    assert api_key_from(None) == "from-file"
    monkeypatch.delenv("TPI_API_KEY")
    assert api_key_from(None) is None


def test_an_empty_key_file_is_refused_not_taken_for_no_key(tmp_path):
    # An empty file (a secret not yet written) must not leave the server open to all.
    (tmp_path / "key").write_text("\n")
    with pytest.raises(TpiError, match=r"the API key file .*key is empty"):
        api_key_from(f"@{tmp_path / 'key'}")


def test_an_unreadable_key_file_is_one_line_before_the_model_is_loaded(tmp_path):
    # The model does not exist either: the key file must be the first thing reported.
    args = ["serve", "--model", str(tmp_path / "no-model"), "--port", "0"]
    r = CliRunner().invoke(cli, [*args, "--api-key", f"@{tmp_path / 'missing'}"])
    assert r.exit_code == 1
    assert r.output == (
        f"Error: cannot read the API key file {tmp_path / 'missing'}: No such file or directory\n"
    )
