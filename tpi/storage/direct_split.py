"""Write a split straight from each rank's tensors, with no checkpoint to cut.

`tpi split` slices a checkpoint; a model too big to exist as a checkpoint on
this disk (e.g. 70B-shaped and synthetic, tpi.sources.synthetic) is produced
slice by slice instead and written here through the same file writer
(write_safetensors: sha256, bytes and crc32 of every file) and the same
manifests and index (tpi.storage.split.write_split_metadata), so workers load
and verify it like any split.

Long runs resume: files go to a hidden sibling directory whose journal lists
the layers already written (with their hashes), rewritten after every layer; a
rerun continues after the last layer in the journal. The directory takes its
real name only when complete. Tensors for the next file are made on a thread
while the current one is written, so making and writing (hashing) overlap.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from tpi.dtypes import STORED_NAMES
from tpi.errors import ModelError
from tpi.model.config import ModelConfig
from tpi.model.partition import Partition, RankSlice
from tpi.quant.quantize import QuantSpec
from tpi.storage.atomic import atomic_write_text
from tpi.storage.expert_file import write_layer_files
from tpi.storage.manifest import HEAD_FILE
from tpi.storage.split import (
    copy_master_files,
    is_split_dir,
    read_split_index,
    write_split_metadata,
)
from tpi.storage.tensor_file import write_safetensors

JOURNAL = "journal.json"
Tensors = dict[str, torch.Tensor]


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.partial")


def _identity(model_id: str, partition: Partition, dtype: str, quant: QuantSpec) -> dict:
    ident = {
        "model_id": model_id,
        "partition": partition.to_dict(),
        "dtype": dtype,
        "quant": quant.to_dict(),
    }
    return json.loads(json.dumps(ident))  # as the journal reads back (lists, not tuples)


def _resume(tmp: Path, identity: dict, world: int) -> tuple[int, list[dict]]:
    """(layers already written, their file entries per rank) from an earlier run's journal;
    (0, empty) when there is none, or it belongs to another model or partition."""
    try:
        j = json.loads((tmp / JOURNAL).read_text())
        if j["identity"] == identity:
            files = j["files"]
            # Trust the journal only for files still there at the size it recorded.
            if all(
                (tmp / f"rank{r}" / name).stat().st_size == meta["bytes"]
                for r in range(world)
                for name, meta in files[r].items()
            ):
                return int(j["layers_done"]), files
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return 0, [{} for _ in range(world)]


def _produce(jobs: list, make: Callable, out: queue.Queue, stop: threading.Event) -> None:
    """Make each job's tensors in order; an exception travels to the writer."""
    try:
        for job in jobs:
            item = (job, make(*job))
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
    except BaseException as e:  # surfaced by the consumer
        out.put((None, e))


def _made_ahead(jobs: list, make: Callable[..., Tensors]) -> Iterator[tuple[tuple, Tensors]]:
    """`(job, make(*job))` for every job, the next one being made while the caller
    writes the current one (two in flight at most: memory stays about two files)."""
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    t = threading.Thread(target=_produce, args=(jobs, make, q, stop), daemon=True)
    t.start()
    try:
        for _ in jobs:
            job, item = q.get()
            if job is None:
                raise item
            yield job, item
    finally:
        stop.set()
        t.join(timeout=30)


def write_split(
    out_dir: Path,
    cfg: ModelConfig,
    partition: Partition,
    layer_tensors: Callable[[int, RankSlice], Tensors],
    head_tensors: Callable[[RankSlice], Tensors],
    *,
    model_id: str,
    dtype: torch.dtype,
    quant: QuantSpec,
    master_dir: Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write OUT/rank{r}/ for every rank of `partition` plus OUT/split.json; returns OUT.

    `layer_tensors(i, rs)` gives rank `rs`'s stored tensors of layer i (names as in a
    split's layer files), `head_tensors(rs)` its final norm and vocabulary tables
    (asked of rank 0, or of every rank when the partition splits the vocabulary).
    `dtype` is the float storage dtype the manifests record (the norms' dtype); the
    tokenizer and configs found in `master_dir` go to rank 0. A complete split of the
    same model and partition already at OUT is returned as it is."""
    out_dir = Path(out_dir)
    dtype_name = STORED_NAMES[dtype]
    identity = _identity(model_id, partition, dtype_name, quant)
    if is_split_dir(out_dir):
        index = read_split_index(out_dir)
        same_stages = index.get("stages") == partition.to_dict().get("stages")
        if (
            index["model_id"] == model_id
            and index["shares"] == list(partition.shares)
            and same_stages
        ):
            return out_dir
        raise ModelError(f"{out_dir} holds another split; remove it first")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelError(f"output directory {out_dir} is not empty")
    tmp = _partial_dir(out_dir)
    done, files = _resume(tmp, identity, partition.world)
    for r in range(partition.world):
        (tmp / f"rank{r}").mkdir(parents=True, exist_ok=True)
    total = cfg.num_layers + 1
    jobs = [
        (i, rs)
        for i in range(done, cfg.num_layers)
        for rs in partition.slices
        if rs.holds(i)  # a pipeline stage's rank holds only its stage's layers
    ]
    last_rank = {i: rs.rank for i, rs in jobs}  # the layer's last file, in job order
    for (i, rs), tensors in _made_ahead(jobs, layer_tensors):
        files[rs.rank].update(write_layer_files(tmp / f"rank{rs.rank}", i, tensors))
        del tensors
        if rs.rank == last_rank[i]:  # the layer is complete on every rank that holds it
            atomic_write_text(
                tmp / JOURNAL,
                json.dumps({"identity": identity, "layers_done": i + 1, "files": files}),
            )
            if progress:
                progress(i + 1, total, f"layer {i}")
    for rs in partition.slices:
        if rs.vocab is None and rs.rank != 0:
            continue
        files[rs.rank][HEAD_FILE] = write_safetensors(
            tmp / f"rank{rs.rank}" / HEAD_FILE, head_tensors(rs)
        )
    if master_dir is not None:
        copy_master_files(master_dir, tmp / "rank0", files[0])
    write_split_metadata(tmp, cfg, partition, model_id, dtype_name, files, quant)
    (tmp / JOURNAL).unlink()
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked above)
    os.replace(tmp, out_dir)
    if progress:
        progress(total, total, "head")
    return out_dir


def remove_split(out_dir: Path) -> None:
    """Remove a split written here and any unfinished run of it."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(_partial_dir(Path(out_dir)), ignore_errors=True)
