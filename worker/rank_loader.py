"""LOAD: verify the shard, then build this rank's runtime as the master asks,
within this device's own limits (which win)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.comm.group_hub import GroupHub
from tpi.comm.star_worker import StarWorker
from tpi.comm.wire import Message, ProtocolError
from tpi.dtypes import COMPUTE_DTYPES, DTYPES
from tpi.model.decoder import Collective
from tpi.model.partition import Stage
from tpi.runtime.rank_runtime import RankRuntime, build_rank
from tpi.runtime.vocab_parallel import HeadService
from tpi.storage.manifest import ShardError
from tpi.storage.shard_reader import RankShard
from tpi.worker.handshake import Hello
from tpi.worker.master_channel import MasterChannel
from tpi.worker.options import WorkerOptions
from tpi.worker.store import ShardStore

log = logging.getLogger("tpi.worker")


@dataclass(frozen=True)
class LoadRequest:
    dtype: torch.dtype
    wire_dtype: torch.dtype
    window: int | None
    max_context: int | None
    # Pipeline hops straight between workers (worker.peers opened the links).
    direct_hops: bool = False

    @classmethod
    def from_message(cls, msg: Message) -> LoadRequest:
        b = msg.body
        dtype, wire = COMPUTE_DTYPES.get(b["dtype"]), DTYPES.get(b["wire_dtype"])
        if dtype is None or wire is None:
            raise ProtocolError("LOAD names an unknown dtype")
        window, context = b.get("window"), b.get("max_context")
        for name, v in (("window", window), ("max_context", context)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ProtocolError(f"LOAD {name} must be a positive integer")
        return cls(dtype, wire, window, context, b.get("direct_hops") is True)


@dataclass
class LoadedRank:
    runtime: RankRuntime
    collective: StarWorker
    head: HeadService | None  # vocabulary-parallel splits only
    load_seconds: float
    # A pipeline stage's lead after the first stage: its stage's index (it sends the
    # stage's output to the master); None otherwise.
    hands_on: int | None = None
    stage: int = 0  # its pipeline stage (0 without a pipeline)
    last_stage: bool = True  # whether its stage ends the model (it holds the final states)
    stage_layers: tuple[int, int] | None = None  # a pipeline rank's layers (None: all)
    # With direct hops, a stage lead's next stage: its output goes straight there as
    # a STEP to these ranks (instead of HIDDEN to the master).
    next_stage: tuple[int, ...] = ()


def load_rank(
    channel: MasterChannel,
    hello: Hello,
    request: LoadRequest,
    shard_dir: Path,
    store: ShardStore,
    options: WorkerOptions,
) -> LoadedRank:
    t0 = time.perf_counter()
    store.verify(shard_dir, hello.manifest_hash)  # sha256, once per unchanged shard
    shard = RankShard(shard_dir)
    m = shard.manifest
    if m.rank != hello.rank or m.world != hello.world:
        raise ShardError(
            f"shard is rank {m.rank}/{m.world}, master asked for {hello.rank}/{hello.world}"
        )
    stage_index, stage = m.partition.stage_of(m.rank)
    stages = m.partition.stages
    last = stages is None or stage_index == len(stages) - 1
    hands_on = (
        stage_index if stage is not None and stage_index > 0 and stage.lead == m.rank else None
    )
    next_stage: tuple[int, ...] = ()
    if request.direct_hops and stage is not None and stage_index > 0:
        collective = direct_collective(channel, hello, request, stages, stage_index, m.rank)
        if hands_on is not None and not last:
            next_stage, hands_on = tuple(stages[stage_index + 1].ranks), None
    else:
        solo = stage is not None and len(stage.ranks) == 1
        collective = StarWorker(channel, hello.session, request.wire_dtype, solo=solo)
    head = None
    if shard.has_head:  # a vocabulary-parallel split: this rank's rows of the head
        head = HeadService(shard.config, shard.load_head(request.dtype), collective)
    runtime = build_rank(
        shard,
        request.dtype,
        collective,
        window=options.window or request.window,
        budget_bytes=options.budget_bytes,
        max_context=options.max_context or request.max_context,
        head_bytes=head.head.nbytes() if head else 0,
        echo=log.info,
    )
    load_s = time.perf_counter() - t0
    log.info("loaded rank %d/%d in %.2f s", hello.rank, hello.world, load_s)
    return LoadedRank(
        runtime,
        collective,
        head,
        load_s,
        hands_on,
        stage_index,
        last,
        stage and stage.layers,
        next_stage,
    )


def direct_collective(
    channel: MasterChannel,
    hello: Hello,
    request: LoadRequest,
    stages: list[Stage],
    index: int,
    rank: int,
) -> Collective:
    """A later stage's rank with direct hops: its steps come from the stage before
    (the master's, for stage 1), and its group's allreduce is hubbed by its lead."""
    if index > 1:
        channel.step_source = stages[index - 1].lead
    stage = stages[index]
    if len(stage.ranks) == 1:
        return StarWorker(channel, hello.session, request.wire_dtype, solo=True)
    if rank != stage.lead:
        channel.hub = stage.lead
        return StarWorker(channel, hello.session, request.wire_dtype)
    members = {r: channel.peers[r] for r in stage.ranks if r != rank}
    return GroupHub(
        members, channel.receive_from, channel.send_to, hello.session, request.wire_dtype
    )
