"""PROFILE_REQUEST on a worker: measure this device (and the model's slices the
master names) and answer with a PROFILE. Measuring takes seconds the first time
and is cached (tpi.planning.device_probe); a probe session (HELLO with
tpi.planning.request.PROBE_MANIFEST) exists only for this, before any shard."""

from __future__ import annotations

import logging
import time

from tpi.comm.wire import Kind, Message
from tpi.planning.request import ProfileRequest, answer
from tpi.worker.master_channel import MasterChannel
from tpi.worker.options import WorkerOptions
from tpi.worker.store import ShardStore

log = logging.getLogger("tpi.worker")


def serve_profile(
    channel: MasterChannel, msg: Message, options: WorkerOptions, store: ShardStore
) -> None:
    req = ProfileRequest.from_body(msg.body["request"])
    t0 = time.perf_counter()
    profile = answer(req, store.root, options.budget_bytes, echo=log.info)
    log.info("profile measured/read in %.1f s", time.perf_counter() - t0)
    channel.control(Kind.PROFILE, profile=profile)
