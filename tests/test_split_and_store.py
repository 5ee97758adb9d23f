"""`tpi split` output and the worker's shard store."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tpi.cli import cli
from tpi.model.config import load_config
from tpi.storage.manifest import (
    HEAD_FILE,
    ShardError,
    layer_file,
    read_manifest,
    sha256_file,
    verify_files,
)
from tpi.storage.split import read_split_index, split_model
from tpi.worker.store import ShardStore


def test_split_layout_and_manifests(llama_dir, tmp_path):
    out = tmp_path / "s"
    res = CliRunner().invoke(
        cli, ["split", str(llama_dir), "--world", "3", "--shares", "2,1,1", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    index = read_split_index(out)
    cfg = load_config(llama_dir)
    assert index["world"] == 3 and index["shares"] == [2.0, 1.0, 1.0]
    for r, entry in enumerate(index["ranks"]):
        d = out / entry["dir"]
        m, h = read_manifest(d)
        assert h == entry["manifest_sha256"] and m.rank == r
        verify_files(d, m)
        names = set(m.files)
        assert {layer_file(i) for i in range(cfg.num_layers)} <= names
        assert (HEAD_FILE in names) == (r == 0)
        assert ("tokenizer.json" in names) == (r == 0)
    # The stronger master got more heads and MLP columns.
    m0, _ = read_manifest(out / "rank0")
    m1, _ = read_manifest(out / "rank1")
    assert m0.rank_slice.n_mlp > m1.rank_slice.n_mlp


def test_split_refuses_bad_shares_and_existing_output(llama_dir, tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "split",
            str(llama_dir),
            "--world",
            "2",
            "--shares",
            "1,1,1",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert r.exit_code != 0 and "3 values" in r.output
    # 8 query heads: 9 ranks cannot each get one.
    r = CliRunner().invoke(
        cli, ["split", str(llama_dir), "--world", "9", "--out", str(tmp_path / "y")]
    )
    assert r.exit_code != 0 and "attention heads" in r.output and "Traceback" not in r.output
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "f").write_text("keep")
    r = CliRunner().invoke(
        cli, ["split", str(llama_dir), "--world", "2", "--out", str(tmp_path / "z")]
    )
    assert r.exit_code != 0 and "not empty" in r.output
    assert (tmp_path / "z" / "f").read_text() == "keep"


def _push(
    store: ShardStore, rank_dir, h: str, chunk: int = 1000, stop_after: int | None = None
) -> None:
    sent = 0
    for f in sorted(rank_dir.iterdir()):
        data = f.read_bytes()
        have = store.partial_sizes(h).get(f.name, 0)
        for off in range(have, max(len(data), 1), chunk):
            store.write_chunk(h, f.name, off, len(data), data[off : off + chunk])
            sent += 1
            if stop_after is not None and sent >= stop_after:
                return


def test_store_push_resume_and_verify(llama_dir, tmp_path):
    split = split_model(llama_dir, tmp_path / "s", [1, 1])
    rank_dir = split / "rank1"
    _, h = read_manifest(rank_dir)
    store = ShardStore(tmp_path / "store")
    assert store.find(h) is None
    _push(store, rank_dir, h, stop_after=5)  # interrupted
    assert sum(store.partial_sizes(h).values()) > 0
    _push(store, rank_dir, h)  # resumed from what is there
    final = store.finalize(h)
    assert store.find(h) == final
    for f in rank_dir.iterdir():
        assert sha256_file(final / f.name) == sha256_file(f)


def test_store_rejects_corrupt_pushes_and_unsafe_names(llama_dir, tmp_path):
    split = split_model(llama_dir, tmp_path / "s", [1, 1])
    rank_dir = split / "rank1"
    m, h = read_manifest(rank_dir)
    store = ShardStore(tmp_path / "store")
    _push(store, rank_dir, h)
    bad = store.root / "incoming" / h / layer_file(0)
    data = bytearray(bad.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="corrupt"):
        store.finalize(h)
    assert not bad.exists()  # removed, so a retry sends it again
    for name in ("../evil", ".hidden", "a/b"):
        with pytest.raises(ShardError, match="unsafe"):
            store.write_chunk(h, name, 0, 1, b"x")
    with pytest.raises(ShardError, match="gap"):
        store.write_chunk(h, "new.bin", 10, 20, b"x")


def test_store_uses_a_precopied_rank_dir_and_detects_damage(llama_dir, tmp_path):
    import shutil

    split = split_model(llama_dir, tmp_path / "s", [1, 1])
    store_root = tmp_path / "store"
    shutil.copytree(split / "rank1", store_root / "rank1")
    _, h = read_manifest(split / "rank1")
    store = ShardStore(store_root)
    assert store.find(h) == store_root / "rank1"
    store.verify(store_root / "rank1", h)
    f = store_root / "rank1" / layer_file(1)
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    with pytest.raises(ShardError, match="layer_001.*corrupt"):
        store.verify(store_root / "rank1", h)  # changed since verification: checked again


def test_manifest_rejects_path_traversal():
    from tpi.storage.manifest import Manifest

    bad = {
        "format": "tpi-shard",
        "format_version": 1,
        "files": {"../x": {"sha256": "a", "bytes": 1}},
    }
    with pytest.raises(ShardError, match="unsafe"):
        Manifest.from_bytes(json.dumps(bad).encode())


def test_tensor_files_are_standard_safetensors(tmp_path):
    """Our streaming writer and plain-read reader agree with the safetensors library."""
    import torch
    from safetensors.torch import load_file, save_file

    from tpi.storage.tensor_file import SafetensorsFile, write_safetensors

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int32).view(2, 3),
        "empty": torch.empty(0, 4),
    }
    meta = write_safetensors(tmp_path / "ours.safetensors", tensors)
    assert meta["bytes"] == (tmp_path / "ours.safetensors").stat().st_size
    assert meta["sha256"] == sha256_file(tmp_path / "ours.safetensors")
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    assert set(theirs) == set(tensors) and all(torch.equal(theirs[k], tensors[k]) for k in tensors)
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    f = SafetensorsFile(tmp_path / "ref.safetensors")
    assert all(torch.equal(f.read(k), tensors[k]) for k in tensors)
    buf = torch.empty(100, dtype=torch.float32)
    assert torch.equal(f.read("a", out=buf), tensors["a"])
