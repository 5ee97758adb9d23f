"""One master session on a worker: admit the master (worker.handshake), load
the rank (worker.rank_loader), then run the steps it sends until it leaves."""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from tpi.comm.data_link import DataListener, new_ticket
from tpi.comm.links import Inbound, WorkerEndpoint
from tpi.comm.wire import Kind, Message, ProtocolError, encode_control, payload_ids, payload_tensor
from tpi.errors import TpiError
from tpi.model.batch import BatchPlan, PlanError
from tpi.planning.request import PROBE_MANIFEST
from tpi.quant.formats import weight_nbytes
from tpi.runtime.node_stats import node_stats
from tpi.storage.read_check import CorruptShard
from tpi.worker.handshake import Hello, Refused, admit
from tpi.worker.master_channel import MasterChannel, SessionEnded
from tpi.worker.options import WorkerOptions
from tpi.worker.profile_service import serve_profile
from tpi.worker.rank_loader import LoadedRank, LoadRequest, load_rank
from tpi.worker.store import ShardStore

log = logging.getLogger("tpi.worker")
DATA_ACCEPT_TIMEOUT_S = 10.0  # the master connects before it sends LOAD
DATA_TIMEOUT_S = 60.0  # a message that stops halfway, or a master that stops reading


class Session:
    def __init__(
        self,
        endpoint: WorkerEndpoint,
        store: ShardStore,
        hello_msg: Inbound,
        body: dict,
        options: WorkerOptions,
        data_listener: DataListener | None = None,
    ) -> None:
        self.hello = Hello.from_body(body)
        self.data_listener = data_listener
        self.channel = MasterChannel(endpoint, hello_msg, self.hello.session, self.hello.rank)
        self.store = store
        self.options = options
        self.rank = self.hello.rank
        self.world = self.hello.world
        self.loaded: LoadedRank | None = None
        self.handover: Inbound | None = None
        self.compute_seconds = 0.0
        self.steps = 0

    def run(self) -> str:
        """Serve until the session ends; returns why it ended."""
        channel = self.channel
        shard_dir = None
        try:
            if self.hello.manifest_hash == PROBE_MANIFEST:
                return self._probe_only()
            ticket = new_ticket()
            offer = {}
            if self.data_listener is not None:
                offer = {"data_port": self.data_listener.port, "data_ticket": ticket.hex()}
            shard_dir = admit(channel, self.hello, self.options, self.store, offer)
            msg = channel.next(None)
            if msg.kind != Kind.LOAD:
                raise SessionEnded(f"expected LOAD, got {msg.kind.name}")
            if msg.body.get("data_link") is True and self.data_listener is not None:
                try:
                    channel.data = self.data_listener.accept(
                        self.hello.session, ticket, DATA_ACCEPT_TIMEOUT_S, DATA_TIMEOUT_S
                    )
                except TimeoutError as e:
                    raise SessionEnded(str(e)) from None
            self.loaded = load_rank(
                channel,
                self.hello,
                LoadRequest.from_message(msg),
                shard_dir,
                self.store,
                self.options,
            )
            channel.keep_steps = self.loaded.stage_layers is not None
            plan = self.loaded.runtime.plan
            channel.control(
                Kind.READY,
                load_seconds=self.loaded.load_seconds,
                resident_bytes=self.loaded.runtime.layers.resident_bytes,
                max_context=self.loaded.runtime.decoder.max_positions,
                plan=plan.to_dict(),
                plan_text=plan.describe(),
            )
            while True:
                self._serve(channel.next(None))
        except SessionEnded as e:
            self.handover = e.handover
            return str(e)
        except Refused as e:
            body = {"session": self.hello.session, "reason": str(e)}
            channel.endpoint.send(channel.peer, [encode_control(Kind.REFUSE, body)])
            return f"refused: {e}"
        except CorruptShard as e:
            why = str(e)
            if shard_dir is not None and self.store.discard_pushed(shard_dir):
                why += "; it was removed and will be pushed again next session"
            return self._report(f"CorruptShard: {why}")
        except Exception as e:  # whatever broke, the master hears why (never a silent wait)
            if not isinstance(e, TpiError | RuntimeError | MemoryError | OSError):
                log.exception("session failed")
            return self._report(f"{type(e).__name__}: {e}")
        finally:
            # Dropping the data link tells a master waiting on it that this session is
            # over (after an ERROR, which went first on the control link).
            channel.close_data()
            # Free weights, KV cache and the loader thread before the next master.
            if self.loaded is not None:
                self.loaded.runtime.close()
            self.loaded = None

    def _probe_only(self) -> str:
        """A session that only measures (tpi plan, --plan auto): no shard, no LOAD."""
        self.channel.control(Kind.WELCOME, have_shard=False, partial={})
        while True:
            msg = self.channel.next(None)
            if msg.kind != Kind.PROFILE_REQUEST:
                raise SessionEnded(f"unexpected {msg.kind.name} in a probe session")
            serve_profile(self.channel, msg, self.options, self.store)

    def _report(self, message: str) -> str:
        """Tell the master what broke here; the daemon then goes back to waiting."""
        with contextlib.suppress(SessionEnded):
            self.channel.control(Kind.ERROR, message=message)
        return f"error: {message}"

    def _serve(self, msg: Message) -> None:
        loaded = self.loaded
        if msg.kind == Kind.STEP:
            self._step(msg)
        elif msg.kind == Kind.STEP_TOKENS:
            self._step_tokens(msg)
        elif msg.kind == Kind.HEAD_MORE:
            if loaded.head is None or msg.body["step"] != loaded.collective.step:
                raise ProtocolError("HEAD_MORE for a step this worker did not sample")
            loaded.head.more(msg.body["row"], msg.body["round"], msg.body["count"])
        elif msg.kind == Kind.STATS_REQUEST:
            self.send_stats()
        elif msg.kind == Kind.PROFILE_REQUEST:
            serve_profile(self.channel, msg, self.options, self.store)
        else:
            raise SessionEnded(f"unexpected {msg.kind.name}")

    def _step(self, msg: Message) -> None:
        h, loaded = msg.data, self.loaded
        decoder = loaded.runtime.decoder
        if len(h.shape) != 2 or h.shape[1] != decoder.cfg.hidden_size:
            raise ProtocolError(f"malformed STEP {h}")
        if loaded.head is not None:
            raise ProtocolError("STEP with hidden states sent to a vocabulary-parallel rank")
        plan = _plan(h.plan, h.shape[0])
        x = payload_tensor(msg.payload, h).to(decoder.dtype, copy=True)
        loaded.collective.step, loaded.collective.pos = h.step, h.pos
        t0 = time.perf_counter()
        out = decoder.run(x, plan, h.chunks)
        if loaded.hands_on is not None:  # the next stage starts from here
            loaded.collective.send_hidden(out, loaded.hands_on, h.pos)
        self.compute_seconds += time.perf_counter() - t0
        self.steps += 1

    def _step_tokens(self, msg: Message) -> None:
        b, loaded = msg.body, self.loaded
        decoder = loaded.runtime.decoder
        if loaded.head is None:
            raise ProtocolError("STEP_TOKENS sent to a rank without a vocabulary slice")
        ids = payload_ids(msg.payload, decoder.cfg.vocab_size)
        if b["chunks"] < 1:
            raise ProtocolError(f"malformed STEP_TOKENS {b}")
        plan = _plan(b["plan"], ids.numel())
        pos = plan.segments[0].pos
        loaded.collective.step, loaded.collective.pos = b["step"], pos
        t0 = time.perf_counter()
        x = loaded.head.embed(ids, decoder.dtype)
        if loaded.stage == 0:
            h = decoder.run(x, plan, b["chunks"])
        else:  # a later pipeline stage: its input comes when the stages before are done
            h = self._expect_data(Kind.STEP, x.shape, b["step"]).to(decoder.dtype, copy=True)
            h = decoder.run(h, plan, 1)
            if loaded.hands_on is not None:
                loaded.collective.send_hidden(h, loaded.hands_on, pos)
        if not loaded.last_stage and b["head"].get("mode") != "none":
            # The final states, for this rank's head rows.
            h = self._expect_data(Kind.FINAL, x.shape, b["step"]).to(decoder.dtype)
        loaded.head.answer(h, b["head"])
        self.compute_seconds += time.perf_counter() - t0
        self.steps += 1

    def _expect_data(self, kind: Kind, shape, step: int) -> torch.Tensor:
        """The next message, which must be `kind` of this step and shape (a pipeline
        stage's input, or its final states). The stages before may take long; a
        master that vanishes meanwhile is noticed by its link."""
        msg = self.channel.next(None)
        while msg.kind in (Kind.STATS_REQUEST, Kind.PROFILE_REQUEST):  # kept from an allreduce
            self._serve(msg)
            msg = self.channel.next(None)
        if msg.kind != kind:
            raise ProtocolError(f"expected {kind.name} of step {step}, got {msg.kind.name}")
        h = msg.data
        if h.step != step or tuple(h.shape) != tuple(shape):
            raise ProtocolError(f"{kind.name} of step {h.step} {h.shape}, expected {step} {shape}")
        return payload_tensor(msg.payload, h)

    def send_stats(self) -> None:
        loaded = self.loaded
        stats = node_stats(
            loaded.runtime.layers if loaded else None,
            loaded.collective.stats if loaded else None,
            self.compute_seconds,
            self.steps,
            decoder=loaded.runtime.decoder if loaded else None,
            head_bytes=weight_nbytes(loaded.head.head.lm_head) if loaded and loaded.head else 0,
        )
        self.channel.control(Kind.STATS, stats=stats)


def _plan(values, tokens: int) -> BatchPlan:
    try:
        return BatchPlan.from_ints(values, tokens)
    except (PlanError, TypeError) as e:
        raise ProtocolError(f"malformed step plan: {e}") from None
