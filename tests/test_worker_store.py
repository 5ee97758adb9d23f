"""The worker's shard store (worker/store.py) on shards built by hand: where it looks,
what it refuses, what it removes. (Pushes of a real split: test_split_and_store.py.)"""

from __future__ import annotations

import pytest

from tests.worker_helpers import shard_manifest, write_shard
from tpi.storage.manifest import MANIFEST_NAME, ShardError, sha256_bytes
from tpi.worker.store import MAX_FILE_BYTES, ShardStore

FILES = {"a.bin": b"alpha" * 20, "b.bin": b"beta" * 30}


def _push(store: ShardStore, files: dict[str, bytes], model_id: str) -> str:
    """Every file and the manifest written into incoming/, whole; returns the hash."""
    raw = shard_manifest(files, model_id)
    h = sha256_bytes(raw)
    for name, data in {**files, MANIFEST_NAME: raw}.items():
        assert store.write_chunk(h, name, 0, len(data), data) == len(data)
    return h


def test_find_looks_in_the_root_its_subdirectories_and_pushed_shards(tmp_path):
    store = ShardStore(tmp_path)
    at_root = write_shard(tmp_path, FILES, "root")
    copied = write_shard(tmp_path / "rank1", FILES, "copied")
    pushed = store.finalize(_push(store, FILES, "pushed"))
    assert store.find(at_root) == tmp_path
    assert store.find(copied) == tmp_path / "rank1"
    assert store.find(sha256_bytes((pushed / MANIFEST_NAME).read_bytes())) == pushed
    assert store.find("0" * 64) is None


def test_a_push_in_progress_is_not_a_shard(tmp_path):
    store = ShardStore(tmp_path)
    h = _push(store, FILES, "half")  # every byte there, not yet verified and moved
    assert store.find(h) is None
    # Nor is a directory named like the store's own areas, at the root.
    in_incoming_name = write_shard(tmp_path / "incoming", FILES, "odd")
    assert store.find(in_incoming_name) is None


@pytest.mark.parametrize("name", ["", "../" + "0" * 61, "A" * 64, "0" * 63, "0" * 65])
def test_names_that_are_not_a_sha256_are_never_looked_up_or_written(tmp_path, name):
    store = ShardStore(tmp_path)
    assert store.find(name) is None
    with pytest.raises(ShardError, match="invalid shard name"):
        store.partial_sizes(name)
    with pytest.raises(ShardError, match="invalid shard name"):
        store.write_chunk(name, "a.bin", 0, 1, b"x")
    assert not (tmp_path / "incoming").exists()


@pytest.mark.parametrize(
    "offset,total,data",
    [(-1, 4, b"x"), (5, 4, b""), (3, 4, b"xy"), (0, MAX_FILE_BYTES + 1, b"x")],
)
def test_a_chunk_outside_its_file_is_refused(tmp_path, offset, total, data):
    store = ShardStore(tmp_path)
    with pytest.raises(ShardError, match="chunk outside the file"):
        store.write_chunk("0" * 64, "a.bin", offset, total, data)


def test_a_file_name_longer_than_a_file_system_takes_is_refused(tmp_path):
    with pytest.raises(ShardError, match="unsafe file name"):
        ShardStore(tmp_path).write_chunk("0" * 64, "x" * 256, 0, 1, b"x")


def test_a_chunk_resent_from_an_earlier_offset_replaces_the_rest(tmp_path):
    store = ShardStore(tmp_path)
    h = "1" * 64
    assert store.write_chunk(h, "a.bin", 0, 8, b"abcdef") == 6
    assert store.partial_sizes(h) == {"a.bin": 6}
    assert store.write_chunk(h, "a.bin", 2, 8, b"XY") == 4  # the master resumed at 2
    assert (tmp_path / "incoming" / h / "a.bin").read_bytes() == b"abXY"
    assert store.partial_sizes(h) == {"a.bin": 4}


def test_finalize_refuses_a_push_without_its_manifest_or_with_another(tmp_path):
    store = ShardStore(tmp_path)
    h = "2" * 64
    store.write_chunk(h, "a.bin", 0, 5, b"alpha")
    with pytest.raises(ShardError, match="pushed shard has no manifest"):
        store.finalize(h)
    raw = shard_manifest(FILES, "other")
    store.write_chunk(h, MANIFEST_NAME, 0, len(raw), raw)
    with pytest.raises(ShardError, match="does not match its announced sha256"):
        store.finalize(h)
    assert store.partial_sizes(h) == {"a.bin": 5}  # the manifest is dropped, to be sent again


def test_finalize_drops_only_the_bad_files_so_a_retry_resends_just_those(tmp_path):
    store = ShardStore(tmp_path)
    h = _push(store, FILES, "retry")
    store.write_chunk(h, "b.bin", 0, len(FILES["b.bin"]), b"x" * len(FILES["b.bin"]))
    with pytest.raises(ShardError, match="b.bin is corrupt"):
        store.finalize(h)
    left = store.partial_sizes(h)
    assert "b.bin" not in left and left["a.bin"] == len(FILES["a.bin"]) and MANIFEST_NAME in left


def test_finalize_removes_files_the_manifest_does_not_list_and_replaces_an_old_copy(tmp_path):
    store = ShardStore(tmp_path)
    h = _push(store, FILES, "extra")
    store.write_chunk(h, "stray.bin", 0, 3, b"abc")
    final = tmp_path / "shards" / h
    final.mkdir(parents=True)
    (final / "leftover").write_text("from an earlier, broken store")
    assert store.finalize(h) == final
    assert sorted(p.name for p in final.iterdir()) == sorted([*FILES, MANIFEST_NAME])
    assert not (tmp_path / "incoming" / h).exists()


def test_a_corrupt_pushed_shard_is_removed_a_copied_one_is_left_to_the_user(tmp_path):
    store = ShardStore(tmp_path)
    pushed = store.finalize(_push(store, FILES, "damaged-pushed"))
    copied_hash = write_shard(tmp_path / "rank1", FILES, "damaged-copied")
    for d in (pushed, tmp_path / "rank1"):
        (d / "a.bin").write_bytes(b"A" * len(FILES["a.bin"]))
    pushed_hash = sha256_bytes((pushed / MANIFEST_NAME).read_bytes())
    with pytest.raises(ShardError, match="removed and will be pushed again next session"):
        store.verify(pushed, pushed_hash)
    assert not pushed.exists() and store.find(pushed_hash) is None
    with pytest.raises(ShardError, match="a.bin is corrupt") as e:
        store.verify(tmp_path / "rank1", copied_hash)
    assert "removed" not in str(e.value)
    assert (tmp_path / "rank1" / "a.bin").exists()


def test_discard_pushed_removes_pushed_shards_only(tmp_path):
    store = ShardStore(tmp_path)
    pushed = store.finalize(_push(store, FILES, "discard"))
    write_shard(tmp_path / "rank1", FILES, "kept")
    assert store.discard_pushed(tmp_path / "rank1") is False
    assert (tmp_path / "rank1" / MANIFEST_NAME).exists()
    assert store.discard_pushed(pushed) is True
    assert not pushed.exists()
