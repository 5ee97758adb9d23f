"""What a worker's announcement says: the DNS-SD service type and its TXT record.

Everything here is readable by anyone on the network, so it holds only what a
master needs to pick and reach a worker: ports, protocol version, whether it
wants CurveZMQ, and a device summary (cores, memory, free disk). Never the
secret, the shards or the models a worker holds.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVICE_TYPE = "_tpi._tcp.local."


@dataclass(frozen=True)
class DeviceSummary:
    cores: float  # CPUs this device may use (a cgroup quota counts)
    memory_bytes: int  # memory it may use (total, a cgroup limit or its --memory-budget)
    disk_free_bytes: int  # free space where its shards go

    def describe(self) -> str:
        return (
            f"{self.cores:g} cores, {self.memory_bytes / 2**30:.1f} GiB memory, "
            f"{self.disk_free_bytes / 2**30:.0f} GiB free disk"
        )


@dataclass(frozen=True)
class Advert:
    """A worker's TXT record, decoded."""

    port: int  # the control port (ZeroMQ): the SRV record's port
    protocol: int  # wire protocol version (tpi.comm.wire.PROTOCOL_VERSION)
    version: str  # tpi's version
    data_port: int | None  # the data link's port, None: none offered
    curve: bool  # the worker requires CurveZMQ (the master needs --curve)
    device: DeviceSummary

    def properties(self) -> dict[str, str]:
        props = {
            "proto": str(self.protocol),
            "tpi": self.version,
            "curve": "1" if self.curve else "0",
            "cores": f"{self.device.cores:g}",
            "mem": str(self.device.memory_bytes),
            "disk": str(self.device.disk_free_bytes),
        }
        if self.data_port is not None:
            props["data"] = str(self.data_port)
        return props

    @classmethod
    def from_properties(cls, port: int, props: dict) -> Advert | None:
        """The advert in a TXT record (keys and values as bytes or str); None when it
        is not one a tpi worker writes (another program's service of the same type)."""
        text = {_text(k): _text(v) for k, v in props.items() if k is not None}
        try:
            device = DeviceSummary(
                float(text.get("cores") or 0),
                int(text.get("mem") or 0),
                int(text.get("disk") or 0),
            )
            data = text.get("data")
            return cls(
                port,
                int(text["proto"]),
                text.get("tpi") or "?",
                int(data) if data else None,
                text.get("curve") == "1",
                device,
            )
        except (KeyError, ValueError):
            return None


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Sighting:
    """A worker seen on the network: its announcement and where it answers."""

    name: str  # the DNS-SD instance name
    host: str  # an IPv4 address it announced
    advert: Advert

    @property
    def address(self) -> str:
        return f"{self.host}:{self.advert.port}"
