"""One master session on a worker: handshake, shard push, load, then steps."""

from __future__ import annotations

import contextlib
import logging
import time

from tpi.auth import check, new_nonce, proof
from tpi.decoder import Decoder
from tpi.errors import TpiError
from tpi.linear import weight_nbytes
from tpi.links import Inbound, WorkerEndpoint
from tpi.loading import COMPUTE_DTYPES
from tpi.manifest import ShardError
from tpi.node_report import node_stats
from tpi.rank_runtime import RankRuntime, build_rank
from tpi.shard_reader import RankShard
from tpi.star_allreduce import STEP_LAYER, StarWorker, pass_order
from tpi.wire import (
    WIRE_DTYPES,
    DataHeader,
    Kind,
    Message,
    ProtocolError,
    decode,
    encode_control,
    payload_ids,
    payload_tensor,
)
from worker.head_service import HeadService
from worker.options import WorkerOptions
from worker.store import ShardStore

log = logging.getLogger("tpi.worker")

MID_STEP_TIMEOUT_S = 300.0  # backstop only: disconnects are noticed within seconds
AUTH_TIMEOUT_S = 10.0  # a master that does not answer the challenge is dropped


class SessionEnded(Exception):
    """The master ended the session, vanished, or broke the protocol."""

    def __init__(self, why: str, handover: Inbound | None = None) -> None:
        super().__init__(why)
        self.handover = handover  # a new master's HELLO that arrived as this one vanished


class Refused(Exception):
    """The master's request cannot be served; it is told why with REFUSE."""


def peer_address(inb: Inbound) -> str:
    try:
        return inb.frames[0].get("Peer-Address")
    except Exception:
        return "?"


class Session:
    def __init__(
        self,
        endpoint: WorkerEndpoint,
        store: ShardStore,
        hello: Inbound,
        body: dict,
        options: WorkerOptions,
    ) -> None:
        self.endpoint = endpoint
        self.options = options
        self.runtime: RankRuntime | None = None
        self.store = store
        self.peer = hello.peer
        self.fd = hello.fd
        self.addr = peer_address(hello)
        self.id = int(body["session"])
        self.rank = int(body["rank"])
        self.world = int(body["world"])
        self.manifest_hash = str(body["manifest"])
        self.nonce_m = str(body["nonce"])
        self.auth_mode = str(body["auth"])
        self.decoder: Decoder | None = None
        self.collective: StarWorker | None = None
        self.handover: Inbound | None = None
        self.compute_seconds = 0.0
        self.steps = 0
        self.resident_bytes = 0
        self.head: HeadService | None = None  # vocabulary-parallel splits only

    # --- messaging -------------------------------------------------------------------

    def send(self, frames: list) -> None:
        if not self.endpoint.send(self.peer, frames):
            raise SessionEnded("master disconnected")

    def control(self, kind: Kind, **body) -> None:
        self.send([encode_control(kind, {"session": self.id, **body})])

    def _probe_master(self) -> bool:
        """True if our master is still connected (ROUTER_MANDATORY fails a send to a gone peer)."""
        return self.endpoint.send(self.peer, [encode_control(Kind.PING, {"session": self.id})])

    def _master_gone(self) -> bool:
        if self.fd not in self.endpoint.closed_fds:
            return False
        # A disconnect was reported on our master's fd; the event may be stale
        # (fds are reused), so confirm with a probe.
        self.endpoint.closed_fds.discard(self.fd)
        return not self._probe_master()

    def refuse_stranger(self, inb: Inbound) -> None:
        try:
            msg = decode(inb.frames)
        except ProtocolError as e:
            self.endpoint.send(inb.peer, [encode_control(Kind.REFUSE, {"reason": str(e)})])
            return
        if msg.kind == Kind.HELLO:
            if not self._probe_master():
                # Our master is gone (its disconnect not yet reported): serve the newcomer.
                raise SessionEnded("master disconnected", handover=inb)
            reason = f"busy: serving another master ({self.addr}) as rank {self.rank}"
            self.endpoint.send(inb.peer, [encode_control(Kind.REFUSE, {"reason": reason})])

    def recv(self, timeout_s: float | None) -> Message:
        """Next valid message from our master; strangers are answered 'busy'."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._master_gone():
                raise SessionEnded("master disconnected")
            if deadline is not None and time.monotonic() > deadline:
                raise SessionEnded(f"master silent for {timeout_s:g} s")
            inb = self.endpoint.recv(0.5)
            if inb is None:
                continue
            if inb.peer != self.peer:
                self.refuse_stranger(inb)
                continue
            self.fd = inb.fd
            try:
                msg = decode(inb.frames)
            except ProtocolError as e:
                raise SessionEnded(f"protocol error from master: {e}") from None
            body = msg.body
            sid = body.session if isinstance(body, DataHeader) else body.get("session")
            if sid != self.id:
                continue  # a late frame of an earlier session
            if msg.kind == Kind.END:
                raise SessionEnded(f"master ended the session ({body['reason']})")
            if msg.kind == Kind.PING:  # the master measuring the round trip
                self.control(Kind.PONG)
                continue
            if msg.kind == Kind.PONG:
                continue
            return msg

    def wait_sum(self, expected: DataHeader) -> Message:
        """WorkerChannel: the SUM for exactly this step/layer/phase."""
        want = (expected.step, expected.layer, expected.phase, expected.pos)
        while True:
            msg = self.recv(MID_STEP_TIMEOUT_S)
            if msg.kind == Kind.STATS_REQUEST:
                self.send_stats()
                continue
            if msg.kind != Kind.SUM:
                raise SessionEnded(f"expected SUM, got {msg.kind.name}")
            got = (msg.data.step, msg.data.layer, msg.data.phase, msg.data.pos)
            if pass_order(got) < pass_order(want):
                continue  # stale
            if got != want or msg.data.shape != expected.shape:
                raise SessionEnded(
                    f"SUM for {got} {msg.data.shape}, expected {want} {expected.shape}"
                )
            return msg

    # --- phases ---------------------------------------------------------------------

    def run(self) -> str:
        """Serve until the session ends; returns why it ended."""
        try:
            self._handshake()
            self._load(self.recv(None))
            while True:
                msg = self.recv(None)
                if msg.kind == Kind.STEP:
                    self._step(msg)
                elif msg.kind == Kind.STEP_TOKENS:
                    self._step_tokens(msg)
                elif msg.kind == Kind.HEAD_MORE:
                    if self.head is None or msg.body["step"] != self.collective.step:
                        raise ProtocolError("HEAD_MORE for a step this worker did not sample")
                    self.head.more(msg.body["round"], msg.body["count"])
                elif msg.kind == Kind.STATS_REQUEST:
                    self.send_stats()
                else:
                    raise SessionEnded(f"unexpected {msg.kind.name}")
        except SessionEnded as e:
            self.handover = e.handover
            return str(e)
        except Refused as e:
            self.endpoint.send(
                self.peer, [encode_control(Kind.REFUSE, {"session": self.id, "reason": str(e)})]
            )
            return f"refused: {e}"
        except (TpiError, RuntimeError, MemoryError, OSError) as e:
            # Tell the master what broke here, then go back to waiting.
            with contextlib.suppress(SessionEnded):
                self.control(Kind.ERROR, message=f"{type(e).__name__}: {e}")
            return f"error: {e}"
        finally:
            # Free weights, KV cache and the loader thread before the next master.
            if self.runtime is not None:
                self.runtime.close()
            self.runtime = None
            self.decoder = None

    def _authenticate(self) -> None:
        """Mutual proof of the shared secret (see tpi.auth) before anything else."""
        secret = self.options.secret
        if secret is None:
            return
        if self.auth_mode != "hmac":
            raise Refused(
                "this worker requires the cluster's shared secret (set TPI_SECRET or --secret-file on the master)"
            )
        nonce_w = new_nonce()
        self.control(
            Kind.CHALLENGE,
            nonce=nonce_w,
            proof=proof(secret, "worker", self.nonce_m, nonce_w, self.id),
        )
        msg = self.recv(AUTH_TIMEOUT_S)
        if msg.kind != Kind.AUTH or not check(
            secret, msg.body["proof"], "master", self.nonce_m, nonce_w, self.id
        ):
            log.warning("master %s failed authentication", self.addr)
            raise Refused("authentication failed: wrong shared secret")

    def _handshake(self) -> None:
        if not (2 <= self.world <= 1024 and 1 <= self.rank < self.world):
            raise Refused(f"bad rank {self.rank} of world {self.world}")
        self._authenticate()
        found = self.store.find(self.manifest_hash)
        if found is None and not self.options.accept_push:
            raise Refused(
                f"no shard with manifest {self.manifest_hash[:12]}... in {self.store.root} "
                "and this worker does not accept pushed shards"
            )
        partial = {} if found else self.store.partial_sizes(self.manifest_hash)
        self.control(Kind.WELCOME, have_shard=found is not None, partial=partial)
        if found is None:
            found = self._receive_push()
        self.shard_dir = found

    def _receive_push(self):
        received, last_log = 0, time.monotonic()
        while True:
            msg = self.recv(MID_STEP_TIMEOUT_S)
            if msg.kind == Kind.PUSH_CHUNK:
                b = msg.body
                data = msg.payload.buffer if msg.payload is not None else b""
                nxt = self.store.write_chunk(
                    self.manifest_hash, b["file"], b["offset"], b["total"], data
                )
                received += len(data)
                self.control(Kind.PUSH_ACK, file=b["file"], next=nxt)
                if time.monotonic() - last_log > 2:
                    log.info("receiving shard: %.1f MB so far", received / 1e6)
                    last_log = time.monotonic()
            elif msg.kind == Kind.PUSH_DONE:
                log.info("shard received (%.1f MB this session); verifying", received / 1e6)
                path = self.store.finalize(self.manifest_hash)
                self.control(Kind.READY, verified=True)
                return path
            else:
                raise SessionEnded(f"unexpected {msg.kind.name} during shard push")

    def _load(self, msg: Message) -> None:
        if msg.kind != Kind.LOAD:
            raise SessionEnded(f"expected LOAD, got {msg.kind.name}")
        dtype = COMPUTE_DTYPES.get(msg.body["dtype"])
        wire = WIRE_DTYPES.get(msg.body["wire_dtype"])
        if dtype is None or wire is None:
            raise ProtocolError("LOAD names an unknown dtype")
        asked_window = msg.body.get("window")
        asked_context = msg.body.get("max_context")
        for name, v in (("window", asked_window), ("max_context", asked_context)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ProtocolError(f"LOAD {name} must be a positive integer")
        t0 = time.perf_counter()
        self.store.verify(self.shard_dir, self.manifest_hash)  # sha256, once per unchanged shard
        shard = RankShard(self.shard_dir)
        m = shard.manifest
        if m.rank != self.rank or m.world != self.world:
            raise ShardError(
                f"shard is rank {m.rank}/{m.world}, master asked for {self.rank}/{self.world}"
            )
        self.collective = StarWorker(self, self.id, wire)
        head_bytes = 0
        if shard.has_head:  # a vocabulary-parallel split: this rank's rows of the head
            vocab_head = shard.load_head(dtype)
            head_bytes = vocab_head.nbytes()
            self.head = HeadService(shard.config, vocab_head, self.collective)
        # This device's own limits win over what the master asks for.
        opts = self.options
        self.runtime = build_rank(
            shard,
            dtype,
            self.collective,
            window=opts.window or asked_window,
            budget_bytes=opts.budget_bytes,
            max_context=opts.max_context or asked_context,
            head_bytes=head_bytes,
            echo=log.info,
        )
        self.decoder = self.runtime.decoder
        self.resident_bytes = self.runtime.layers.resident_bytes
        load_s = time.perf_counter() - t0
        log.info("loaded rank %d/%d in %.2f s", self.rank, self.world, load_s)
        self.control(
            Kind.READY,
            load_seconds=load_s,
            resident_bytes=self.resident_bytes,
            plan=self.runtime.plan.to_dict(),
            plan_text=self.runtime.plan.describe(),
        )

    def _step(self, msg: Message) -> None:
        h = msg.data
        if h.layer != STEP_LAYER or len(h.shape) != 2 or h.shape[1] != self.decoder.cfg.hidden_size:
            raise ProtocolError(f"malformed STEP {h}")
        if self.head is not None:
            raise ProtocolError("STEP with hidden states sent to a vocabulary-parallel rank")
        x = payload_tensor(msg.payload, h).to(self.decoder.dtype, copy=True)
        self.collective.step, self.collective.pos = h.step, h.pos
        t0 = time.perf_counter()
        self.decoder.forward(x, h.pos, chunks=max(1, h.phase))
        self.compute_seconds += time.perf_counter() - t0
        self.steps += 1

    def _step_tokens(self, msg: Message) -> None:
        b = msg.body
        if self.head is None:
            raise ProtocolError("STEP_TOKENS sent to a rank without a vocabulary slice")
        ids = payload_ids(msg.payload, self.decoder.cfg.vocab_size)
        if b["pos"] < 0 or b["chunks"] < 1:
            raise ProtocolError(f"malformed STEP_TOKENS {b}")
        self.collective.step, self.collective.pos = b["step"], b["pos"]
        t0 = time.perf_counter()
        x = self.head.embed(ids, self.decoder.dtype)
        h = self.decoder.forward(x, b["pos"], chunks=b["chunks"])
        self.head.answer(h, b["head"])
        self.compute_seconds += time.perf_counter() - t0
        self.steps += 1

    def send_stats(self) -> None:
        stats = node_stats(
            self.runtime.layers if self.runtime else None,
            self.collective.stats if self.collective else None,
            self.compute_seconds,
            self.steps,
            decoder=self.decoder,
            head_bytes=weight_nbytes(self.head.head.lm_head) if self.head else 0,
        )
        self.control(Kind.STATS, stats=stats)
