"""One master session on a worker: admit the master (worker.handshake), load
the rank (worker.rank_loader), then run the steps it sends (worker.steps) and
answer its requests until it leaves."""

from __future__ import annotations

import contextlib
import logging

from tpi.comm.data_link import DataListener, new_ticket
from tpi.comm.links import Inbound, WorkerEndpoint
from tpi.comm.wire import Kind, Message, encode_control
from tpi.errors import TpiError
from tpi.planning.request import PROBE_MANIFEST
from tpi.quant.formats import weight_nbytes
from tpi.runtime.node_stats import node_stats
from tpi.storage.read_check import CorruptShard
from tpi.worker.handshake import Hello, Refused, admit
from tpi.worker.master_channel import MasterChannel, PeerLost, SessionEnded
from tpi.worker.options import WorkerOptions
from tpi.worker.peers import (
    MAX_PEER_PINGS,
    PeerSetupFailed,
    open_peer_links,
    peer_links,
    peer_round_trips,
)
from tpi.worker.profile_service import serve_profile
from tpi.worker.rank_loader import LoadedRank, LoadRequest, load_rank
from tpi.worker.steps import RankSteps
from tpi.worker.store import ShardStore
from tpi.worker.watchdog import beat

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
        self.steps: RankSteps | None = None
        self.handover: Inbound | None = None

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
            if msg.kind == Kind.PEERS:  # a pipeline's direct hops: links to other workers
                self._open_peers(msg)
                msg = channel.next(None)
            if msg.kind != Kind.LOAD:
                raise SessionEnded(f"expected LOAD, got {msg.kind.name}")
            if msg.body.get("direct_hops") is not True:
                for link in channel.peers.values():
                    link.close()
                channel.peers = {}
            if msg.body.get("data_link") is True and self.data_listener is not None:
                try:
                    channel.data = self.data_listener.accept(
                        self.hello.session, ticket, DATA_ACCEPT_TIMEOUT_S, DATA_TIMEOUT_S, beat
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
            self.steps = RankSteps(channel, self.loaded, self._serve)
            memory = self.loaded.runtime.memory
            channel.control(
                Kind.READY,
                load_seconds=self.loaded.load_seconds,
                resident_bytes=self.loaded.runtime.layers.resident_bytes,
                max_context=self.loaded.runtime.decoder.max_positions,
                memory=memory.to_dict(),
                memory_text=memory.describe(),
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
        except PeerLost as e:  # the master names the other worker, not this one
            return self._report(str(e), peer_rank=e.rank)
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
            self.loaded = self.steps = None

    def _probe_only(self) -> str:
        """A session that only measures (tpi plan, --plan auto): no shard, no LOAD.
        Besides this device's profile, the round trips to the other workers: the
        master links them (PEERS) and asks each in turn to time its links, while
        the others echo."""
        offer = {"data_port": self.data_listener.port} if self.data_listener else {}
        self.channel.control(Kind.WELCOME, have_shard=False, partial={}, **offer)
        self.channel.echo_peers = True
        while True:
            msg = self.channel.next(None)
            if msg.kind == Kind.PROFILE_REQUEST:
                serve_profile(self.channel, msg, self.options, self.store)
            elif msg.kind == Kind.PEERS:
                self._open_peers(msg)
            elif msg.kind == Kind.PEER_RTT_REQUEST:
                pings = max(1, min(msg.body["pings"], MAX_PEER_PINGS))
                rtts = peer_round_trips(self.channel, pings)
                self.channel.control(Kind.PEER_RTT, rtts={str(r): t for r, t in rtts.items()})
            else:
                raise SessionEnded(f"unexpected {msg.kind.name} in a probe session")

    def _report(self, message: str, **extra) -> str:
        """Tell the master what broke here; the daemon then goes back to waiting."""
        with contextlib.suppress(SessionEnded):
            self.channel.control(Kind.ERROR, message=message, **extra)
        return f"error: {message}"

    def _open_peers(self, msg: Message) -> None:
        """The direct links PEERS asks for; PEERED says whether they are all open
        (if not, the master keeps every hop through itself)."""
        try:
            self.channel.peers = open_peer_links(
                peer_links(msg), self.data_listener, self.hello.session, DATA_TIMEOUT_S, beat
            )
            failed = ""
        except PeerSetupFailed as e:
            failed = str(e)
            log.warning("direct links to other workers: %s", failed)
        self.channel.control(Kind.PEERED, failed=failed)

    def _serve(self, msg: Message) -> None:
        steps = self.steps
        if msg.kind == Kind.STEP:
            steps.step(msg)
        elif msg.kind == Kind.STEP_TOKENS:
            steps.step_tokens(msg)
        elif msg.kind == Kind.HEAD_MORE:
            steps.head_more(msg)
        elif msg.kind == Kind.STATS_REQUEST:
            self.send_stats()
        elif msg.kind == Kind.PROFILE_REQUEST:
            serve_profile(self.channel, msg, self.options, self.store)
        else:
            raise SessionEnded(f"unexpected {msg.kind.name}")

    def send_stats(self) -> None:
        loaded, steps = self.loaded, self.steps
        stats = node_stats(
            loaded.runtime.layers if loaded else None,
            loaded.collective.stats if loaded else None,
            steps.compute_seconds if steps else 0.0,
            steps.steps if steps else 0,
            decoder=loaded.runtime.decoder if loaded else None,
            head_bytes=weight_nbytes(loaded.head.head.lm_head) if loaded and loaded.head else 0,
        )
        self.channel.control(Kind.STATS, stats=stats)
