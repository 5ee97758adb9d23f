"""The worker daemon: wait for a master, serve its session, wait again."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import zmq

from tpi.comm.curve import CurveKeys
from tpi.comm.data_link import DataListener
from tpi.comm.links import WorkerEndpoint, display_address
from tpi.comm.wire import DATA_KINDS, PROTOCOL_VERSION, Kind, ProtocolError, decode, encode_control
from tpi.worker.admission import Admission
from tpi.worker.master_channel import peer_address
from tpi.worker.options import WorkerOptions
from tpi.worker.session import Session
from tpi.worker.store import ShardStore
from tpi.worker.watchdog import beat

log = logging.getLogger("tpi.worker")

IDLE_POLL_S = 0.5


class WorkerDaemon:
    def __init__(
        self,
        listen: str,
        store: Path,
        curve: CurveKeys | None = None,
        options: WorkerOptions | None = None,
    ) -> None:
        self.curve = curve
        self.options = options or WorkerOptions()
        self.ctx = zmq.Context()
        self.store = ShardStore(store)
        self.endpoint = WorkerEndpoint(self.ctx, listen, curve.secure_server if curve else None)
        self.admission = Admission(self.endpoint, self.options.secret)
        self.data_listener = self._listen_for_data()
        self.sessions_served = 0
        self.pending = None  # a HELLO handed over by a session whose master vanished

    def _listen_for_data(self) -> DataListener | None:
        """The data link's socket (tpi.comm.data_link); None: allreduces stay on ZeroMQ."""
        if self.options.data_port is None or self.curve is not None:
            return None  # under CurveZMQ the data link would travel unencrypted
        host = display_address(self.endpoint.address).rpartition(":")[0].strip("[]")
        host = "0.0.0.0" if host == "*" else host  # ZeroMQ's "any interface"
        try:
            listener = DataListener(host, self.options.data_port)
        except OSError as e:
            log.warning(
                "no data link (cannot listen on %s port %d: %s); allreduces use the control port",
                host,
                self.options.data_port,
                e.strerror or e,
            )
            return None
        log.info("data link on port %d", listener.port)
        return listener

    @property
    def address(self) -> str:
        return self.endpoint.address

    def serve(self, stop: threading.Event | None = None, max_sessions: int | None = None) -> None:
        stop = stop or threading.Event()
        log.info("listening on %s (store %s)", display_address(self.address), self.store.root)
        try:
            while not stop.is_set():
                if max_sessions is not None and self.sessions_served >= max_sessions:
                    return
                inb = self.pending or self.endpoint.recv(IDLE_POLL_S)
                beat()
                self.pending = None
                if inb is None:
                    self.admission.expire()
                    continue
                start = self._idle_message(inb)
                if start is not None:
                    self._serve_one(*start)
        finally:
            self.close()

    def _idle_message(self, inb) -> tuple | None:
        """Handle one message while no session runs; returns a session to start."""
        try:
            msg = decode(inb.frames)
        except ProtocolError as e:
            self.endpoint.send(inb.peer, [encode_control(Kind.REFUSE, {"reason": str(e)})])
            return None
        if msg.kind == Kind.HELLO and msg.version != PROTOCOL_VERSION:
            reason = f"protocol version {msg.version}, this worker speaks {PROTOCOL_VERSION} (upgrade one side)"
            self.endpoint.send(inb.peer, [encode_control(Kind.REFUSE, {"reason": reason})])
            return None
        if msg.kind == Kind.HELLO:
            return self.admission.hello(inb, msg)
        if msg.kind == Kind.AUTH:
            return self.admission.auth(inb, msg)
        if msg.kind not in DATA_KINDS and msg.kind != Kind.END:
            reason = f"no session: send HELLO first (got {msg.kind.name})"
            self.endpoint.send(inb.peer, [encode_control(Kind.REFUSE, {"reason": reason})])
        return None  # late frames of a finished session are dropped quietly

    def _serve_one(self, inb, body: dict) -> None:
        session = Session(self.endpoint, self.store, inb, body, self.options, self.data_listener)
        log.info(
            "master %s connected: rank %d of %d", peer_address(inb), session.rank, session.world
        )
        try:
            why = session.run()
        except Exception as e:  # a bug must not take the daemon down
            log.exception("session failed")
            why = f"internal error: {e}"
        self.sessions_served += 1
        self.pending = session.handover
        log.info("session ended: %s; waiting for a master", why)

    def close(self) -> None:
        if self.data_listener is not None:
            self.data_listener.close()
        self.endpoint.close()
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()
