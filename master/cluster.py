"""The master's session with its workers for one split model.

connect and authenticate (tpi.master.connection) -> push missing shards
(tpi.master.shard_sender) -> LOAD (with a data link where the worker offers
one) -> READY -> steps -> END. Any worker that refuses, does not answer or
disappears is reported by rank and address.

`start` returns the cluster's Topology (tpi.master.topology): the groups of
workers that each step starts on and whose partials are summed together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tpi.comm.data_link import connect as connect_data_link
from tpi.comm.links import ClusterError, WorkerLink
from tpi.comm.wire import Kind, encode_control
from tpi.dtypes import DTYPES
from tpi.master.connection import CONNECT_TIMEOUT_S, WorkerConnections
from tpi.master.direct_hops import open_direct_hops, peer_routes, route
from tpi.master.shard_sender import VERIFY_TIMEOUT_S, ShardSender
from tpi.master.topology import Topology
from tpi.model.partition import Stage
from tpi.storage.split import read_split_index


@dataclass(kw_only=True)
class ClusterSession(WorkerConnections):
    split_dir: Path
    dtype: str = "fp32"
    wire_dtype: str = "fp32"
    progress: Callable[[int, int, str], None] | None = None
    window: int | None = None
    windows: dict[int, int | None] | None = None  # per worker rank, from a plan (else `window`)
    max_context: int | None = None
    # Allreduce frames over a direct TCP connection per worker (tpi.comm.data_link),
    # where the worker offers one; off: everything over ZeroMQ.
    data_link: bool = True
    # A pipeline's later stages hand their outputs on among themselves (where every
    # pair of them can link up: tpi.master.direct_hops); off: through the master.
    direct_hops: bool = True
    pushed_bytes: int = 0
    worker_info: dict[int, dict] = field(default_factory=dict)
    topology: Topology | None = None

    def __post_init__(self) -> None:
        self.index = read_split_index(self.split_dir)
        world = int(self.index["world"])
        if len(self.addresses) != world - 1:
            raise ClusterError(
                f"this split is for {world} ranks (master + {world - 1} workers) "
                f"but {len(self.addresses)} worker address(es) were given"
            )
        super().__post_init__()

    def rank_dir(self, rank: int) -> Path:
        return self.split_dir / self.index["ranks"][rank]["dir"]

    def _manifest_of(self, rank: int) -> str:
        """What HELLO asks `rank` to run: the sha256 of its shard's manifest."""
        return self.index["ranks"][rank]["manifest_sha256"]

    def start(self) -> Topology:
        super().start()
        assert self.topology is not None
        return self.topology

    def _start(self) -> None:
        welcomes = self._handshake()
        need = [r for r, m in welcomes.items() if not m.body["have_shard"]]
        if need:
            self._push({r: welcomes[r].body["partial"] for r in need})
        direct = self._direct_hops(welcomes)
        for link in self.links.links:
            body = {
                "session": self.session,
                "dtype": self.dtype,
                "wire_dtype": self.wire_dtype,
                "window": self.windows.get(link.rank, self.window) if self.windows else self.window,
                "max_context": self.max_context,
                "data_link": self._open_data_link(link, welcomes[link.rank].body),
                "direct_hops": direct,
            }
            link.send([encode_control(Kind.LOAD, body)])
        ranks = set(range(1, self.world))
        ready = self._expect({Kind.READY}, VERIFY_TIMEOUT_S, ranks, "while loading its shard")
        self.worker_info = {r: m.body for r, m in ready.items()}
        self.topology = Topology.build(
            self.index, self.inbox, DTYPES[self.wire_dtype], self.timeout_s, direct
        )

    def _direct_hops(self, welcomes: dict) -> bool:
        """Whether a pipeline's later stages link up to hand their outputs on."""
        stages = [Stage.from_dict(d) for d in self.index.get("stages") or ()]
        if len(stages) < 2 or not self.direct_hops or self.index.get("vocab_parallel"):
            return False  # (a vocabulary-parallel head's steps start on every rank)
        if self.curve is not None:
            self.echo(
                "direct hops between pipeline stages off under --curve (their links would "
                "travel unencrypted): their outputs go through the master"
            )
            return False
        return open_direct_hops(
            self.links.links, self.session, stages, welcomes, self._expect, self.echo
        )

    def _push(self, partials: dict[int, dict]) -> None:
        self.pushed_bytes += ShardSender(self, self.rank_dir, self.progress).push(partials)

    def _open_data_link(self, link: WorkerLink, welcome: dict) -> bool:
        """Connect the worker's data link if it offers one (tpi.comm.data_link);
        False: its allreduces stay on the control link."""
        port, ticket = welcome.get("data_port"), welcome.get("data_ticket")
        if not self.data_link or self.curve is not None or not isinstance(port, int) or not port:
            return False
        host = link.address[len("tcp://") :].rpartition(":")[0].strip("[]")
        host, port = route(peer_routes(), "master", link.address) or (host, port)
        try:
            data = connect_data_link(
                host,
                port,
                self.session,
                bytes.fromhex(str(ticket)),
                self.timeout_s,
                CONNECT_TIMEOUT_S,
            )
        except (OSError, ValueError) as e:
            self.echo(
                f"rank {link.rank} ({link.name}): no data link on port {port} ({e}); "
                "its allreduces go over the control link"
            )
            return False
        self.links.attach_data(link, data)
        return True
