"""`tpi split`: cut a Hugging Face checkpoint into one directory per rank.

Streams layer by layer: the full tensors of one layer are read once, sliced for
every rank, written, and dropped, so peak memory is about two layers, never the
model. Output goes to a temporary directory renamed at the end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tpi.dtypes import DTYPES, STORED_NAMES
from tpi.errors import ModelError
from tpi.model.config import ModelConfig, load_config
from tpi.model.partition import DEFAULT_MOE_SPLIT, Partition, plan_partition
from tpi.model.pipeline_plan import plan_pipeline
from tpi.model.weights import EMBED, FINAL_NORM, LM_HEAD, head_tensors, slice_head, slice_layer
from tpi.quant.int4_rows import GGUF_GROUP
from tpi.quant.quantize import LINEAR_NAMES, QuantSpec, quantize_embedding, quantize_tensors
from tpi.storage.atomic import atomic_directory
from tpi.storage.checkpoint import Checkpoint
from tpi.storage.expert_file import write_layer_files
from tpi.storage.manifest import (
    FORMAT_VERSION,
    HEAD_FILE,
    MANIFEST_NAME,
    SPLIT_FORMAT,
    SPLIT_INDEX_NAME,
    Manifest,
    sha256_bytes,
    sha256_file,
)
from tpi.storage.tensor_file import write_safetensors
from tpi.system.malloc import pin_mmap_threshold, release_freed_memory

SPLIT_LAYOUT = "c1"  # c1: every shard file's crc32 in its manifest
MASTER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint: config plus each weights file's name, size and header."""
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 100_000_000)))
    return h.hexdigest()


def split_model(
    model_dir: Path,
    out_dir: Path,
    shares: list[float],
    dtype: str = "keep",
    progress: Callable[[int, int, str], None] | None = None,
    overwrite: bool = False,
    quant: QuantSpec | None = None,
    vocab_parallel: bool = False,
    moe_split: str = DEFAULT_MOE_SPLIT,
    stage_sizes: list[int] | None = None,
    stage_layers: list[int] | None = None,
) -> Path:
    """Write OUT/rank{r}/ for every rank plus OUT/split.json; returns OUT.

    `quant` stores the matmul weights quantized (see tpi.quant.quantize);
    `vocab_parallel` gives every rank its vocabulary rows of the embedding and LM
    head instead of all of them to rank 0; `moe_split` how experts are cut
    (tpi.model.partition). `stage_sizes` makes a pipeline (ranks per stage, see
    tpi.model.pipeline_plan; `stage_layers`: layers per stage, default even): a
    rank's shard then holds only its stage's layers."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = load_config(model_dir)
    if stage_sizes is not None:
        partition = plan_pipeline(cfg, stage_sizes, stage_layers, shares, moe_split, vocab_parallel)
    else:
        partition = plan_partition(cfg, shares, vocab_parallel, moe_split)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ModelError(f"output directory {out_dir} is not empty (use --force to replace it)")
    if dtype != "keep" and dtype not in DTYPES:
        raise ModelError(f"unknown storage dtype {dtype!r}")
    quant = quant or QuantSpec()
    pin_mmap_threshold()
    ckpt = Checkpoint(model_dir)
    source_dtype = ckpt.get("model.norm.weight").dtype
    storage = DTYPES.get(dtype) or source_dtype
    model_id = model_fingerprint(model_dir)
    try:
        with atomic_directory(out_dir) as tmp:
            shards = _ShardWriter(ckpt, cfg, partition, quant, storage, tmp)
            shards.write_layers(progress)
            shards.write_heads()
            copy_master_files(model_dir, tmp / "rank0", shards.files[0])
            if progress:
                progress(shards.steps, shards.steps, "head")
            write_split_metadata(
                tmp, cfg, partition, model_id, STORED_NAMES[storage], shards.files, quant
            )
    finally:
        ckpt.close()
    return out_dir


@dataclass
class _ShardWriter:
    """Writes every rank's shard files of one split into `tmp`/rank{r}, and lists
    them (`files[rank]`: name -> sha256 and size) for the manifests."""

    ckpt: Checkpoint
    cfg: ModelConfig
    partition: Partition
    quant: QuantSpec
    storage: torch.dtype
    tmp: Path
    files: list[dict[str, dict]] = field(init=False)

    def __post_init__(self) -> None:
        self.files = [{} for _ in self.partition.slices]
        for r in range(self.partition.world):
            (self.tmp / f"rank{r}").mkdir(parents=True)

    @property
    def steps(self) -> int:
        """What progress counts: every layer, then the head."""
        return self.cfg.num_layers + 1

    def write_layers(self, progress: Callable[[int, int, str], None] | None) -> None:
        ckpt, cfg, quant = self.ckpt, self.cfg, self.quant
        # 4-bit weights kept from a GGUF file pass into an int4 split of their group as is.
        keep_int4 = quant.mode == "int4" and quant.group_size == GGUF_GROUP
        for i in range(cfg.num_layers):
            layer_cache: dict[str, torch.Tensor] = {}

            def get(name: str, cache: dict[str, torch.Tensor] = layer_cache) -> torch.Tensor:
                # Each full tensor is read once per layer, then sliced for every rank.
                if name not in cache:
                    kept = ckpt.get_int4(name) if keep_int4 else None
                    cache[name] = kept if kept is not None else ckpt.get(name, self.storage)
                return cache[name]

            for rs in self.partition.slices:
                if not rs.holds(i):
                    continue  # another pipeline stage's layer
                tensors = quantize_tensors(slice_layer(get, cfg, i, rs), LINEAR_NAMES, quant)
                self.files[rs.rank].update(
                    write_layer_files(self.tmp / f"rank{rs.rank}", i, tensors)
                )
                del tensors
            layer_cache.clear()
            release_freed_memory()
            if progress:
                progress(i + 1, self.steps, f"layer {i}")

    def write_heads(self) -> None:
        """The final norm, embedding and LM head: all of them to rank 0, or each rank
        its vocabulary rows (vocab-parallel)."""
        head = head_tensors(lambda n: self.ckpt.get(n, self.storage), self.cfg)
        for rs in self.partition.slices:
            if rs.vocab is None and rs.rank != 0:
                continue
            part = slice_head(head, *rs.vocab) if rs.vocab else head
            self.files[rs.rank][HEAD_FILE] = write_safetensors(
                self.tmp / f"rank{rs.rank}" / HEAD_FILE, quantize_head(part, self.quant)
            )
            del part
        del head


def quantize_head(head: dict[str, torch.Tensor], quant: QuantSpec) -> dict[str, torch.Tensor]:
    """Embedding and LM head in the split's format; tied, they stay one table."""
    out = {FINAL_NORM: head[FINAL_NORM], **quantize_embedding(EMBED, head[EMBED], quant)}
    if LM_HEAD in head:
        out.update(quantize_embedding(LM_HEAD, head[LM_HEAD], quant))
    return out


def copy_master_files(src_dir: Path, rank0_dir: Path, files0: dict[str, dict]) -> None:
    """Copy the tokenizer, chat template, generation and model config that exist in
    `src_dir` to rank 0 (the master reads them there), listing each in `files0`."""
    for name in MASTER_FILES + ("config.json",):
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copyfile(src, rank0_dir / name)
            files0[name] = {"sha256": sha256_file(src), "bytes": src.stat().st_size}


def write_split_metadata(
    tmp: Path,
    cfg: ModelConfig,
    partition: Partition,
    model_id: str,
    dtype: str,
    files: list[dict],
    quant: QuantSpec,
) -> None:
    """Every rank's manifest (listing `files[rank]`) and the split index above them:
    the one place a split's metadata is written, whoever wrote its shard files."""
    ranks = []
    for r in range(partition.world):
        m = Manifest(
            model_id=model_id,
            config=cfg,
            partition=partition,
            rank=r,
            dtype=dtype,
            files=files[r],
            quant=quant,
        )
        raw = m.to_bytes()
        (tmp / f"rank{r}" / MANIFEST_NAME).write_bytes(raw)
        ranks.append({"rank": r, "dir": f"rank{r}", "manifest_sha256": sha256_bytes(raw)})
    index = {
        "format": SPLIT_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "world": partition.world,
        "shares": list(partition.shares),
        "dtype": dtype,
        "quant": quant.to_dict(),
        "vocab_parallel": partition.vocab_parallel,
        "ranks": ranks,
    }
    if partition.stages is not None:
        index["stages"] = [st.to_dict() for st in partition.stages]
    (tmp / SPLIT_INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")


def read_split_index(split_dir: Path) -> dict:
    path = Path(split_dir) / SPLIT_INDEX_NAME
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    if d.get("format") != SPLIT_FORMAT or d.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path} is not a split index this tpi can read; re-run 'tpi split'")
    return d


def is_split_dir(path: Path) -> bool:
    return (Path(path) / SPLIT_INDEX_NAME).is_file()


def ensure_split(
    model_dir: Path,
    shares: list[float],
    echo: Callable[[str], None],
    progress: Callable[[int, int, str], None] | None = None,
    quant: QuantSpec | None = None,
    vocab_parallel: bool = False,
    stage_sizes: list[int] | None = None,
    stage_layers: list[int] | None = None,
) -> Path:
    """A split of `model_dir` for these shares (and pipeline stages) in
    $TPI_HOME/splits, made once."""
    from tpi.paths import tpi_home
    from tpi.storage.file_lock import file_lock

    quant = quant or QuantSpec()
    tag = "-".join(f"{s:g}" for s in shares)
    if quant.quantized:
        tag += f"-{quant.mode}" + (
            f"g{quant.group_size}-{quant.int4_layout}" if quant.mode == "int4" else ""
        )
    if vocab_parallel:
        tag += "-vp"
    if stage_sizes is not None:
        tag += "-pp" + ".".join(map(str, stage_sizes))
        if stage_layers is not None:
            tag += "-L" + ".".join(map(str, stage_layers))
    root = tpi_home() / "splits"
    # SPLIT_LAYOUT names what a cached split holds, so a newer tpi makes a fresh
    # one instead of reusing a split without, e.g., per-read checksums.
    target = root / f"{model_fingerprint(Path(model_dir))[:16]}-w{len(shares)}-{tag}-{SPLIT_LAYOUT}"
    if is_split_dir(target):
        return target
    with file_lock(root / ".lock"):
        if not is_split_dir(target):
            echo(
                f"splitting {model_dir} for {len(shares)} ranks (shares {tag}) into {target} (once)..."
            )
            split_model(
                Path(model_dir),
                target,
                shares,
                progress=progress,
                overwrite=True,
                quant=quant,
                vocab_parallel=vocab_parallel,
                stage_sizes=stage_sizes,
                stage_layers=stage_layers,
            )
    return target
