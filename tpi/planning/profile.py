"""A node's profile: what it is (cores, CPU quota, memory, disk) and how fast it
runs slices of a given model, as plain data that travels as JSON.

Measuring lives in tpi.planning.device_probe and tpi.planning.slice_probe; this
module only defines the data and turns measured points into the curves the cost
model reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tpi.planning.curves import Curve

SCHEMA = 1


@dataclass(frozen=True)
class DeviceFacts:
    host: str
    cpu: str
    cores: int  # CPUs this process may run on
    threads: int  # torch compute threads
    cpu_limit: float | None  # cgroup CPU quota in cores (None: none)
    # Share of its short-run speed this node keeps over seconds: a 0.25-core
    # cgroup quota, thermal throttling or a busy machine all show up here.
    sustained: float
    memory_total: int
    memory_available: int  # what the OS could still give (MemAvailable)
    memory_limit: int | None  # cgroup limit
    budget_bytes: int | None  # --memory-budget of this node
    rss_bytes: int  # this process now: the runtime's baseline before weights
    disk_read_bytes_per_s: float | None  # cold reads from the store's disk
    disk_path: str | None
    torch: str
    tpi: str
    measured_at: str
    probe_seconds: float
    # The native kernels its slices were timed with (tpi.kernels.build.kernels_summary):
    # an ARM board's NEON, a laptop's AVX2, or torch's where there are none.
    kernels: str | None = None

    @property
    def capacity(self) -> tuple[int, str]:
        """Memory a rank may plan in, and what sets it."""
        options = [(self.memory_available + self.rss_bytes, "free memory")]
        if self.memory_limit is not None:
            options.append((self.memory_limit, "cgroup memory limit"))
        if self.budget_bytes is not None:
            options.append((self.budget_bytes, "--memory-budget"))
        return min(options)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DeviceFacts:
        names = cls.__dataclass_fields__
        return cls(**{k: d.get(k) for k in names})


@dataclass(frozen=True)
class SliceProfile:
    """One node's measured slices of one model shape, in one setting
    (tpi.planning.slice_probe.Setting.key()). Seconds per layer."""

    setting: str
    points: tuple[dict, ...]  # slice_probe.Point.to_dict() each
    head: dict | None = None  # slice_probe.HeadTiming.to_dict(), when measured

    def attention(self) -> Curve:
        return Curve.of([(p["q"], p["attention_s"]) for p in self.points])

    def attention_per_position(self) -> Curve:
        return Curve.of([(p["q"], p["attention_per_position_s"]) for p in self.points])

    def mlp(self) -> Curve:
        return Curve.of([(p["mlp"], p["mlp_s"]) for p in self.points])

    def attention_prefill(self) -> Curve:
        return Curve.of([(p["q"], p["attention_prefill_s"]) for p in self.points])

    def mlp_prefill(self) -> Curve:
        return Curve.of([(p["mlp"], p["mlp_prefill_s"]) for p in self.points])

    def to_dict(self) -> dict:
        return {"setting": self.setting, "points": list(self.points), "head": self.head}

    @classmethod
    def from_dict(cls, d: dict) -> SliceProfile:
        return cls(str(d["setting"]), tuple(d["points"]), d.get("head"))


@dataclass(frozen=True)
class LinkFacts:
    """The master's link to a worker (zero for the master itself)."""

    rtt_s: float = 0.0
    bytes_per_s: float | None = None  # None: not limited (or not measured)
    # CPU seconds one message exchange (a message in, one out) costs the worker
    # and the master: sockets, ZeroMQ's I/O thread, Python. None: not measured.
    worker_cpu_s: float | None = None
    master_cpu_s: float | None = None

    def transfer_s(self, nbytes: float) -> float:
        return nbytes / self.bytes_per_s if self.bytes_per_s else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NodeProfile:
    """Everything the planner knows about one node."""

    name: str  # "master" or the worker's address
    device: DeviceFacts
    slices: dict[str, SliceProfile] = field(default_factory=dict)  # by shape|setting key
    link: LinkFacts = field(default_factory=LinkFacts)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "device": self.device.to_dict(),
            "slices": {k: v.to_dict() for k, v in self.slices.items()},
            "link": self.link.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> NodeProfile:
        return cls(
            name=str(d["name"]),
            device=DeviceFacts.from_dict(d["device"]),
            slices={k: SliceProfile.from_dict(v) for k, v in d.get("slices", {}).items()},
            link=LinkFacts(**d.get("link", {})),
        )


def slices_key(shape_key: str, setting_key: str) -> str:
    return f"{shape_key}|{setting_key}"
