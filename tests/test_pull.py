"""`tpi pull` and `--model ORG/NAME`: the real huggingface_hub client against a
stand-in hub on loopback (tests/hub_server.py, reached through HF_ENDPOINT), each
command a process of its own as a user would run it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import make_model
from tests.hub_server import Faults, Hub, HubServer, Repo, git_blob_id, repo_from_dir
from tpi.errors import ModelError
from tpi.sources.hub_files import HubFile, checkpoint_files, mismatch
from tpi.sources.hub_ref import HubRef, parse_hub_ref

JUNK = {  # in the repository, never fetched: tpi does not read them
    "README.md": b"# tiny\n",
    "pytorch_model.bin": b"\0" * 64,
    "original/consolidated.safetensors": b"\0" * 64,
}
MB = 1 << 20


def tpi(home: Path, hub_url: str, *args: str, extra_env: dict | None = None, timeout=180):
    env = {
        **os.environ,
        "TPI_HOME": str(home),
        "HF_ENDPOINT": hub_url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(home / "hf"),  # no token of the machine's user
        **(extra_env or {}),
    }
    env.pop("HF_TOKEN", None) if "HF_TOKEN" not in (extra_env or {}) else None
    return subprocess.run(
        [sys.executable, "-m", "tpi.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def one_line_error(done) -> str:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    # Before it, at most the line saying what is being downloaded (and its bar).
    others = [ln for ln in done.stderr.splitlines() if ln.strip() and ln not in errors]
    assert all(ln.startswith(("Downloading ", "downloading")) for ln in others), done.stderr
    return errors[0]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A Llama whose weights are split into shards named by model.safetensors.index.json."""
    d = make_model(tmp_path_factory.mktemp("sharded"), "llama", max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").is_file()
    return d


def _wanted(model_dir: Path) -> set[str]:
    names = {p.name for p in model_dir.iterdir() if p.is_file()}
    return {n for n in names if n.endswith((".json", ".safetensors", ".jinja"))}


def test_pull_fetches_only_what_tpi_reads_checked_and_the_copy_answers_as_the_original(
    sharded, tmp_path
):
    hub = Hub({"org/tiny": repo_from_dir(sharded, JUNK)})
    with HubServer(hub) as server:
        done = tpi(tmp_path, server.url, "pull", "org/tiny")
        assert done.returncode == 0, done.stderr
        copy = Path(done.stdout.strip().split(": ", 1)[1])
        got = {p.name for p in copy.iterdir() if p.is_file() and not p.name.startswith(".")}
        assert got == _wanted(sharded)
        for name in got:
            assert (copy / name).read_bytes() == (sharded / name).read_bytes(), name
        fetched = {p.rsplit("/", 1)[1] for m, p, _ in hub.requests if "/resolve/" in p}
        assert fetched == _wanted(sharded)  # README, .bin, original/ never asked for
        again = tpi(tmp_path, server.url, "pull", "org/tiny")
        assert again.returncode == 0 and "up to date" in again.stderr
        assert len([r for r in hub.requests if "/resolve/" in r[1]]) == len(fetched)
    listed = tpi(tmp_path, server.url, "models")
    assert any(ln.startswith("org/tiny ") and " MB " in ln for ln in listed.stdout.splitlines())
    # The hub is gone: the copy answers offline, token for token as the original.
    prompt = ["generate", "--raw", "-n", "6", "Hello"]
    ours = tpi(tmp_path, server.url, *prompt, "--model", "org/tiny")
    original = tpi(tmp_path, server.url, *prompt, "--model", str(sharded))
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == original.stdout
    removed = tpi(tmp_path, server.url, "rm", "org/tiny")
    assert removed.returncode == 0 and "freed" in removed.stdout
    assert not copy.exists()
    assert "org/tiny" not in tpi(tmp_path, server.url, "models").stdout


def test_model_by_name_is_pulled_on_first_use_with_yes_and_not_without(sharded, tmp_path):
    hub = Hub({"org/tiny": repo_from_dir(sharded)})
    prompt = ["generate", "--raw", "-n", "6", "Hello", "--model", "org/tiny"]
    with HubServer(hub) as server:
        refused = tpi(tmp_path, server.url, *prompt)  # no terminal to ask on, no --yes
        line = one_line_error(refused)
        assert "tpi pull org/tiny" in line and "--yes" in line
        assert hub.requests == []  # nothing fetched without consent
        done = tpi(tmp_path, server.url, *prompt, "--yes")
        assert done.returncode == 0, done.stderr
    original = tpi(
        tmp_path, server.url, "generate", "--raw", "-n", "6", "Hello", "--model", str(sharded)
    )
    assert done.stdout == original.stdout


def _big_repo() -> tuple[Repo, bytes]:
    weights = os.urandom(24 * MB)  # bigger than two of the client's 10 MB write chunks
    files = {"config.json": b"{}", "tokenizer.json": b"{}", "model.safetensors": weights}
    return Repo(files), weights


def test_an_interrupted_pull_resumes_where_it_stopped(tmp_path):
    repo, weights = _big_repo()
    hub = Hub(
        {"org/big": repo}, Faults(cut_after={"model.safetensors": 15 * MB}, errors_after_cut=10)
    )
    with HubServer(hub) as server:
        first = tpi(tmp_path, server.url, "pull", "org/big")
        assert "HTTP 500" in one_line_error(first)
        part = tmp_path / "models" / ".pulling" / "org--big" / "model.safetensors.part"
        kept = part.stat().st_size
        assert 0 < kept < len(weights)
        assert "org--big" in tpi(tmp_path, server.url, "models").stdout  # shown as unfinished
        hub._pending_errors.clear()  # the network is back
        second = tpi(tmp_path, server.url, "pull", "org/big")
        assert second.returncode == 0, second.stderr
    assert hub.fetched("model.safetensors")[-1] == f"bytes={kept}-"  # only the rest asked for
    copy = tmp_path / "models" / "org--big" / "model.safetensors"
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(weights).digest()


def test_a_connection_dropped_mid_file_is_resumed_within_one_pull(tmp_path):
    repo, weights = _big_repo()
    hub = Hub({"org/big": repo}, Faults(cut_after={"model.safetensors": 15 * MB}))
    with HubServer(hub) as server:
        done = tpi(tmp_path, server.url, "pull", "org/big")
    assert done.returncode == 0, done.stderr
    ranges = hub.fetched("model.safetensors")
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert (tmp_path / "models" / "org--big" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    "name, checksum", [("model.safetensors", "sha256"), ("config.json", "git sha1")]
)
def test_a_corrupted_file_is_refused_and_nothing_is_kept(sharded, tmp_path, name, checksum):
    files = {
        "config.json": (sharded / "config.json").read_bytes(),
        "tokenizer.json": b"{}",
        "model.safetensors": os.urandom(4096),
    }
    hub = Hub({"org/bad": Repo(files)}, Faults(corrupt={name}))
    with HubServer(hub) as server:
        line = one_line_error(tpi(tmp_path, server.url, "pull", "org/bad"))
        assert f"refused {name}" in line and checksum in line
        listed = tpi(tmp_path, server.url, "models").stdout
    assert "org/bad" not in listed
    assert not (tmp_path / "models" / "org--bad").exists()
    assert not list((tmp_path / "models" / ".pulling").rglob(name + "*"))


def test_unreachable_or_offline_says_in_one_line_what_was_tried(tmp_path):
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    line = one_line_error(tpi(tmp_path, closed, "pull", "org/tiny"))
    assert "cannot download org/tiny" in line and f"{closed}/api/models/org/tiny" in line
    line = one_line_error(
        tpi(tmp_path, closed, "pull", "org/tiny", extra_env={"HF_HUB_OFFLINE": "1"})
    )
    assert "HF_HUB_OFFLINE" in line


def test_missing_repo_revision_and_gated_models_say_what_to_do(sharded, tmp_path):
    repo = repo_from_dir(sharded)
    repo.gated = True
    hub = Hub({"org/gated": repo})
    with HubServer(hub) as server:
        assert "no model org/nope" in one_line_error(tpi(tmp_path, server.url, "pull", "org/nope"))
        line = one_line_error(tpi(tmp_path, server.url, "pull", "org/gated@v9"))
        assert "no revision 'v9'" in line
        line = one_line_error(tpi(tmp_path, server.url, "pull", "org/gated"))
        assert "gated" in line and "HF_TOKEN" in line
        done = tpi(tmp_path, server.url, "pull", "org/gated", extra_env={"HF_TOKEN": "hf_x" * 8})
        assert done.returncode == 0, done.stderr


@pytest.mark.slow  # a conversion and two generations: the names themselves are unit-tested
def test_a_gguf_is_named_by_repository_and_file(tmp_path):
    from tests.gguf_writer import write_gguf

    hf = make_model(tmp_path / "hf", "llama", tied=False)
    gguf = tmp_path / "tiny.Q8_0.gguf"
    write_gguf(hf, gguf)
    hub = Hub({"org/tiny-gguf": Repo({"tiny.Q8_0.gguf": gguf.read_bytes(), "README.md": b""})})
    home = tmp_path / "home"
    name = "org/tiny-gguf/tiny.Q8_0.gguf"
    prompt = ["generate", "--raw", "-n", "6", "Hello", "--model"]
    with HubServer(hub) as server:
        line = one_line_error(tpi(home, server.url, "pull", "org/tiny-gguf/other.gguf"))
        assert "no file other.gguf" in line and "tiny.Q8_0.gguf" in line
        done = tpi(home, server.url, *prompt, name, "--yes")
        assert done.returncode == 0, done.stderr
    direct = tpi(home, server.url, *prompt, str(gguf))
    assert done.stdout == direct.stdout
    assert name in tpi(home, server.url, "models").stdout
    assert not (home / "models" / ".pulling" / "org--tiny-gguf--tiny.Q8_0").exists()


# --- the parts, in process ---------------------------------------------------------


@pytest.mark.parametrize(
    "spec, ref",
    [
        ("org/name", HubRef("org/name")),
        ("org/name@v1.0", HubRef("org/name", "v1.0")),
        ("org/name/sub/f.Q4_0.gguf@abc", HubRef("org/name", "abc", "sub/f.Q4_0.gguf")),
    ],
)
def test_names_of_hub_models(spec, ref):
    assert parse_hub_ref(spec) == ref
    assert str(ref) == spec


@pytest.mark.parametrize("spec", ["name", "org/", "/abs/path", "org/name/file.bin", "org/n@"])
def test_what_is_not_a_hub_model_name(spec):
    with pytest.raises(ModelError):
        parse_hub_ref(spec)


def test_the_weights_chosen_from_a_listing():
    def listing(*names):
        return {n: HubFile(n, 1, None, None) for n in names}

    base = ("config.json", "tokenizer.json", "README.md", "tokenizer_config.json")
    files, indexed = checkpoint_files("o/n", listing(*base, "model.safetensors", "x.bin"))
    assert [f.name for f in files][-1] == "model.safetensors" and not indexed
    assert {f.name for f in files} == {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    }
    files, indexed = checkpoint_files(
        "o/n", listing(*base, "model.safetensors.index.json", "consolidated.safetensors")
    )
    assert indexed and files[-1].name == "model.safetensors.index.json"
    with pytest.raises(ModelError, match=r"no safetensors weights tpi can read \(it has \.bin"):
        checkpoint_files("o/n", listing(*base, "pytorch_model.bin"))
    with pytest.raises(ModelError, match="no tokenizer.json"):
        checkpoint_files("o/n", listing("config.json", "model.safetensors"))


def test_checksums_as_the_hub_publishes_them(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    # git's id of the empty blob, a constant every git knows
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert (
        mismatch(empty, HubFile("e", 0, None, "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391")) is None
    )
    data = tmp_path / "data"
    data.write_bytes(b"abc")
    sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2's
    assert mismatch(data, HubFile("d", 3, sha, None)) is None
    assert "sha256" in mismatch(data, HubFile("d", 3, "0" * 64, None))
    assert "bytes" in mismatch(data, HubFile("d", 4, sha, None))
